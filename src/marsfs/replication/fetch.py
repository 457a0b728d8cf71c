"""The fetching side of replication: copy an image once, then fetch the log for ever.

Rules that hold here:

* Fetched records are appended to this node's log byte for byte (same LSNs, same chain) and
  made durable before they are acknowledged or replayed. A record that does not continue our
  log is refused; a frame that fails its checksum drops the connection and the fetch resumes
  from our last durable LSN (G6).
* Fetch never depends on replay: it appends and syncs; replay (the visible version) is moved
  by the node independently and may be paused.
* Connection trouble only adds lag: reconnects back off exponentially (0.1 s doubling to 5 s,
  back to 0.1 s after a session that brought records); a connection that brings no frame for
  ``STALL_AFTER`` seconds is dropped and retried. The source starts each session with small
  frames (slow start), so a link that cuts connections still lets records through.
* ``diverged`` and ``log-trimmed`` refusals stop fetching: they need an operator.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from marsfs.aio import single_error
from marsfs.errors import MarsError
from marsfs.replication.channel import Channel, ConnectionLost, PeerRefused
from marsfs.replication.protocol import PROTO_VERSION, MsgType, ProtocolError, decode_image_data, split_records
from marsfs.volume import Volume

logger = logging.getLogger(__name__)

BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
STALL_AFTER = 10.0
ACK_EVERY = 0.2
CONNECT_TIMEOUT = 5.0
FATAL = ("diverged", "log-trimmed", "unknown-volume", "cluster", "protocol")


@dataclass
class FetchState:
    """What a mirror knows about its fetch of one volume (read by status)."""

    source: str
    connected: bool = False
    error: str = ""
    fatal: str = ""  #: a refusal code that needs an operator
    primary_head_lsn: int = 0
    primary_durable_lsn: int = 0
    lag_bytes: int = 0
    lag_records: int = 0
    lag_seconds: float = 0.0
    last_frame: float = 0.0  #: monotonic time of the last frame received
    last_heartbeat: float = 0.0
    #: when we sent the ACK whose probe the newest heartbeat echoes: that heartbeat describes
    #: the source at or after this moment (heartbeats can sit in buffers; receipt time lies)
    heartbeat_basis: float = 0.0
    last_progress: float = field(default_factory=time.monotonic)
    fetched_bytes: int = 0
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=50))

    def rate(self) -> float:
        """Fetched bytes per second over the last few seconds."""
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def hello(node: str, cluster: str, volume: str, want: str, epoch: int = 0) -> dict[str, Any]:
    return {"proto": PROTO_VERSION, "cluster": cluster, "node": node, "volume": volume, "want": want, "epoch": epoch}


Connect = Callable[[], Awaitable[trio.abc.Stream]]


async def open_channel(connect: Connect, greeting: dict[str, Any]) -> tuple[Channel, dict[str, Any]]:
    """Connect, say HELLO, return the channel and the WELCOME (PeerRefused on ERROR)."""
    with trio.fail_after(CONNECT_TIMEOUT):
        stream = await connect()
    ch = Channel(stream)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await ch.send_json(MsgType.HELLO, greeting)
            welcome = (await ch.expect(MsgType.WELCOME)).json()
    except BaseException:
        await ch.aclose()
        raise
    return ch, welcome


async def receive_image(ch: Channel, make_volume: Callable[[dict[str, Any]], Volume],
                        progress: Callable[[int, int], None]) -> Volume:
    """Receive IMAGE_INFO/IMAGE_DATA/IMAGE_END into a new replica volume; durable on return."""
    info = (await ch.expect(MsgType.IMAGE_INFO)).json()
    vol = await trio.to_thread.run_sync(make_volume, info)
    size = int(info["size"])
    try:
        while True:
            frame = await ch.expect(MsgType.IMAGE_DATA, MsgType.IMAGE_END)
            if frame.type == MsgType.IMAGE_END:
                break
            off, data = decode_image_data(frame.payload)
            await trio.to_thread.run_sync(vol.write_base, off, data)
            progress(off + len(data), size)
        await trio.to_thread.run_sync(vol.sync_base)
        await ch.send_json(MsgType.ACK, {"fetched_lsn": vol.head_lsn, "replayed_lsn": vol.head_lsn})
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(vol.close)
        raise
    return vol


class Fetcher:
    """Keeps one mirror volume's log following its source node."""

    def __init__(self, vol: Volume, node: str, cluster: str, source: str, connect: Connect,
                 paused: Callable[[], bool], replayed: Callable[[], int], replay_paused: Callable[[], bool]) -> None:
        self.vol = vol
        self.node = node
        self.cluster = cluster
        self.connect = connect
        self.paused = paused
        self.replayed = replayed
        self.replay_paused = replay_paused
        self.state = FetchState(source=source)
        self._probe = 0
        self._probes: dict[int, float] = {}  # probe number -> monotonic time its ACK was sent

    async def run(self) -> None:
        """Fetch until cancelled or refused for good (state.fatal)."""
        backoff = BACKOFF_MIN
        while True:
            if self.paused():
                self.state.connected = False
                await trio.sleep(0.1)
                continue
            before = self.vol.durable_lsn
            try:
                await self._session()
                backoff = BACKOFF_MIN
            except PeerRefused as e:
                self.state.error = e.message
                if e.code in FATAL:
                    self.state.fatal = e.code
                    logger.error("fetch of %s refused by %s: %s", self.vol.name, self.state.source, e)
                    return
            except (ConnectionLost, ProtocolError, OSError, trio.TooSlowError, MarsError) as e:
                self.state.error = f"{type(e).__name__}: {e}" if not isinstance(e, MarsError) else str(e)
                logger.info("fetch of %s from %s: %s; retrying in %.1f s", self.vol.name, self.state.source,
                         self.state.error, backoff)
            finally:
                self.state.connected = False
            if self.vol.durable_lsn > before:  # the session moved us forward: the link works, mostly
                backoff = BACKOFF_MIN
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _session(self) -> None:
        vol = self.vol
        ch, _welcome = await open_channel(self.connect, hello(self.node, self.cluster, vol.name, "fetch"))
        try:
            await ch.send_json(MsgType.FETCH, {"from_lsn": vol.log.last_lsn + 1,
                                               "prev_chain": vol.log.last_chain.hex()})
            self.state.connected = True
            self.state.error = ""
            self.state.last_frame = time.monotonic()
            with single_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._ack_loop, ch, nursery.cancel_scope)
                    await self._receive_loop(ch)
                    nursery.cancel_scope.cancel()
        finally:
            await ch.aclose()

    async def _receive_loop(self, ch: Channel) -> None:
        st = self.state
        while not self.paused():
            with trio.move_on_after(STALL_AFTER) as scope:
                frame = await ch.expect(MsgType.RECORDS, MsgType.HEARTBEAT)
            if scope.cancelled_caught:
                raise ConnectionLost(f"no data from {st.source} for {STALL_AFTER:.0f} s")
            now = time.monotonic()
            st.last_frame = now
            if frame.type == MsgType.HEARTBEAT:
                beat = frame.json()
                st.primary_head_lsn = int(beat.get("head_lsn", 0))
                st.primary_durable_lsn = int(beat.get("durable_lsn", 0))
                st.last_heartbeat = now
                sent = self._probes.get(int(beat.get("probe", -1)))
                if sent is not None:
                    st.heartbeat_basis = max(st.heartbeat_basis, sent)
                self._update_lag(beat)
                continue
            records = split_records(frame.payload)
            await trio.to_thread.run_sync(self._append, records)
            st.fetched_bytes += sum(len(r) for r in records)
            st.samples.append((now, st.fetched_bytes))
            st.last_progress = now
            st.primary_durable_lsn = max(st.primary_durable_lsn, self.vol.durable_lsn)
            self._update_lag(None)

    def _append(self, records: list[bytes]) -> None:
        for raw in records:
            self.vol.append_raw(raw)
        self.vol.log.sync()  # durable before it is acknowledged or replayed

    def _update_lag(self, beat: dict[str, Any] | None) -> None:
        st = self.state
        fetched = self.vol.durable_lsn
        if beat is not None:
            # the primary computed lag for what we had acknowledged; correct it by what came since
            st.lag_records = max(0, st.primary_durable_lsn - fetched)
            st.lag_bytes = int(beat.get("lag_bytes", 0)) if st.lag_records else 0
            st.lag_seconds = float(beat.get("lag_seconds", 0.0)) if st.lag_records else 0.0
        elif st.primary_durable_lsn <= fetched:
            st.lag_records = st.lag_bytes = 0
            st.lag_seconds = 0.0

    async def _ack_loop(self, ch: Channel, scope: trio.CancelScope) -> None:
        try:
            while True:
                self._probe += 1
                self._probes[self._probe] = time.monotonic()
                self._probes.pop(self._probe - 100, None)
                await ch.send_json(MsgType.ACK, {
                    "fetched_lsn": self.vol.durable_lsn, "replayed_lsn": self.replayed(),
                    "fetch_paused": self.paused(), "replay_paused": self.replay_paused(),
                    "probe": self._probe})
                await trio.sleep(ACK_EVERY)
        finally:
            scope.cancel()
