"""The wire protocol as pure functions (marsfs.replication.protocol): frames and typed messages.

* Every message type round-trips through encode_message, FrameDecoder and decode_message.
* For every JSON message type and every field: a missing (required) field, a wrong JSON type
  (a bool is not an int), a value out of range, and an unknown extra field are ProtocolErrors
  that name the message type and the field.
* Binary messages: RECORDS must hold verified records with consecutive LSNs, SYNC_DATA an
  offset. The retired image copy's message types (8-11) are unknown types now.
* HELLO carries the client's node id; one without it decodes with the id "".
* Protocol 2: HEARTBEAT names the volume's uuid, FETCH may only watch, and
  frames of protocols 1 and 2 are refused in words.
* FrameDecoder refuses bad magic, checksum, length, version, type, flags and lz4 garbage, and
  decodes frames fed in pieces of any size.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import MISSING, fields
from typing import Any

import lz4.block
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from marsfs.errors import PeerError, ProtocolError
from marsfs.replication import protocol
from marsfs.replication.protocol import (
    FRAME_HEADER,
    MAX_FRAME,
    MAX_JSON,
    MAX_META_CLOCK,
    MAX_META_DEPTH,
    MAX_META_ENTRIES,
    MAX_META_VALUE,
    MAX_RANGES,
    PROTO_VERSION,
    Ack,
    Error,
    Fetch,
    Frame,
    FrameDecoder,
    Heartbeat,
    Hello,
    Message,
    MetaEntries,
    MsgType,
    Records,
    SyncData,
    SyncInfo,
    Welcome,
    decode_message,
    encode_frame,
    encode_message,
    json_depth,
    payload_limit,
)
from marsfs.testing.sansio import CHAIN, records
from marsfs.testing.wire import decode_frame

SAMPLES: list[Message] = [
    Hello(proto=PROTO_VERSION, cluster="c", node="b", volume="vm", want="fetch", epoch=2,
          node_id="0123456789abcdef0123456789abcdef"),
    Welcome(node="a", volume="vm", uuid="u-1", size=1 << 20, epoch=1, head_lsn=7, durable_lsn=5),
    Error(code="diverged", error="the histories diverged"),
    Fetch(from_lsn=8, prev_chain=CHAIN),
    Fetch(from_lsn=8, prev_chain=CHAIN, watch=True),
    Heartbeat(uuid="u-1", head_lsn=9, durable_lsn=9, time=1700000000.5, probe=3, lag_bytes=100, lag_records=2,
              lag_seconds=0.25),
    Heartbeat(uuid="u-1", head_lsn=9, durable_lsn=9, time=1700000000.5, probe=3, lag_bytes=0, lag_records=0,
              lag_seconds=0.0, mode="sync", sync_mirrors=1, refuse=True, degraded_since=1700000000.0, acked_lsn=8),
    Ack(fetched_lsn=5, replayed_lsn=4, fetch_paused=True, replay_paused=False, probe=12),
    Ack(fetched_lsn=5, replayed_lsn=5),
    Records(records(8, 3)),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    assert decode_frame(encode_message(msg)) == msg


def test_records_positions() -> None:
    msg = Records(records(8, 3))
    assert (msg.first_lsn, msg.last_lsn, msg.nbytes) == (8, 10, sum(map(len, msg.records)))


def test_fetch_without_watch_fetches() -> None:
    """``watch`` is optional on the wire: a FETCH without it asks for records."""
    frame = encode_frame(MsgType.FETCH, json.dumps({"from_lsn": 3, "prev_chain": CHAIN.hex()}).encode())
    assert decode_frame(frame) == Fetch(from_lsn=3, prev_chain=CHAIN, watch=False)


def test_protocol_1_is_refused_in_words() -> None:
    """Protocols 2 and 3 added fields and messages an old peer would not know; its frames are
    refused as such."""
    assert PROTO_VERSION == 3 and MsgType.SYNC_REQUEST.value == 12
    for old in (1, 2):
        with pytest.raises(ProtocolError, match=f"unsupported protocol version {old}"):
            FrameDecoder().feed(raw_frame(version=old))


def test_hello_carries_the_node_id_and_may_lack_it() -> None:
    """HELLO names the client node's id (two daemons of one name differ in it); a HELLO
    without one (a node from before ids) decodes with the id "", which claims no identity."""
    hello = SAMPLES[0]
    assert isinstance(hello, Hello) and wire(hello)["node_id"] == hello.node_id
    obj = wire(hello)
    del obj["node_id"]
    assert decode_frame(frame_of(hello, obj)) == Hello(proto=PROTO_VERSION, cluster="c", node="b", volume="vm",
                                                      want="fetch", epoch=2, node_id="")
    obj["node_id"] = 7
    with pytest.raises(ProtocolError, match="HELLO: field 'node_id' must be a string"):
        decode_frame(frame_of(hello, obj))


def test_sync_ack_keeps_its_two_field_wire_form() -> None:
    """The ACK after a fast sync carries only the two LSNs (as before the typed messages)."""
    frame = encode_frame(MsgType.ACK, b'{"fetched_lsn":5,"replayed_lsn":5}')
    assert decode_frame(frame) == Ack(fetched_lsn=5, replayed_lsn=5)


# ---------------------------------------------------------------------------- field validation

JSON_SAMPLES = [m for m in SAMPLES if not isinstance(m, Records)]


def wire(msg: Message) -> dict[str, Any]:
    obj = json.loads(FrameDecoder().feed(encode_message(msg))[0].payload)
    assert isinstance(obj, dict)
    return obj


def frame_of(msg: Message, obj: dict[str, Any]) -> bytes:
    return encode_frame(msg.TYPE, json.dumps(obj).encode())


def _kind(msg: Message, name: str) -> str:
    kind: str = next(f.metadata["kind"] for f in fields(msg) if f.name == name)
    return kind


#: per field kind: (wrong JSON types, values out of range)
BAD: dict[str, tuple[list[Any], list[Any]]] = {
    "uint": (["1", True, 1.5, None, [1]], [-1]),
    "pos": (["1", False, 2.0, None], [0, -5]),
    "str": ([1, None, ["a"], {"a": 1}], []),
    "bool": ([1, 0, "true", None], []),
    "seconds": (["1", True, None], [-0.5, float("nan"), float("inf")]),
    "chain": ([123, None, ["00"]], ["00" * 15, "00" * 17, "zz" * 16]),
    "want": ([1, None, True], ["images", "", "FETCH"]),
    "mode": ([1, None, True], ["SYNC", "", "semi"]),
    "node": ([1, None, ["a"]], ["", "n" * 65, "-a", ".hidden", "a/b", "a b", "é"]),
    "volume": ([1, None, ["a"]], ["v" * 65, "../x", "a/b", "x\n"]),
}

CASES = [(m, f.name, f.default is MISSING) for m in JSON_SAMPLES for f in fields(m)]


@pytest.mark.parametrize("msg, name, required", CASES, ids=[f"{type(m).__name__}.{n}" for m, n, _ in CASES])
def test_each_field_is_checked(msg: Message, name: str, required: bool) -> None:
    kind = _kind(msg, name)
    tname = msg.TYPE.name
    obj = wire(msg)
    missing = {k: v for k, v in obj.items() if k != name}
    if required:
        with pytest.raises(ProtocolError, match=f"^{tname}: missing field '{name}'"):
            decode_frame(frame_of(msg, missing))
    else:  # optional: absent means the default
        default = next(f.default for f in fields(msg) if f.name == name)
        assert getattr(decode_frame(frame_of(msg, missing)), name) == default
    wrong_types, out_of_range = BAD[kind]
    for value in wrong_types + out_of_range:
        with pytest.raises(ProtocolError, match=f"^{tname}: field '{name}' ") as e:
            decode_frame(frame_of(msg, {**obj, name: value}))
        assert isinstance(e.value, PeerError)  # a peer's fault, reported as such


@pytest.mark.parametrize("msg", JSON_SAMPLES, ids=lambda m: type(m).__name__)
def test_garbage_is_refused(msg: Message) -> None:
    tname = msg.TYPE.name
    with pytest.raises(ProtocolError, match=f"^{tname}: unknown field 'extra'"):
        decode_frame(frame_of(msg, {**wire(msg), "extra": 1}))
    with pytest.raises(ProtocolError, match=f"^{tname}: payload is not JSON"):
        decode_frame(encode_frame(msg.TYPE, json.dumps(wire(msg)).encode() + b" trailing"))
    with pytest.raises(ProtocolError, match=f"^{tname}: payload is not a JSON object"):
        decode_frame(encode_frame(msg.TYPE, b"[1, 2]"))


def test_records_are_checked() -> None:
    good = records(8, 3)
    with pytest.raises(ProtocolError, match="RECORDS: frame without records"):
        decode_frame(encode_frame(MsgType.RECORDS, b""))
    with pytest.raises(ProtocolError, match="RECORDS: field 'records' holds LSN 12 after 8"):
        decode_frame(encode_message(Records((good[0], *records(12, 1)))))
    damaged = bytearray(good[1])
    damaged[10] ^= 1
    with pytest.raises(ProtocolError, match="bad record in RECORDS frame"):
        decode_frame(encode_message(Records((good[0], bytes(damaged)))))
    with pytest.raises(ProtocolError, match="runs past the end"):
        decode_frame(encode_frame(MsgType.RECORDS, good[0][:-1]))


def test_sync_data_needs_an_offset() -> None:
    with pytest.raises(ProtocolError, match="SYNC_DATA: frame without offset"):
        decode_frame(encode_frame(MsgType.SYNC_DATA, b"1234567"))
    assert decode_frame(encode_frame(MsgType.SYNC_DATA, bytes(8))) == SyncData(0, b"")


@pytest.mark.parametrize("mtype", [8, 9, 10, 11])
def test_the_image_copy_messages_are_retired(mtype: int) -> None:
    """IMAGE_INFO, IMAGE_DATA, IMAGE_END, IMAGE_PROGRESS went with want "image": their numbers
    stay reserved and a frame of one is an unknown type; so is the want."""
    assert mtype not in {int(t) for t in MsgType}
    with pytest.raises(ProtocolError, match=f"unknown message type {mtype}"):
        FrameDecoder().feed(raw_frame(mtype=mtype, payload=bytes(8)))
    obj = {"proto": PROTO_VERSION, "cluster": "c", "node": "b", "volume": "vm", "want": "image", "epoch": 0}
    with pytest.raises(ProtocolError, match="HELLO: field 'want' must be one of"):
        decode_frame(encode_frame(MsgType.HELLO, json.dumps(obj).encode()))


# ---------------------------------------------------------------------------- framing

_HEAD = struct.Struct("<4sBBHI")


def raw_frame(magic: bytes = b"MRSf", version: int = PROTO_VERSION, mtype: int = 3, flags: int = 0,
              payload: bytes = b'{"code":"x","error":"y"}', length: int | None = None) -> bytes:
    """A frame with any header fields, and a correct checksum unless the caller breaks it."""
    head = _HEAD.pack(magic, version, mtype, flags, len(payload) if length is None else length)
    h = xxhash.xxh3_64(head)
    h.update(payload)
    return head + struct.pack("<Q", h.intdigest()) + payload


def test_raw_frame_helper_is_a_valid_frame() -> None:
    assert decode_frame(raw_frame()) == Error(code="x", error="y")


@pytest.mark.parametrize("frame, error", [
    (raw_frame(magic=b"MRSx"), "bad frame magic"),
    (raw_frame(version=PROTO_VERSION + 1), "unsupported protocol version"),
    (raw_frame(mtype=99), "unknown message type 99"),
    (raw_frame(flags=0x4), "unknown frame flags"),
    (raw_frame(length=MAX_FRAME + 1), "exceeds"),
    (raw_frame(flags=1, payload=b"\x10\x00\x00\x00garbage"), "bad lz4 frame payload"),
    (raw_frame(flags=1, payload=(MAX_FRAME + 1).to_bytes(4, "little") + b"x"), "claims 8388609 bytes, more than"),
    (raw_frame(flags=1, payload=b"\x01"), "compressed payload without its size"),
    (raw_frame(mtype=MsgType.RECORDS, flags=1, payload=(MAX_FRAME + 1).to_bytes(4, "little") + b"x"),
     "RECORDS: compressed payload claims"),
], ids=["magic", "version", "type", "flags", "length", "lz4", "lz4-size", "lz4-short", "lz4-records"])
def test_frame_decoder_refuses(frame: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        FrameDecoder().feed(frame)


def test_checksum_covers_header_and_payload() -> None:
    frame = raw_frame()
    for pos in (5, 6, 13, FRAME_HEADER - 1, FRAME_HEADER + 3):  # type, flags, sum, payload
        broken = bytearray(frame)
        broken[pos] ^= 0x10
        with pytest.raises(ProtocolError):
            FrameDecoder().feed(bytes(broken))
    broken = bytearray(frame)
    broken[-1] ^= 1
    with pytest.raises(ProtocolError, match="checksum"):
        FrameDecoder().feed(bytes(broken))


def test_compression_and_incremental_feeding() -> None:
    data = SyncData(4096, b"abc" * 10_000)
    frame = encode_message(data)
    assert len(frame) < 3000  # compressed
    plain = encode_message(data, compress=False)
    assert len(plain) == FRAME_HEADER + 8 + 30_000
    dec = FrameDecoder()
    got: list[Frame] = []
    stream = frame + plain + encode_message(SAMPLES[0])
    for i in range(0, len(stream), 777):
        got += dec.feed(stream[i : i + 777])
    assert [decode_message(f) for f in got] == [data, data, SAMPLES[0]]
    assert dec.buffered == 0
    assert lz4.block.decompress(frame[FRAME_HEADER:]) == frame_payload(plain)


def frame_payload(frame: bytes) -> bytes:
    return frame[FRAME_HEADER:]


# ---------------------------------------------------------------------------- bounded input


def test_a_json_message_is_no_larger_than_what_it_needs() -> None:
    """A message of a few scalars carries at most MAX_JSON bytes of JSON: a frame that says it
    expands to more is refused before anything is decompressed (33 KB of lz4 could otherwise
    become 8 MiB of JSON for the trio thread to parse), and so is a plain one."""
    bomb = json.dumps({"code": "x", "error": "y" * (8 << 20)}).encode()
    packed = lz4.block.compress(bomb, store_size=True)
    assert len(packed) < 40_000
    with pytest.raises(ProtocolError, match=f"^ERROR: compressed payload claims {len(bomb)} bytes, more than {MAX_JSON}"):
        FrameDecoder().feed(raw_frame(flags=1, payload=packed))
    plain = json.dumps({"code": "x", "error": "y" * MAX_JSON}).encode()
    with pytest.raises(ProtocolError, match="^ERROR: payload of .* bytes exceeds"):
        FrameDecoder().feed(raw_frame(payload=plain))
    for mt in MsgType:  # binary frames keep the frame limit; the list-holding JSON ones their own
        assert payload_limit(mt) <= MAX_FRAME


def test_the_largest_legal_list_messages_fit_their_limits() -> None:
    entries = tuple(("n" * 64, f"{i:03d}" + "k" * 197, MAX_META_CLOCK, "v" * (MAX_META_VALUE - 2))
                    for i in range(MAX_META_ENTRIES))
    big = MetaEntries(entries=entries, more=True)
    assert decode_frame(encode_message(big, compress=False)) == big
    ranges = tuple((i * (1 << 30), 1 << 20) for i in range(MAX_RANGES))
    info = SyncInfo(lsn=1 << 40, chain=CHAIN, size=1 << 50, uuid="u" * 36, ranges=ranges)
    assert decode_frame(encode_message(info, compress=False)) == info


def test_deep_nesting_is_a_protocol_error_not_a_recursion_error() -> None:
    deep = b'{"code":"x","error":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    with pytest.raises(ProtocolError, match="^ERROR: payload is nested too deeply"):
        decode_message(Frame(MsgType.ERROR, deep))
    value: Any = "v"
    for _ in range(MAX_META_DEPTH):
        value = [value]
    ok = [["a", "k", 1, value]]
    assert decode_frame(frame_of(MetaEntries(entries=()), {"entries": ok}))
    with pytest.raises(ProtocolError, match=f"entry 0: value is nested deeper than {MAX_META_DEPTH} levels"):
        decode_frame(frame_of(MetaEntries(entries=()), {"entries": [["a", "k", 1, [value]]]}))
    assert json_depth({"a": [1, {"b": []}]}) == 4 and json_depth(7) == 0


@pytest.mark.parametrize("entry, error", [
    (["a", "k", MAX_META_CLOCK + 1, 1], "clock must be an integer from 1 to"),
    (["a", "k", int("9" * 4300), 1], "clock must be an integer from 1 to"),
    (["n" * 300, "k", 1, 1], "owner must be a node name of 1-64"),
    (["../b", "k", 1, 1], "owner must be a node name"),
    (["", "k", 1, 1], "owner must be a node name"),
], ids=["clock", "clock-4300-digits", "long-owner", "path-owner", "empty-owner"])
def test_metadata_entries_within_bounds(entry: list[Any], error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_frame(frame_of(MetaEntries(entries=()), {"entries": [entry]}))


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)


@st.composite
def _payloads(draw: st.DrawFn) -> tuple[MsgType, bytes]:
    """A frame's type and payload: random bytes, random JSON, or a JSON object with the type's own
    field names and random values (what reaches the field checks)."""
    mt = draw(st.sampled_from(list(MsgType)))
    how = draw(st.sampled_from(["bytes", "json", "fields"]))
    if how == "bytes":
        return mt, draw(st.binary(max_size=300))
    if how == "json":
        return mt, json.dumps(draw(_JSON)).encode()
    cls = protocol._JSON_TYPES.get(mt)
    names = [f.name for f in fields(cls)] if cls is not None else ["x"]
    obj = draw(st.dictionaries(st.sampled_from(names), _JSON, max_size=len(names)))
    return mt, json.dumps(obj).encode()


#: examples per fuzz test; the default suite runs a few hundred, a soak sets MARSFS_FUZZ_EXAMPLES higher
FUZZ = int(os.environ.get("MARSFS_FUZZ_EXAMPLES", "300"))


@settings(max_examples=FUZZ, deadline=None)
@given(_payloads(), st.booleans())
def test_fuzzed_frames_raise_only_protocol_errors(payload: tuple[MsgType, bytes], compress: bool) -> None:
    """Whatever a peer puts in a well-framed message, decoding it raises only our ProtocolError."""
    mt, body = payload
    try:
        for f in FrameDecoder().feed(encode_frame(mt, body, compress=compress)):
            decode_message(f)
    except ProtocolError:
        pass



def test_frame_lz4_backs_off_while_it_does_not_pay_and_resets_when_it_does() -> None:
    """FrameLz4: after an attempt that does not save 1/16 the next 1, 2, 4 ... 64 frames are sent
    without trying; a frame that shrinks resets that. Every frame decodes to its message."""
    noise = SyncData(0, os.urandom(4096))
    text = SyncData(0, b"abc" * 2000)
    lz4 = protocol.FrameLz4()

    def compressed(frame: bytes) -> bool:
        return bool(struct.unpack_from("<H", frame, 6)[0] & protocol.FLAG_LZ4)

    tried: list[bool] = []
    for _ in range(1 + 1 + 2 + 4 + 8):  # noise: tried, then 1 skipped, tried, 2 skipped, tried, 4 ...
        before = lz4._skip
        frame = lz4.encode(noise)
        tried.append(before == 0)
        assert not compressed(frame)
        assert decode_message(FrameDecoder().feed(frame)[0]) == noise
    assert tried == [True, False, True, False, False, True, False, False, False, False, True,
                     False, False, False, False, False]
    for _ in range(200):
        lz4.encode(noise)
    assert lz4._backoff == protocol.FRAME_LZ4_MAX_SKIP
    while lz4._skip:  # skipped frames go plain even when they would shrink
        assert not compressed(lz4.encode(text))
    frame = lz4.encode(text)  # the next attempt pays: compressed, and the backoff is gone
    assert compressed(frame) and decode_message(FrameDecoder().feed(frame)[0]) == text
    assert compressed(lz4.encode(text))
    assert lz4._backoff == 0 and lz4._skip == 0
    small = SyncData(0, os.urandom(100))  # too small to try: no backoff either
    lz4.encode(small)
    assert lz4._skip == 0
    one = SyncData(0, os.urandom(3686) + bytes(410))  # lz4 saves 1/10: enough by default, not here
    assert compressed(encode_message(one)) and not compressed(lz4.encode(one))
    assert lz4._backoff == 1

@settings(max_examples=FUZZ, deadline=None)
@given(st.binary(max_size=200), st.integers(0, FRAME_HEADER + 40))
def test_fuzzed_bytes_raise_only_protocol_errors(noise: bytes, at: int) -> None:
    """A frame with bytes flipped or cut anywhere, and bytes of no frame at all."""
    frame = bytearray(encode_message(SAMPLES[0]))
    for i, b in enumerate(noise[:8]):
        frame[(at + i) % len(frame)] ^= b
    for data in (bytes(frame), noise, bytes(frame[:at]) + noise):
        try:
            for f in FrameDecoder().feed(data):
                decode_message(f)
        except ProtocolError:
            pass
