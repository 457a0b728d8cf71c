"""The lz4 backoff of a volume's writers (marsfs.volume.encoding.Lz4Policy).

Whatever the policy decides, every payload decodes to its data; it only decides which records
are stored compressed (those lz4 shrinks by at least 1/LZ4_MIN_SAVING) and how many records
skip the lz4 attempt after attempts that did not save that much.
"""

from __future__ import annotations

import os

from marsfs.log.record import Flags, decode_payload, encode_payload
from marsfs.volume.encoding import LZ4_MAX_SKIP, LZ4_MIN_SAVING, Lz4Policy

CHUNK = 4096


def test_incompressible_data_backs_off_exponentially_up_to_the_cap() -> None:
    policy = Lz4Policy()
    attempts = []
    for i in range(400):
        data = os.urandom(CHUNK)
        before = policy._skip
        payload = policy.encode(data)
        assert decode_payload(payload.flags, payload.length, payload.stored) == data
        if before == 0:
            attempts.append(i)
    gaps = [b - a - 1 for a, b in zip(attempts, attempts[1:])]
    assert gaps[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert set(gaps[7:]) == {LZ4_MAX_SKIP}


def test_a_compressing_attempt_resets_the_backoff() -> None:
    policy = Lz4Policy()
    for _ in range(3 + 1 + 2 + 4):  # three failed attempts and their 1 + 2 + 4 skips
        policy.encode(os.urandom(CHUNK))
    assert policy._skip == 0 and policy._backoff == 4
    payload = policy.encode(bytes(CHUNK))
    assert payload.flags & Flags.LZ4
    assert policy._backoff == 0
    assert policy.encode(bytes(CHUNK)).flags & Flags.LZ4  # tried again at once


def test_short_chunks_are_never_counted_as_failures() -> None:
    policy = Lz4Policy()
    for _ in range(10):
        payload = policy.encode(os.urandom(32))
        assert not payload.flags & Flags.LZ4
    assert policy._skip == 0 and policy._backoff == 0


def test_data_that_lz4_shrinks_only_a_little_is_stored_as_it_is_and_backs_off() -> None:
    policy = Lz4Policy()
    attempts = []
    for i in range(200):
        data = os.urandom(CHUNK - 200) + bytes(200)  # like fio's data: lz4 saves about 4 %
        before = policy._skip
        payload = policy.encode(data)
        assert not payload.flags & Flags.LZ4
        assert decode_payload(payload.flags, payload.length, payload.stored) == data
        if before == 0:
            attempts.append(i)
    gaps = [b - a - 1 for a, b in zip(attempts, attempts[1:])]
    assert gaps[:7] == [1, 2, 4, 8, 16, 32, 64]


def test_a_record_is_compressed_when_it_saves_at_least_the_minimum() -> None:
    saving = CHUNK // LZ4_MIN_SAVING
    data = os.urandom(CHUNK - 2 * saving) + bytes(2 * saving)
    payload = Lz4Policy().encode(data)
    assert payload.flags & Flags.LZ4 and len(payload.stored) <= CHUNK - saving
    assert decode_payload(payload.flags, payload.length, payload.stored) == data


def test_immutable_data_stored_as_it_is_is_not_copied_and_mutable_data_is() -> None:
    data = os.urandom(3 * CHUNK)
    view = memoryview(data)[CHUNK : 2 * CHUNK]
    assert encode_payload(data, compress=False).stored is data
    assert encode_payload(view, compress=False).stored is view
    buf = bytearray(data)
    payload = encode_payload(memoryview(buf), compress=False)
    buf[0] ^= 0xFF
    assert payload.stored == data  # a copy: changing the buffer afterwards changes no record
