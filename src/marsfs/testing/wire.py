"""The replication wire format from the tests' side: one frame's bytes back to its message."""

from __future__ import annotations

from marsfs.replication.protocol import FrameDecoder, Message, decode_message


def decode_frame(frame: bytes) -> Message:
    """The message of ``frame``, which must hold exactly one whole frame (ProtocolError when
    its payload is not a valid message of its type)."""
    (f,) = FrameDecoder().feed(frame)
    return decode_message(f)
