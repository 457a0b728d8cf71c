"""Fuzz targets for what a peer or a disk hands us: frames, messages, log records, metadata.

Each target takes bytes and either returns or raises one of the project's own errors for bad
input (:data:`OWN_ERRORS`); anything else escaping is a bug (an IndexError, a RecursionError,
lz4's or json's exception, an AssertionError). The same targets serve three drivers:

* ``tests/t0_fuzz_corpus.py`` runs the seed corpus in ``tests/corpus/TARGET/`` through them,
  and hypothesis mutations of those seeds (the default suite);
* ``scripts/fuzz TARGET`` runs atheris, coverage-guided, from that corpus (not in the suite);
* :func:`write_corpus` makes the seeds: one valid input of every message type, record type and
  metadata view, and some that must be refused (``bad-*``).

Checksums guard frames and records, so random bytes rarely get past them. The ``message`` and
``record`` targets therefore take their input as the *contents* a peer controls and frame or
checksum it correctly themselves: a peer can checksum anything, so what is behind the checksum
must be as strict as the checksum.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from marsfs.errors import ProtocolError
from marsfs.log import record as rec
from marsfs.log.record import CHAIN_SIZE, BadRecord, RecordType
from marsfs.node.meta import ClusterMeta, Entry, check_entry
from marsfs.replication.protocol import (
    FLAG_LZ4,
    FRAME_HEADER,
    FRAME_MAGIC,
    PROTO_VERSION,
    Ack,
    Chains,
    Error,
    Fetch,
    FrameDecoder,
    HandoverEnd,
    HandoverPrepare,
    HandoverReady,
    Heartbeat,
    Hello,
    Message,
    MetaEntries,
    MetaWelcome,
    MsgType,
    PositionAsk,
    PositionTold,
    Records,
    Sums,
    SumsRequest,
    SyncData,
    SyncEnd,
    SyncInfo,
    SyncProgress,
    SyncRequest,
    SyncSums,
    Welcome,
    decode_message,
    encode_frame,
    encode_message,
)
from marsfs.volume.blocksums import BLOCK, SUM_SIZE

#: what bad input may raise: the wire's and the log's own errors, which the callers handle
OWN_ERRORS: tuple[type[Exception], ...] = (ProtocolError, BadRecord)

CHAIN = bytes(range(CHAIN_SIZE))


def fuzz_frames(data: bytes) -> None:
    """The node port's byte stream as it arrives: frames, each decoded to a message."""
    for frame in FrameDecoder().feed(data):
        decode_message(frame)


#: ``message`` input: one byte picks the type (modulo the types), one says compressed, the rest
#: is the payload, framed with a correct checksum
_TYPES = sorted(MsgType)


def fuzz_message(data: bytes) -> None:
    """A well-framed message of any type whose payload is the input's: past the checksum,
    everything a peer can say is checked field by field."""
    if len(data) < 2:
        return
    mt = _TYPES[data[0] % len(_TYPES)]
    fuzz_frames(encode_frame(mt, data[2:], compress=bool(data[1] & 1)))


_FORGE = struct.Struct("<BBQQI")  # record type, flags, lsn, offset, length


def fuzz_record(data: bytes) -> None:
    """What a log file or a peer's RECORDS hands us, by ``data[0] % 3``: 0, the rest as a raw
    record (header and payload); 1, a record forged with correct sums over fields and stored
    bytes taken from the input (what a lying peer can do); 2, a segment file's header."""
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    if mode == 2:
        rec.decode_segment_header(body)
        return
    if mode == 0:
        raw = body
    else:
        if len(body) < _FORGE.size:
            return
        rtype, flags, lsn, offset, length = _FORGE.unpack_from(body)
        stored = body[_FORGE.size:]
        payload = rec.Payload(flags, length, stored, xxhash.xxh3_128_digest(stored))
        header, _ = rec.encode_header(rtype, lsn, offset, payload, 1, CHAIN)
        raw = header + stored
    h = rec.decode_header(raw)
    stored = raw[rec.HEADER_SIZE:rec.HEADER_SIZE + h.stored_len]
    rec.verify_payload(h, stored)
    out = rec.decode_payload(h.flags, h.length, stored)
    assert len(out) == h.length, "a verified record decodes to its length or is a BadRecord"


@dataclass
class MetaTarget:
    """A META_ENTRIES payload (the input, framed correctly here) merged into a node's
    :class:`ClusterMeta` (kept in a temporary directory for the target's life), then every view
    the node reads from the merged map."""

    meta: ClusterMeta

    def __call__(self, data: bytes) -> None:
        (frame,) = FrameDecoder().feed(encode_frame(MsgType.META_ENTRIES, data, compress=False))
        msg = decode_message(frame)
        assert isinstance(msg, MetaEntries)
        entries: list[Entry] = []
        for owner, key, clock, value in msg.entries:
            if check_entry(owner, key, clock, value) is None:
                entries.append(Entry.from_wire((owner, key, clock, value)))
        self.meta.merge(entries)
        for volume in {e.key.split("/")[1] for e in entries if e.key.count("/") >= 2}:
            self.meta.designated(volume)
            self.meta.positions(volume)
            self.meta.members(volume)
            self.meta.removed(volume)


