"""Replication in one process (the t3 tier), over trio memory streams instead of TCP; run it
with :mod:`marsfs.testing.runner`.

Two sizes of the same kit:

* one volume: a primary Volume, its Server (:func:`server_for`) and connections to it
  (:class:`Link`), for the replication protocol itself;
* whole nodes: :class:`MemNet`, real Nodes and Clusters under one directory whose peers reach
  each other through memory streams, with the two failures the cluster tests need: a node that
  is down (``down``, :meth:`MemNet.kill`) and a cut link (:meth:`MemNet.partition`). Connect
  through :meth:`MemNet.connect`; :func:`in_net` runs a test body in one.

A connection that breaks or corrupts is a :class:`PassStream` that overrides what it changes
(:class:`CutStream` is the partition's).
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import trio
import trio.testing

from marsfs.log import genesis_chain
from marsfs.node.cluster import Cluster
from marsfs.node.node import Node
from marsfs.replication.fetch import Connect, Fetcher, hello, open_channel, receive_sync, stage_resync
from marsfs.replication.protocol import SyncInfo, SyncRequest
from marsfs.replication.server import PeerTable, Server
from marsfs.replication.session import FetchingSession, SyncStatus
from marsfs.testing.runner import run
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


def fetcher(mirror: Volume, link: Link, paused: list[bool] | None = None) -> Fetcher:
    flag = paused if paused is not None else [False]
    return Fetcher(mirror, "b", CLUSTER, "a", link.connect, paused=lambda: flag[0],
                   replayed=lambda: mirror.replayed_lsn, replay_paused=lambda: False)


class PassStream(trio.abc.Stream):
    """A stream that passes everything to and from ``inner``: the base of the streams that
    break or corrupt a connection (a subclass overrides what it changes)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class CutStream(PassStream):
    """A memory stream that breaks while ``cut()`` says its link is cut (a partition), and
    holds what it received while ``stalled()`` says its link is stalled, until ``healed()``
    returns (a link that stays up and carries nothing)."""

    def __init__(self, inner: trio.abc.Stream, cut: Callable[[], bool], stalled: Callable[[], bool] = lambda: False,
                 healed: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(inner)
        self.cut = cut
        self.stalled = stalled
        self.healed = healed

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.cut():
            raise trio.BrokenResourceError("partitioned")
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        while self.stalled() and self.healed is not None:
            await self.healed()
        if self.cut():
            raise trio.BrokenResourceError("partitioned")
        return data


class MemPeers:
    """How node ``me`` of a :class:`MemNet` reaches its peers: a
    :class:`marsfs.node.peers.Peers` that knows every node of the net."""

    def __init__(self, net: MemNet, me: str) -> None:
        self.net = net
        self.me = me

    def connector(self, peer: str) -> Connect:
        return self.net.connect(peer, self.me)

    def where(self, peer: str) -> str:
        return f"memory stream to {peer}"


class MemNet:
    """In-process nodes (real Nodes and Clusters under ``root``) connected by memory streams.

    A node is reachable once its Cluster runs (:meth:`start`) and while it is not in ``down``;
    a link is broken both ways while it is in ``cut`` (both ends' connections fail, new ones are
    refused), and stalled while it is in ``stalled`` (:meth:`stall`: connections stay up, what
    is sent arrives only once it is healed). Close it (:meth:`close`) after the nursery ended."""

    def __init__(self, root: Path, nursery: trio.Nursery, names: Iterable[str] = ()) -> None:
        self.root = root
        self.nursery = nursery
        #: the open nodes (``names`` open at once, so a test can set them up before they run)
        self.nodes: dict[str, Node] = {n: Node.open(root / n, n) for n in names}
        self.clusters: dict[str, Cluster] = {}  #: the running ones
        self.down: set[str] = set()
        self.cut: set[frozenset[str]] = set()
        self.stalled: set[frozenset[str]] = set()
        self._healed = trio.Event()
        self._streams: dict[str, list[trio.abc.Stream]] = {}  # server ends, per node: kill ends them

    async def start(self, name: str, peers: Iterable[str]) -> Cluster:
        """Run node ``name`` (opened now unless it is open) as a Cluster knowing ``peers``."""
        if name not in self.nodes:
            self.nodes[name] = Node.open(self.root / name, name)
        # the addresses are never used: connections go through connect() (metadata gossip too)
        cluster = Cluster(self.nodes[name], listen=None, peers={p: "127.0.0.1:1" for p in peers if p != name},
                          cluster=CLUSTER, connections=MemPeers(self, name))
        await self.nursery.start(cluster.run)
        self.clusters[name] = cluster
        return cluster

    def connect(self, peer: str, me: str = "") -> Connect:
        """Connections from ``me`` (a node, or "" for the test itself: never cut) to ``peer``."""
        link = frozenset((me, peer))

        def broken() -> bool:
            return link in self.cut

        def stalled() -> bool:
            return link in self.stalled

        async def connect() -> trio.abc.Stream:
            if peer in self.down or peer not in self.clusters or broken():
                raise OSError(errno.ECONNREFUSED, f"connection refused ({peer} is down or partitioned)")
            client, server = trio.testing.memory_stream_pair()
            end = CutStream(server, broken, stalled, self._wait_healed)
            self._streams.setdefault(peer, []).append(end)
            self.nursery.start_soon(self.clusters[peer].server.handle, end)
            return CutStream(client, broken, stalled, self._wait_healed)

        return connect

    async def kill(self, peer: str) -> None:
        """``peer`` is gone: its connections end, new ones are refused (until it leaves ``down``)."""
        self.down.add(peer)
        for stream in self._streams.pop(peer, []):
            await stream.aclose()

    def partition(self, *groups: set[str]) -> None:
        """Cut every link between nodes of different ``groups`` (none: heal them all)."""
        self.cut = {frozenset((a, b)) for g in groups for a in g for b in self.nodes if b not in g}

    def stall(self, *groups: set[str]) -> None:
        """Stall every link between nodes of different ``groups`` (none: heal them all): its
        connections stay up, but nothing arrives until it is healed (then everything does)."""
        self.stalled = {frozenset((a, b)) for g in groups for a in g for b in self.nodes if b not in g}
        if not self.stalled:
            self._healed.set()
            self._healed = trio.Event()

    async def _wait_healed(self) -> None:
        await self._healed.wait()

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


def in_net(root: Path, body: Callable[[MemNet], Awaitable[None]], names: Iterable[str] = ()) -> None:
    """Run ``body`` with a :class:`MemNet` (nodes ``names`` opened) under :func:`run`; the nodes'
    tasks are cancelled when it ends, and the nodes closed once those ended."""
    nets: list[MemNet] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nets.append(MemNet(root, nursery, names))
            await body(nets[0])
            nursery.cancel_scope.cancel()

    try:
        run(main)
    finally:
        for net in nets:
            net.close()
