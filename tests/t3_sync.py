"""Fast sync between the real Server and ``receive_sync`` over memory streams (MockClock).

The mirror side stages into a bytearray here (the conversation does not care what stages);
the source is a real Volume. What holds:

* A sync brings the staged image to the source's image at the target LSN, and only blocks
  that differ travel.
* A connection cut mid-sync, or a frame damaged on the way, ends the attempt (ConnectionLost,
  ProtocolError: a reconnect), and the next attempt over the same staging sends only what is
  still missing.
* The source paces data to its ``sync_rate`` and to the request's ``rate``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from marsfs.errors import ProtocolError
from marsfs.log import genesis_chain
from marsfs.replication.channel import ConnectionLost
from marsfs.replication.fetch import Fetcher, ResyncPlan, hello, open_channel, receive_sync
from marsfs.replication.protocol import SyncInfo, SyncRequest
from marsfs.replication.server import Server
from marsfs.replication.session import FetchingSession, SyncStatus
from marsfs.testing.memnet import (
    CLUSTER,
    SIZE,
    Link,
    PassStream,
    copy_image,
    fetcher,
    primary,
    server_for,
    write,
)
from marsfs.testing.runner import run, wait_for
from marsfs.volume import Volume
from marsfs.volume.blocksums import BLOCK


class Staged:
    """A staging over a bytearray; ``finish`` records the target."""

    def __init__(self, image: bytes) -> None:
        self.image = bytearray(image)
        self.syncs = 0
        self.finished: SyncInfo | None = None

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.image[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.image[offset : offset + len(data)] = data

    def sync(self) -> None:
        self.syncs += 1

    async def finish(self, info: SyncInfo) -> int:
        self.finished = info
        return info.lsn


class Faulty(PassStream):
    """The mirror's end of a connection: cut (reset) after ``cut_after`` received bytes, or one
    bit flipped at received byte ``flip_at``."""

    def __init__(self, inner: trio.abc.Stream, cut_after: int | None, flip_at: int | None) -> None:
        super().__init__(inner)
        self.cut_after = cut_after
        self.flip_at = flip_at
        self.seen = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.cut_after is not None and self.seen >= self.cut_after:
            raise trio.BrokenResourceError("connection reset (test)")
        data = bytearray(await self.inner.receive_some(max_bytes))
        if self.cut_after is not None:
            data = data[: self.cut_after - self.seen]
        if self.flip_at is not None and self.seen <= self.flip_at < self.seen + len(data):
            data[self.flip_at - self.seen] ^= 0x10
        self.seen += len(data)
        return data


async def sync_once(nursery: trio.Nursery, server: Server, staged: Staged, *, cut_after: int | None = None,
                    flip_at: int | None = None, whole: bool = True, rate: int = 0) -> tuple[SyncInfo, int]:
    """One sync attempt; returns the target and the data bytes that arrived."""

    async def connect() -> trio.abc.Stream:
        client, srv = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle, srv)
        return Faulty(client, cut_after, flip_at)

    sess = FetchingSession(hello("b", CLUSTER, "vm", "sync"))
    ch, _ = await open_channel(connect, sess)
    try:
        req = SyncRequest(since_lsn=0, since_chain=bytes(16), whole=whole, rate=rate)
        info = await receive_sync(ch, req, lambda i: staged, staged.finish, SyncStatus(started=trio.current_time()))
    finally:
        await ch.aclose()
    return info, sess.received


def write_random(vol: Volume, n: int, seed: int = 3) -> None:
    """``n`` writes of 64 KiB of random (incompressible) bytes, then a flush."""
    rng = random.Random(seed)
    for _ in range(n):
        vol.write(rng.randrange(SIZE // 65536) * 65536, rng.randbytes(65536))
    vol.flush()


def changed_copy(vol: Volume, blocks: list[int], seed: int = 7) -> bytes:
    """The volume's image with ``blocks`` changed."""
    image = bytearray(vol.read(0, vol.size))
    rng = random.Random(seed)
    for b in blocks:
        image[b * BLOCK : (b + 1) * BLOCK] = rng.randbytes(BLOCK)
    return bytes(image)


