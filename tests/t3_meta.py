"""Cluster metadata gossip and following the designated primary, in one process.

Real Nodes and Clusters in ``tmp_path``; their connections are trio memory streams through a
:class:`~marsfs.testing.memnet.MemNet` that can cut links (a partition); trio's MockClock drives time.

* Gossip converges: every node learns every claim and position; a partition keeps each side's
  view and newest wins on reunion.
* A primary that learns of a newer epoch on another node is fenced: writes fail with EROFS and
  its divergent tail stays. One whose log is a prefix becomes that node's mirror; a mirror
  switches its source to the designated primary. Nobody is promoted by a timeout.
* A peer of another cluster, or a malformed entry, is refused and nothing of it is merged.
"""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest
import trio
import trio.testing

from marsfs.errors import InvalidRequest, ProtocolError, VolumeBusy, VolumeReadOnly
from marsfs.node import gossip
from marsfs.node.cluster import Cluster
from marsfs.node.meta import CLOCK_STEP, ClusterMeta, Entry, Stamp
from marsfs.node.node import Node
from marsfs.node.volstate import FenceHolder, Role, VolumeState
from marsfs.replication.channel import Channel, PeerRefused
from marsfs.replication.protocol import PROTO_VERSION, Hello, MetaEntries, MetaWelcome
from marsfs.replication.server import PeerTable, Server
from marsfs.testing.memnet import CLUSTER, Link, MemNet, in_net
from marsfs.testing.runner import run, wait_for

MiB = 1 << 20
NODES = ["a", "b", "c"]


def write(node: Node, seed: int, n: int = 3) -> None:
    vol = node.volume("v")
    for i in range(n):
        vol.write(((seed + i) % 16) * 4096, bytes([seed % 250 + 1]) * 4096)
    vol.flush()


async def force_primary(net: MemNet, name: str) -> int:
    """Test-only stand-in for ``marsfs primary v --force`` (without its checks): stop fetching,
    become primary, claim the next epoch from our head + 1. Returns the epoch."""
    c, node = net.clusters[name], net.nodes[name]
    await c.mirrors.stop("v")
    vol = node.volume("v")
    d = node.meta.designated("v")
    assert d is not None
    epoch = d.epoch + 1
    node.set_role("v", role=Role.PRIMARY, source="", epoch=epoch)
    vol.replay_limit = None
    node.unfence("v", holder=FenceHolder.MIRROR)
    node.meta.claim("v", name, epoch, vol.head_lsn + 1)
    c.gossip_now()
    return epoch


def synced(net: MemNet, *names: str) -> bool:
    heads = {(net.nodes[n].volume("v").durable_lsn, net.nodes[n].volume("v").replayed_lsn) for n in names}
    return len(heads) == 1


async def three_nodes(net: MemNet) -> None:
    """a is primary of v; b and c mirror it; everyone knows it."""
    net.nodes["a"].create("v", MiB)
    write(net.nodes["a"], 1)
    for n in NODES:
        await net.start(n, NODES)
    for m in ("b", "c"):
        await net.clusters[m].join("v", "a")
    await wait_for(lambda: all("v" in net.nodes[m].volumes for m in "bc") and synced(net, "a", "b", "c"), "mirrors")
    await wait_for(lambda: all(n.meta.members("v") == {"a", "b", "c"} for n in net.nodes.values()), "members")


def test_gossip_converges_and_mirrors_follow_a_new_primary(tmp_path: Path) -> None:
    async def main(net: MemNet) -> None:
        await three_nodes(net)
        for n in net.nodes.values():
            d = n.meta.designated("v")
            assert d is not None and (d.node, d.epoch, d.start_lsn) == ("a", 1, 1)
        st = net.clusters["a"].statuses("v")[0]
        assert st.designated_primary == "a" and st.members == ["a", "b", "c"]
        assert {p.node for p in st.positions} == {"b", "c"}
        # a handover as the handover engineer does it: a is closed and flushed, b has it all
        epoch = await force_primary(net, "b")
        await wait_for(lambda: net.nodes["a"].is_mirror("v") and net.nodes["c"].role("v").source == "b",
                       "a and c follow b")
        assert net.nodes["a"].role("v").source == "b" and net.nodes["a"].role("v").epoch == epoch
        with pytest.raises(VolumeReadOnly):
            net.nodes["a"].volume("v").write(0, b"x" * 512)
        write(net.nodes["b"], 7)
        await wait_for(lambda: synced(net, "a", "b", "c"), "all synced with b")
        va, vb = net.nodes["a"].volume("v"), net.nodes["b"].volume("v")
        assert va.log.last_chain == vb.log.last_chain and va.read(0, MiB) == vb.read(0, MiB)
        st = net.clusters["c"].statuses("v")[0]
        assert st.source == "b" and st.designated_primary == "b" and st.epoch == epoch

    in_net(tmp_path, main, NODES)


