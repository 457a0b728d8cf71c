"""Record and segment-header codec: pure functions over bytes, no I/O.

Rules that hold here (docs/log-format.md is the normative description):

* A record is an 80-byte header followed by ``stored_len`` payload bytes.
* ``header_sum`` (xxh3-64 over header bytes 0..72) covers every header field, including
  ``payload_hash`` (xxh3-128 over the stored payload), so one check of the header and one
  of the payload verify the whole record.
* ``chain`` = blake2b-128(previous chain || header bytes 0..56). Header bytes 0..56 hold the
  type, flags, LSN, offset, lengths, timestamp and payload hash, so two logs have the same
  chain at LSN n exactly when their records 1..n are byte-identical (up to blake2b collisions).
* The payload is lz4 block-compressed only when that makes it smaller (flag ``LZ4``).
* Lengths are bounded (:data:`MAX_PAYLOAD`) so that a damaged length field can never make a
  reader allocate or skip an absurd amount.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

import lz4.block
import xxhash

RECORD_MAGIC = b"MRSr"
SEGMENT_MAGIC = b"MRSg"
FORMAT_VERSION = 1

#: Largest logical payload of one record. Larger volume writes are split by the volume.
MAX_PAYLOAD = 4 * 1024 * 1024
#: Payloads shorter than this are never worth an lz4 attempt.
MIN_COMPRESS = 64

# magic, version, type, flags, lsn, offset, length, stored_len, timestamp_ns, payload_hash
_HEAD = struct.Struct("<4sBBHQQIIQ16s")
_CHAIN_AT = _HEAD.size  # 56
_SUM_AT = _CHAIN_AT + 16  # 72
HEADER_SIZE = _SUM_AT + 8  # 80
_SUM = struct.Struct("<Q")

# magic, version, 3 pad, first_lsn, prev_chain, created_ns, 16 reserved
_SEG = struct.Struct("<4sB3xQ16sQ16x")
SEGMENT_HEADER_SIZE = _SEG.size + 8  # 64

CHAIN_SIZE = 16


class RecordType(IntEnum):
    """What a record means. Values are on disk and on the wire: never renumber."""

    WRITE = 1  #: data written at ``offset``
    FLUSH = 2  #: an fsync completed: an application-consistent point
    MARK = 3  #: a named LSN; the payload is the UTF-8 name
    RESIZE = 4  #: the volume's size becomes ``offset`` (``marsfs resize``; empty payload)


class Flags:
    """Bit flags in the record header."""

    LZ4 = 0x0001
    KNOWN = LZ4


class BadRecord(Exception):
    """A record (or segment header) failed verification; ``reason`` says how.

    Internal to the log package: recovery turns it into a torn tail or a
    :class:`marsfs.errors.LogDamaged`.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded, verified record header."""

    type: RecordType
    flags: int
    lsn: int
    offset: int
    length: int
    stored_len: int
    timestamp_ns: int
    payload_hash: bytes
    chain: bytes

    @property
    def size(self) -> int:
        """Bytes the whole record takes in a segment."""
        return HEADER_SIZE + self.stored_len


@dataclass(frozen=True, slots=True)
class Payload:
    """A payload ready to be put in a record: possibly compressed, already hashed.

    Encoding is the expensive part of an append (lz4, xxh3) and does not depend on the LSN,
    so callers do it outside any lock. A record received from another node is a Payload too:
    its verified stored bytes (a memoryview into the received buffer, not copied) and hash.
    """

    flags: int
    length: int
    stored: bytes | memoryview
    payload_hash: bytes


def genesis_chain(volume_uuid: str) -> bytes:
    """The chain value "before LSN 1" of a volume: different volumes never share history."""
    return hashlib.blake2b(b"marsfs-genesis:" + volume_uuid.encode(), digest_size=CHAIN_SIZE).digest()


def encode_payload(data: bytes | memoryview, *, compress: bool = True, max_stored: int | None = None) -> Payload:
    """Compress ``data`` with lz4 when that makes it smaller, and hash what is stored.

    ``max_stored``: keep the compressed form only when it takes at most that many bytes (the
    default: fewer than the data). Data stored as it is is not copied when it cannot change
    (``bytes``, or a read-only memoryview such as a slice of one): the payload refers to it."""
    length = len(data)
    if length > MAX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds the record limit {MAX_PAYLOAD}")
    stored: bytes | memoryview = data if type(data) is bytes or (type(data) is memoryview and data.readonly) \
        else bytes(data)
    flags = 0
    if compress and length >= MIN_COMPRESS:
        packed = lz4.block.compress(stored, store_size=False)
        if len(packed) <= (length - 1 if max_stored is None else max_stored):
            stored, flags = packed, Flags.LZ4
    return Payload(flags, length, stored, xxhash.xxh3_128_digest(stored))


def decode_payload(flags: int, length: int, stored: bytes | memoryview) -> bytes:
    """The logical payload of a record whose stored bytes were already verified.

    Verified means only that they are what the writer stored: a peer can checksum anything, so
    a compressed payload that does not decompress to exactly ``length`` bytes is a
    :class:`BadRecord` too, never another library's exception."""
    if flags & Flags.LZ4:
        try:
            out: bytes = lz4.block.decompress(stored, uncompressed_size=length)
        except lz4.block.LZ4BlockError as e:
            raise BadRecord(f"compressed payload does not decompress ({e})") from None
        if len(out) != length:
            raise BadRecord(f"compressed payload decompresses to {len(out)} bytes, not {length}")
        return out
    return bytes(stored)


