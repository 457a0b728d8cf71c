"""The verify messages on the wire: SUMS_REQUEST (JSON) and SUMS (binary), and what a peer
can get wrong in them."""

from __future__ import annotations

import json
import struct

import pytest

from marsfs.errors import ProtocolError
from marsfs.replication.protocol import (
    Hello,
    MsgType,
    Sums,
    SumsRequest,
    encode_frame,
    encode_message,
)
from marsfs.testing.wire import decode_frame
from marsfs.volume.blocksums import ZERO_SUM


@pytest.mark.parametrize("msg", [
    SumsRequest(lsn=0, offset=0, length=4096),
    SumsRequest(lsn=77, offset=1 << 30, length=256 << 20),
    Sums(lsn=5, offset=8192, size=3 * 4096 + 512, sums=ZERO_SUM * 2),
    Sums(lsn=5, offset=0, size=4096, sums=b""),
    Hello(proto=3, cluster="c", node="n", volume="v", want="sums", epoch=0),
], ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    assert decode_frame(encode_message(msg)) == msg  # type: ignore[arg-type]


def test_types_are_the_assigned_numbers() -> None:
    assert (MsgType.SUMS_REQUEST, MsgType.SUMS) == (18, 19)


@pytest.mark.parametrize("obj, error", [
    ({"lsn": 0, "offset": 0}, "SUMS_REQUEST: missing field 'length'"),
    ({"lsn": -1, "offset": 0, "length": 1}, "field 'lsn' is out of range"),
    ({"lsn": 0, "offset": 0, "length": 0}, "field 'length' is out of range"),
    ({"lsn": 0, "offset": True, "length": 1}, "field 'offset' must be an integer"),
])
def test_bad_sums_requests(obj: dict[str, object], error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_frame(encode_frame(MsgType.SUMS_REQUEST, json.dumps(obj).encode()))


@pytest.mark.parametrize("payload, error", [
    (b"\0" * 23, "SUMS: frame shorter than its header"),
    (struct.pack("<QQQ", 1, 0, 4096) + b"\0" * 7, "are not whole 4 KiB blocks"),
    (struct.pack("<QQQ", 1, 512, 8192) + b"\0" * 8, "are not whole 4 KiB blocks"),
    (struct.pack("<QQQ", 1, 4096, 8192) + b"\0" * 16, "run past the image's 8192 bytes"),
])
def test_bad_sums(payload: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_frame(encode_frame(MsgType.SUMS, payload))
