"""The serving side of replication: fast-sync images and ship durable log records.

This module does the I/O; what may be said when, and what is admitted, is the
:class:`~marsfs.replication.session.ServingSession`'s (see there for the rules of the
conversation: admission, ``diverged`` and ``log-trimmed``, slow start, heartbeats).

Rules that hold here:

* While a mirror is known, its position holds our log (``Volume.hold``), so we keep what it
  still has to fetch.
* Shipping runs in its own tasks and only reads the log: a slow, stalled or dead link never
  blocks writers (G4). Records are read and frames encoded in worker threads. A session with
  nothing to ship looks again after :data:`POLL`, or at once when a flush made records
  durable (:meth:`PeerTable.more`). Every ACK is passed on (:meth:`PeerTable.acked`): a sync
  volume's flush waits for them (``marsfs.node.syncmode``); heartbeats say the volume's mode.
* Every loop asks the session whether the volume it serves is still the node's volume of that
  name (a ``delete``, maybe followed by a ``create``, replaces the object); if not, the mirror
  is told (``volume-deleted``) and the connection ends. A failure while the volume is being
  deleted under a session is that deletion, not a bug. Mirrors are known per volume *uuid*,
  so a volume created under an old name starts with no mirrors.
* Every HELLO of our protocol and cluster passes the node's gate first (``gate``): a peer in
  no peer list, or a second node that claims the name of a running one, is refused before
  anything is done for it, so it never replaces that node's hold or mirror line.
* Every HELLO about a volume of ours then passes the node's authorization (``authorize``):
  only a member of the volume, or a node whose HELLO is a ``join``'s fast sync, is answered;
  anyone else gets an ERROR (``not-a-member``) before the volume is touched. Metadata (want
  ``meta``) is about no volume: the gate alone decides it.
* A peer that breaks the protocol is logged at INFO and disconnected; it is the peer's fault,
  not ours. Only an error nobody foresaw is logged with its traceback, and it still only ends
  that one connection.
* This module reads the volume and feeds the session values: the volume's facts at
  admission, what the log says about the LSN a FETCH or SYNC_REQUEST names (read in a worker
  thread: a chain is a ``pread``), the shippable LSN at each poll. What they mean (admitted,
  ``diverged``, ``log-trimmed``, which change set to compare) is the session's.
* Fast sync (want ``sync``): the target is a pinned view at the shippable LSN L, and the
  mirror's position holds our log from L+1. The ranges to compare are the change set the
  session names (:func:`read_changes` reads it), else the whole image. Data is paced to the
  node's ``--sync-rate`` and the request's own rate, whichever is lower; sums and progress
  are not paced (they are small and keep the mirror from calling the link stalled).
* A clean stop says goodbye (:meth:`Server.farewell`, once the node's logs are durable and
  nothing writes any more): each fetch session ships what is left, then sends a last
  HEARTBEAT and ERROR ``stopping``, so every mirror knows exactly what it lacks.
* Times are trio times (``trio.current_time``), except wall times compared with record
  timestamps (lag seconds) or shown to users.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import trio

from marsfs.aio import describe, single_error
from marsfs.errors import MarsError, ProtocolError, VersionNotFound
from marsfs.replication.channel import Channel, ConnectionLost
from marsfs.replication.protocol import (
    PROTO_VERSION,
    Ack,
    Error,
    Fetch,
    FrameLz4,
    Hello,
    Records,
    Sums,
    SumsRequest,
    SyncData,
    SyncRequest,
    encode_message,
)
from marsfs.replication.session import (
    Changes,
    Compare,
    LogFacts,
    Pace,
    ServingSession,
    StartShipping,
    SyncWord,
    VolumeFacts,
    combined_rate,
    shippable_lsn,
)
from marsfs.replication.verify import pick_version, sums_span
from marsfs.volume import Volume, VolumeView
from marsfs.volume.blocksums import block_sums

logger = logging.getLogger(__name__)

POLL = 0.01  #: how often a session with nothing to ship looks again
HELLO_TIMEOUT = 10.0  #: seconds a new connection has to send its HELLO; then it is closed


class PeerGate(Protocol):
    """Who may speak to this node (:class:`marsfs.node.identity.Identities` in a daemon): asked
    for every HELLO of our protocol and cluster, before anything else is done for it."""

    def admit(self, name: str, node_id: str, where: str) -> tuple[str, str] | None:
        """None to accept (then :meth:`closed` is called when the connection ends), or the
        refusal's code and message."""
        ...

    def closed(self, name: str, node_id: str) -> None: ...