@pytest.mark.allow_log("split brain with")  # both sides find the fork (marsfs.node.handover)
def test_partition_fences_the_old_primary_and_keeps_its_tail(tmp_path: Path) -> None:
    async def main(net: MemNet) -> None:
        await three_nodes(net)
        net.partition({"a"}, {"b", "c"})
        await trio.sleep(1.5)
        await force_primary(net, "b")  # failover while a is cut off
        write(net.nodes["a"], 3)  # a does not know: it still takes writes
        write(net.nodes["b"], 5)
        a_head = net.nodes["a"].volume("v").head_lsn
        await wait_for(lambda: net.nodes["c"].role("v").source == "b", "c follows b")
        await trio.sleep(3)
        da = net.nodes["a"].meta.designated("v")
        assert da is not None and da.node == "a"  # each side keeps its view
        net.partition()  # reunion: newest wins
        await wait_for(lambda: net.nodes["a"].fenced("v") != {}, "a fenced")
        vol = net.nodes["a"].volume("v")
        with pytest.raises(VolumeReadOnly) as e:
            vol.write(0, b"y" * 512)
        assert e.value.errno == errno.EROFS and "designated primary" in str(e.value)
        with pytest.raises(VolumeReadOnly):
            net.nodes["a"].acquire("v", write=True)
        await trio.sleep(3)
        assert vol.head_lsn == a_head and not net.nodes["a"].is_mirror("v")  # the tail stays
        st = net.clusters["a"].statuses("v")[0]
        # fenced, and once the chains were compared with b: split brain (fork before a's tail)
        assert st.state == VolumeState.SPLIT_BRAIN and st.designated_primary == "b"
        assert st.fork_lsn is not None and st.fork_lsn < a_head
        assert any("split brain" in e for e in st.errors) and any("marsfs invalidate v" in e for e in st.errors)
        for n in net.nodes.values():
            d = n.meta.designated("v")
            assert d is not None and d.node == "b"

    in_net(tmp_path, main, NODES)


def test_leave_node_force_releases_the_hold(tmp_path: Path) -> None:
    async def main(net: MemNet) -> None:
        await three_nodes(net)
        a = net.clusters["a"]
        vol = net.nodes["a"].volume("v")
        net.partition({"c"}, {"a", "b"})  # c dies
        await wait_for(lambda: not any(p.connected for p in a.peer_table.for_volume("v", vol.uuid)
                                       if p.node == "c"), "c disconnected")
        with pytest.raises(InvalidRequest, match="add --force"):
            await a.leave_node("v", "c", force=False)
        with pytest.raises(InvalidRequest, match="this node"):
            await a.leave_node("v", "a", force=True)
        with pytest.raises(VolumeBusy, match="connected"):
            await a.leave_node("v", "b", force=True)
        with pytest.raises(InvalidRequest, match="designated primary"):
            await net.clusters["b"].leave_node("v", "a", force=True)
        assert "mirror:c" in vol.holds
        r = await a.leave_node("v", "c", force=True)
        assert r["members"] == ["a", "b"] and "mirror:c" not in vol.holds
        assert a.mirrors_of("v") == ["b"]
        await wait_for(lambda: net.nodes["b"].meta.members("v") == {"a", "b"}, "b learns the removal")

    in_net(tmp_path, main, NODES)


# ---------------------------------------------------------------------------- the exchange itself

def pair(tmp_path: Path, cluster_b: str = CLUSTER) -> tuple[ClusterMeta, ClusterMeta, Server]:
    a, b = ClusterMeta(tmp_path / "a.json", "a"), ClusterMeta(tmp_path / "b.json", "b")

    async def serve(ch: Channel, greeting: Hello) -> None:
        await gossip.serve(ch, greeting, b, cluster_b)

    return a, b, Server("b", cluster_b, lambda name: None, lambda name: 0, PeerTable(), meta=serve)


def test_exchange_goes_both_ways_and_in_many_messages(tmp_path: Path) -> None:
    a, b, server = pair(tmp_path)
    a.merge([Entry("c", f"k{i}", i, Stamp(i + 1, "c")) for i in range(1200)])  # more than one META_ENTRIES holds
    b.claim("v", "b", 1, 1)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            connect = Link(nursery, server.handle).connect
            changed = await gossip.exchange(connect, a, CLUSTER, "b")
            assert changed == {("b", "volume/v/primary")}
            assert a.snapshot() == b.snapshot()
            assert await gossip.exchange(connect, a, CLUSTER, "b") == set()

    run(main, autojump=math.inf)


