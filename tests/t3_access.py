"""Who may ask what of a volume, between in-process nodes (MemNet): members only, and a join.

* A node that the peer lists name but that is no member of a volume is refused whatever it asks
  of it (``not-a-member``), on the primary and on a mirror: it gets no log, image, sums,
  handover, comparison or position, its ``leave`` touches nothing, and the primary gets no
  mirror line, no hold and no fence from it. Each node logs it once.
* The way in is the operator's ``join``: from its first fast sync on the joiner is a member of
  its source, and of every other node once its position reached it.
* No gossip round lies between a join and what follows it: with no periodic gossip at all, a
  mirror that joined a moment ago and fails over still gets the other mirror's answer (it
  introduces itself first), and a source that forgot a mirror learns it back from the mirror
  when it refuses it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from marsfs.errors import StateError
from marsfs.node.cluster import Cluster
from marsfs.replication.channel import PeerRefused
from marsfs.replication.fetch import hello, open_channel
from marsfs.replication.protocol import Want
from marsfs.testing.memnet import CLUSTER, SIZE, MemNet, in_net, write
from marsfs.testing.runner import wait_for
from marsfs.volume.holds import mirror_hold

WANTS: tuple[Want, ...] = ("fetch", "sync", "sums", "leave", "handover", "compare", "position")


async def synced(node: Cluster, primary: Cluster) -> None:
    await wait_for(lambda: "vm" in node.node.volumes
                   and node.node.volumes["vm"].replayed_lsn == primary.node.volumes["vm"].durable_lsn,
                   f"{node.node.name} to sync")


@pytest.mark.allow_log("refused node c for volume vm")
def test_a_node_that_is_no_member_is_refused_whatever_it_asks(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    async def body(net: MemNet) -> None:
        a, b, c = [await net.start(n, ["a", "b", "c"]) for n in ("a", "b", "c")]
        vol = a.node.create("vm", SIZE, thin=True)
        await trio.to_thread.run_sync(write, vol, 1, 20)
        await b.join("vm", "a")
        await synced(b, a)

        async def ask(to: str, want: Want, *, join: bool = False) -> str:
            try:
                ch, _ = await open_channel(net.connect(to), hello("c", CLUSTER, "vm", want, 1, node_id=c.node.node_id,
                                                                  join=join))
            except PeerRefused as e:
                return e.code
            await ch.aclose()
            return "welcome"

        for want in WANTS:
            assert (await ask("a", want), await ask("b", want)) == ("not-a-member", "not-a-member"), want
        assert await ask("a", "fetch", join=True) == "not-a-member"  # a join is a fast sync, nothing else
        assert [p.node for p in a.peer_table.for_volume("vm", vol.uuid)] == ["b"]
        assert mirror_hold("c") not in vol.holds and not a.node.fenced("vm") and not b.node.fenced("vm")
        assert a.access.refused == 8 and b.access.refused == 7
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused node c for volume vm")]
        assert len(lines) == 2 and all(line.endswith("marsfs join vm --from a") or line.endswith(
            "marsfs join vm --from b") for line in lines), lines
        await trio.to_thread.run_sync(write, vol, 2, 3)  # the primary's writes and b's fetch go on
        await synced(b, a)

        await c.join("vm", "a")  # the operator's join: the way in
        await synced(c, a)
        assert "c" in a.members_of(vol) and await ask("a", "sums") == "welcome"
        await wait_for(lambda: "c" in b.members_of(b.node.volumes["vm"]), "b to learn c's position")
        assert await ask("b", "sums") == "welcome"

    in_net(tmp_path, body)


def test_a_member_of_a_moment_ago_is_answered_with_no_gossip_round(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No periodic gossip runs: b never hears of c's copy. c's forced failover asks b anyway;
    c introduces itself first, so b answers that it holds more, and the failover is refused
    naming b (without the introduction b refuses c, and c would lose b's records)."""
    async def no_gossip(self: Cluster, peer: str) -> None:
        return

    monkeypatch.setattr(Cluster, "_gossip_loop", no_gossip)

    async def body(net: MemNet) -> None:
        a, b, c = [await net.start(n, ["a", "b", "c"]) for n in ("a", "b", "c")]
        va = a.node.create("vm", SIZE, thin=True)
        await trio.to_thread.run_sync(write, va, 1, 20)
        await b.join("vm", "a")
        await c.join("vm", "a")
        await synced(b, a)
        await synced(c, a)
        assert "c" not in b.node.meta.members("vm") and "c" not in b.members_of(b.node.volumes["vm"])
        c.set_paused("vm", "fetch", True)
        await trio.to_thread.run_sync(write, va, 3, 6)
        await wait_for(lambda: b.node.volumes["vm"].durable_lsn == va.durable_lsn, "b to fetch everything")
        await net.kill("a")
        with pytest.raises(StateError, match=r"^b holds \d+ more records .* of vm than this node"):
            await c.primary("vm", force=True)
        assert b.access.refused == 0 and "c" in b.node.meta.members("vm")

    in_net(tmp_path, body)


@pytest.mark.allow_log("refused node b for volume vm")
def test_a_source_that_forgot_its_mirror_learns_it_back_from_the_mirror(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No periodic gossip runs, and a loses what it knew of b (its mirror line and its hold, as
    a restart before the hold was persisted would): b's next fetch is refused, b introduces
    itself (its position) and fetches again at once."""
    async def no_gossip(self: Cluster, peer: str) -> None:
        return

    monkeypatch.setattr(Cluster, "_gossip_loop", no_gossip)

    async def body(net: MemNet) -> None:
        a, b = [await net.start(n, ["a", "b"]) for n in ("a", "b")]
        va = a.node.create("vm", SIZE, thin=True)
        await trio.to_thread.run_sync(write, va, 1, 20)
        await b.join("vm", "a")
        await synced(b, a)
        assert "b" not in a.node.meta.members("vm")
        await net.kill("a")
        a.peer_table.forget("vm", va.uuid, "b")
        va.release(mirror_hold("b"))
        net.down.discard("a")
        assert "b" not in a.members_of(va)
        await trio.to_thread.run_sync(write, va, 2, 5)
        await synced(b, a)
        assert a.access.refused >= 1 and "b" in a.node.meta.members("vm") and "b" in a.members_of(va)

    in_net(tmp_path, body)
