"""Fetching as its source changes, in the replication pumps: the real Server and Fetcher on memory streams and MockClock.

* Volume identity: a session whose volume is deleted (and created again) on the source ends
  with ``volume-deleted``; a fetcher that meets a volume of its name with another uuid stops
  with ``volume-replaced``. Both stop the fetcher for good, in words.
* A paused fetcher watches: it keeps a session that brings heartbeats and no records, so its
  lag grows with the source's writes; resumed, it catches up.
* A new mirror's first copy (a fast sync into an empty image, as ``join`` makes it) reports
  how far the source compared while it compares.
* A fetch failure is a reason in words: no empty text, no bare exception class.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from marsfs.node.volstate import MirrorFacts, VolumeState, mirror_state
from marsfs.replication.fetch import Fetcher
from marsfs.replication.server import PeerTable, Server
from marsfs.replication.session import SUMS_BLOCKS, SyncStatus
from marsfs.testing.memnet import CLUSTER, SIZE, Link, copy_image, fetcher, primary, write
from marsfs.testing.runner import run, wait_for
from marsfs.volume import Volume


class Node:
    """The serving side of node ``a`` with a volume table that tests change (delete, create)."""

    def __init__(self, *vols: Volume) -> None:
        self.volumes = {v.name: v for v in vols}
        self.peers = PeerTable()
        self.server = Server("a", CLUSTER, self.volumes.get, lambda name: 3, self.peers)


# ---------------------------------------------------------------------------------------------- identity


@pytest.mark.allow_log(r"fetch of vm from a stopped: a deleted volume vm")
@pytest.mark.parametrize("recreate", [False, True], ids=["deleted", "deleted-and-created"])
def test_a_session_ends_when_the_source_deletes_its_volume(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                           recreate: bool) -> None:
    a = primary(tmp_path)
    node = Node(a)
    anew = Volume.create(tmp_path / "a2" / "vm", "vm", SIZE, sync_interval=None)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, node.server.handle)
            b = await copy_image(link, tmp_path / "b" / "vm")
            try:
                f = fetcher(b, link)
                nursery.start_soon(f.run)
                await wait_for(lambda: f.state.connected and f.state.last_heartbeat > 0, "a heartbeat")
                assert [p.node for p in node.peers.for_volume("vm", a.uuid)] == ["b"]
                del node.volumes["vm"]  # marsfs delete vm --force on a (and maybe create vm)
                if recreate:
                    node.volumes["vm"] = anew
                    await trio.to_thread.run_sync(write, anew, 9, 3)
                with trio.fail_after(5):
                    while not f.state.fatal:
                        await trio.sleep(0.05)
                assert f.state.fatal == "volume-deleted" and not f.state.connected
                assert f.state.error.startswith(f"a deleted volume vm (uuid {a.uuid})")
                if recreate:
                    assert f"and created a new volume vm (uuid {anew.uuid})" in f.state.error
                assert node.peers.for_volume("vm", a.uuid) == []  # the old volume's mirror is forgotten
                assert len(link.opened) == 2  # the first copy and the one fetch: no retries
                nursery.cancel_scope.cancel()
            finally:
                b.close()

    with caplog.at_level(logging.INFO, logger="marsfs"):
        try:
            run(main)
        finally:
            a.close()
            anew.close()
    assert any("replication connection from b ends: a deleted volume vm" in r.getMessage() for r in caplog.records)


@pytest.mark.allow_log(r"fetch of vm from a stopped: a's volume vm is not the volume this mirror copies")
def test_a_fetcher_meeting_another_volume_of_its_name_stops(tmp_path: Path) -> None:
    """The mirror was away while the source deleted and created the volume: WELCOME tells."""
    a = primary(tmp_path)
    node = Node(a)
    anew = Volume.create(tmp_path / "a2" / "vm", "vm", SIZE, sync_interval=None)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, node.server.handle)
            b = await copy_image(link, tmp_path / "b" / "vm")
            try:
                node.volumes["vm"] = anew
                await trio.to_thread.run_sync(write, anew, 9, 40)  # more records than the mirror has
                f = fetcher(b, link)
                with trio.fail_after(5):
                    await f.run()  # returns: stopped for good
                assert f.state.fatal == "volume-replaced"
                assert f"uuid {anew.uuid} there, {a.uuid} here" in f.state.error
                assert "marsfs leave vm, then marsfs join vm --from a" in f.state.error
                assert b.durable_lsn == a.durable_lsn  # nothing of the other volume was fetched
                assert node.peers.for_volume("vm", anew.uuid) == []
            finally:
                b.close()
            nursery.cancel_scope.cancel()

    try:
        run(main)
    finally:
        a.close()
        anew.close()


# ---------------------------------------------------------------------------------------------- pause


def test_a_paused_fetcher_watches_its_lag_grow_and_resumes(tmp_path: Path) -> None:
    a = primary(tmp_path)
    node = Node(a)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, node.server.handle)
            b = await copy_image(link, tmp_path / "b" / "vm")
            try:
                paused = [True]
                f = fetcher(b, link, paused)
                nursery.start_soon(f.run)
                await wait_for(lambda: f.state.connected and f.state.last_heartbeat > 0, "a watching session")
                start = b.durable_lsn
                await trio.to_thread.run_sync(write, a, 3, 40)
                await wait_for(lambda: f.state.primary_durable_lsn == a.durable_lsn, "a heartbeat after the writes")
                assert b.durable_lsn == start  # paused: nothing fetched
                assert f.state.lag_records == a.durable_lsn - start > 40
                assert f.state.lag_bytes == a.log.bytes_between(start, a.durable_lsn) > 0
                (peer,) = node.peers.for_volume("vm", a.uuid)
                await wait_for(lambda: peer.fetch_paused, "an ACK that says paused")
                assert peer.connected and peer.fetched_lsn == start
                paused[0] = False
                await wait_for(lambda: b.durable_lsn == a.durable_lsn and f.state.lag_records == 0, "catching up")
                assert not f.state.error
                nursery.cancel_scope.cancel()
            finally:
                b.close()
        assert len(link.opened) == 3  # the first copy, the watching session, the fetching one

    try:
        run(main)
    finally:
        a.close()


def test_records_arriving_after_a_pause_are_not_fetched(tmp_path: Path) -> None:
    """pause-fetch means nothing more is fetched from that moment: a fetcher that was waiting
    for frames when the pause came must not append the next RECORDS frame it receives."""
    a = primary(tmp_path)
    node = Node(a)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, node.server.handle)
            b = await copy_image(link, tmp_path / "b" / "vm")
            try:
                paused = [False]
                f = fetcher(b, link, paused)
                nursery.start_soon(f.run)
                await wait_for(lambda: f.state.connected and f.state.last_heartbeat > 0, "a fetching session")
                paused[0] = True  # the fetcher sits in its receive: the pause lands there
                start = b.durable_lsn
                await trio.to_thread.run_sync(write, a, 3, 40)
                await wait_for(lambda: f.state.primary_durable_lsn == a.durable_lsn, "a heartbeat after the writes")
                assert b.durable_lsn == start, "records were fetched after the pause"
                nursery.cancel_scope.cancel()
            finally:
                b.close()

    try:
        run(main)
    finally:
        a.close()


# ---------------------------------------------------------------------------------------------- copy progress


class Recorded(SyncStatus):
    """A sync status that remembers every progress report (times: the caller's clock)."""

    def __init__(self) -> None:
        super().__init__(started=0.0)
        self.reports: list[tuple[float, int]] = []

    def update(self, now: float, compared: int, received: int) -> None:
        super().update(now, compared, received)
        self.reports.append((now, compared))


def test_a_first_copy_shows_progress_while_the_source_compares(tmp_path: Path) -> None:
    """What the source's log wrote is compared, one SYNC_SUMS step (4 MiB) at a time, and the
    mirror's status moves through it before the end."""
    steps = 6
    step = SUMS_BLOCKS * 4096
    a = Volume.create(tmp_path / "a" / "vm", "vm", steps * step, sync_interval=None)
    for i in range(steps):
        for k in range(4):  # 1 MiB at the start of each step
            a.write(i * step + k * 256 * 1024, bytes([i + 1]) * (256 * 1024))
    a.flush()
    node = Node(a)
    status = Recorded()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, node.server.handle)
            b = await copy_image(link, tmp_path / "b" / "vm", status)
            try:
                assert b.head_lsn == a.durable_lsn and b.read(0, a.size) == a.read(0, a.size)
            finally:
                b.close()
            nursery.cancel_scope.cancel()

    try:
        run(main)
    finally:
        a.close()
    done = [d for _, d in status.reports]
    assert status.total == steps * 1024 * 1024 and status.lsn == a.durable_lsn
    assert done == sorted(done) and done[-1] == status.total, done
    assert len([d for d in done if 0 < d < status.total]) >= steps - 1, "no progress before the end"


