"""G3 under network faults: a mirror's image is always the primary's image after a prefix.

The primary's loop device gets self-describing 4 KiB blocks (block number, write number,
CRC) one at a time with O_DIRECT, with random flushes, while the mirror fetches through a
fault proxy that cycles latency, bandwidth limits, stalls, resets, cuts mid-frame, bit
corruption and down/up. Every 2 s the test opens the mirror image and checks that it is
exactly the state after some prefix of the writes, and that the prefixes never go back.
Then the link heals: lag reaches 0 and both images have the same SHA-256 (G5).

MARSFS_PREFIX_SECONDS sets how long the faults cycle (default 120).
"""

from __future__ import annotations

import bisect
import mmap
import os
import random
import struct
import threading
import time
import zlib

from marsfs.testing.checks import sha, status, wait_synced
from marsfs.testing.faultproxy import ProxyProcess
from marsfs.testing.harness import Harness

BLOCK = 4096
BLOCKS = 8192  # a 32 MiB region
MAX_WRITES = 3_000_000
_HEAD = struct.Struct("<QQ")
FAULTS: list[dict[str, float | bool]] = [
    {"latency": 0.05, "jitter": 0.02},
    {"bandwidth": 200_000},
    {"stall": True},
    {"reset": True},
    {"cut_after": 50_000, "reset": True},
    {"corrupt": 1e-5},
    {"down": True},
    {},
]


def block_bytes(block: int, number: int) -> bytes:
    head = _HEAD.pack(block, number)
    body = head + (number % 251).to_bytes(1, "little") * (BLOCK - len(head) - 4)
    return body + struct.pack("<I", zlib.crc32(body))


def parse(data: bytes, block: int) -> int:
    """Write number found in a block, -1 for a block never written; asserts integrity."""
    if data == bytes(BLOCK):
        return -1
    assert zlib.crc32(data[:-4]) == struct.unpack("<I", data[-4:])[0], f"torn or damaged block {block}"
    b: int
    number: int
    b, number = _HEAD.unpack_from(data)
    assert b == block, f"block {block} holds block {b}'s data"
    return number


def test_mirror_is_always_a_prefix_under_faults(harness: Harness) -> None:
    seconds = float(os.environ.get("MARSFS_PREFIX_SECONDS", "120"))
    rng = random.Random(1234)
    blocks = [rng.randrange(BLOCKS) for _ in range(MAX_WRITES)]
    per_block: list[list[int]] = [[] for _ in range(BLOCKS)]
    for i, block in enumerate(blocks):
        per_block[block].append(i)

    nodes = harness.cluster(["a", "b"], start=False)
    a, b = nodes["a"], nodes["b"]
    with ProxyProcess() as proxy:
        port = proxy.start(harness.ports["a"])
        b.extra = [x if not x.startswith("a=") else f"a=127.0.0.1:{port}" for x in b.extra]
        a.start()
        b.start()
        a.cli("create", "vm", "--size", f"{BLOCK * BLOCKS}")
        b.cli("join", "vm", "--from", "a")
        wait_synced(b, "vm")
        dev = harness.attach(a.image("vm"))

        stop = threading.Event()
        written = [0]
        errors: list[BaseException] = []

        def writer() -> None:
            buf = mmap.mmap(-1, BLOCK)
            fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
            wrng = random.Random(99)
            try:
                i = 0
                while not stop.is_set() and i < MAX_WRITES:
                    buf.seek(0)
                    buf.write(block_bytes(blocks[i], i))
                    assert os.pwrite(fd, buf, blocks[i] * BLOCK) == BLOCK
                    i += 1
                    written[0] = i
                    if wrng.random() < 0.05:
                        os.fsync(fd)
                os.fsync(fd)
            except BaseException as e:
                errors.append(e)
            finally:
                os.close(fd)

        def check() -> int:
            try:
                with open(b.image("vm"), "rb") as f:
                    image = f.read()
            except OSError as e:
                listing = os.listdir(b.mount)
                raise AssertionError(f"cannot read the mirror image: {e} (listing {listing}, "
                                     f"status {status(b, 'vm')})\n{b.log_tail(40)}") from e
            seen = [parse(image[k * BLOCK : (k + 1) * BLOCK], k) for k in range(BLOCKS)]
            m = max(seen)
            for k in range(BLOCKS):
                j = bisect.bisect_right(per_block[k], m) - 1
                want = per_block[k][j] if j >= 0 else -1
                assert seen[k] == want, (f"mirror image is not a prefix: block {k} holds write {seen[k]}, "
                                         f"the state after write {m} has {want}")
            return m

        t = threading.Thread(target=writer)
        t.start()
        prefixes: list[int] = []
        try:
            start = time.monotonic()
            fault = 0
            next_fault = start
            while time.monotonic() - start < seconds and not errors:
                if time.monotonic() >= next_fault:
                    proxy.clear()
                    f = dict(FAULTS[fault % len(FAULTS)])
                    reset = f.pop("reset", False)
                    if f:
                        proxy.set(**f)
                    if reset:  # after setting: the reconnection already meets the new fault
                        proxy.reset()
                    fault += 1
                    next_fault += 6
                m = check()
                assert not prefixes or m >= prefixes[-1], f"prefix went back: {prefixes[-1]} -> {m}"
                prefixes.append(m)
                time.sleep(2)
        finally:
            stop.set()
            t.join()
        assert not errors, errors
        proxy.clear()
        stats = proxy.stats()
        harness.detach(dev)
        wait_synced(b, "vm", timeout=120)
        final = check()
        assert final == written[0] - 1, (final, written[0])
        assert sha(a.image("vm")) == sha(b.image("vm"))
        sb = status(b, "vm")
        assert sb["lag_records"] == 0 and sb["lag_bytes"] == 0
    assert len(prefixes) >= min(10, seconds / 3), prefixes
    assert prefixes[-1] > prefixes[0], "the mirror never advanced while the faults cycled"
    print(f"{len(prefixes)} checks, {written[0]} writes, prefixes {prefixes[0]}..{prefixes[-1]}, "
          f"{fault} fault phases, proxy stats {stats}")
