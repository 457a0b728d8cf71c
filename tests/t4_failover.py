"""Forced failover and split brain between real nodes (small volume, no filesystem).

* SIGKILL the primary a in the middle of fsynced writes that its mirror b has not all fetched,
  ``primary --force`` on b (it says what may be lost), write on b, restart a: both a and b
  report the split brain (fork LSN, both tails), a refuses writes (EROFS) and keeps its tail.
  Ten runs, every one must show it.
* A mirror c that lagged before the fork (its fetch paused) follows b by itself, becomes
  identical to it, and is not in a split brain. Right after the failover b lists the lost a
  not as its mirror but as not following epoch 2; its loss line goes with the next handover.
* The split-brain figures say each side wrote its tail as primary, the same on both sides.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from marsfs.testing.checks import Writer, sha, status, wait_for, wait_synced, write_synced
from marsfs.testing.harness import Harness, NodeProcess

SIZE = "8M"
RUNS = 10


def pair(harness: Harness, names: list[str]) -> list[NodeProcess]:
    nodes = harness.cluster(names)
    first = nodes[names[0]]
    first.cli("create", "vm", "--size", SIZE)
    for n in names[1:]:
        nodes[n].cli("join", "vm", "--from", names[0])
    for n in names[1:]:
        wait_synced(nodes[n], "vm")
    return [nodes[n] for n in names]


def lose(node: NodeProcess) -> None:
    node.kill()
    node.abort()
    node.unmount()


@pytest.mark.allow_log("forced failover", "split brain", "stopped: .*diverged")
@pytest.mark.parametrize("run", range(RUNS))
def test_failover_then_split_brain_seen_by_both(harness: Harness, run: int) -> None:
    a, b = pair(harness, ["a", "b"])
    w = Writer(a.image("vm"), seed=run, slot=16 * 1024)
    w.write(5)
    wait_synced(b, "vm")
    b.cli("pause-fetch", "vm")  # b falls behind: what a writes now is a's alone
    w.start(None, pause=0.005)
    wait_for(lambda: w.done >= 20 and status(b, "vm")["lag_records"] > 0, what="writes on a that b heard of")
    w.crash_expected = True
    lose(a)  # SIGKILL in the middle of writing
    w.crashed()
    fork = status(b, "vm")["durable_lsn"]
    r = b.cli("primary", "vm", "--force")
    assert "failover without a" in r.stdout and "lost at least" in r.stdout, r.stdout
    sb = status(b, "vm")
    assert sb["role"] == "primary" and sb["epoch"] == 2 and sb["failover_loss"]["records"] > 0
    write_synced(b.image("vm"), 4 * 1024 * 1024, b"b's own history".ljust(4096, b"."))
    a.start()
    for n in (a, b):
        wait_for(lambda n=n: status(n, "vm")["state"] == "split-brain", timeout=60,
                 what=f"{n.name} to report the split brain")
    sa, sb = status(a, "vm"), status(b, "vm")
    assert sa["fork_lsn"] == sb["fork_lsn"] == fork, (sa["fork_lsn"], sb["fork_lsn"], fork)
    (xa,), (xb,) = sa["split_brain"], sb["split_brain"]
    assert (xa["peer"], xb["peer"]) == ("b", "a") and xa["exact"] and xb["exact"]
    assert xa["own_records"] == xb["peer_records"] == sa["head_lsn"] - fork > 0
    assert xb["own_records"] == xa["peer_records"] == sb["head_lsn"] - fork > 0
    # each wrote its whole tail as primary, and both sides say so
    assert xa["own_written"] == xb["peer_written"] == xa["own_records"]
    assert xb["own_written"] == xa["peer_written"] == xb["own_records"]
    assert any("split brain with b" in e for e in sa["errors"])
    with pytest.raises(OSError) as e:
        os.open(a.image("vm"), os.O_RDWR)
    assert e.value.errno == errno.EROFS
    time.sleep(1)
    assert status(a, "vm")["head_lsn"] == sa["head_lsn"]  # a keeps its tail, takes nothing of b's


@pytest.mark.allow_log("forced failover")
def test_a_mirror_lagging_before_the_fork_follows_the_survivor(harness: Harness) -> None:
    a, b, c = pair(harness, ["a", "b", "c"])
    w = Writer(a.image("vm"), seed=42)
    w.write(10)
    wait_synced(c, "vm")
    c.cli("pause-fetch", "vm")  # c lags from here
    w.write(20)
    wait_synced(b, "vm")
    lose(a)
    b.cli("primary", "vm", "--force")
    sb = status(b, "vm")
    assert sb["failover_loss"] is not None and [p["node"] for p in sb["peers"]] in ([], ["c"])
    [pa] = [p for p in sb["positions"] if p["node"] == "a"]
    assert "not following b (epoch 2) yet" in pa["stale"], pa  # the lost primary, not a mirror
    w.image = b.image("vm")
    w.write(10)
    c.cli("resume-fetch", "vm")
    wait_for(lambda: status(c, "vm").get("source") == "b", timeout=60, what="c to follow b")
    wait_synced(c, "vm")
    sc = status(c, "vm")
    assert sc["state"] == "synced" and not sc["split_brain"] and sc["epoch"] == 2
    assert sha(c.image("vm")) == sha(b.image("vm"))
    assert w.check_prefix(c.image("vm")) == 40
    c.cli("primary", "vm")  # a later epoch: b's failover loss is no news any more
    wait_for(lambda: status(b, "vm")["role"] == "mirror", what="b to follow c")
    assert status(b, "vm")["failover_loss"] is None