def encode_header(
    rtype: RecordType,
    lsn: int,
    offset: int,
    payload: Payload,
    timestamp_ns: int,
    prev_chain: bytes,
) -> tuple[bytes, bytes]:
    """The 80 header bytes of a record and its chain value."""
    head = _HEAD.pack(
        RECORD_MAGIC,
        FORMAT_VERSION,
        int(rtype),
        payload.flags,
        lsn,
        offset,
        payload.length,
        len(payload.stored),
        timestamp_ns,
        payload.payload_hash,
    )
    chain = next_chain(prev_chain, head)
    body = head + chain
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body)), chain


def next_chain(prev_chain: bytes, head56: bytes | memoryview) -> bytes:
    """Chain value of a record given its predecessor's chain and its header bytes 0..56."""
    h = hashlib.blake2b(prev_chain, digest_size=CHAIN_SIZE)
    h.update(head56)
    return h.digest()


def decode_header(buf: bytes | memoryview) -> Header:
    """Decode and verify 80 header bytes (not the payload, not the chain link).

    Raises :class:`BadRecord` when the bytes are not a header this version wrote.
    """
    if len(buf) < HEADER_SIZE:
        raise BadRecord("incomplete header")
    (magic, version, rtype, flags, lsn, offset, length, stored_len, ts, phash) = _HEAD.unpack_from(buf, 0)
    if magic != RECORD_MAGIC:
        raise BadRecord("bad record magic")
    (want,) = _SUM.unpack_from(buf, _SUM_AT)
    if xxhash.xxh3_64_intdigest(buf[:_SUM_AT]) != want:
        raise BadRecord("header checksum mismatch")
    if version != FORMAT_VERSION:
        raise BadRecord(f"unsupported record format version {version}")
    try:
        rt = RecordType(rtype)
    except ValueError:
        raise BadRecord(f"unknown record type {rtype}") from None
    if flags & ~Flags.KNOWN:
        raise BadRecord(f"unknown record flags {flags:#x}")
    if length > MAX_PAYLOAD or stored_len > MAX_PAYLOAD:
        raise BadRecord(f"record length {max(length, stored_len)} exceeds the limit")
    if not flags & Flags.LZ4 and stored_len != length:
        raise BadRecord("stored length differs from length of an uncompressed record")
    chain = bytes(buf[_CHAIN_AT:_SUM_AT])
    return Header(rt, flags, lsn, offset, length, stored_len, ts, bytes(phash), chain)


def verify_payload(header: Header, stored: bytes | memoryview) -> None:
    """Raise :class:`BadRecord` unless ``stored`` is the payload ``header`` describes."""
    if len(stored) != header.stored_len:
        raise BadRecord("incomplete payload")
    if xxhash.xxh3_128_digest(stored) != header.payload_hash:
        raise BadRecord("payload checksum mismatch")


def verify_link(header: Header, raw_header: bytes | memoryview, expect_lsn: int, prev_chain: bytes) -> None:
    """Raise :class:`BadRecord` unless the record continues the log at ``expect_lsn``."""
    if header.lsn != expect_lsn:
        raise BadRecord(f"LSN {header.lsn} where {expect_lsn} was expected")
    if next_chain(prev_chain, raw_header[:_CHAIN_AT]) != header.chain:
        raise BadRecord("chain hash does not continue the previous record")


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """The first bytes of every segment file: where it starts in the history."""

    first_lsn: int
    prev_chain: bytes
    created_ns: int


def encode_segment_header(first_lsn: int, prev_chain: bytes, created_ns: int) -> bytes:
    assert len(prev_chain) == CHAIN_SIZE
    body = _SEG.pack(SEGMENT_MAGIC, FORMAT_VERSION, first_lsn, prev_chain, created_ns)
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


def decode_segment_header(buf: bytes | memoryview) -> SegmentHeader:
    if len(buf) < SEGMENT_HEADER_SIZE:
        raise BadRecord("incomplete segment header")
    magic, version, first_lsn, prev_chain, created_ns = _SEG.unpack_from(buf, 0)
    if magic != SEGMENT_MAGIC:
        raise BadRecord("bad segment magic")
    (want,) = _SUM.unpack_from(buf, _SEG.size)
    if xxhash.xxh3_64_intdigest(buf[: _SEG.size]) != want:
        raise BadRecord("segment header checksum mismatch")
    if version != FORMAT_VERSION:
        raise BadRecord(f"unsupported segment format version {version}")
    return SegmentHeader(first_lsn, bytes(prev_chain), created_ns)
