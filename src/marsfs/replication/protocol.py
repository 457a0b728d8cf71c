"""Node-to-node wire protocol: framing and messages, pure functions over bytes (no I/O).

Rules that hold here:

* Every frame is a 20-byte header and a payload: magic ``MRSf``, protocol version, message
  type, flags, payload length (at most :data:`MAX_FRAME`), and an xxh3-64 checksum over the
  first 12 header bytes and the payload as transmitted. A frame that fails any check raises
  :class:`ProtocolError`; the connection is then dropped and the fetch resumes from the last
  good LSN. A damaged frame is never acted on (G6).
* The payload is lz4-compressed (flag ``LZ4``) when that makes it at least 1/16 smaller.
* Control messages carry JSON objects; ``RECORDS`` carries log records exactly as stored
  (each verifies on its own: header sum, payload hash, and the chain on append);
  ``IMAGE_DATA`` carries an 8-byte volume offset and the bytes there.
* The framing runs over any byte stream, so TLS can wrap the TCP stream without changing it.

Conversation (client = the mirror, server = the node it fetches from)::

    client: HELLO {proto, cluster, node, volume, want: "image" | "fetch", epoch}
    server: WELCOME {node, volume, uuid, size, epoch, head_lsn, durable_lsn}  |  ERROR {code, error}
    want=image: server: IMAGE_INFO {lsn, chain, size}, IMAGE_DATA..., IMAGE_END {lsn}
    want=fetch: client: FETCH {from_lsn, prev_chain}
                server: RECORDS... and HEARTBEAT {durable_lsn, lag..., probe} while the client ACKs
                client: ACK {fetched_lsn, replayed_lsn, fetch_paused, replay_paused, probe}
    A HEARTBEAT echoes the newest ACK probe the server had read before it looked at its
    durable LSN, so the client knows how old the state it describes can be at most.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import lz4.block
import xxhash

from marsfs.log.record import HEADER_SIZE, BadRecord, decode_header

FRAME_MAGIC = b"MRSf"
PROTO_VERSION = 1
MAX_FRAME = 8 * 1024 * 1024
_HEAD = struct.Struct("<4sBBHI")  # magic, version, type, flags, length
_SUM = struct.Struct("<Q")
FRAME_HEADER = _HEAD.size + _SUM.size  # 20
FLAG_LZ4 = 0x1
_MIN_COMPRESS = 512
_OFFSET = struct.Struct("<Q")


class MsgType(IntEnum):
    """Message types. Values are on the wire: never renumber."""

    HELLO = 1
    WELCOME = 2
    ERROR = 3
    FETCH = 4
    RECORDS = 5
    HEARTBEAT = 6
    ACK = 7
    IMAGE_INFO = 8
    IMAGE_DATA = 9
    IMAGE_END = 10


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; drop the connection."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: MsgType
    payload: bytes

    def json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.payload)
        except ValueError as e:
            raise ProtocolError(f"{self.type.name} frame is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"{self.type.name} frame is not a JSON object")
        return obj


def encode_frame(mtype: MsgType, payload: bytes | bytearray | memoryview, *, compress: bool = True) -> bytes:
    data = bytes(payload)
    flags = 0
    if compress and len(data) >= _MIN_COMPRESS:
        packed = lz4.block.compress(data, store_size=True)
        if len(packed) <= len(data) - len(data) // 16:
            data, flags = packed, FLAG_LZ4
    if len(data) > MAX_FRAME:
        raise ValueError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    head = _HEAD.pack(FRAME_MAGIC, PROTO_VERSION, int(mtype), flags, len(data))
    h = xxhash.xxh3_64(head)
    h.update(data)
    return head + _SUM.pack(h.intdigest()) + data


def encode_json(mtype: MsgType, obj: dict[str, Any]) -> bytes:
    return encode_frame(mtype, json.dumps(obj, separators=(",", ":")).encode())


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole verified frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        while len(self._buf) >= FRAME_HEADER:
            magic, version, mtype, flags, length = _HEAD.unpack_from(self._buf, 0)
            if magic != FRAME_MAGIC:
                raise ProtocolError("bad frame magic")
            if length > MAX_FRAME:
                raise ProtocolError(f"frame length {length} exceeds {MAX_FRAME}")
            if len(self._buf) < FRAME_HEADER + length:
                break
            (want,) = _SUM.unpack_from(self._buf, _HEAD.size)
            body = bytes(self._buf[FRAME_HEADER : FRAME_HEADER + length])
            h = xxhash.xxh3_64(bytes(self._buf[: _HEAD.size]))
            h.update(body)
            if h.intdigest() != want:
                raise ProtocolError("frame checksum mismatch")
            del self._buf[: FRAME_HEADER + length]
            if version != PROTO_VERSION:
                raise ProtocolError(f"unsupported protocol version {version}")
            try:
                mt = MsgType(mtype)
            except ValueError:
                raise ProtocolError(f"unknown message type {mtype}") from None
            if flags & ~FLAG_LZ4:
                raise ProtocolError(f"unknown frame flags {flags:#x}")
            if flags & FLAG_LZ4:
                body = _decompress(body)
            out.append(Frame(mt, body))
        return out


def _decompress(body: bytes) -> bytes:
    if len(body) < 4 or int.from_bytes(body[:4], "little") > MAX_FRAME:
        raise ProtocolError("compressed frame claims more than the frame limit")
    try:
        out: bytes = lz4.block.decompress(body)
        return out
    except lz4.block.LZ4BlockError as e:
        raise ProtocolError(f"bad lz4 frame payload: {e}") from None


def split_records(payload: bytes) -> list[bytes]:
    """The raw records in a RECORDS payload (boundaries from each verified header)."""
    out: list[bytes] = []
    pos = 0
    view = memoryview(payload)
    while pos < len(payload):
        try:
            h = decode_header(view[pos : pos + HEADER_SIZE])
        except BadRecord as e:
            raise ProtocolError(f"bad record in RECORDS frame: {e.reason}") from None
        end = pos + HEADER_SIZE + h.stored_len
        if end > len(payload):
            raise ProtocolError("record runs past the end of its RECORDS frame")
        out.append(payload[pos:end])
        pos = end
    return out


def encode_image_data(offset: int, data: bytes) -> bytes:
    return encode_frame(MsgType.IMAGE_DATA, _OFFSET.pack(offset) + data)


def decode_image_data(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < _OFFSET.size:
        raise ProtocolError("IMAGE_DATA frame without offset")
    return _OFFSET.unpack_from(payload, 0)[0], payload[_OFFSET.size :]
