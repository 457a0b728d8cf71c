"""A forced failover asks the reachable members first, and either side of a split brain can win.

One cluster of real nodes: a is primary, b its synced mirror, c a mirror whose fetch is paused;
6 MiB are written on a (so b holds them and c does not), and a is SIGKILLed. Then

* ``primary --force`` on c is refused: the line names b, how much more it holds (in MiB) and
  what to run; nothing changes on c;
* with ``--accept-loss`` it proceeds, and the loss it reports and records is measured from b's
  position (what b holds beyond c, exactly), not from c's last word from a;
* c writes, and b (which holds a's records c never had) is in a split brain with c. The
  operator keeps b's history: ``primary --force`` on b makes b the primary (the other side is
  fenced), ``invalidate`` on c keeps c's writes as a split version and resyncs c from b. c
  ends identical to b, with a's 6 MiB, and both leave the split-brain state.
"""

from __future__ import annotations

import random

import pytest

from marsfs.testing.checks import sha, status, wait_for, wait_synced, write_synced
from marsfs.testing.harness import Harness, NodeProcess

MiB = 1 << 20
WRITTEN = 6  #: MiB written on a that b fetches and c does not
MARK = b"c's own history".ljust(64 * 1024, b".")  #: what c writes after its failover
MARK_AT = 12 * MiB


def lose(node: NodeProcess) -> None:
    node.kill()
    node.abort()
    node.unmount()


@pytest.mark.allow_log("forced failover", "split brain", "stopped: .*diverged")
def test_failover_onto_a_lagging_mirror_is_refused_and_either_side_can_survive(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b", "c"])
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    a.cli("create", "vm", "--size", "16M")
    for n in (b, c):
        n.cli("join", "vm", "--from", "a", "--wait")
    c.cli("pause-fetch", "vm")
    rng = random.Random(16)
    data = rng.randbytes(WRITTEN * MiB)  # random: the log holds about as many bytes
    for i in range(WRITTEN):
        write_synced(a.image("vm"), i * MiB, data[i * MiB:(i + 1) * MiB])
    wait_synced(b, "vm")
    lose(a)
    c_lsn = status(c, "vm")["durable_lsn"]
    b_lsn = status(b, "vm")["durable_lsn"]
    assert b_lsn > c_lsn

    r = c.cli("primary", "vm", "--force", check=False)
    assert r.returncode == 1, r.stdout
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert f"b holds {b_lsn - c_lsn} more records (" in err and "MiB" in err, err
    assert "marsfs primary vm --force on b" in err and "--accept-loss" in err, err
    assert c.cli("primary", "vm", "--accept-loss", check=False).returncode == 2  # goes with --force only

    r = c.cli("primary", "vm", "--force", "--accept-loss")
    assert "primary on this node now (epoch 2," in r.stdout, r.stdout  # the refusal changed nothing
    assert "measured from b's position" in r.stdout, r.stdout
    sc = status(c, "vm")
    loss = sc["failover_loss"]
    assert sc["role"] == "primary" and loss["held_by"] == "b", sc
    assert loss["held_records"] == b_lsn - c_lsn == loss["records"], loss
    assert WRITTEN * MiB <= loss["held_bytes"] == loss["bytes"] < (WRITTEN + 1) * MiB, loss

    write_synced(c.image("vm"), MARK_AT, MARK)  # c's own writes, in its epoch
    wait_for(lambda: status(b, "vm")["state"] == "split-brain", timeout=30, what="b to find the split brain with c")

    r = b.cli("primary", "vm", check=False)  # a planned handover cannot join two histories: says what can
    assert r.returncode == 1 and "marsfs primary vm --force here to keep this side" in r.stderr, r.stderr
    r = b.cli("primary", "vm", "--force")  # keep b's side: it holds a's 6 MiB
    assert "primary on this node now (epoch 3," in r.stdout, r.stdout
    assert "kept this node's side of the split brain: c's 2 records" in r.stdout, r.stdout
    assert f"after the fork at LSN {c_lsn}" in r.stdout, r.stdout
    wait_for(lambda: status(c, "vm")["designated_primary"] == "b", what="c to learn that b is primary")
    r = c.cli("invalidate", "vm")
    assert f"split-c-{c_lsn}.img" in r.stdout, r.stdout
    wait_synced(c, "vm")
    assert sha(c.image("vm")) == sha(b.image("vm"))
    with open(c.image("vm"), "rb") as f:
        assert f.read(WRITTEN * MiB) == data  # b's history won: a's writes are on c
        f.seek(MARK_AT)
        assert f.read(len(MARK)) == bytes(len(MARK))
    with open(c.mount / ".versions" / "vm" / f"split-c-{c_lsn}.img", "rb") as f:
        f.seek(MARK_AT)
        assert f.read(len(MARK)) == MARK  # c's writes are kept as its split version
    wait_for(lambda: not status(b, "vm")["split_brain"] and not status(c, "vm")["split_brain"], timeout=30,
             what="both to leave the split brain")
