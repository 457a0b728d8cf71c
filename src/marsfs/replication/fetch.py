"""The fetching side of replication: fast-sync the image once, then fetch the log for ever.

This module does the I/O; what the server may say when, lag correction, stall detection and
the backoff schedule are the :class:`~marsfs.replication.session.FetchingSession`'s and its
helpers' (see there).

Rules that hold here:

* Fetched records are appended to this node's log byte for byte (same LSNs, same chain) and
  made durable before they are acknowledged or replayed; each RECORDS frame is acknowledged
  as soon as it is durable (a sync volume's flush on the source waits for that ACK), and
  every ``ACK_EVERY`` seconds anyway. A record that does not continue our
  log is refused; a frame that fails its checksum drops the connection and the fetch resumes
  from our last durable LSN (G6).
* Fetch never depends on replay: it appends and syncs; replay (the visible version) is moved
  by the node independently and may be paused.
* Connection trouble only adds lag: the fetcher reconnects after the session's backoff delay,
  and a connection that brings no frame for ``STALL_AFTER`` seconds is dropped and retried.
* A refusal is acted on by its :class:`~marsfs.replication.session.Stop` (the session's
  table says what each code means): retry after the backoff, resync what changed (the source
  no longer holds our log), or stop fetching for good (split brain, needs-resync, fatal: an
  operator acts). No code here compares refusal codes; a refusal that is retried is handed to
  the node first (``Fetcher.refused``: e.g. a source that does not know us as a member yet).
* A fetcher that the operator's ``join`` made (``Fetcher.joining``) says ``join`` in the HELLO
  of its fast syncs until one switched: that is how a node that is no member of a volume yet
  gets its first copy; every other HELLO is a member's.
* The volume is read here and fed to the session as values (our log's end at a FETCH, our
  chain at a SYNC_REQUEST's ``since_lsn``, read in a worker thread: a chain is a ``pread``).
* A paused fetch keeps a session that only watches (heartbeats, no records), so the mirror's
  lag stays true while paused; pausing or resuming ends the session and starts the other kind.
* Fast sync (:func:`receive_sync`): our block sums of the staged image go out as fast as the
  window allows while the differing blocks come back and are staged (one task each); staged
  data is made durable (``sync``) every :data:`SYNC_EVERY` bytes or :data:`SYNC_SECONDS`
  and before the switch, and
  the switch (``finish``) happens before the ACK. The staged image survives a lost
  connection or a crash: the next sync compares sums again, so what was staged is not sent
  again unless it changed.
* The fetcher runs a resync instead of a fetch while one is wanted (``Fetcher.resync``: an
  operator's invalidate or join, the source's ``log-trimmed``) or staged (``Volume.resync``,
  e.g. after a restart), and fetches from the target's LSN on once it switched. While it
  runs, the volume keeps serving its last version and its log does not grow; a paused fetch
  does not hold a resync back (it pauses the log that follows). Around the switch the node's
  server goes quiet for the volume (``quiet``): the switch restarts the log under its readers.
* A failure becomes a reason in words (:func:`marsfs.aio.describe`): status and log never show
  an empty text or a bare exception class.
* Times are trio times (``trio.current_time``), so a mock clock drives every timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import trio

from marsfs.aio import describe, single_error
from marsfs.errors import MarsError, ProtocolError
from marsfs.replication.channel import Channel, ConnectionLost, PeerRefused
from marsfs.replication.protocol import (
    PROTO_VERSION,
    Hello,
    Records,
    SyncData,
    SyncEnd,
    SyncInfo,
    SyncProgress,
    SyncRequest,
    Want,
    Welcome,
)
from marsfs.replication.session import (
    ACK_EVERY,
    STALL_AFTER,
    Backoff,
    FetchingSession,
    FetchState,
    Probes,
    Refused,
    ServerReply,
    StageStep,
    Stop,
    SyncStatus,
    SyncTarget,
    stage_step,
)
from marsfs.volume import Volume
from marsfs.volume.blocksums import block_sums

logger = logging.getLogger(__name__)

__all__ = ["Connect", "FetchState", "Fetcher", "PeerChannel", "failure_reason", "hello", "open_channel",
           "receive_sync", "stage_resync"]

CONNECT_TIMEOUT = 5.0
SYNC_EVERY = 64 * 1024 * 1024  #: staged bytes between syncs of the staged image (what a crash may cost)...
SYNC_SECONDS = 1.0  #: ...or seconds
FINISH_RETRY = 0.2  #: seconds between attempts to switch while old views hold it back


def hello(node: str, cluster: str, volume: str, want: Want, epoch: int = 0, *, node_id: str = "",
          join: bool = False) -> Hello:
    """Our opening as ``node`` (whose id is ``node_id``) for ``want`` of ``volume``; ``join``: a
    fast sync of the operator's ``join`` (see :attr:`Hello.join`)."""
    return Hello(proto=PROTO_VERSION, cluster=cluster, node=node, volume=volume, want=want, epoch=epoch,
                 node_id=node_id, join=join)


