"""The fetching side of replication: copy an image once, then fetch the log for ever.

This module does the I/O; what the server may say when, lag correction, stall detection and
the backoff schedule are the :class:`~marsfs.replication.session.FetchingSession`'s and its
helpers' (see there).

Rules that hold here:

* Fetched records are appended to this node's log byte for byte (same LSNs, same chain) and
  made durable before they are acknowledged or replayed. A record that does not continue our
  log is refused; a frame that fails its checksum drops the connection and the fetch resumes
  from our last durable LSN (G6).
* Fetch never depends on replay: it appends and syncs; replay (the visible version) is moved
  by the node independently and may be paused.
* Connection trouble only adds lag: the fetcher reconnects after the session's backoff delay,
  and a connection that brings no frame for ``STALL_AFTER`` seconds is dropped and retried.
* Fatal refusals (``diverged``, ``log-trimmed``, ``volume-replaced`` ...) stop fetching: they
  need an operator.
* A paused fetch keeps a session that only watches (heartbeats, no records), so the mirror's
  lag stays true while paused; pausing or resuming ends the session and starts the other kind.
* A failure becomes a reason in words (:func:`marsfs.aio.describe`): status and log never show
  an empty text or a bare exception class.
* Times are trio times (``trio.current_time``), so a mock clock drives every timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from marsfs.aio import describe, single_error
from marsfs.errors import MarsError, ProtocolError
from marsfs.replication.channel import Channel, ConnectionLost, PeerRefused
from marsfs.replication.protocol import (
    PROTO_VERSION,
    Hello,
    ImageData,
    ImageEnd,
    ImageInfo,
    ImageProgress,
    Records,
    Want,
    Welcome,
)
from marsfs.replication.session import (
    ACK_EVERY,
    Backoff,
    FetchingSession,
    FetchState,
    Probes,
    Refused,
    ServerReply,
)
from marsfs.volume import Volume

logger = logging.getLogger(__name__)

__all__ = ["Connect", "FetchState", "Fetcher", "PeerChannel", "failure_reason", "hello", "open_channel",
           "receive_image"]

CONNECT_TIMEOUT = 5.0


def hello(node: str, cluster: str, volume: str, want: Want, epoch: int = 0) -> Hello:
    return Hello(proto=PROTO_VERSION, cluster=cluster, node=node, volume=volume, want=want, epoch=epoch)


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


async def receive_image(ch: PeerChannel, make_volume: Callable[[ImageInfo], Volume],
                        progress: Callable[[int, int], None]) -> Volume:
    """Receive IMAGE_INFO/IMAGE_DATA/IMAGE_PROGRESS/IMAGE_END into a new replica volume; durable
    on return. ``progress(scanned, size)`` follows the source's scan, zeros included."""
    info = await ch.receive_reply()
    assert isinstance(info, ImageInfo)
    vol = await trio.to_thread.run_sync(make_volume, info)
    try:
        while True:
            msg = await ch.receive_reply()
            if isinstance(msg, ImageEnd):
                break
            if isinstance(msg, ImageData):
                await trio.to_thread.run_sync(vol.write_base, msg.offset, msg.data)
            else:
                assert isinstance(msg, ImageProgress), msg
            progress(ch.session.scanned, info.size)
        await trio.to_thread.run_sync(vol.sync_base)
        await ch.send_message(ch.session.image_done(vol.head_lsn))
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(vol.close)
        raise
    return vol


def failure_reason(e: BaseException) -> str:
    """A failed fetch session in words, as status and the log show it. A protocol error keeps
    its class name after the words: it means a damaged link or a buggy peer, worth a grep."""
    if isinstance(e, ProtocolError):
        return f"damaged or invalid data from the peer (ProtocolError: {describe(e)})"
    return describe(e)


class Fetcher:
    """Keeps one mirror volume's log following its source node. Construct inside trio."""

    def __init__(self, vol: Volume, node: str, cluster: str, source: str, connect: Connect,
                 paused: Callable[[], bool], replayed: Callable[[], int], replay_paused: Callable[[], bool]) -> None:
        self.vol = vol
        self.node = node
        self.cluster = cluster
        self.connect = connect
        self.paused = paused
        self.replayed = replayed
        self.replay_paused = replay_paused
        self.state = FetchState(source=source, last_progress=trio.current_time())
        self._probes = Probes()
        self._backoff = Backoff()

    async def run(self) -> None:
        """Fetch (or, while paused, watch) until cancelled or refused for good (state.fatal)."""
        while True:
            before = self.vol.durable_lsn
            clean = False
            failure = ""
            try:
                await self._session(watch=self.paused())
                clean = True
            except PeerRefused as e:
                self.state.error = e.message
                if Refused(e.code, e.message).fatal:
                    self.state.fatal = e.code
                    logger.error("fetch of %s from %s stopped: %s", self.vol.name, self.state.source, e)
                    return
            except (ConnectionLost, OSError, trio.TooSlowError, MarsError) as e:
                failure = self.state.error = failure_reason(e)
            finally:
                self.state.connected = False
            # a session that ended cleanly or moved us forward: the link works, mostly
            delay = self._backoff.next(clean or self.vol.durable_lsn > before)
            if failure:
                logger.info("fetch of %s from %s: %s; retrying in %.1f s", self.vol.name, self.state.source,
                            failure, delay)
            await trio.sleep(delay)

    async def _session(self, *, watch: bool) -> None:
        """One session: fetch, or (``watch``) only hear the source's heartbeats; it ends when
        the pause flag no longer matches."""
        vol = self.vol
        sess = FetchingSession(hello(self.node, self.cluster, vol.name, "fetch"), state=self.state,
                               probes=self._probes, mirror=vol)
        ch, _welcome = await open_channel(self.connect, sess)
        try:
            await ch.send_message(sess.fetch(trio.current_time(), watch=watch))
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