@dataclass
class Targets:
    """The targets by name, with what the meta target needs kept alive; close() removes it."""

    _dir: tempfile.TemporaryDirectory[str]
    by_name: dict[str, Callable[[bytes], None]]

    def close(self) -> None:
        self._dir.cleanup()


def targets() -> Targets:
    d = tempfile.TemporaryDirectory(prefix="marsfs-fuzz-")
    meta = ClusterMeta(Path(d.name) / "meta.json", "fuzz")
    return Targets(d, {"frames": fuzz_frames, "message": fuzz_message, "record": fuzz_record,
                       "meta": MetaTarget(meta)})


def run_one(target: Callable[[bytes], None], data: bytes) -> str | None:
    """Run one input; the name of the own error it raised, None if it was accepted. Any other
    exception propagates: that is the finding."""
    try:
        target(data)
    except OWN_ERRORS as e:
        return type(e).__name__
    return None


# ---------------------------------------------------------------------------- the seed corpus

def _records(first: int, n: int, *, compress: bool) -> tuple[bytes, ...]:
    out, chain = [], CHAIN
    for i in range(n):
        payload = rec.encode_payload(bytes([i]) * 4096, compress=compress)
        header, chain = rec.encode_header(RecordType.WRITE, first + i, i * 4096, payload, 1_700_000_000 + i, chain)
        out.append(header + payload.stored)
    return tuple(out)


def sample_messages() -> list[Message]:
    """One valid message of every type (several where a field changes the shape)."""
    sums = bytes(SUM_SIZE * 4)
    return [
        Hello(proto=PROTO_VERSION, cluster="c", node="b", volume="vm", want="fetch", epoch=2, node_id="0" * 32),
        Hello(proto=PROTO_VERSION, cluster="c", node="b", volume="", want="meta", epoch=0),
        Welcome(node="a", volume="vm", uuid="u-1", size=1 << 20, epoch=1, head_lsn=7, durable_lsn=5),
        Error(code="diverged", error="the histories diverged"),
        Fetch(from_lsn=8, prev_chain=CHAIN),
        Fetch(from_lsn=8, prev_chain=CHAIN, watch=True),
        Records(_records(8, 3, compress=True)),
        Records(_records(8, 2, compress=False)),
        Heartbeat(uuid="u-1", head_lsn=9, durable_lsn=9, time=1.7e9, probe=3, lag_bytes=100, lag_records=2,
                  lag_seconds=0.25),
        Ack(fetched_lsn=5, replayed_lsn=4, fetch_paused=True, replay_paused=False, probe=12),
        SyncRequest(since_lsn=4, since_chain=CHAIN, whole=False, ranges=((0, BLOCK * 4),), rate=1 << 20),
        SyncInfo(lsn=9, chain=CHAIN, size=1 << 20, uuid="u-1", ranges=((0, BLOCK * 4), (BLOCK * 8, BLOCK))),
        SyncSums(0, sums),
        SyncData(BLOCK, b"\1" * BLOCK),
        SyncProgress(compared=BLOCK * 4, sent=BLOCK),
        SyncEnd(lsn=9),
        SumsRequest(lsn=0, offset=0, length=BLOCK * 4),
        Sums(9, 0, 1 << 20, sums),
        MetaWelcome(node="a", cluster="c"),
        MetaEntries(entries=(("a", "volume/vm/primary", 3, {"node": "a", "epoch": 1, "start_lsn": 1}),
                             ("b", "volume/vm/position", 4, {"durable_lsn": 5}), ("a", "volume/vm/removed/c", 5, True)),
                    more=False),
        HandoverPrepare(epoch=1, timeout=30.0),
        HandoverReady(head_lsn=9, chain=CHAIN, epoch=1),
        HandoverEnd(claimed=True, epoch=2, start_lsn=10),
        Chains(lsns=(1, 5, 9), chains=(CHAIN, CHAIN, CHAIN), head_lsn=9),
        Chains(lsns=(), chains=(), head_lsn=9, done=True, fork_lsn=5, exact=True, tail_records=4, tail_bytes=16384),
        PositionAsk(lsn=9, chain=CHAIN),
        PositionTold(relation="ahead", durable_lsn=12, replayed_lsn=11, records=3, bytes=12288, oldest=1.7e9,
                     newest=1.7e9 + 2),
    ]


