"""What a forced failover says it lost, when the old primary dies right after fsynced writes.

Real daemons over TLS. node2 is the primary of vm1, node1 its mirror with its fetch paused
(it still watches: heartbeats, no records). node2 writes 8 MiB and fsyncs, and at once its
daemon stops: cleanly (SIGTERM) or by SIGKILL. Right after, ``primary vm1 --force`` on node1.
Then node2 is started again, and its log says how many records it held beyond the fork:

* A clean stop says goodbye: node2 makes its logs durable and sends every mirror a last
  heartbeat before it goes, so the failover's loss is exact (``at_least`` false), equal to
  what node2 holds after the fork, and says that node2 stopped cleanly; that heartbeat also
  says that the fsync acknowledged all of them.
* After SIGKILL node1 may never have heard of the last writes (a heartbeat every 0.5 s): the
  report may count fewer records than node2 holds, never more, but it never says that nothing
  was lost: when it counts none it says when node1 last heard from node2 ("no loss known;
  last heard from node2 N s before this failover").

Both run several times: the window is a heartbeat, so a single run could pass by luck.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from marsfs.testing.checks import status, wait_for, wait_synced
from marsfs.testing.harness import Harness, NodeProcess

RUNS = 3
MIB = 1024 * 1024


def dd_fsync(image: os.PathLike[str], count: int) -> None:
    """What ``dd bs=1M count=N conv=fsync,notrunc`` does: N 1 MiB writes, then one fsync."""
    fd = os.open(image, os.O_WRONLY)
    try:
        for i in range(count):
            os.pwrite(fd, os.urandom(MIB), i * MIB)
        os.fsync(fd)
    finally:
        os.close(fd)


def failover_right_after_writes(harness: Harness, how: str) -> tuple[dict[str, Any], str, int]:
    """The loss node1's failover recorded, what the command said, and how many records node2
    held beyond node1's durable head, as its own log tells after a restart."""
    nodes = harness.cluster(["node1", "node2"])
    n1, n2 = nodes["node1"], nodes["node2"]
    n2.cli("create", "vm1", "--size", "16M")
    n1.cli("join", "vm1", "--from", "node2")
    wait_synced(n1, "vm1")
    n1.cli("pause-fetch", "vm1")
    dd_fsync(n2.image("vm1"), 8)
    stop(n2, how)
    r = n1.cli("primary", "vm1", "--force")
    s1 = status(n1, "vm1")
    loss = s1["failover_loss"]
    assert loss is not None and loss["source"] == "node2", s1
    n2.start()
    wait_for(lambda: status(n2, "vm1")["epoch"] == 1 and status(n2, "vm1")["state"] in ("fenced", "split-brain"),
             what="node2 to come back fenced by epoch 2")
    held = status(n2, "vm1")["durable_lsn"] - (loss["start_lsn"] - 1)
    return loss, r.stdout, held


def stop(node: NodeProcess, how: str) -> None:
    if how == "clean":
        assert node.stop() == 0, node.log_tail()
    else:
        node.kill()
        node.abort()
    node.unmount()


@pytest.mark.allow_log("forced failover", "split brain", "stopped: .*diverged")
@pytest.mark.parametrize("run", range(RUNS))
def test_a_clean_stop_right_after_writes_is_reported_exactly(harness: Harness, run: int) -> None:
    loss, said, held = failover_right_after_writes(harness, "clean")
    assert held >= 8 * MIB // (64 * 1024), held  # 8 MiB in 64 KiB records, and a flush
    assert (loss["records"], loss["at_least"]) == (held, False), (loss, said)
    assert "stopped cleanly" in said and f"lost {held} records" in said, said
    # the goodbye is an ordinary heartbeat: it says what the fsync acknowledged, too
    assert (loss["mode"], loss["acked_lost"]) == ("async", held), loss


@pytest.mark.allow_log("forced failover", "split brain", "stopped: .*diverged")
@pytest.mark.parametrize("run", range(RUNS))
def test_after_sigkill_right_after_writes_no_loss_is_never_claimed(harness: Harness, run: int) -> None:
    loss, said, held = failover_right_after_writes(harness, "kill")
    assert held >= 8 * MIB // (64 * 1024), held
    assert loss["at_least"] and loss["records"] <= held, (loss, held)
    assert "no record known lost" not in said and loss["acked_lost"] <= held, (said, loss)
    if loss["records"] == 0:
        assert re.search(r"no loss known; last heard from node2 \d+\.\d s before this failover", said), said
    else:
        assert f"lost at least {loss['records']} records" in said, said
