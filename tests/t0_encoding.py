"""The lz4 backoff of a volume's writers (marsfs.volume.encoding.Lz4Policy).

Whatever the policy decides, every payload decodes to its data; it only decides how many
records skip the lz4 attempt after attempts that did not compress.
"""

from __future__ import annotations

import os

from marsfs.log.record import Flags, decode_payload
from marsfs.volume.encoding import LZ4_MAX_SKIP, Lz4Policy

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