def test_another_cluster_is_refused_both_ways(tmp_path: Path) -> None:
    a, b, server = pair(tmp_path, cluster_b="other")
    a.put("k", 1)
    b.put("j", 2)

    async def liar(srv: trio.abc.Stream) -> None:
        """A server that lies about its cluster in META_WELCOME."""
        ch = Channel(srv)
        await ch.receive_message()
        await ch.send_message(MetaWelcome(node="b", cluster="other"))
        await ch.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(PeerRefused, match="cluster"):
                await gossip.exchange(Link(nursery, server.handle).connect, a, CLUSTER, "b")
            # the client refuses the liar
            with pytest.raises(PeerRefused, match="cluster"):
                await gossip.exchange(Link(nursery, liar).connect, a, CLUSTER, "b")

    run(main)
    assert a.get("b", "j") is None and b.get("a", "k") is None


@pytest.mark.parametrize("bad", [
    ["b", "k", 0, 1], ["b", "", 1, 1], ["", "k", 1, 1], ["b", "k", 1, "x" * 3000],
    ["b", "k", CLOCK_STEP + 1, 1],  # a's clock is 0: no exchange moves it further than CLOCK_STEP
    ["b", "volume/vm/primary", 1, {"node": "../../x", "epoch": 9, "start_lsn": 1}],
    ["b", "volume/vm/removed/" + "n" * 100, 1, True],
], ids=["clock-0", "empty-key", "no-owner", "long-value", "clock-step", "claim-name", "removed-name"])
def test_malformed_entries_are_refused_and_nothing_merged(tmp_path: Path, bad: list[object]) -> None:
    a = ClusterMeta(tmp_path / "a.json", "a")

    async def answer(srv: trio.abc.Stream) -> None:
        ch = Channel(srv)
        hello = await ch.receive_message()
        assert isinstance(hello, Hello) and hello.want == "meta" and hello.proto == PROTO_VERSION
        await ch.send_message(MetaWelcome(node="b", cluster=CLUSTER))
        await ch.receive_message()
        good = ("b", "good", 5, 1)
        await ch.send_message(MetaEntries(entries=(good, tuple(bad)), more=False))  # type: ignore[arg-type]
        await ch.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(ProtocolError):
                await gossip.exchange(Link(nursery, answer).connect, a, CLUSTER, "b")

    run(main)
    assert a.get("b", "good") is None


def test_merge_from_the_wire_keeps_owner_stamps(tmp_path: Path) -> None:
    a = ClusterMeta(tmp_path / "a.json", "a")
    e = Entry.from_wire(("c", "k", 7, {"x": 1}))
    assert e.stamp == Stamp(7, "c") and a.merge([e]) == {("c", "k")}


def test_a_name_used_before_claims_a_newer_epoch(tmp_path: Path) -> None:
    node = Node.open(tmp_path / "n", "a")
    try:
        node.meta.merge([Entry("b", "volume/v/primary", {"node": "b", "epoch": 4, "start_lsn": 9}, Stamp(3, "b"))])
        node.create("v", MiB)
        d = node.meta.designated("v")
        assert d is not None and (d.node, d.epoch, d.start_lsn) == ("a", 5, 1) and node.role("v").epoch == 5
    finally:
        node.close()


def test_a_primary_from_before_the_metadata_claims_at_start(tmp_path: Path) -> None:
    node = Node.open(tmp_path / "n", "a")
    node.create("v", MiB)
    node.close()
    (tmp_path / "n" / "meta.json").unlink()  # as a state directory from before the metadata existed
    node = Node.open(tmp_path / "n", "a")
    try:
        assert node.meta.designated("v") is None
        cluster = Cluster(node, listen=None, peers={}, cluster=CLUSTER)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(cluster.run)
                d = node.meta.designated("v")
                assert d is not None and (d.node, d.epoch, d.start_lsn) == ("a", 1, 1)
                assert not node.fenced("v") and cluster.statuses("v")[0].state == VolumeState.UP
                nursery.cancel_scope.cancel()

        run(main)
    finally:
        node.close()


def test_stopped_leaves_no_fetch_running_when_another_step_starts_one_meanwhile(tmp_path: Path) -> None:
    """Following a new source stops the old fetcher, awaits, then starts one; another step (a
    resync's end, the roles' watch) may start a fetch as soon as the old one ended. ``stopped``
    returns only once none runs, so the start that follows never finds one still running."""
    async def main(net: MemNet) -> None:
        await three_nodes(net)
        mirrors, vol = net.clusters["c"].mirrors, net.nodes["c"].volume("v")
        for _ in range(12):  # trio runs woken tasks in random order: both orders come up
            assert mirrors.running("v")
            ended = mirrors._ended["v"]

            async def another_step(ended: trio.Event) -> None:
                await ended.wait()
                if not mirrors.running("v"):
                    mirrors.start(vol)

            async with trio.open_nursery() as n:
                n.start_soon(another_step, ended)
                await trio.sleep(0)
                await mirrors.stopped("v")
                assert not mirrors.running("v")
                mirrors.start(vol)  # what follows it: asserts that no fetch runs
        await wait_for(lambda: synced(net, "a", "c"), "c fetches again")

    in_net(tmp_path, main, NODES)