def test_a_sync_sends_only_the_blocks_that_differ(tmp_path: Path) -> None:
    a = primary(tmp_path)
    write(a, 3, 30)
    differ = [0, 9, 10, 11, 500, SIZE // BLOCK - 1]
    staged = Staged(changed_copy(a, differ))
    server = server_for(a)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info, received = await sync_once(nursery, server, staged)
            assert info.lsn == a.durable_lsn and info.ranges == ((0, SIZE),)
            assert received == len(differ) * BLOCK
            assert staged.finished == info and staged.syncs >= 1
            assert bytes(staged.image) == a.read(0, SIZE)
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("fault", ["cut", "flip"])
def test_an_interrupted_sync_resumes_without_resending(tmp_path: Path, fault: str) -> None:
    a = primary(tmp_path)
    write_random(a, 30)
    staged = Staged(bytes(SIZE))  # a new replica: every non-zero block differs
    server = server_for(a)
    nonzero = sum(1 for off in range(0, SIZE, BLOCK) if a.read(off, BLOCK) != bytes(BLOCK)) * BLOCK

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            half = nonzero // 2
            cut_after, flip_at = (half, None) if fault == "cut" else (None, half)
            with pytest.raises(ConnectionLost if fault == "cut" else ProtocolError):
                await sync_once(nursery, server, staged, cut_after=cut_after, flip_at=flip_at)
            assert staged.finished is None
            first = sum(1 for off in range(0, SIZE, BLOCK) if staged.read(off, BLOCK) == a.read(off, BLOCK)
                        and a.read(off, BLOCK) != bytes(BLOCK)) * BLOCK
            assert 0 < first < nonzero
            info, received = await sync_once(nursery, server, staged)
            assert received == nonzero - first  # nothing staged before is sent again
            assert bytes(staged.image) == a.read(0, SIZE) and staged.finished == info
            nursery.cancel_scope.cancel()

    run(main)


def test_the_source_paces_sync_data(tmp_path: Path) -> None:
    a = primary(tmp_path)
    staged = Staged(bytes(SIZE))
    nonzero = sum(1 for off in range(0, SIZE, BLOCK) if a.read(off, BLOCK) != bytes(BLOCK)) * BLOCK
    rate = nonzero // 4  # four (virtual) seconds of data

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for server, req_rate in ((server_for(a), rate), (Server("a", CLUSTER, lambda n: a, lambda n: 3,
                                                                      server_for(a).peers, sync_rate=rate), 0)):
                staged.image[:] = bytes(SIZE)
                t0 = trio.current_time()
                await sync_once(nursery, server, staged, rate=req_rate)
                assert 3.8 <= trio.current_time() - t0
            nursery.cancel_scope.cancel()

    run(main)


# ---------------------------------------------------------------------------- the fetcher with a real Volume


def fetcher_of(mirror: Volume, connect: Callable[[], Awaitable[trio.abc.Stream]], **kw: Any) -> Fetcher:
    return Fetcher(mirror, "b", CLUSTER, "a", connect, paused=lambda: False, replayed=lambda: mirror.replayed_lsn,
                   replay_paused=lambda: False, **kw)


def same_version(a: Volume, b: Volume) -> bool:
    """Both at the same durable LSN with the same chain and the same image there."""
    lsn = a.durable_lsn
    if b.durable_lsn != lsn or b.log.last_chain != a.log.chain_at(lsn):
        return False
    va, vb = a.view(lsn), b.view(lsn)
    try:
        return va.read(0, SIZE) == vb.read(0, SIZE)
    finally:
        va.close()
        vb.close()


def test_a_first_copy_then_a_catch_up_after_the_log_was_trimmed(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                                ) -> None:
    caplog.set_level(logging.INFO, "marsfs")
    a = primary(tmp_path)
    write_random(a, 20)
    b = Volume.create_replica(tmp_path / "b" / "vm", "vm", SIZE, a.uuid, 0, genesis_chain(a.uuid))
    server = server_for(a)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            connect = Link(nursery, server.handle).connect
            synced: list[int] = []
            f = fetcher_of(b, connect, resync=ResyncPlan(), direct=True, synced=lambda: synced.append(b.head_lsn))
            scope = trio.CancelScope()

            async def run() -> None:
                with scope:
                    await f.run()

            nursery.start_soon(run)
            await wait_for(lambda: synced and f.state.connected and f.state.sync is None, "the first copy")
            await trio.to_thread.run_sync(write_random, a, 5, 9)  # fetched as records
            await wait_for(lambda: b.durable_lsn == a.durable_lsn, "the mirror to fetch")
            assert await trio.to_thread.run_sync(same_version, a, b)
            scope.cancel()
            # the mirror is away; the primary forgets it and drops the log it would need
            await trio.sleep(1)
            before = b.durable_lsn
            await trio.to_thread.run_sync(write_random, a, 10, 11)
            a.release("mirror:b")
            for seed in (13, 14):  # the segment holding the oldest version goes with the next one
                await trio.to_thread.run_sync(lambda: a.writeback(max_bytes=None))
                await trio.to_thread.run_sync(write_random, a, 1, seed)
            assert a.log.first_lsn > before + 1
            f2 = fetcher_of(b, connect)
            nursery.start_soon(f2.run)
            await wait_for(lambda: b.durable_lsn == a.durable_lsn and f2.state.sync is None, "the catch-up")
            assert not f2.state.fatal and b.resync is None
            assert await trio.to_thread.run_sync(same_version, a, b)
            await trio.to_thread.run_sync(write_random, a, 2, 12)  # and the log follows again
            await wait_for(lambda: b.durable_lsn == a.durable_lsn, "the mirror to fetch after the resync")
            assert await trio.to_thread.run_sync(same_version, a, b)
            nursery.cancel_scope.cancel()

    run(main)
    # the log line says what the mirror does by itself, and does not send the operator to do it
    line = next(r.getMessage() for r in caplog.records if "resyncing what changed" in r.getMessage())
    assert "by itself now" in line and "marsfs invalidate" not in line


def test_a_quiet_volume_is_not_shipped_from_until_the_switch_is_over(tmp_path: Path) -> None:
    """A mirror that other mirrors fetch from goes quiet around its resync's switch (the switch
    restarts the log under its readers): fetch sessions end, new ones are refused, and the
    downstream mirror fetches again afterwards, with no fatal refusal."""
    a = primary(tmp_path)
    server = server_for(a)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, server.handle)
            b = await copy_image(link, tmp_path / "b" / "vm")
            f = fetcher(b, link)
            nursery.start_soon(f.run)
            await wait_for(lambda: f.state.connected, "the mirror to fetch")
            async with server.quiet(a):
                await trio.to_thread.run_sync(write, a, 1, 5)
                await trio.sleep(3)
                assert b.durable_lsn < a.durable_lsn  # nothing was shipped meanwhile
                await wait_for(lambda: "switching vm to a resynced version" in f.state.error, "the refusal")
                assert not f.state.fatal
            await wait_for(lambda: b.durable_lsn == a.durable_lsn, "the mirror to fetch again")
            nursery.cancel_scope.cancel()

    run(main)