#: Whether the node of an admitted HELLO may ask what it asks of the volume it names (which this
#: node has): None to answer, or the ERROR to refuse it with
#: (:meth:`marsfs.node.access.Access.authorize` in a daemon).
Authorize = Callable[[Hello, Volume], Error | None]


def peer_address(stream: trio.abc.Stream) -> str:
    """Where a connection comes from, for a log line ("" when the stream does not say)."""
    sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("", 0)
    except (OSError, ValueError, TypeError):
        return ""
    return f"{host}:{port}" if host else ""


#: A conversation another module carries on after WELCOME (``want`` handover, compare): it gets
#: the channel, the HELLO and the volume; the connection is closed when it returns.
Conversation = Callable[[Channel, Hello, Volume], Awaitable[None]]


@dataclass
class PeerState:
    """What this node knows about one mirror of one of its volumes."""

    node: str
    volume: str
    uuid: str
    connected: bool = False
    fetched_lsn: int = 0
    replayed_lsn: int = 0
    fetch_paused: bool = False
    replay_paused: bool = False
    sent_lsn: int = 0
    lag_bytes: int = 0
    lag_records: int = 0
    lag_seconds: float = 0.0
    last_seen: float = field(default_factory=time.time)
    address: str = ""
    probe: int = 0  #: the newest ACK probe, echoed in heartbeats (see session.FetchState)
    syncing: bool = False  #: a fast sync to it runs (its fetched LSN is where it was before)


class SyncHooks(Protocol):
    """What the node's replication modes (``marsfs.node.syncmode.SyncGates``) hear from the
    server and tell it: a mirror's ACK moved its position, and what heartbeats say of a volume's
    mode."""

    def acked(self, volume: str, uuid: str) -> None: ...
    def word(self, vol: Volume) -> SyncWord | None: ...


class PeerTable:
    """Mirrors per volume (name and uuid: a volume created under a deleted one's name is
    another volume, with mirrors of its own), as seen from the node they fetch from.

    It is also where the server and the node's flushes meet: :meth:`more` says that records
    became durable (a flush completed), so shipping sessions send them now instead of at their
    next poll, and ``hooks`` hears every ACK (a sync volume's flush waits for them)."""

    def __init__(self) -> None:
        self._peers: dict[tuple[str, str, str], PeerState] = {}
        self._more: dict[str, trio.Event] = {}  #: uuid -> set when more records of it are durable
        self.hooks: SyncHooks | None = None

    def acked(self, state: PeerState) -> None:
        """``state``'s mirror acknowledged a new position (an ACK, or the end of a fast sync)."""
        if self.hooks is not None:
            self.hooks.acked(state.volume, state.uuid)

    def word(self, vol: Volume) -> SyncWord | None:
        """What a heartbeat says about ``vol``'s replication mode (None: async)."""
        return self.hooks.word(vol) if self.hooks is not None else None

    def more(self, uuid: str) -> None:
        """Records of volume ``uuid`` became durable: wake the sessions that ship it."""
        ev = self._more.pop(uuid, None)
        if ev is not None:
            ev.set()

    async def wait_more(self, uuid: str, timeout: float) -> None:
        """Until :meth:`more` is called for ``uuid``, at most ``timeout`` seconds."""
        ev = self._more.get(uuid)
        if ev is None:
            ev = self._more[uuid] = trio.Event()
        with trio.move_on_after(timeout):
            await ev.wait()

    def get(self, volume: str, uuid: str, node: str) -> PeerState:
        key = (volume, uuid, node)
        if key not in self._peers:
            self._peers[key] = PeerState(node=node, volume=volume, uuid=uuid)
        return self._peers[key]

    def forget(self, volume: str, uuid: str, node: str) -> None:
        self._peers.pop((volume, uuid, node), None)

    def for_volume(self, volume: str, uuid: str) -> list[PeerState]:
        return [p for (v, u, _), p in sorted(self._peers.items()) if (v, u) == (volume, uuid)]