# ---------------------------------------------------------------------------------------------- reasons


def test_a_fetch_that_times_out_says_so_in_words(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = primary(tmp_path)
    b = Volume.create_replica(tmp_path / "b" / "vm", "vm", SIZE, a.uuid, a.durable_lsn, a.log.last_chain)
    tries: list[float] = []

    async def hang() -> trio.abc.Stream:
        tries.append(trio.current_time())
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            f = Fetcher(b, "b", CLUSTER, "a", hang, paused=lambda: False, replayed=lambda: b.replayed_lsn,
                        replay_paused=lambda: False)
            nursery.start_soon(f.run)
            while len(tries) < 2:
                await trio.sleep(1)
            assert f.state.error == "no answer in time (timed out)"
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="marsfs"):
        try:
            run(main, autojump=0)
        finally:
            a.close()
            b.close()
    lines = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert lines and lines[0].startswith("fetch of vm from a: no answer in time (timed out); retrying in"), lines
    assert not any("Error: ;" in line or "Error: " in line for line in lines), lines


@pytest.mark.parametrize("code", ["volume-deleted", "volume-replaced"])
def test_a_source_volume_gone_needs_a_resync(code: str) -> None:
    state, errors = mirror_state(MirrorFacts(
        source="a", fetching=True, fatal=code, error="a deleted volume vm (uuid u-1)", fetch_paused=False,
        replay_paused=False, connected=False, since_progress=0.0, missing_records=0, lag_records=0,
        heartbeat_age=0.1))
    assert state is VolumeState.NEEDS_RESYNC and errors == ["fetch from a: a deleted volume vm (uuid u-1)"]