Connect = Callable[[], Awaitable[trio.abc.Stream]]


class PeerChannel(Channel):
    """A channel to the node we fetch from, with the session that judges what it says."""

    def __init__(self, stream: trio.abc.Stream, session: FetchingSession) -> None:
        super().__init__(stream)
        self.session = session

    async def receive_reply(self) -> ServerReply:
        """The server's next message as the session took it (PeerRefused on ERROR)."""
        reply = self.session.receive(await self.receive_message(), trio.current_time())
        if isinstance(reply, Refused):
            raise PeerRefused(reply.code, reply.message)
        return reply


async def open_channel(connect: Connect, greeting: Hello | FetchingSession) -> tuple[PeerChannel, Welcome]:
    """Connect, say HELLO, return the channel and the WELCOME (PeerRefused on ERROR)."""
    session = greeting if isinstance(greeting, FetchingSession) else FetchingSession(greeting)
    with trio.fail_after(CONNECT_TIMEOUT):
        stream = await connect()
    ch = PeerChannel(stream, session)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await ch.send_message(session.hello())
            welcome = await ch.receive_reply()
    except BaseException:
        await ch.aclose()
        raise
    assert isinstance(welcome, Welcome)
    return ch, welcome


class Staging(Protocol):
    """Where a fast sync stages the blocks it receives (``marsfs.volume.Resync`` is one)."""

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...
    def sync(self) -> None: ...


async def receive_sync(ch: PeerChannel, request: SyncRequest, stage: Callable[[SyncInfo], Staging],
                       finish: Callable[[SyncInfo], Awaitable[int]], status: SyncStatus) -> SyncInfo:
    """One fast sync on a welcomed ``sync`` channel: ``stage(info)`` (in a worker thread) gives
    the staged image for the target, ``await finish(info)`` switches to it durably and returns
    our head LSN, which the ACK reports. ``status`` follows the progress."""
    sess = ch.session
    await ch.send_message(sess.sync_request(request))
    with trio.fail_after(STALL_AFTER):  # the source syncs its log and plans the ranges first
        info = await ch.receive_reply()
    assert isinstance(info, SyncInfo)
    staging = await trio.to_thread.run_sync(stage, info)
    status.total, status.lsn = info.total, info.lsn
    status.update(trio.current_time(), 0, 0)
    lock = trio.Lock()  # the staging is used from one worker thread at a time
    wake = [trio.Event()]

    async def send_sums() -> None:
        while (chunk := sess.next_sums()) is not None:
            while not sess.sums_window_open:
                await wake[0].wait()
            off, n = chunk
            async with lock:
                sums = await trio.to_thread.run_sync(block_sums, staging.read, off, n)
            await ch.send_message(sess.sums(off, sums))

    async def receive_blocks() -> None:
        unsynced, synced_at = 0, trio.current_time()
        while True:
            msg: ServerReply | None = None
            with trio.move_on_after(STALL_AFTER):
                msg = await ch.receive_reply()
            if msg is None:
                if sess.awaiting_source:
                    raise ConnectionLost(f"no data from the source for {STALL_AFTER:.0f} s during a fast sync")
                continue  # we are slow reading our own image: the source waits for our sums
            if isinstance(msg, SyncData):
                async with lock:
                    await trio.to_thread.run_sync(staging.write, msg.offset, msg.data)
                unsynced += len(msg.data)
                if unsynced >= SYNC_EVERY or trio.current_time() - synced_at >= SYNC_SECONDS:
                    async with lock:
                        await trio.to_thread.run_sync(staging.sync)
                    unsynced, synced_at = 0, trio.current_time()
            elif isinstance(msg, SyncProgress):
                status.update(trio.current_time(), msg.compared, sess.received)
                wake[0].set()
                wake[0] = trio.Event()
            else:
                assert isinstance(msg, SyncEnd), msg
                return

    try:
        with single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_sums)
                await receive_blocks()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):  # what arrived is kept for the next attempt
            async with lock:
                await trio.to_thread.run_sync(staging.sync)
    head = await finish(info)
    await ch.send_message(sess.sync_done(head))
    return info


@dataclass
class ResyncPlan:
    """A resync the fetcher is to run before it fetches again (see :class:`Fetcher`)."""

    whole: bool = False  #: compare the whole image (our copy is not trusted)
    ranges: tuple[tuple[int, int], ...] = ()  #: byte ranges we add ourselves (a split-brain tail)
    rate: int = 0  #: bytes/s for this sync (0: the source's limit only)
    #: the newest LSN our image shares with the source's history (a split brain's fork); None:
    #: our durable head (or a staged resync's base). The source compares what it wrote since.
    since: int | None = None