def lag_of(vol: Volume, fetched: int) -> tuple[int, int, float]:
    """(bytes, records, seconds) a mirror that has everything up to ``fetched`` is behind us.

    The age is that of the oldest record the mirror lacks; when our log no longer holds it
    (trimmed) or holds no record at all, the lag counts from now."""
    durable = vol.durable_lsn
    if fetched >= durable:
        return 0, 0, 0.0
    log = vol.log
    first = max(fetched + 1, log.first_lsn)
    now = time.time()
    oldest = log.info(first).timestamp_ns / 1e9 if first <= log.last_lsn else now
    return log.bytes_between(fetched, durable), durable - fetched, max(0.0, now - oldest)


class Server:
    """Answers one replication connection at a time per task (see :meth:`handle`)."""

    def __init__(self, node: str, cluster: str, lookup: Callable[[str], Volume | None],
                 epoch_of: Callable[[str], int], peers: PeerTable,
                 meta: Callable[[Channel, Hello], Awaitable[None]] | None = None,
                 conversations: Mapping[str, Conversation] | None = None, *, sync_rate: int = 0,
                 gate: PeerGate | None = None, authorize: Authorize | None = None) -> None:
        self.node = node
        self.gate = gate  #: refuses peers in no peer list and a second node of one name (None: any peer)
        self.authorize = authorize  #: refuses a volume's non-members (None: anyone the gate let in)
        self.meta = meta  #: answers want "meta" (the node's metadata gossip; it checks the cluster)
        self.conversations = dict(conversations or {})  #: answer want "handover", "compare" after WELCOME
        self.sync_rate = sync_rate  #: bytes/s of fast sync data per connection (0: unlimited)
        self._quiet: set[int] = set()  #: id() of volumes whose log nobody may read now (see quiet)
        self._shipping: Counter[int] = Counter()  #: fetch sessions reading each volume's log, by id()
        self._stopping = False  #: a clean stop: each fetch session says goodbye once it shipped everything
        self.cluster = cluster
        self.lookup = lookup
        self.epoch_of = epoch_of
        self.peers = peers

    async def handle(self, stream: trio.abc.Stream, certified: str | None = None) -> None:
        """Serve one connection. ``certified``: the node name the peer's TLS certificate gives
        (None without TLS); a HELLO that claims another node is refused before anything else."""
        ch = Channel(stream)
        sess = ServingSession(self.node, self.cluster)
        vol: Volume | None = None
        admitted: Hello | None = None
        try:
            with trio.move_on_after(HELLO_TIMEOUT) as waited:
                first = await ch.receive_message()
            if waited.cancelled_caught:
                logger.info("a connection from %s sent no HELLO within %.0f s; closed it",
                            peer_address(stream) or "an unknown address", HELLO_TIMEOUT)
                return
            hello = sess.receive(first)
            assert isinstance(hello, Hello)
            if certified is not None and hello.node != certified:
                logger.info("refused a HELLO as node %s from %s: its certificate is node %s's", hello.node,
                            peer_address(stream) or "an unknown address", certified or "no node")
                await self._refuse(ch, Error(code="node-identity",
                                             error=f"this connection's certificate is node {certified or '(none)'}'s, "
                                                   f"but its HELLO speaks as node {hello.node}: a node speaks only "
                                                   "for the name in its own certificate"))
                return
            ours = hello.proto == PROTO_VERSION and hello.cluster == self.cluster  # else admit() refuses it
            if self.gate is not None and ours:
                refused = self.gate.admit(hello.node, hello.node_id, peer_address(stream))
                if refused is not None:
                    await self._refuse(ch, Error(code=refused[0], error=refused[1]))
                    return
                admitted = hello
            if hello.want == "meta":  # no volume: the node's metadata exchange
                if self.meta is None:
                    await ch.send_message(Error(code="unknown-want", error=f"node {self.node} keeps no metadata"))
                else:
                    await self.meta(ch, hello)
                return
            vol = self.lookup(hello.volume)
            if vol is not None and ours and self.authorize is not None:
                denied = self.authorize(hello, vol)
                if denied is not None:
                    await self._refuse(ch, denied)
                    return
            answer = sess.admit(volume_facts(vol) if vol is not None else None,
                                self.epoch_of(hello.volume) if vol is not None else 0)
            await ch.send_message(answer)
            if isinstance(answer, Error) or vol is None:
                return
            if hello.want == "fetch":
                await self._serve_fetch(ch, sess, vol)
            elif hello.want == "sync":
                await self._serve_sync(ch, sess, vol)
            elif hello.want == "sums":
                await self._serve_sums(ch, sess, vol)
            elif hello.want == "leave":
                vol.release(sess.hold_key)
                self.peers.forget(vol.name, vol.uuid, sess.peer)
            elif hello.want in self.conversations:
                await self.conversations[hello.want](ch, hello, vol)
            else:
                await self._refuse(ch, Error(code="unsupported", error=f"node {self.node} does not serve "
                                                                         f"{hello.want!r} conversations"))
        except (ConnectionLost, ProtocolError) as e:
            logger.info("replication connection from %s ended: %s", sess.peer, describe(e))
        except Exception as e:
            if vol is not None and await self._volume_gone(ch, sess, vol):
                pass  # it failed because the volume was deleted under it: said so to the mirror
            elif isinstance(e, MarsError):
                logger.warning("replication connection from %s: %s", sess.peer, describe(e))
                await self._refuse(ch, Error(code="error", error=describe(e)))
            else:  # a bug in one peer's connection must not take the node down (G4)
                logger.exception("replication connection from %s failed; dropping it", sess.peer)
        finally:
            if admitted is not None and self.gate is not None:
                self.gate.closed(admitted.node, admitted.node_id)
            await ch.aclose()

    async def _refuse(self, ch: Channel, error: Error) -> None:
        try:
            await ch.send_message(error)
        except ConnectionLost:
            pass

    async def _volume_gone(self, ch: Channel, sess: ServingSession, vol: Volume) -> bool:
        """If ``vol`` is no longer this node's volume of its name: tell the mirror, forget it
        (its position no longer holds anything here) and return True."""
        current = self.lookup(vol.name)
        if current is vol:
            return False
        gone = sess.volume_gone(current.uuid if current is not None else None)
        if gone is None:
            return False
        logger.info("replication connection from %s ends: %s", sess.peer, gone.error)
        self.peers.forget(vol.name, vol.uuid, sess.peer)
        await self._refuse(ch, gone)
        return True

    async def _serve_sync(self, ch: Channel, sess: ServingSession, vol: Volume) -> None:
        req = sess.receive(await ch.receive_message())
        assert isinstance(req, SyncRequest)
        await trio.to_thread.run_sync(vol.log.sync)
        lsn = shippable_lsn(vol)
        view = vol.view(lsn)
        state = self.peers.get(vol.name, vol.uuid, sess.peer)  # a mirror (and member) from now on, syncing
        state.connected = state.syncing = True
        state.last_seen = time.time()
        try:
            vol.hold(sess.hold_key, lsn)  # the mirror fetches from lsn+1 once it switched (persisted: a member)
            since = await trio.to_thread.run_sync(log_facts, vol.log, req.since_lsn)
            changes = sess.changes(since, lsn)
            changed, chain = await trio.to_thread.run_sync(read_changes, vol, changes, sess.peer, req.since_lsn, lsn)
            info = sess.plan_sync(changed, lsn, chain, vol.size)
            await ch.send_message(info)
            logger.info("fast sync of %s at LSN %d to %s: comparing %d bytes%s", vol.name, lsn, sess.peer,
                        info.total, "" if changed is None else " (what changed since its LSN "
                        f"{req.since_lsn}{' and its own ranges' if req.ranges else ''})")
            pace = Pace(combined_rate(self.sync_rate, req.rate))
            while not sess.sync_complete:
                if await self._volume_gone(ch, sess, vol):
                    return
                job = sess.receive(await ch.receive_message())
                assert isinstance(job, Compare)
                frames = await trio.to_thread.run_sync(_compare, sess, view, job)
                for frame, data_bytes in frames:
                    if data_bytes:
                        await trio.sleep(pace.delay(trio.current_time(), data_bytes))
                    await ch.send_raw(frame)
            await ch.send_message(sess.end_sync())
            logger.info("fast sync of %s to %s compared %d bytes, sent %d", vol.name, sess.peer,
                        sess.sync_compared, sess.sync_sent)
            sess.receive(await ch.receive_message())  # the ACK: the mirror switched to LSN lsn
            state.fetched_lsn = state.replayed_lsn = state.sent_lsn = lsn
            state.last_seen = time.time()
            self.peers.acked(state)
        finally:
            state.connected = state.syncing = False
            view.close()
    async def _serve_sums(self, ch: Channel, sess: ServingSession, vol: Volume) -> None:
        """Block sums of one version, pinned from the first request until the client hangs up
        (see :mod:`marsfs.replication.verify`)."""
        view = None
        try:
            while True:
                req = sess.receive(await ch.receive_message())
                assert isinstance(req, SumsRequest)
                if view is None:
                    lsn = pick_version(req, vol.oldest_version_lsn, vol.replayed_lsn, self.node, vol.name)
                    if isinstance(lsn, Error):
                        await ch.send_message(lsn)
                        return
                    try:
                        view = await trio.to_thread.run_sync(vol.view, lsn)
                    except VersionNotFound as e:  # writeback passed it since pick_version
                        await ch.send_message(Error(code="version-not-retained", error=str(e)))
                        return
                span = sums_span(req, view.lsn, view.size)
                if isinstance(span, Error):
                    await ch.send_message(span)
                    return
                sums = await trio.to_thread.run_sync(block_sums, view.read, *span)
                await ch.send_message(Sums(lsn=view.lsn, offset=span[0], size=view.size, sums=sums))
        except ConnectionLost:
            pass  # the client hangs up when it has what it asked for
        finally:
            if view is not None:
                view.close()

    @asynccontextmanager
    async def quiet(self, vol: Volume) -> AsyncIterator[None]:
        """While inside, no fetch session reads ``vol``'s log: running ones end, new ones are
        refused with ``switching`` (not fatal: the mirror retries). A resync's switch restarts
        the log under its readers, so a mirror that other mirrors fetch from goes quiet first."""
        key = id(vol)
        self._quiet.add(key)
        try:
            while self._shipping[key]:
                await trio.sleep(POLL)
            yield
        finally:
            self._quiet.discard(key)

    async def farewell(self) -> None:
        """A clean stop's goodbye (call it once the logs are durable and nothing appends any
        more): every fetch session, also one that starts from now on, ships what is left, sends
        its last HEARTBEAT and ERROR ``stopping``, and ends. Returns when none runs; the caller
        bounds the wait (a mirror behind a stalled link must not hold the stop)."""
        self._stopping = True
        while sum(self._shipping.values()):
            await trio.sleep(POLL)

    def _switching(self, vol: Volume) -> Error | None:
        if id(vol) not in self._quiet:
            return None
        return Error(code="switching", error=f"{self.node} is switching {vol.name} to a resynced version; "
                                             "fetching resumes in a moment")

    async def _serve_fetch(self, ch: Channel, sess: ServingSession, vol: Volume) -> None:
        self._shipping[id(vol)] += 1
        try:
            await self._serve_fetch_counted(ch, sess, vol)
        finally:
            self._shipping[id(vol)] -= 1

    async def _serve_fetch_counted(self, ch: Channel, sess: ServingSession, vol: Volume) -> None:
        switching = self._switching(vol)
        if switching is not None:
            await ch.send_message(switching)
            return
        req = sess.receive(await ch.receive_message())
        assert isinstance(req, Fetch)
        start = sess.admit_fetch(await trio.to_thread.run_sync(log_facts, vol.log, req.from_lsn - 1))
        if isinstance(start, Error):
            await ch.send_message(start)
            return
        assert isinstance(start, StartShipping)
        vol.hold(sess.hold_key, start.after)
        state = self.peers.get(vol.name, vol.uuid, sess.peer)
        state.connected, state.fetched_lsn, state.sent_lsn = True, start.after, start.after
        if sess.watching:
            logger.info("%s watches %s from LSN %d (its fetch is paused)", sess.peer, vol.name, start.after + 1)
        else:
            logger.info("%s fetches %s from LSN %d", sess.peer, vol.name, start.after + 1)
        try:
            with single_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive_acks, ch, sess, vol, state, nursery.cancel_scope)
                    await self._ship(ch, sess, vol, state)  # returns when the volume is gone
                    nursery.cancel_scope.cancel()
        finally:
            state.connected = False

    async def _ship(self, ch: Channel, sess: ServingSession, vol: Volume, state: PeerState) -> None:
        lz4 = FrameLz4()  # this connection's frames: lz4 backs off while it does not pay
        while not await self._volume_gone(ch, sess, vol):
            switching = self._switching(vol)
            if switching is not None:
                logger.info("%s stops fetching %s from here: %s", sess.peer, vol.name, switching.error)
                await self._refuse(ch, switching)
                return
            if self._stopping and sess.poll(shippable_lsn(vol)) is None and sess.farewell():
                # nothing left to ship, and our last heartbeat is out: the mirror keeps it as our final word
                logger.info("told %s that %s stops with its log of %s durable up to LSN %d", sess.peer, self.node,
                            vol.name, vol.durable_lsn)
                await self._refuse(ch, Error(code="stopping", error=f"{self.node} is stopping cleanly; its log of "
                                                                    f"{vol.name} is durable up to LSN {vol.durable_lsn}"))
                return
            todo = sess.poll(shippable_lsn(vol))
            if todo is not None:
                frame, cursor = await trio.to_thread.run_sync(_records_frame, vol, todo.first, todo.limit, todo.batch, lz4)
                await ch.send_raw(frame)
                sess.shipped(cursor)
                state.sent_lsn = sess.sent_lsn
            else:  # a flush wakes us at once (a sync volume's flush waits for what we ship)
                await self.peers.wait_more(vol.uuid, POLL)
            now = trio.current_time()
            if sess.heartbeat_due(now):
                lag = lag_of(vol, state.fetched_lsn)
                state.lag_bytes, state.lag_records, state.lag_seconds = lag
                await ch.send_message(sess.heartbeat(now, time.time(), lag, vol.head_lsn, self.peers.word(vol)))

    async def _receive_acks(self, ch: Channel, sess: ServingSession, vol: Volume, state: PeerState,
                            scope: trio.CancelScope) -> None:
        try:
            while True:
                ack = sess.receive(await ch.receive_message())
                assert isinstance(ack, Ack)
                state.fetched_lsn, state.replayed_lsn = ack.fetched_lsn, ack.replayed_lsn
                state.fetch_paused, state.replay_paused = ack.fetch_paused, ack.replay_paused
                state.probe = ack.probe
                state.last_seen = time.time()
                vol.hold(sess.hold_key, sess.hold_lsn)
                self.peers.acked(state)
        finally:
            scope.cancel()


