"""Replication modes between in-process nodes (MemNet, trio's MockClock): the sync gate.

* On a sync volume an application's flush completes only once the mirror's log holds it
  durably; on an async one it never waits for a mirror (G4), also over a stalled link.
* A stalled link: the first flush waits the timeout (virtual seconds), once; the volume runs
  degraded (status and the log say since when and how far behind) and later flushes do not
  wait; once the link heals and the mirror caught up, it is in sync again by itself, and
  flushes wait for the mirror again.
* With ``refuse`` a degraded volume's flushes fail (EIO), and work again once in sync.
* N mirrors: a flush waits for two when asked to, and one stalled mirror of three degrades
  nothing when N is 2.
* The mode is in the cluster metadata: every member knows it, a planned handover keeps it,
  and the new primary's flushes wait for the old primary, now its mirror.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from marsfs.errors import PeerError, SyncRefused
from marsfs.faces.view import status_table
from marsfs.node.cluster import Cluster
from marsfs.node.state import ReplicationMode, SyncState
from marsfs.node.syncmode import ModeSetting
from marsfs.testing.memnet import SIZE, MemNet, in_net
from marsfs.testing.runner import wait_for
from marsfs.volume import Volume

SYNC = ModeSetting(ReplicationMode.SYNC)
DEGRADED = r"syncmode WARNING: volume vm: sync degraded to async since"


async def pair(net: MemNet, *names: str, mode: ModeSetting | None = None) -> list[Cluster]:
    """``names[0]`` primary of vm (in ``mode``), the others its mirrors, caught up."""
    clusters = [await net.start(n, list(names)) for n in names]
    a = clusters[0]
    vol = a.node.create("vm", SIZE, thin=True, mode=mode)
    write(vol, 0)
    vol.flush()
    for c in clusters[1:]:
        await c.join("vm", names[0])

        def caught_up(c: Cluster = c) -> bool:
            return "vm" in c.node.volumes and c.node.volumes["vm"].durable_lsn == vol.durable_lsn

        await wait_for(caught_up, f"{c.node.name} to catch up")

        def knows(c: Cluster = c) -> bool:  # the mode comes with the cluster metadata (gossip)
            return c.node.sync.setting(c.node.volumes["vm"]) == (mode or ModeSetting())

        await wait_for(knows, f"{c.node.name} to learn the mode")
    return clusters


def write(vol: Volume, i: int) -> None:
    vol.write((i * 4096) % SIZE, bytes([i % 251 + 1]) * 4096)


async def flush_timed(c: Cluster, vol: Volume) -> float:
    """One application flush; the (virtual) seconds it took."""
    t0 = trio.current_time()
    await c.node.sync.flush(vol)
    return trio.current_time() - t0


def test_a_sync_flush_completes_once_the_mirror_holds_it(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b", mode=SYNC)
        va, vb = a.node.volumes["vm"], b.node.volumes["vm"]
        for i in range(30):
            write(va, i)
            await a.node.sync.flush(va)
            assert vb.durable_lsn >= va.durable_lsn, (i, vb.durable_lsn, va.durable_lsn)
        st = a.statuses("vm")[0]
        assert st.mode is ReplicationMode.SYNC and st.sync_mode is not None
        assert st.sync_mode.state is SyncState.IN_SYNC and st.sync_mode.holding == ["b"]
        assert st.sync_mode.acked_lsn == va.durable_lsn and not [w for w in st.warnings if "sync" in w]
        text = status_table(a.status("vm"))  # the plain view says it under the row
        assert f"  replication sync: in-sync (1 mirror(s), timeout 2 s); acknowledged up to LSN {va.durable_lsn}, " \
               "held by b" in text, text
        await wait_for(lambda: b.statuses("vm")[0].mode is ReplicationMode.SYNC, "b to learn the mode (gossip)")
        assert b.statuses("vm")[0].sync_mode is None  # only the primary acknowledges flushes

    in_net(tmp_path, body)


def test_an_async_flush_never_waits_for_a_mirror(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b")
        va, vb = a.node.volumes["vm"], b.node.volumes["vm"]
        net.stall({"a"}, {"b"})
        for i in range(10):
            write(va, i)
            assert await flush_timed(a, va) < 1.0  # well below the timeout
        assert vb.durable_lsn < va.durable_lsn  # the mirror lags; the primary does not wait
        st = a.statuses("vm")[0]
        assert st.mode is ReplicationMode.ASYNC and st.sync_mode is None
        net.stall()

    in_net(tmp_path, body)


@pytest.mark.allow_log(DEGRADED)
def test_a_stalled_link_costs_the_timeout_once_then_sync_returns(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b", mode=SYNC)
        va, vb = a.node.volumes["vm"], b.node.volumes["vm"]
        net.stall({"a"}, {"b"})
        write(va, 1)
        waited = await flush_timed(a, va)
        assert 1.99 <= waited < 3.0, waited  # the timeout, once (and the flush's own time)
        st = a.statuses("vm")[0].sync_mode
        assert st is not None and st.state is SyncState.DEGRADED and st.since is not None
        assert st.behind_records >= 2 and st.holding == []
        warning = [w for w in a.statuses("vm")[0].warnings if "degraded" in w]
        assert warning and warning[0].startswith("sync degraded to async since ") and "behind by" in warning[0]
        for i in range(10):  # degraded: no flush waits
            write(va, i + 2)
            assert await flush_timed(a, va) < 1.0  # well below the timeout
        assert a.statuses("vm")[0].sync_mode.state is SyncState.DEGRADED  # type: ignore[union-attr]
        net.stall()  # healed: the mirror catches up and the volume is in sync by itself
        await wait_for(lambda: a.statuses("vm")[0].sync_mode.state is SyncState.IN_SYNC,  # type: ignore[union-attr]
                       "sync again")
        assert vb.durable_lsn >= a.statuses("vm")[0].sync_mode.acked_lsn  # type: ignore[union-attr]
        write(va, 50)
        await a.node.sync.flush(va)
        assert vb.durable_lsn >= va.durable_lsn  # waits for the mirror again
        net.stall({"a"}, {"b"})  # and a second stall costs the timeout once more
        write(va, 51)
        assert 1.99 <= await flush_timed(a, va) < 3.0
        net.stall()

    in_net(tmp_path, body)


@pytest.mark.allow_log(DEGRADED)
def test_refuse_fails_flushes_while_degraded(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b", mode=ModeSetting(ReplicationMode.SYNC, refuse=True))
        va = a.node.volumes["vm"]
        net.stall({"a"}, {"b"})
        write(va, 1)
        t0 = trio.current_time()
        with pytest.raises(SyncRefused, match="refused: the volume is in sync mode with --refuse and degraded"):
            await a.node.sync.flush(va)
        assert 1.99 <= trio.current_time() - t0 < 3.0
        write(va, 2)
        t0 = trio.current_time()
        with pytest.raises(SyncRefused):
            await a.node.sync.flush(va)
        assert trio.current_time() - t0 < 1.0  # at once: the timeout was paid once
        acked = a.statuses("vm")[0].sync_mode.acked_lsn  # type: ignore[union-attr]
        assert acked < va.durable_lsn  # nothing refused counts as acknowledged
        net.stall()
        await wait_for(lambda: a.statuses("vm")[0].sync_mode.state is SyncState.IN_SYNC,  # type: ignore[union-attr]
                       "sync again")
        write(va, 3)
        await a.node.sync.flush(va)

    in_net(tmp_path, body)


@pytest.mark.allow_log(DEGRADED)
def test_n_mirrors(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b, c, d = await pair(net, "a", "b", "c", "d", mode=ModeSetting(ReplicationMode.SYNC, mirrors=2))
        va = a.node.volumes["vm"]
        mirrors = [x.node.volumes["vm"] for x in (b, c, d)]
        write(va, 1)
        await a.node.sync.flush(va)
        assert sum(m.durable_lsn >= va.durable_lsn for m in mirrors) >= 2
        net.stall({"a", "b", "c"}, {"d"})  # one of three stalls: two still answer
        for i in range(5):
            write(va, i + 2)
            assert await flush_timed(a, va) < 1.0  # well below the timeout
        assert a.statuses("vm")[0].sync_mode.state is SyncState.IN_SYNC  # type: ignore[union-attr]
        net.stall({"a", "b"}, {"c", "d"})  # two of three: degraded
        write(va, 9)
        assert 1.99 <= await flush_timed(a, va) < 3.0
        assert a.statuses("vm")[0].sync_mode.state is SyncState.DEGRADED  # type: ignore[union-attr]
        net.stall()

    in_net(tmp_path, body)


def test_the_mode_survives_a_handover(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b")
        va = a.node.volumes["vm"]
        a.node.set_mode("vm", SYNC)
        a.gossip_now()
        await wait_for(lambda: b.node.sync.setting(b.node.volumes["vm"]).sync, "b to learn the mode")
        write(va, 1)
        await a.node.sync.flush(va)
        await b.primary("vm")
        vb = b.node.volumes["vm"]
        await wait_for(lambda: a.node.is_mirror("vm") and "vm" in a.mirrors.fetchers, "a to follow b")
        st = b.statuses("vm")[0]
        assert st.mode is ReplicationMode.SYNC and st.sync_mode is not None
        va = a.node.volumes["vm"]
        await wait_for(lambda: va.durable_lsn == vb.durable_lsn, "a to catch up")
        for i in range(10):
            write(vb, i + 2)
            await b.node.sync.flush(vb)
            assert va.durable_lsn >= vb.durable_lsn  # the new primary waits for its mirror
        assert b.statuses("vm")[0].sync_mode.state is SyncState.IN_SYNC  # type: ignore[union-attr]

    in_net(tmp_path, body)


async def lose_primary(net: MemNet, a: Cluster, b: Cluster) -> dict[str, object]:
    """Wait until b heard a heartbeat with a's newest acknowledged LSN, lose a, force b."""
    word = a.node.sync.word(a.node.volumes["vm"])
    assert word is not None

    said = word

    def heard() -> bool:
        nonlocal said
        got = b.mirrors.fetchers["vm"].state.primary_sync
        said = got or said
        return got is not None and got.acked_lsn == word.acked_lsn

    await wait_for(heard, "a heartbeat with a's acknowledged LSN")
    await net.kill("a")
    if not b.node.role("vm").fetch_paused:  # (a paused mirror is refused a handover for that first)
        with pytest.raises(PeerError, match=r"cannot reach a.*--force makes this node primary") as refused:
            await b.primary("vm")  # the planned handover needs a; its refusal says what a failover risks
        risk = str(refused.value)
        assert ("nothing acknowledged known lost" in risk) == (said.acked_lsn <= b.node.volumes["vm"].durable_lsn
                                                              and word.mode == "sync" and not word.degraded_since), risk
    return await b.primary("vm", force=True)


