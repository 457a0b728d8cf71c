"""Frames over a trio byte stream (TCP today, TLS-wrapped later: same framing)."""

from __future__ import annotations

from typing import Any

import trio

from marsfs.replication.protocol import Frame, FrameDecoder, MsgType, ProtocolError, encode_frame, encode_json

_READ = 256 * 1024


class ConnectionLost(Exception):
    """The peer went away (EOF, reset); reconnect."""


class Channel:
    """A framed, checksummed message channel. Not safe for concurrent senders: use one task."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._pending: list[Frame] = []
        self._send_lock = trio.Lock()
        self.bytes_in = 0
        self.bytes_out = 0

    async def send(self, mtype: MsgType, payload: bytes, *, compress: bool = True) -> None:
        await self.send_raw(encode_frame(mtype, payload, compress=compress))

    async def send_json(self, mtype: MsgType, obj: dict[str, Any]) -> None:
        await self.send_raw(encode_json(mtype, obj))

    async def send_raw(self, frame: bytes) -> None:
        async with self._send_lock:
            try:
                await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ConnectionLost(str(e) or type(e).__name__) from None
            self.bytes_out += len(frame)

    async def receive(self) -> Frame:
        while not self._pending:
            try:
                data = await self.stream.receive_some(_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ConnectionLost(str(e) or type(e).__name__) from None
            if not data:
                raise ConnectionLost("connection closed by peer")
            self.bytes_in += len(data)
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    async def expect(self, *types: MsgType) -> Frame:
        """The next frame, which must be one of ``types`` (an ERROR frame raises PeerRefused)."""
        frame = await self.receive()
        if frame.type == MsgType.ERROR and MsgType.ERROR not in types:
            info = frame.json()
            raise PeerRefused(str(info.get("code", "error")), str(info.get("error", "refused")))
        if frame.type not in types:
            raise ProtocolError(f"expected {'/'.join(t.name for t in types)}, got {frame.type.name}")
        return frame

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, OSError):
                pass


class PeerRefused(Exception):
    """The peer answered with an ERROR frame: ``code`` says why (diverged, unknown-volume, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message