def stage_resync(vol: Volume, info: SyncInfo, *, direct: bool) -> Staging:
    """The staged image of ``vol`` for target ``info``: the running resync, retargeted when the
    source is further now, else a new one (an older target cannot be reached from staged
    blocks of a newer one: start over)."""
    rs = vol.resync
    staged = None if rs is None else SyncTarget(uuid=rs.uuid, lsn=rs.target_lsn, chain=rs.target_chain, size=rs.size)
    step = stage_step(staged, info)
    if step is StageStep.RESTART:
        vol.abort_resync()
    if rs is None or step is StageStep.RESTART:
        return vol.begin_resync(info.lsn, info.chain, info.size, info.uuid, direct=direct)
    if step is StageStep.RETARGET:
        rs.retarget(info.lsn, info.chain, info.size)
    return rs


def failure_reason(e: BaseException) -> str:
    """A failed fetch session in words, as status and the log show it. A protocol error keeps
    its class name after the words: it means a damaged link or a buggy peer, worth a grep."""
    if isinstance(e, ProtocolError):
        return f"damaged or invalid data from the peer (ProtocolError: {describe(e)})"
    return describe(e)


class Fetcher:
    """Keeps one mirror volume's log following its source node. Construct inside trio."""

    def __init__(self, vol: Volume, node: str, cluster: str, source: str, connect: Connect,
                 paused: Callable[[], bool], replayed: Callable[[], int], replay_paused: Callable[[], bool],
                 *, resync: ResyncPlan | None = None, direct: bool = False,
                 synced: Callable[[], None] | None = None,
                 quiet: Callable[[], AbstractAsyncContextManager[None]] | None = None, node_id: str = "",
                 joining: bool = False, refused: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.vol = vol
        self.node_id = node_id  #: this node's id, said in every HELLO
        #: the operator's ``join`` made this fetcher: its fast syncs say ``join`` in the HELLO (the
        #: source takes us for a member from then on) until the first one switched
        self.joining = joining
        #: awaited with the code of a refusal that is retried, before the backoff (the node
        #: introduces itself to a source that did not know it as a member)
        self.refused = refused
        #: a resync to run before fetching (an operator's, or the source trimmed our log); a
        #: staged one (``vol.resync``) continues even without a plan
        self.resync = resync
        self.direct = direct  #: nobody reads the volume yet (a first copy): stage into the base
        self.synced = synced  #: called (in a worker thread) after a resync switched
        #: entered around the switch: nobody reads this volume's log meanwhile (the node's server)
        self.quiet = quiet
        self.node = node
        self.cluster = cluster
        self.connect = connect
        self.paused = paused
        self.replayed = replayed
        self.replay_paused = replay_paused
        self.state = FetchState(source=source, last_progress=trio.current_time())
        self._probes = Probes()
        self._backoff = Backoff()
        self._session_scope: trio.CancelScope | None = None  #: the fetch or watch session running
        self._woken = False

    def wake(self) -> None:
        """The pause flag changed: end a fetch or watch session now (it would notice only at the
        next frame, up to a heartbeat later) and start the other kind at once, without backoff.
        A sync session is left alone (pausing does not stop a resync)."""
        if self._session_scope is not None:
            self._woken = True
            self._session_scope.cancel()

    async def run(self) -> None:
        """Fetch (or, while paused, watch) until cancelled or refused for good (state.fatal)."""
        while True:
            before = self.vol.durable_lsn
            clean = False
            failure = ""
            try:
                if self.resync is not None or self.vol.resync is not None:
                    await self._sync_session()
                else:
                    with trio.CancelScope() as self._session_scope:
                        await self._session(watch=self.paused())
                    self._session_scope = None
                clean = True
            except PeerRefused as e:
                self.state.error = e.message
                stop = e.stop
                if stop is Stop.RESYNC and self.resync is None:
                    # not fatal: copy what changed instead of the log we can no longer get
                    logger.info("fetch of %s from %s: %s; resyncing what changed by itself now (a fast sync; "
                                "nothing to run)", self.vol.name, self.state.source, e.message)
                    self.state.error = ""
                    self.resync = ResyncPlan()
                    clean = True
                elif stop.stops or stop is Stop.RESYNC:  # (log-trimmed while resyncing: no way on)
                    self.state.fatal = e.code
                    logger.error("fetch of %s from %s stopped: %s", self.vol.name, self.state.source, e)
                    return
                elif self.refused is not None:
                    await self.refused(e.code)
            except (ConnectionLost, OSError, trio.TooSlowError, MarsError) as e:
                failure = self.state.error = failure_reason(e)
            finally:
                self.state.connected = False
                self._session_scope = None
            # a session that ended cleanly or moved us forward: the link works, mostly
            delay = self._backoff.next(clean or self.vol.durable_lsn > before)
            if self._woken:
                self._woken, delay = False, 0.0
            if failure:
                logger.info("fetch of %s from %s: %s; retrying in %.1f s", self.vol.name, self.state.source,
                            failure, delay)
            await trio.sleep(delay)

    async def _sync_session(self) -> None:
        """One fast sync toward the source's current version; the log follows from its LSN on."""
        vol, plan = self.vol, self.resync or ResyncPlan()
        staged = vol.resync
        since = plan.since if plan.since is not None else staged.base_lsn if staged is not None else vol.durable_lsn
        since_chain = await trio.to_thread.run_sync(vol.log.chain_at, since)
        request = SyncRequest(since_lsn=since, since_chain=since_chain, whole=plan.whole, ranges=plan.ranges,
                              rate=plan.rate)
        sess = FetchingSession(hello(self.node, self.cluster, vol.name, "sync", node_id=self.node_id,
                                     join=self.joining), state=self.state, probes=self._probes, uuid=vol.uuid)
        if self.state.sync is None:
            self.state.sync = SyncStatus(started=trio.current_time())
        ch, _welcome = await open_channel(self.connect, sess)
        self.state.connected, self.state.error = True, ""
        try:
            info = await receive_sync(ch, request, lambda i: stage_resync(vol, i, direct=self.direct),
                                      self._finish, self.state.sync)
        finally:
            await ch.aclose()
        logger.info("resync of %s from %s done at LSN %d: %d of %d compared bytes were sent", vol.name,
                    self.state.source, info.lsn, sess.received, info.total)
        self.resync, self.state.sync, self.direct, self.joining = None, None, False, False
        self.state.last_progress = trio.current_time()

    async def _finish(self, info: SyncInfo) -> int:
        """Switch to the target; while views of older versions hold the switch back, wait (and
        say why in the sync status)."""
        vol, st = self.vol, self.state.sync
        async with self.quiet() if self.quiet is not None else nullcontext():
            while not await trio.to_thread.run_sync(vol.finish_resync):
                rs = vol.resync
                if st is not None and rs is not None:
                    st.waiting = rs.waiting_for
                await trio.sleep(FINISH_RETRY)
        if st is not None:
            st.waiting = ""
        # a first copy's callback is for that copy only: a later resync (a catch-up after log
        # space dropped our log) switches a volume that is served already
        synced, self.synced = self.synced, None
        if synced is not None:
            await trio.to_thread.run_sync(synced)
        return vol.head_lsn

    async def _session(self, *, watch: bool) -> None:
        """One session: fetch, or (``watch``) only hear the source's heartbeats; it ends when
        the pause flag no longer matches."""
        vol = self.vol
        sess = FetchingSession(hello(self.node, self.cluster, vol.name, "fetch", node_id=self.node_id), state=self.state,
                               probes=self._probes, uuid=vol.uuid)
        ch, _welcome = await open_channel(self.connect, sess)
        try:
            log = vol.log  # its end is in memory: no read
            await ch.send_message(sess.fetch(trio.current_time(), last_lsn=log.last_lsn, last_chain=log.last_chain,
                                             durable_lsn=vol.durable_lsn, watch=watch))
            with single_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._ack_loop, ch, sess, nursery.cancel_scope)
                    await self._receive_loop(ch, sess, watch)
                    nursery.cancel_scope.cancel()
        finally:
            await ch.aclose()

    async def _receive_loop(self, ch: PeerChannel, sess: FetchingSession, watch: bool) -> None:
        while self.paused() == watch:
            msg = None
            with trio.move_on_at(sess.stall_deadline):
                msg = await ch.receive_reply()
            if msg is None:
                why = sess.stalled(trio.current_time())
                assert why is not None, "move_on_at fired before the stall deadline"
                raise ConnectionLost(why)
            if isinstance(msg, Records):
                if self.paused():  # paused while we waited: nothing more is fetched from now on
                    break
                await trio.to_thread.run_sync(self._append, msg.records)
                sess.appended(msg)
                # at once, not at the next ACK_EVERY: a sync volume's flush on the source waits
                # for this (one small frame per RECORDS frame)
                await ch.send_message(sess.ack(trio.current_time(), self.replayed(), self.paused(),
                                               self.replay_paused()))

    def _append(self, records: tuple[bytes, ...]) -> None:
        for raw in records:
            self.vol.append_raw(raw)
        self.vol.log.sync()  # durable before it is acknowledged or replayed

    async def _ack_loop(self, ch: PeerChannel, sess: FetchingSession, scope: trio.CancelScope) -> None:
        try:
            while sess.following:  # a closed session acknowledges nothing more
                await ch.send_message(sess.ack(trio.current_time(), self.replayed(), self.paused(),
                                               self.replay_paused()))
                await trio.sleep(ACK_EVERY)
        finally:
            scope.cancel()