@pytest.mark.allow_log("forced failover of vm")
def test_failover_of_a_sync_volume_with_refuse_loses_nothing_acknowledged(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b", mode=ModeSetting(ReplicationMode.SYNC, refuse=True))
        va = a.node.volumes["vm"]
        for i in range(10):
            write(va, i)
            await a.node.sync.flush(va)
        write(va, 99)  # written, never flushed: it may be lost, nobody was told it is safe
        result = await lose_primary(net, a, b)
        loss = result["loss"]
        assert isinstance(loss, dict) and loss["nothing_acked_lost"] and loss["mode"] == "sync" and loss["refuse"]
        assert loss["acked_lost"] == 0 and loss["acked_lsn"] <= b.node.volumes["vm"].durable_lsn
        assert "nothing acknowledged lost: a was in sync mode with --refuse" in str(result["lost"])
        st = b.statuses("vm")[0]
        assert st.mode is ReplicationMode.SYNC and st.sync_mode is not None  # the new primary keeps the mode

    in_net(tmp_path, body)


@pytest.mark.allow_log("forced failover of vm")
def test_failover_of_a_sync_volume_without_refuse_says_what_is_not_proven(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b", mode=SYNC)
        va = a.node.volumes["vm"]
        for i in range(5):
            write(va, i)
            await a.node.sync.flush(va)
        result = await lose_primary(net, a, b)
        loss = result["loss"]
        assert isinstance(loss, dict) and not loss["nothing_acked_lost"] and loss["acked_lost"] == 0
        assert "nothing acknowledged known lost: a was in sync at its last word" in str(result["lost"])
        assert "not proven beyond that" in str(result["lost"])

    in_net(tmp_path, body)


@pytest.mark.allow_log("forced failover of vm", DEGRADED)
def test_failover_after_a_degraded_spell_says_since_when_and_how_much(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b", mode=SYNC)
        va = a.node.volumes["vm"]
        b.set_paused("vm", "fetch", True)  # b hears heartbeats and fetches nothing
        await trio.sleep(1.0)
        write(va, 1)
        assert await flush_timed(a, va) >= 1.99  # degraded
        for i in range(4):
            write(va, i + 2)
            await a.node.sync.flush(va)
        kept = b.node.volumes["vm"].durable_lsn
        result = await lose_primary(net, a, b)
        loss = result["loss"]
        assert isinstance(loss, dict) and not loss["nothing_acked_lost"] and loss["degraded_since"] > 0
        assert loss["acked_lost"] == va.durable_lsn - kept > 0
        assert "a ran degraded (async) since" in str(result["lost"])
        assert f"at least {va.durable_lsn - kept} of the lost records were acknowledged" in str(result["lost"])

    in_net(tmp_path, body)


@pytest.mark.allow_log("forced failover of vm")
def test_failover_of_an_async_volume_counts_acknowledged_writes_lost(tmp_path: Path) -> None:
    async def body(net: MemNet) -> None:
        a, b = await pair(net, "a", "b")
        va = a.node.volumes["vm"]
        b.set_paused("vm", "fetch", True)
        await trio.sleep(1.0)
        kept = b.node.volumes["vm"].durable_lsn
        for i in range(3):
            write(va, i)
            await a.node.sync.flush(va)
        result = await lose_primary(net, a, b)
        loss = result["loss"]
        assert isinstance(loss, dict) and loss["mode"] == "async" and loss["acked_lost"] == va.durable_lsn - kept == 6
        assert "a ran in async mode: at least 6 of the lost records were acknowledged" in str(result["lost"])

    in_net(tmp_path, body)
