"""Handover, failover and split brain between in-process nodes: real Nodes and Clusters in
``tmp_path``, their replication connections over trio memory streams (:class:`MemNet`), trio's
MockClock.

* A planned handover fences and flushes the old primary, brings the mirror to its head,
  raises the epoch and makes the mirror writable; nothing acknowledged is lost.
* It is refused (nothing changes) while the image is open on the primary (saying how many
  holders), when the primary is unreachable (saying that --force exists and what it costs),
  on a primary, and while the fetch is paused.
* A prepare that no claim follows unfences the old primary after the timeout.
* Two handovers at once to two mirrors: the old primary hands over to one claimant at a time,
  so exactly one succeeds and the other is refused naming the winner; a claim another node
  made while a handover ran wins over it (the handover refuses to claim).
* A handover or failover onto a copy that is resyncing is refused, saying to wait for it;
  the old primary stays primary.
* A forced failover is refused while the primary answers; without it, the new primary says
  how much may be lost, from the last heartbeat.
* A failover right after writes its heartbeats never told of says "no loss known" and when it
  last heard from the primary, never that nothing was lost; after the primary's clean stop
  (its goodbye: a last heartbeat) the loss is exact.
* A forced failover onto a mirror that another reachable one is ahead of is refused naming
  it; accepted, its loss is measured from that mirror's position.
* After a failover and writes on both sides, the old primary following the new one is
  refused as diverged, and both sides record the split brain: fork LSN and both tails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from marsfs.errors import InvalidRequest, MarsError, PeerError, StateError, VolumeBusy, VolumeReadOnly, WrongRole
from marsfs.node import Node
from marsfs.node import handover as node_handover
from marsfs.node.cluster import Cluster
from marsfs.node.handover import tail_extents
from marsfs.node.volstate import Role, VolumeState
from marsfs.replication import handover as repl_handover
from marsfs.replication.protocol import HandoverReady
from marsfs.testing.memnet import CLUSTER, SIZE, MemNet, in_net, write
from marsfs.testing.runner import wait_for
from marsfs.volume import Volume


def image(vol: Volume) -> bytes:
    return vol.read(0, SIZE)


async def pair(net: MemNet, *names: str) -> list[Cluster]:
    """``names[0]`` primary of vm with some data, the others its synced mirrors."""
    clusters = [await net.start(n, list(names)) for n in names]
    a = clusters[0]
    vol = a.node.create("vm", SIZE, thin=True)
    await trio.to_thread.run_sync(write, vol, 1, 20)
    for c in clusters[1:]:
        await c.join("vm", names[0])

        def synced(c: Cluster = c) -> bool:
            return "vm" in c.node.volumes and c.node.volumes["vm"].replayed_lsn == vol.durable_lsn

        await wait_for(synced, f"{c.node.name} to sync")
    return clusters


def test_planned_handover_loses_nothing(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b")
        va = a.node.volumes["vm"]
        b.set_paused("vm", "fetch", True)  # b lags: the handover must fetch the rest
        await trio.to_thread.run_sync(write, va, 2, 30)
        b.set_paused("vm", "fetch", False)
        head = va.durable_lsn
        result = await b.primary("vm")
        vb = b.node.volumes["vm"]
        assert result["epoch"] == 2 and result["start_lsn"] == head + 1
        assert b.node.role("vm").role == Role.PRIMARY and b.node.role("vm").epoch == 2
        assert vb.replay_limit is None and vb.head_lsn == head and vb.log.last_chain == va.log.last_chain
        assert image(vb) == image(va)
        assert result["follows"] and a.roles.handed_over["vm"] == ("b", 2)
        assert a.node.is_mirror("vm") and a.node.role("vm").source == "b" and a.node.role("vm").epoch == 2
        with pytest.raises(VolumeReadOnly):
            a.node.acquire("vm", write=True)  # the old primary takes no writes: it is b's mirror
        await trio.to_thread.run_sync(write, vb, 3, 5)  # the new primary's log continues
        assert vb.head_lsn > head and "vm" not in b.mirrors.fetchers
        assert b.statuses("vm")[0].state == VolumeState.UP

    in_net(tmp_path, body)


def test_handover_refusals_change_nothing(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b")
        a.node.acquire("vm")
        a.node.acquire("vm")
        with pytest.raises(VolumeBusy, match=r"open on its primary a \(2 holder\(s\)"):
            await b.primary("vm")
        assert b.node.is_mirror("vm") and not a.node.fenced("vm") and "vm" in b.mirrors.fetchers
        a.node.release("vm")
        a.node.release("vm")
        with pytest.raises(WrongRole, match="already primary"):
            await a.primary("vm")
        b.set_paused("vm", "fetch", True)
        with pytest.raises(VolumeBusy, match="resume-fetch"):
            await b.primary("vm")
        b.set_paused("vm", "fetch", False)
        net.down.add("a")
        with pytest.raises(PeerError, match=r"cannot reach a.*primary vm --force.*losing what it did not fetch: ") as e:
            await b.primary("vm")
        assert "forced failover from" not in str(e.value) and "epoch 0" not in str(e.value)  # none happened
        assert b.node.is_mirror("vm") and b.node.role("vm").epoch == 1
        net.down.clear()
        with pytest.raises(InvalidRequest, match="reachable: use the planned handover"):
            await b.primary("vm", force=True)
        assert b.node.is_mirror("vm")

    in_net(tmp_path, body)


def test_prepare_without_claim_unfences_after_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repl_handover, "PREPARE_TIMEOUT", 3.0)
    monkeypatch.setattr(node_handover, "PREPARE_TIMEOUT", 3.0)

    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b")
        from marsfs.replication.fetch import hello, open_channel
        from marsfs.replication.protocol import HandoverPrepare, HandoverReady

        ch, _ = await open_channel(net.connect("a"), hello("b", CLUSTER, "vm", "handover", 1,
                                                             node_id=b.node.node_id))
        await ch.send_message(HandoverPrepare(epoch=1, timeout=repl_handover.PREPARE_TIMEOUT))
        assert isinstance(await ch.receive_message(), HandoverReady)
        assert "handover" in a.node.fenced("vm")
        with pytest.raises(VolumeReadOnly):
            a.node.volumes["vm"].write(0, b"x" * 512)
        await ch.aclose()  # the asker vanished without END
        await trio.sleep(repl_handover.PREPARE_TIMEOUT / 2)
        assert "handover" in a.node.fenced("vm")  # it may have claimed: wait out the timeout
        await wait_for(lambda: not a.node.fenced("vm"), "the fence to end", repl_handover.PREPARE_TIMEOUT)
        a.node.volumes["vm"].write(0, b"x" * 512)

    in_net(tmp_path, body)


def test_two_handovers_at_once_exactly_one_wins(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b, c = await pair(net, "a", "b", "c")
        won: dict[str, dict[str, object]] = {}
        lost: dict[str, MarsError] = {}

        async def primary(cl: Cluster) -> None:
            try:
                won[cl.node.name] = await cl.primary("vm")
            except MarsError as e:
                lost[cl.node.name] = e

        async with trio.open_nursery() as nursery:
            nursery.start_soon(primary, b)
            nursery.start_soon(primary, c)
        assert len(won) == len(lost) == 1, (won, lost)
        ((winner, result),), ((loser, error),) = won.items(), lost.items()
        assert result["epoch"] == 2
        assert isinstance(error, VolumeBusy) and f"being handed over to {winner} already" in str(error), error
        assert f"{winner} becomes its primary, not {loser}" in str(error)
        nodes = {"a": a, "b": b, "c": c}
        await wait_for(lambda: all(n.node.role("vm").source == winner for n in nodes.values() if n.node.name != winner),
                       "everyone to follow the winner")
        for n in nodes.values():
            d = n.node.meta.designated("vm")
            assert d is not None and (d.node, d.epoch) == (winner, 2)
        assert [n for n in nodes if nodes[n].node.role("vm").role == Role.PRIMARY] == [winner]

    in_net(tmp_path, body)


def test_a_claim_made_during_a_handover_wins_over_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handover claims only if the newest epoch is still the one it began from."""
    async def body(net: MemNet) -> None:
        a, b, c = await pair(net, "a", "b", "c")
        catch_up = b.roles._catch_up

        async def meanwhile(vol: Volume, name: str, source: str, ready: HandoverReady) -> None:
            await catch_up(vol, name, source, ready)
            c.node.meta.claim("vm", "c", 2, start_lsn=ready.head_lsn + 1)  # a claim a never saw
            c.gossip_now()
            await wait_for(lambda: (d := b.node.meta.designated("vm")) is not None and d.node == "c", "b to hear it")

        monkeypatch.setattr(b.roles, "_catch_up", meanwhile)
        with pytest.raises(StateError, match=r"^c became the primary of vm \(epoch 2\) while this handover ran: c won"):
            await b.primary("vm")
        assert b.node.is_mirror("vm")  # it goes on mirroring (and follows c, the designated primary)
        d = b.node.meta.designated("vm")
        assert d is not None and (d.node, d.epoch) == ("c", 2)

    in_net(tmp_path, body)