def volume_facts(vol: Volume) -> VolumeFacts:
    """``vol`` as a serving session is admitted to it (its positions as of now)."""
    return VolumeFacts(name=vol.name, uuid=vol.uuid, size=vol.size, head_lsn=vol.head_lsn,
                       durable_lsn=vol.durable_lsn)


class ChainLog(Protocol):
    """What :func:`log_facts` reads of a log (``marsfs.log.Log`` has it)."""

    @property
    def first_lsn(self) -> int: ...
    @property
    def last_lsn(self) -> int: ...
    def chain_at(self, lsn: int) -> bytes: ...


def log_facts(log: ChainLog, lsn: int) -> LogFacts:
    """What ``log`` says about ``lsn``: its ends and the chain there if it holds it (a
    ``pread``: call in a worker thread)."""
    first, last = log.first_lsn, log.last_lsn
    chain = log.chain_at(lsn) if first - 1 <= lsn <= last else None
    return LogFacts(lsn=lsn, first_lsn=first, last_lsn=last, chain=chain)


def read_changes(vol: Volume, changes: Changes, mirror: str, since: int, lsn: int
                 ) -> tuple[list[tuple[int, int]] | None, bytes]:
    """The byte ranges where ``mirror``'s image may differ from ours at ``lsn`` (None: any), read
    from the change set the session named for the mirror's ``since``, and our chain at ``lsn``
    (worker thread: both read the log)."""
    chain = vol.log.chain_at(lsn)
    if changes is Changes.WRITTEN:
        return vol.extents_between(since, lsn), chain
    if changes is Changes.KEPT:
        return vol.changed_ranges(mirror, since, lsn), chain
    return None, chain


def _compare(sess: ServingSession, view: VolumeView, job: Compare) -> list[tuple[bytes, int]]:
    """The frames that answer one SYNC_SUMS, each with the data bytes it carries."""
    data = view.read(job.offset, job.length)
    return [(encode_message(m), len(m.data) if isinstance(m, SyncData) else 0) for m in sess.compare(job, data)]


def _records_frame(vol: Volume, first: int, limit: int, batch: int, lz4: FrameLz4) -> tuple[bytes, int]:
    """One RECORDS frame of raw records from ``first`` (at most ``batch`` bytes unless one is larger),
    compressed as ``lz4`` decides."""
    parts: list[bytes] = []
    size = 0
    lsn = first
    while lsn <= limit and (not parts or size < batch):
        raw = vol.log.read_raw(lsn)
        if parts and size + len(raw) > batch:
            break
        parts.append(raw)
        size += len(raw)
        lsn += 1
    return lz4.encode(Records(tuple(parts))), lsn
