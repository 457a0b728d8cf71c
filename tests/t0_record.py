"""Unit tests of the record and segment-header codec (marsfs.log.record), and of the chain
hash as two real logs see it.

The codec is pure (bytes in, bytes out), so most tests need no files. Headers with one wrong
field are crafted with the codec's own struct and a *correct* header checksum, so that each
test reaches the check it means to test instead of stopping at the checksum.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from marsfs.log import Log
from marsfs.log import record as rec
from marsfs.log.record import (
    CHAIN_SIZE,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAX_PAYLOAD,
    MIN_COMPRESS,
    RECORD_MAGIC,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    BadRecord,
    Flags,
    RecordType,
    decode_header,
    decode_payload,
    decode_segment_header,
    encode_header,
    encode_payload,
    encode_segment_header,
    genesis_chain,
    next_chain,
    verify_link,
    verify_payload,
)

GENESIS = genesis_chain("test-record-volume")
TS = 1_700_000_000_123_456_789


def _craft(*, magic: bytes = RECORD_MAGIC, version: int = FORMAT_VERSION, rtype: int = RecordType.WRITE,
           flags: int = 0, lsn: int = 1, offset: int = 0, length: int = 0, stored_len: int = 0,
           ts: int = TS, payload_hash: bytes = bytes(16), chain: bytes = bytes(16)) -> bytes:
    """80 header bytes with arbitrary fields and a correct header checksum."""
    body = rec._HEAD.pack(magic, version, rtype, flags, lsn, offset, length, stored_len, ts, payload_hash) + chain
    assert len(body) == HEADER_SIZE - 8
    return body + rec._SUM.pack(xxhash.xxh3_64_intdigest(body))


# ---------------------------------------------------------------------- layout


def test_sizes_match_the_documented_layout() -> None:
    assert HEADER_SIZE == 80
    assert SEGMENT_HEADER_SIZE == 64
    assert rec._HEAD.size == 56
    assert CHAIN_SIZE == 16


def test_crafted_header_helper_agrees_with_the_encoder() -> None:
    payload = encode_payload(b"abc" * 50)
    head, chain = encode_header(RecordType.WRITE, 7, 4096, payload, TS, GENESIS)
    crafted = _craft(rtype=RecordType.WRITE, flags=payload.flags, lsn=7, offset=4096, length=payload.length,
                     stored_len=len(payload.stored), payload_hash=payload.payload_hash, chain=chain)
    assert crafted == head


# ---------------------------------------------------------------------- round trips


ROUND_TRIP_CASES = [
    (RecordType.WRITE, 0, os.urandom(4096)),  # incompressible
    (RecordType.WRITE, 123 * 512, bytes(8192)),  # compressible
    (RecordType.WRITE, 2**40, b"x"),  # tiny, large offset
    (RecordType.WRITE, 512, b""),  # empty
    (RecordType.FLUSH, 0, b""),
    (RecordType.MARK, 0, "nightly-2026-11-23 ✓".encode()),
    (RecordType.RESIZE, 10 * 2**30, b""),
]


@pytest.mark.parametrize("rtype,offset,data", ROUND_TRIP_CASES,
                         ids=[f"{t.name}-{len(d)}" for t, _, d in ROUND_TRIP_CASES])
def test_round_trip_each_record_type(rtype: RecordType, offset: int, data: bytes) -> None:
    payload = encode_payload(data)
    lsn = 4242
    head, chain = encode_header(rtype, lsn, offset, payload, TS, GENESIS)
    assert len(head) == HEADER_SIZE
    assert len(chain) == CHAIN_SIZE

    h = decode_header(head)
    assert h.type is rtype
    assert h.flags == payload.flags
    assert h.lsn == lsn
    assert h.offset == offset
    assert h.length == len(data)
    assert h.stored_len == len(payload.stored)
    assert h.timestamp_ns == TS
    assert h.payload_hash == payload.payload_hash
    assert h.chain == chain == next_chain(GENESIS, head[:56])
    assert h.size == HEADER_SIZE + len(payload.stored)

    verify_payload(h, payload.stored)
    verify_link(h, head, lsn, GENESIS)
    assert decode_payload(h.flags, h.length, payload.stored) == data

    # decoding works the same from a memoryview inside a larger buffer (as recovery reads mmaps)
    buf = bytearray(b"\xee" * 13) + head + payload.stored + b"\xee" * 7
    view = memoryview(buf)
    h2 = decode_header(view[13 : 13 + HEADER_SIZE])
    assert h2 == h
    verify_payload(h2, view[13 + HEADER_SIZE : 13 + HEADER_SIZE + h2.stored_len])


def test_round_trip_max_payload() -> None:
    data = bytes(range(256)) * (MAX_PAYLOAD // 256)
    assert len(data) == MAX_PAYLOAD
    payload = encode_payload(data)
    head, _ = encode_header(RecordType.WRITE, 1, 0, payload, TS, GENESIS)
    h = decode_header(head)
    assert h.length == MAX_PAYLOAD
    verify_payload(h, payload.stored)
    assert decode_payload(h.flags, h.length, payload.stored) == data


def test_payload_over_the_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_payload(bytes(MAX_PAYLOAD + 1))


# ---------------------------------------------------------------------- compression


def test_incompressible_data_stays_uncompressed() -> None:
    data = random.Random(1).randbytes(65536)
    payload = encode_payload(data)
    assert payload.flags == 0
    assert payload.stored == data
    assert payload.length == len(data)
    assert payload.payload_hash == xxhash.xxh3_128_digest(data)


def test_zeros_get_compressed() -> None:
    data = bytes(65536)
    payload = encode_payload(data)
    assert payload.flags == Flags.LZ4
    assert len(payload.stored) < len(data) // 10
    assert payload.length == len(data)
    assert payload.payload_hash == xxhash.xxh3_128_digest(payload.stored)  # hash covers what is stored
    assert decode_payload(payload.flags, payload.length, payload.stored) == data


def test_compression_only_when_it_makes_the_payload_smaller() -> None:
    rng = random.Random(2)
    for n in [MIN_COMPRESS, 100, 1000, 4096, 70000]:
        for data in (rng.randbytes(n), bytes(n), (b"abcd" * n)[:n], rng.randbytes(n // 2) + bytes(n - n // 2)):
            payload = encode_payload(data)
            if payload.flags & Flags.LZ4:
                assert len(payload.stored) < len(data)
            else:
                assert payload.stored == data
            assert decode_payload(payload.flags, payload.length, payload.stored) == data


def test_short_or_opted_out_payloads_are_not_compressed() -> None:
    assert encode_payload(bytes(MIN_COMPRESS - 1)).flags == 0
    assert encode_payload(bytes(65536), compress=False).flags == 0
    assert encode_payload(bytes(65536), compress=False).stored == bytes(65536)
    assert encode_payload(b"").stored == b""


# ---------------------------------------------------------------------- rejection


def test_stored_len_over_the_limit_is_rejected() -> None:
    head = _craft(flags=Flags.LZ4, length=4096, stored_len=MAX_PAYLOAD + 1)
    with pytest.raises(BadRecord, match="exceeds the limit"):
        decode_header(head)
    head = _craft(length=MAX_PAYLOAD + 1, stored_len=MAX_PAYLOAD + 1)
    with pytest.raises(BadRecord, match="exceeds the limit"):
        decode_header(head)
    head = _craft(flags=Flags.LZ4, length=MAX_PAYLOAD + 1, stored_len=100)
    with pytest.raises(BadRecord, match="exceeds the limit"):
        decode_header(head)
    head = _craft(flags=Flags.LZ4, length=2**32 - 1, stored_len=2**32 - 1)
    with pytest.raises(BadRecord, match="exceeds the limit"):
        decode_header(head)
    # exactly at the limit is fine
    decode_header(_craft(length=MAX_PAYLOAD, stored_len=MAX_PAYLOAD))


def test_uncompressed_record_with_differing_lengths_is_rejected() -> None:
    with pytest.raises(BadRecord):
        decode_header(_craft(flags=0, length=100, stored_len=50))


@pytest.mark.parametrize("rtype", [0, 5, 6, 127, 255])
def test_unknown_type_is_rejected(rtype: int) -> None:
    with pytest.raises(BadRecord, match="unknown record type"):
        decode_header(_craft(rtype=rtype))


@pytest.mark.parametrize("flags", [0x0002, 0x0004, 0x0100, 0x8000, 0xFFFF, Flags.LZ4 | 0x0002])
def test_unknown_flags_are_rejected(flags: int) -> None:
    with pytest.raises(BadRecord, match="unknown record flags"):
        decode_header(_craft(flags=flags, length=100, stored_len=50))


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version_is_rejected(version: int) -> None:
    with pytest.raises(BadRecord, match="version"):
        decode_header(_craft(version=version))


def test_bad_magic_checksum_and_short_header_are_rejected() -> None:
    with pytest.raises(BadRecord, match="magic"):
        decode_header(_craft(magic=b"MRSx"))
    with pytest.raises(BadRecord, match="magic"):
        decode_header(bytes(HEADER_SIZE))
    good = _craft()
    decode_header(good)
    for i in range(HEADER_SIZE):
        bad = bytearray(good)
        bad[i] ^= 0x10
        with pytest.raises(BadRecord):
            decode_header(bytes(bad))
    for n in range(HEADER_SIZE):
        with pytest.raises(BadRecord):
            decode_header(good[:n])


def test_every_single_bit_flip_of_a_header_is_rejected() -> None:
    payload = encode_payload(os.urandom(300))
    head, _ = encode_header(RecordType.WRITE, 9, 1024, payload, TS, GENESIS)
    for bit in range(HEADER_SIZE * 8):
        bad = bytearray(head)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BadRecord):
            decode_header(bytes(bad))


def test_payload_verification() -> None:
    data = random.Random(3).randbytes(500)
    payload = encode_payload(data)
    head, _ = encode_header(RecordType.WRITE, 1, 0, payload, TS, GENESIS)
    h = decode_header(head)
    verify_payload(h, payload.stored)
    with pytest.raises(BadRecord, match="incomplete"):
        verify_payload(h, payload.stored[:-1])
    with pytest.raises(BadRecord, match="incomplete"):
        verify_payload(h, bytes(payload.stored) + b"\0")
    for i in (0, 250, 499):
        bad = bytearray(payload.stored)
        bad[i] ^= 0x01
        with pytest.raises(BadRecord, match="checksum"):
            verify_payload(h, bytes(bad))


def test_link_verification() -> None:
    payload = encode_payload(b"hello")
    head, chain = encode_header(RecordType.WRITE, 5, 0, payload, TS, GENESIS)
    h = decode_header(head)
    verify_link(h, head, 5, GENESIS)
    with pytest.raises(BadRecord, match="LSN"):
        verify_link(h, head, 6, GENESIS)
    with pytest.raises(BadRecord, match="chain"):
        verify_link(h, head, 5, genesis_chain("another volume"))
    # the next record links to this one's chain
    head2, _ = encode_header(RecordType.FLUSH, 6, 0, encode_payload(b""), TS, chain)
    verify_link(decode_header(head2), head2, 6, chain)
    with pytest.raises(BadRecord, match="chain"):
        verify_link(decode_header(head2), head2, 6, GENESIS)


# ---------------------------------------------------------------------- segment header


def test_segment_header_round_trip_and_rejection() -> None:
    raw = encode_segment_header(77, GENESIS, TS)
    assert len(raw) == SEGMENT_HEADER_SIZE
    assert raw[:4] == SEGMENT_MAGIC
    sh = decode_segment_header(raw)
    assert (sh.first_lsn, sh.prev_chain, sh.created_ns) == (77, GENESIS, TS)
    for bit in range(SEGMENT_HEADER_SIZE * 8):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BadRecord):
            decode_segment_header(bytes(bad))
    for n in range(SEGMENT_HEADER_SIZE):
        with pytest.raises(BadRecord):
            decode_segment_header(raw[:n])
    # a future version with a correct checksum is refused too
    body = rec._SEG.pack(SEGMENT_MAGIC, FORMAT_VERSION + 1, 77, GENESIS, TS)
    with pytest.raises(BadRecord, match="version"):
        decode_segment_header(body + rec._SUM.pack(xxhash.xxh3_64_intdigest(body)))


def test_genesis_chains_differ_between_volumes() -> None:
    assert genesis_chain("a") != genesis_chain("b")
    assert genesis_chain("a") == genesis_chain("a")
    assert len(genesis_chain("a")) == CHAIN_SIZE


# ---------------------------------------------------------------------- chain across two logs


def _records(seed: int, n: int) -> list[tuple[RecordType, int, bytes, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.15:
            out.append((RecordType.FLUSH, 0, b"", TS + i))
        elif kind < 0.2:
            out.append((RecordType.MARK, 0, f"mark-{i}".encode(), TS + i))
        else:
            size = rng.choice([1, 100, 512, 3000])
            data = rng.randbytes(size) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * size
            out.append((RecordType.WRITE, rng.randrange(0, 1 << 20, 512), data, TS + i))
    return out


def _build(path: Path, records: list[tuple[RecordType, int, bytes, int]]) -> Log:
    log = Log.create(path, GENESIS, segment_bytes=16 * 1024)  # several segments
    for rtype, offset, data, ts in records:
        log.append(rtype, offset, encode_payload(data), timestamp_ns=ts)
    log.sync()
    return log


def _chains(log: Log) -> list[bytes]:
    return [log.chain_at(n) for n in range(0, log.last_lsn + 1)]


def test_identical_records_give_identical_chains(tmp_path: Path) -> None:
    records = _records(10, 60)
    a = _build(tmp_path / "a", records)
    b = _build(tmp_path / "b", records)
    try:
        assert a.last_lsn == b.last_lsn == len(records)
        assert len(list(a.path.iterdir())) > 1, "the test wants several segments"
        assert a.chain_at(0) == b.chain_at(0) == GENESIS
        assert _chains(a) == _chains(b)
        assert len(set(_chains(a))) == len(records) + 1  # all distinct
        for n in range(1, a.last_lsn + 1):
            assert a.read_raw(n) == b.read_raw(n)  # records are byte-identical
    finally:
        a.close()
        b.close()
    # and the same after recovery from disk
    a, b = Log.open(tmp_path / "a"), Log.open(tmp_path / "b")
    try:
        assert _chains(a) == _chains(b)
    finally:
        a.close()
        b.close()


def _variants(original: tuple[RecordType, int, bytes, int]) -> dict[str, tuple[RecordType, int, bytes, int]]:
    rtype, offset, data, ts = original
    assert rtype == RecordType.WRITE and len(data) > 1
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    return {
        "data": (rtype, offset, bytes(flipped), ts),
        "offset": (rtype, offset + 512, data, ts),
        "length": (rtype, offset, data[:-1], ts),
        "timestamp": (rtype, offset, data, ts + 1),
        "type": (RecordType.MARK, offset, data, ts),
    }


@pytest.mark.parametrize("what", ["data", "offset", "length", "timestamp", "type"])
def test_one_differing_record_splits_the_chains_for_good(tmp_path: Path, what: str) -> None:
    records = _records(11, 50)
    k = next(i for i in range(20, 50) if records[i][0] == RecordType.WRITE and len(records[i][2]) > 1)
    diverging = list(records)
    diverging[k] = _variants(records[k])[what]
    a = _build(tmp_path / "a", records)
    b = _build(tmp_path / "b", diverging)
    try:
        lsn_k = k + 1
        assert a.last_lsn == b.last_lsn == len(records)
        for n in range(0, lsn_k):
            assert a.chain_at(n) == b.chain_at(n), f"chains must agree before the difference (LSN {n})"
        for n in range(lsn_k, a.last_lsn + 1):
            assert a.chain_at(n) != b.chain_at(n), f"chains must disagree from LSN {lsn_k} on (LSN {n})"
        # the records after the difference are themselves identical in content,
        # yet their chains differ: the chain carries the history
        for n in range(lsn_k + 1, a.last_lsn + 1):
            ia, ib = a.info(n), b.info(n)
            assert (ia.type, ia.offset, ia.length, ia.timestamp_ns) == (ib.type, ib.offset, ib.length, ib.timestamp_ns)
            assert a.read_data(n, 0, ia.length) == b.read_data(n, 0, ib.length)
    finally:
        a.close()
        b.close()


#: examples per fuzz test; a soak sets MARSFS_FUZZ_EXAMPLES higher
FUZZ = int(os.environ.get("MARSFS_FUZZ_EXAMPLES", "300"))


@settings(max_examples=FUZZ, deadline=None)
@given(st.binary(min_size=0, max_size=HEADER_SIZE + 64), st.integers(0, HEADER_SIZE))
def test_fuzzed_header_bytes_raise_only_bad_record(noise: bytes, at: int) -> None:
    """Noise, or a real header with noise spliced in, decodes or raises BadRecord."""
    real, _ = rec.encode_header(RecordType.WRITE, 7, 4096, rec.encode_payload(b"x" * 512), 1, bytes(CHAIN_SIZE))
    for buf in (noise, real[:at] + noise[: HEADER_SIZE - at] + real[at + len(noise):]):
        try:
            rec.decode_header(buf)
        except BadRecord:
            pass


@settings(max_examples=FUZZ, deadline=None)
@given(st.binary(max_size=4096), st.integers(0, 1 << 20), st.booleans())
def test_a_forged_record_that_checksums_but_lies_raises_only_bad_record(stored: bytes, length: int,
                                                                        compressed: bool) -> None:
    """A peer can checksum anything: a header with a correct checksum and payload hash over
    stored bytes that are no lz4 of ``length`` bytes (or not ``length`` bytes at all) is a
    BadRecord at some step, never another library's error and never a wrong payload."""
    flags = Flags.LZ4 if compressed else 0
    payload = rec.Payload(flags, length, stored, xxhash.xxh3_128_digest(stored))
    raw, _ = rec.encode_header(RecordType.WRITE, 1, 0, payload, 1, bytes(CHAIN_SIZE))
    try:
        header = rec.decode_header(raw)
        rec.verify_payload(header, stored)
        data = rec.decode_payload(header.flags, header.length, stored)
    except BadRecord:
        return
    assert len(data) == length
