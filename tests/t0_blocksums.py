"""Block checksums: the unit fast sync and verify compare."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from marsfs.volume.blocksums import BLOCK, SUM_SIZE, ZERO_SUM, Reader, block_ranges, block_sums, differing_blocks


def reader(image: bytes) -> Reader:
    return lambda off, n: image[off : off + n]


def test_zero_blocks_have_the_zero_sum() -> None:
    sums = block_sums(reader(bytes(3 * BLOCK)), 0, 3 * BLOCK)
    assert sums == ZERO_SUM * 3


def test_short_last_block_is_summed() -> None:
    image = os.urandom(2 * BLOCK + 100)
    sums = block_sums(reader(image), 0, len(image))
    assert len(sums) == 3 * SUM_SIZE


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.sets(st.integers(0, 39)), st.integers(0, BLOCK - 1))
def test_exactly_the_changed_blocks_differ(nblocks: int, changed: set[int], tail: int) -> None:
    size = nblocks * BLOCK - (tail if nblocks > 1 else 0)
    a = bytearray(os.urandom(size))
    b = bytearray(a)
    want = sorted(i for i in changed if i * BLOCK < size)
    for i in want:
        b[i * BLOCK] ^= 0xFF
    diff = list(differing_blocks(block_sums(reader(bytes(a)), 0, size), block_sums(reader(bytes(b)), 0, size)))
    assert diff == want
    ranges = block_ranges(diff, 0, size)
    covered = [i for off, n in ranges for i in range(off // BLOCK, (off + n + BLOCK - 1) // BLOCK)]
    assert covered == want
    assert all(off + n <= size for off, n in ranges)


def test_ranges_merge_neighbours_and_count_from_offset() -> None:
    assert block_ranges([0, 1, 3], 8 * BLOCK, 100 * BLOCK) == [(8 * BLOCK, 2 * BLOCK), (11 * BLOCK, BLOCK)]
