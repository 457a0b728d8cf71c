"""Messages over a trio byte stream (TCP today, TLS-wrapped later: same framing).

A channel only moves frames: it decodes and validates what arrives (a malformed frame or
message is a ProtocolError) but does not judge whether a message may come now; the sessions
(:mod:`marsfs.replication.session`) do.
"""

from __future__ import annotations

import trio

from marsfs.aio import describe
from marsfs.replication.protocol import DECODE_IN_THREAD, Frame, FrameDecoder, Message, decode_message, encode_message
from marsfs.replication.session import Stop, refusal_stop

_READ = 256 * 1024


class ConnectionLost(Exception):
    """The peer went away (EOF, reset) or stopped talking; reconnect."""


class Channel:
    """A framed, checksummed message channel. Senders are serialized by a lock."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._pending: list[Frame] = []
        self._send_lock = trio.Lock()
        self.bytes_in = 0
        self.bytes_out = 0
        #: trio time when bytes last arrived (0: none yet); a frame in progress shows here first
        self.last_bytes_at = 0.0

    async def send_message(self, msg: Message) -> None:
        await self.send_raw(encode_message(msg))

    async def send_raw(self, frame: bytes) -> None:
        """Send a frame encoded elsewhere (big ones are encoded in a worker thread)."""
        async with self._send_lock:
            try:
                await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ConnectionLost(describe(e)) from None
            self.bytes_out += len(frame)

    async def receive(self) -> Frame:
        while not self._pending:
            try:
                data = await self.stream.receive_some(_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ConnectionLost(describe(e)) from None
            if not data:
                raise ConnectionLost("connection closed by peer")
            self.bytes_in += len(data)
            self.last_bytes_at = trio.current_time()
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    async def receive_message(self) -> Message:
        """The next message, validated (ProtocolError if malformed). A large frame is decoded in a
        worker thread: what a peer sends must not hold up the FUSE requests on the trio thread."""
        frame = await self.receive()
        if len(frame.payload) > DECODE_IN_THREAD:
            return await trio.to_thread.run_sync(decode_message, frame)
        return decode_message(frame)

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, OSError):
                pass


class PeerRefused(Exception):
    """The peer answered with an ERROR message: ``code`` says why (diverged, unknown-volume, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message

    @property
    def stop(self) -> Stop:
        """What the refusal means to a refused mirror (the session's table decides)."""
        return refusal_stop(self.code)