def test_no_handover_or_failover_onto_a_resyncing_copy(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b")
        await b.invalidate("vm")
        for force in (False, True):
            with pytest.raises(VolumeBusy, match=r"^volume 'vm' on node b is resyncing: .*marsfs wait vm --synced"):
                await b.primary("vm", force=force)
        assert a.node.role("vm").role == Role.PRIMARY and not a.node.fenced("vm")
        assert b.node.is_mirror("vm") and b.node.role("vm").epoch == 1 and "vm" in b.mirrors.fetchers

    in_net(tmp_path, body)


async def fail_over(net: MemNet, a: Cluster, b: Cluster, unfetched: int) -> dict[str, object]:
    """Pause b's fetch (it still hears heartbeats), write ``unfetched`` records' worth on a,
    lose a, force b."""
    va = a.node.volumes["vm"]
    b.set_paused("vm", "fetch", True)
    await trio.sleep(1.0)
    await trio.to_thread.run_sync(write, va, 5, unfetched)
    await wait_for(lambda: b.mirrors.fetchers["vm"].state.primary_durable_lsn == va.durable_lsn, "a heartbeat")
    await net.kill("a")
    return await b.primary("vm", force=True)


@pytest.mark.allow_log("forced failover of vm", "split brain", "stopped: .*diverged")
def test_failover_says_what_is_lost_and_split_brain_is_seen_by_both(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b")
        va = a.node.volumes["vm"]
        fork = b.node.volumes["vm"].durable_lsn
        result = await fail_over(net, a, b, 10)
        loss = result["loss"]
        assert isinstance(loss, dict)
        assert loss["records"] == va.durable_lsn - fork == 11  # ten writes and their flush
        assert loss["bytes"] == va.log.bytes_between(fork, va.durable_lsn) and loss["at_least"]
        assert result["epoch"] == 2 and result["start_lsn"] == fork + 1
        st = b.statuses("vm")[0]
        assert st.role == Role.PRIMARY and st.failover_loss is not None and st.failover_loss.to_json() == loss
        vb = b.node.volumes["vm"]
        await trio.to_thread.run_sync(write, vb, 9, 4)  # b writes in its epoch
        # a comes back: it learns of epoch 2 by gossip, is fenced, and finds the fork with b
        net.down.clear()
        await wait_for(lambda: a.node.splits("vm") and b.node.splits("vm"), "both sides to record the split")
        (sa,), (sb,) = a.node.splits("vm"), b.node.splits("vm")
        assert (sa.peer, sb.peer) == ("b", "a") and sa.fork_lsn == sb.fork_lsn == fork and sa.exact and sb.exact
        assert (sa.own_records, sa.own_bytes) == (sb.peer_records, sb.peer_bytes) == (11, loss["bytes"])
        assert (sb.own_records, sb.own_bytes) == (sa.peer_records, sa.peer_bytes) == (
            vb.head_lsn - fork, vb.log.bytes_between(fork, vb.head_lsn))
        for c in (a, b):
            row = c.status("vm")[0]
            assert row["state"] == "split-brain" and row["fork_lsn"] == fork
            assert any("split brain with" in e and "invalidate" in e for e in row["errors"])
        assert va.head_lsn == fork + 11  # a keeps its tail
        # what a resync of a would copy for its tail: the ten 64 KiB writes after the fork
        written = sorted({((5 * 7 + i * 13) % (SIZE // 65536)) * 65536 for i in range(10)})
        extents = tail_extents(va, fork)
        assert extents is not None and sum(n for _, n in extents) == len(written) * 65536
        assert all(any(o <= w < o + n for o, n in extents) for w in written)
        # persisted: a restart still shows it
        b.node.close()
        again = Node.open(tmp_path / "b", "b")
        try:
            assert [s.fork_lsn for s in again.splits("vm")] == [fork] and again.failover_loss("vm") is not None
        finally:
            again.close()

    in_net(tmp_path, body)


def test_a_lagging_mirror_stays_a_prefix(tmp_path: Path) -> None:
    """C paused before the fork: what it holds is a prefix of b's history, so it can follow b."""
    async def body(net: MemNet) -> None:
        a, b, c = await pair(net, "a", "b", "c")
        c.set_paused("vm", "fetch", True)
        await trio.to_thread.run_sync(write, a.node.volumes["vm"], 2, 3)
        await wait_for(lambda: b.node.volumes["vm"].replayed_lsn == a.node.volumes["vm"].durable_lsn, "b to sync")
        await b.primary("vm")
        vc = c.node.volumes["vm"]
        c.set_paused("vm", "fetch", False)  # c follows b by itself (the metadata's follow)
        await wait_for(lambda: c.node.role("vm").source == "b", "c to switch to b")
        await wait_for(lambda: vc.replayed_lsn == b.node.volumes["vm"].durable_lsn, "c to follow b")
        assert image(vc) == image(b.node.volumes["vm"]) and not c.node.splits("vm")

    in_net(tmp_path, body)


@pytest.mark.allow_log("forced failover of vm")
def test_a_failover_asks_the_reachable_members_first(tmp_path: Path) -> None:
    """c lags (paused), b has everything: a failover onto c is refused naming b (nothing
    changes); with ``accept_loss`` it goes ahead, and the loss is b's exact tail beyond c."""
    async def body(net: MemNet) -> None:
        a, b, c = await pair(net, "a", "b", "c")
        va, vb, vc = (x.node.volumes["vm"] for x in (a, b, c))
        c.set_paused("vm", "fetch", True)
        await trio.to_thread.run_sync(write, va, 3, 6)
        await wait_for(lambda: vb.durable_lsn == va.durable_lsn, "b to fetch everything")
        await net.kill("a")
        ahead = vb.durable_lsn - vc.durable_lsn
        tail = vb.log.bytes_between(vc.durable_lsn, vb.durable_lsn)
        with pytest.raises(StateError, match=rf"^b holds {ahead} more records \(.*KiB\) of vm than this node.*"
                                             r"marsfs primary vm --force on b instead, or add --accept-loss"):
            await c.primary("vm", force=True)
        assert c.node.is_mirror("vm") and c.node.role("vm").epoch == 1 and c.node.failover_loss("vm") is None
        result = await c.primary("vm", force=True, accept_loss=True)
        loss = result["loss"]
        assert isinstance(loss, dict)
        assert (loss["held_by"], loss["held_records"], loss["held_bytes"]) == ("b", ahead, tail)
        assert loss["records"] == ahead and loss["bytes"] == tail and "measured from b's position" in str(result["lost"])

    in_net(tmp_path, body)


async def lost_right_after_writes(net: MemNet, *, clean: bool) -> tuple[dict[str, object], int]:
    """b watches (fetch paused); a writes ten records' worth and flushes on the trio thread (so
    no heartbeat can tell b of them), stops (``clean``: it says goodbye first) and is lost at
    once; b fails over. The failover's result, and how many records a held beyond b."""
    a, b = await pair(net, "a", "b")
    va, vb = a.node.volumes["vm"], b.node.volumes["vm"]
    b.set_paused("vm", "fetch", True)
    await trio.sleep(1.0)  # b hears heartbeats while paused
    state = b.mirrors.fetchers["vm"].state
    assert state.primary_durable_lsn == va.durable_lsn == vb.durable_lsn
    write(va, 5, 10)
    if clean:
        await a.farewell()
    net.partition({"a"}, {"b"})
    await net.kill("a")
    result = await b.primary("vm", force=True)
    return result, va.durable_lsn - vb.durable_lsn


@pytest.mark.allow_log("forced failover of vm")
def test_a_failover_right_after_writes_never_says_nothing_was_lost(tmp_path: Path) -> None:
    """The writes came after a's last heartbeat: b cannot count them, and says instead when it
    last heard from a (not "no record known lost")."""
    async def body(net: MemNet) -> None:
        result, held = await lost_right_after_writes(net, clean=False)
        loss, said = result["loss"], str(result["lost"])
        assert isinstance(loss, dict) and held == 11
        assert loss["records"] == 0 and loss["at_least"] and float(loss["heard_before"]) >= 0
        assert "no record known lost" not in said, said
        assert re.search(r": no loss known; last heard from a \d+\.\d s before this failover \(its last word, "
                         r"\S+, showed no record this node lacked\); a may have written more after", said), said

    in_net(tmp_path, body)


@pytest.mark.allow_log("forced failover of vm")
def test_a_clean_stop_says_goodbye_and_the_failover_loss_is_exact(tmp_path: Path) -> None:
    """A clean stop makes a's log durable and sends b a last heartbeat: b's failover counts
    exactly what a held beyond it, and says so."""
    async def body(net: MemNet) -> None:
        result, held = await lost_right_after_writes(net, clean=True)
        loss, said = result["loss"], str(result["lost"])
        assert isinstance(loss, dict) and held == 11
        assert (loss["records"], loss["at_least"]) == (11, False), loss
        assert re.search(r" lost 11 records \([^)]*\) written between .*: a stopped cleanly at \S+ with its "
                         r"log durable up to LSN 32\b", said), said

    in_net(tmp_path, body)


@pytest.mark.allow_log("forced failover of vm", "split brain", "stopped: .*diverged")
def test_the_fenced_side_of_a_split_brain_can_be_kept(tmp_path: Path) -> None:
    """After a failover to b and writes on both sides, the operator keeps a's history instead:
    ``primary --force`` on a (fenced, in the split brain) claims the next epoch and makes it
    writable; ``invalidate`` on b then keeps b's state as a split version and resyncs b from a."""
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b")
        va, vb = a.node.volumes["vm"], b.node.volumes["vm"]
        fork = vb.durable_lsn
        await fail_over(net, a, b, 10)
        await trio.to_thread.run_sync(write, vb, 9, 4)  # b writes in its epoch
        net.down.clear()
        await wait_for(lambda: a.node.splits("vm") and b.node.splits("vm"), "both sides to record the split")
        with pytest.raises(VolumeReadOnly):
            va.write(0, b"x" * 512)
        with pytest.raises(StateError, match=r"split brain with b.*marsfs primary vm --force here keeps this side"):
            await a.primary("vm")  # a planned handover cannot join two histories
        result = await a.primary("vm", force=True)
        assert result["epoch"] == 3 and "kept this node's side of the split brain: b's 5 records" in str(result["lost"])
        assert f"after the fork at LSN {fork}" in str(result["lost"]) and a.node.role("vm").epoch == 3
        await trio.to_thread.run_sync(write, va, 11, 2)  # a takes writes again
        await wait_for(lambda: b.node.meta.designated("vm").node == "a", "b to learn that a is primary")  # type: ignore[union-attr]
        kept = await b.invalidate("vm")
        assert kept["split_version"] == f"split-b-{fork}.img"
        vb2 = b.node.volumes["vm"]
        await wait_for(lambda: b.node.is_mirror("vm") and not b.mirrors.copies and vb2.replayed_lsn == va.durable_lsn
                       and image(b.node.volumes["vm"]) == image(va), "b to resync from a", 60)
        await wait_for(lambda: not a.node.splits("vm") and not b.node.splits("vm"), "the split brain to be resolved")

    in_net(tmp_path, body)
