"""Block checksums of an image: what fast sync and verify compare instead of the bytes.

Rules that hold here:

* An image is cut into blocks of :data:`BLOCK` bytes from offset 0 (the last one may be
  short). Each block's checksum is its xxh3-64 digest, 8 bytes little-endian, so the sums of
  ``n`` blocks are ``8 * n`` bytes: 4 MiB for a 2 GiB image, 0.2 % of it.
* 4 KiB is the block of the filesystems and VMs that use our images: a 1 % change in 4 KiB
  writes touches 1 % of the blocks; 64 KiB blocks would make it up to 16 %.
* The functions read through a ``read(offset, length)`` callable (a view, a volume, a staged
  image), so a checksum is always *of a version*: compare two nodes' sums only when both are
  of the same LSN, and differences are real, never writes in flight.
* A hole reads as zeros and is hashed like any block; zero blocks have one known sum
  (:data:`ZERO_SUM`), which lets a sender skip them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import xxhash

BLOCK = 4096
SUM_SIZE = 8
#: how much one read asks for: large enough to stream, small enough to bound memory
READ_CHUNK = 4 * 1024 * 1024
_SUM = struct.Struct("<Q")

Reader = Callable[[int, int], bytes]


def block_sum(data: bytes | memoryview) -> bytes:
    """The checksum of one block (or of a short last block)."""
    return _SUM.pack(xxhash.xxh3_64_intdigest(data))


ZERO_SUM = block_sum(bytes(BLOCK))


def block_sums(read: Reader, offset: int, length: int) -> bytes:
    """The sums of the blocks in ``[offset, offset + length)``; ``offset`` is block-aligned, and
    ``length`` is too unless the range ends at the end of the image."""
    assert offset % BLOCK == 0, f"unaligned offset {offset}"
    out = bytearray()
    pos, end = offset, offset + length
    while pos < end:
        n = min(READ_CHUNK, end - pos)
        data = memoryview(read(pos, n))
        assert len(data) == n, f"short read at {pos}: {len(data)} of {n}"
        for at in range(0, n, BLOCK):
            out += _SUM.pack(xxhash.xxh3_64_intdigest(data[at : at + BLOCK]))
        pos += n
    return bytes(out)


def differing_blocks(mine: bytes, theirs: bytes) -> Iterator[int]:
    """Indexes (from the first block the sums cover) of the blocks whose sums differ."""
    assert len(mine) == len(theirs) and len(mine) % SUM_SIZE == 0, "sums of different ranges"
    for i in range(0, len(mine), SUM_SIZE):
        if mine[i : i + SUM_SIZE] != theirs[i : i + SUM_SIZE]:
            yield i // SUM_SIZE


def block_ranges(blocks: Iterator[int] | list[int], offset: int, image_size: int) -> list[tuple[int, int]]:
    """Merge block indexes (ascending, counted from the block at ``offset``) into
    ``(offset, length)`` byte ranges, clipped to the image."""
    ranges: list[tuple[int, int]] = []
    for b in blocks:
        start = offset + b * BLOCK
        n = min(BLOCK, image_size - start)
        assert n > 0, f"block {b} lies past the image"
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
        else:
            ranges.append((start, n))
    return ranges