def _bad_frames() -> Iterator[tuple[str, bytes]]:
    hello = encode_message(sample_messages()[0])
    yield "bad-magic", b"XXXX" + hello[4:]
    yield "bad-sum", hello[:FRAME_HEADER - 1] + bytes([hello[FRAME_HEADER - 1] ^ 1]) + hello[FRAME_HEADER:]
    yield "bad-length", hello[:8] + struct.pack("<I", 1 << 30) + hello[12:]
    yield "bad-nested-json", encode_frame(MsgType.HELLO, b"[" * 5000 + b"]" * 5000)
    yield "bad-lz4-bomb-claim", _frame(MsgType.HELLO, FLAG_LZ4, (64 << 20).to_bytes(4, "little") + b"\0" * 600)
    yield "bad-lz4-garbage", _frame(MsgType.HELLO, FLAG_LZ4, (600).to_bytes(4, "little") + b"\xff" * 64)
    yield "bad-unknown-type", _frame(99, 0, b"{}")


def _frame(mt: int, flags: int, body: bytes) -> bytes:
    """A frame with a correct checksum over whatever flags and body (encode_frame builds only
    frames we would send)."""
    head = struct.pack("<4sBBHI", FRAME_MAGIC, PROTO_VERSION, int(mt), flags, len(body))
    h = xxhash.xxh3_64(head)
    h.update(body)
    return head + struct.pack("<Q", h.intdigest()) + body


def write_corpus(root: Path) -> dict[str, int]:
    """Write the seeds under ``root/TARGET/NAME`` (valid ones ``ok-*``, refused ones ``bad-*``);
    returns how many each target got. Deterministic: the same bytes every time."""
    counts: dict[str, int] = {}

    def put(target: str, name: str, data: bytes) -> None:
        d = root / target
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
        counts[target] = counts.get(target, 0) + 1

    msgs = sample_messages()
    for i, msg in enumerate(msgs):
        frame = encode_message(msg)
        name = f"ok-{i:02d}-{msg.TYPE.name.lower()}"
        put("frames", name, frame)
        fd = FrameDecoder().feed(frame)[0]
        put("message", name, bytes([_TYPES.index(fd.type), 0]) + fd.payload)
    put("frames", "ok-conversation", b"".join(encode_message(m) for m in msgs[:10]))
    for name, data in _bad_frames():
        put("frames", name, data)
    put("message", "bad-unknown-field", bytes([_TYPES.index(MsgType.ACK), 0]) + b'{"fetched_lsn": 1, "x": 2}')
    put("message", "bad-negative-lsn", bytes([_TYPES.index(MsgType.FETCH), 0])
        + json.dumps({"from_lsn": -1, "prev_chain": CHAIN.hex()}).encode())

    for compress in (True, False):
        raw = _records(1, 1, compress=compress)[0]
        put("record", f"ok-raw-{'lz4' if compress else 'plain'}", b"\0" + raw)
    put("record", "ok-forged-plain", b"\1" + _FORGE.pack(1, 0, 1, 0, 5) + b"hello")
    put("record", "ok-segment-header", b"\2" + rec.encode_segment_header(1, CHAIN, 1))
    put("record", "bad-forged-huge-length", b"\1" + _FORGE.pack(1, 0, 1, 0, 1 << 31) + b"x")
    put("record", "bad-forged-lz4-lies", b"\1" + _FORGE.pack(1, 1, 1, 0, 1 << 20) + b"\x1f" * 40)
    put("record", "bad-raw-flipped", b"\0" + bytes([_records(1, 1, compress=False)[0][0] ^ 1])
        + _records(1, 1, compress=False)[0][1:])
    put("record", "bad-unknown-type", b"\1" + _FORGE.pack(99, 0, 1, 0, 3) + b"abc")
    put("record", "bad-segment-header-is-no-record", b"\0" + rec.encode_segment_header(1, CHAIN, 1))

    def entries_payload(*entries: tuple[str, str, int, object], more: bool = False) -> bytes:
        return json.dumps({"entries": [list(e) for e in entries], "more": more}).encode()

    put("meta", "ok-entries", entries_payload(
        ("a", "volume/vm/primary", 3, {"node": "a", "epoch": 1, "start_lsn": 1}),
        ("b", "volume/vm/position", 4, {"durable_lsn": 5, "replayed_lsn": 5, "updated": 1.7e9}),
        ("a", "volume/vm/removed/c", 5, True), more=True))
    put("meta", "ok-newer-claim", entries_payload(("b", "volume/vm/primary", 9, {"node": "b", "epoch": 2,
                                                                                 "start_lsn": 10})))
    put("meta", "ok-odd-values-are-ignored", entries_payload(("a", "volume/vm/primary", 3, "not a claim"),
                                                            ("b", "volume/vm/position", 4, [1, 2]),
                                                            ("c", "volume/vm/removed/d", 4, {"x": None})))
    put("meta", "ok-tombstone", entries_payload(("b", "volume/vm/position", 12, None)))
    put("meta", "bad-huge-clock", entries_payload(("a", "volume/vm/primary", 10 ** 60, {})))
    put("meta", "bad-deep-value", entries_payload(("a", "k", 1, json.loads("[" * 20 + "]" * 20))))
    put("meta", "bad-owner", entries_payload(("a/../b", "k", 1, 1)))
    return counts
