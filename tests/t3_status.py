"""Status lines that say what is true now, between in-process nodes (real Nodes and Clusters over
:class:`~marsfs.testing.memnet.MemNet`), through handovers, a failover and a leave:

* right after a forced failover the new primary does not list its unreachable old primary (which
  fetched from it in an earlier epoch) as a mirror: its position row says it is not following
  the new epoch yet; a mirror that follows the old primary is not listed either until it follows;
* the failover-loss line belongs to the epoch it happened in: it goes once a later epoch starts
  (a handover on) and the node is a mirror, also after a restart;
* a node that left the volume is no member and has no position row.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from marsfs.node import Node
from marsfs.node.cluster import Cluster
from marsfs.testing.memnet import MemNet, in_net, write
from marsfs.testing.runner import wait_for
from t3_handover import pair


def follows(c: Cluster, source: str) -> bool:
    return c.node.is_mirror("vm") and c.node.role("vm").source == source


def row(c: Cluster) -> dict[str, object]:
    return c.status("vm")[0]


def peers(c: Cluster) -> list[str]:
    return [p.node for p in c.statuses("vm")[0].peers]


def positions(c: Cluster) -> dict[str, str]:
    return {p.node: p.stale for p in c.statuses("vm")[0].positions}


@pytest.mark.allow_log("forced failover of vm")
def test_after_a_failover_status_says_what_holds_now(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b, c = await pair(net, "a", "b", "c")
        await b.primary("vm")  # a fetches from b in epoch 2 ...
        await wait_for(lambda: follows(a, "b") and follows(c, "b"), "a and c to follow b")
        await a.primary("vm")  # ... and is primary again in epoch 3
        await wait_for(lambda: follows(b, "a") and follows(c, "a"), "b and c to follow a")
        await trio.to_thread.run_sync(write, a.node.volumes["vm"], 3, 4)
        await wait_for(lambda: b.node.volumes["vm"].replayed_lsn == a.node.volumes["vm"].durable_lsn, "b to sync")
        c.set_paused("vm", "fetch", True)  # c stays a's mirror for a while
        net.partition({"a"}, {"b", "c"})  # a is lost
        await b.primary("vm", force=True)
        st = b.statuses("vm")[0]
        assert st.epoch == 4 and st.failover_loss is not None
        listed = peers(b)  # read before follows(): c is listed only once it has switched to b
        assert listed == (["c"] if "c" in listed and follows(c, "b") else []), \
            f"a (the old primary) is not b's mirror, and c only once it follows b: {listed}"
        stale = positions(b)
        assert "not following b (epoch 4) yet" in stale["a"] and "from epoch 3" in stale["a"], stale
        c.set_paused("vm", "fetch", False)
        await wait_for(lambda: follows(c, "b") and peers(b) == ["c"], "c to follow b and be listed")
        net.partition()  # a is back: its log is a prefix of b's history, it follows b
        await wait_for(lambda: follows(a, "b") and positions(b).get("a") == "", "a to follow b and say so")
        assert b.statuses("vm")[0].failover_loss is not None
        await a.primary("vm")  # a later epoch: b's failover is history
        await wait_for(lambda: follows(b, "a"), "b to follow a")
        assert b.statuses("vm")[0].failover_loss is None and b.node.failover_loss("vm") is None
        await wait_for(lambda: follows(c, "a"), "c to follow a")
        await c.leave("vm")
        await wait_for(lambda: "c" not in b.statuses("vm")[0].members and "c" not in positions(b)
                       and "c" not in a.statuses("vm")[0].members and "c" not in positions(a), "c to be gone")
        assert peers(a) == ["b"]
        b.node.close()
        again = Node.open(tmp_path / "b", "b")
        try:
            assert again.failover_loss("vm") is None, "a restart does not bring the old failover back"
        finally:
            again.close()

    in_net(tmp_path, body)


@pytest.mark.allow_log("forced failover of vm", "split brain", "stopped: .*diverged")
def test_split_brain_lines_count_what_each_side_wrote_and_fetched(tmp_path: Path) -> None:
    """c fetched records of a that b never got; b fails over, c is refused as diverged before b
    writes, then b writes: c's line says it fetched its tail (wrote none of it), b's counts the
    records it wrote since, and both sides tell the same figures."""
    async def body(net: MemNet) -> None:
        a, b, c = await pair(net, "a", "b", "c")
        b.set_paused("vm", "fetch", True)  # b falls behind; c fetches what a writes now
        va = a.node.volumes["vm"]
        await trio.to_thread.run_sync(write, va, 5, 6)
        await wait_for(lambda: c.node.volumes["vm"].durable_lsn == va.durable_lsn, "c to fetch a's tail")
        fork = b.node.volumes["vm"].durable_lsn
        net.partition({"a"}, {"b", "c"})
        b.set_paused("vm", "fetch", False)
        await b.primary("vm", force=True, accept_loss=True)  # c holds more: that is the point
        await wait_for(lambda: c.node.splits("vm") and b.node.splits("vm"), "c and b to record the split")
        vb = b.node.volumes["vm"]
        await trio.to_thread.run_sync(write, vb, 9, 1)  # one write and its flush: 2 records of b's own
        tail_c = c.node.volumes["vm"].head_lsn - fork
        await wait_for(lambda: c.node.splits("vm")[0].peer_records == 2, "c to hear of b's writes")
        (sb,), (sc,) = b.node.splits("vm"), c.node.splits("vm")
        assert sb.fork_lsn == sc.fork_lsn == fork and sb.exact and sc.exact
        assert (sb.own_records, sb.own_written, sb.peer_records, sb.peer_written) == (2, 2, tail_c, 0)
        assert (sc.own_records, sc.own_written, sc.peer_records, sc.peer_written) == (tail_c, 0, 2, 2)
        assert sb.own_bytes == vb.log.bytes_between(fork, vb.head_lsn) > 0
        line_c = next(e for e in c.status("vm")[0]["errors"] if "split brain with b" in e)
        assert f"this node holds {tail_c} records" in line_c and "none written here as primary" in line_c
        assert "b 2 (" in line_c and "all written there as primary" in line_c, line_c
        line_b = next(e for e in b.status("vm")[0]["errors"] if "split brain with c" in e)
        assert "this node holds 2 records" in line_b and "all written here as primary" in line_b, line_b
        assert f"c {tail_c} (" in line_b and "none written there as primary" in line_b, line_b

    in_net(tmp_path, body)
