"""Replication in one process (the t3 tier): a primary Volume, its Server, and connections to it
over trio memory streams instead of TCP; run them with :mod:`marsfs.testing.runner`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio.testing

from marsfs.log import genesis_chain
from marsfs.replication.fetch import Fetcher, hello, open_channel, receive_sync, stage_resync
from marsfs.replication.protocol import SyncInfo, SyncRequest
from marsfs.replication.server import PeerTable, Server
from marsfs.replication.session import FetchingSession, SyncStatus
from marsfs.volume import Volume

SIZE = 4 * 1024 * 1024
CLUSTER = "test"

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


class Link:
    """Connections to ``handler`` over memory streams; remembers when each was opened."""

    def __init__(self, nursery: trio.Nursery, handler: Handler) -> None:
        self.nursery = nursery
        self.handler = handler
        self.opened: list[float] = []

    async def connect(self) -> trio.abc.Stream:
        self.opened.append(trio.current_time())
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.handler, server)
        return client


def primary(tmp_path: Path) -> Volume:
    vol = Volume.create(tmp_path / "a" / "vm", "vm", SIZE, sync_interval=None)
    write(vol, 0, 5)
    return vol


def write(vol: Volume, seed: int, n: int) -> None:
    """``n`` writes of 64 KiB at offsets that depend on ``seed``, then a flush."""
    for i in range(n):
        off = ((seed * 7 + i * 13) % (SIZE // 65536)) * 65536
        vol.write(off, bytes([(seed + i) % 251 + 1]) * 65536)
    vol.flush()


def server_for(vol: Volume, peers: PeerTable | None = None) -> Server:
    return Server("a", CLUSTER, lambda name: vol if name == vol.name else None, lambda name: 3, peers or PeerTable())


async def copy_image(link: Link, path: Path, status: SyncStatus | None = None) -> Volume:
    """A new mirror's first copy as ``join`` makes it: an empty replica at LSN 0, fast-synced
    into its base (only what the source's log wrote is compared); durable on return, at the
    source's shippable LSN. ``status`` follows the progress."""
    ch, welcome = await open_channel(link.connect, FetchingSession(hello("b", CLUSTER, "vm", "sync")))
    try:
        assert welcome.epoch == 3
        genesis = genesis_chain(welcome.uuid)
        vol = await trio.to_thread.run_sync(Volume.create_replica, path, "vm", welcome.size, welcome.uuid, 0, genesis)
        try:
            async def finish(info: SyncInfo) -> int:
                assert await trio.to_thread.run_sync(vol.finish_resync), "nothing holds an old version"
                return vol.head_lsn

            request = SyncRequest(since_lsn=0, since_chain=genesis)
            await receive_sync(ch, request, lambda info: stage_resync(vol, info, direct=True), finish,
                               status if status is not None else SyncStatus(started=trio.current_time()))
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(vol.close)
            raise
        return vol
    finally:
        await ch.aclose()


async def tick() -> None:
    """Keeps a deadline near, so that the MockClock jumps in small steps while worker threads
    run (it jumps to the next deadline, which may be a test's timeout, when all tasks wait)."""
    while True:
        await trio.sleep(0.05)


def fetcher(mirror: Volume, link: Link, paused: list[bool] | None = None) -> Fetcher:
    flag = paused if paused is not None else [False]
    return Fetcher(mirror, "b", CLUSTER, "a", link.connect, paused=lambda: flag[0],
                   replayed=lambda: mirror.replayed_lsn, replay_paused=lambda: False)
