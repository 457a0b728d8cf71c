"""Write-path profile: CPU time per ``Volume.write``, and what each step of it costs.

CPU time of the calling thread (``time.thread_time``) rather than wall time, so the numbers
hold on a loaded machine (they still grow a little with cache pressure from other work):

* **whole**: ``Volume.write`` of 4 KiB at random offsets of an 8 GiB volume (``--writes`` of
  them), with ``Volume.flush`` every ``--fsync-every`` writes (its CPU shown apart), then the
  writeback of those records into the base image (per record); and ``Volume.write`` of
  1 MiB sequential writes, and the writeback of those into the base image;
* **steps**, each in a loop of its own over the same data and offsets: the copy of the request
  into a ``bytes``, the lz4 attempt, xxh3-128 of the payload, the header (struct, blake2b chain,
  xxh3-64), ``pwritev`` of header and payload into the segment file (page cache), the segment
  table row, the extent-index insert (into an index as large as the whole run leaves it).

The whole is more than the sum of the steps by the call overhead, the locks, the policy and the
fault bookkeeping between them. Each measure is the minimum over ``--repeat`` runs.

Usage: ``scripts/bench writepath [--writes N] [--data random|fio|text] [--repeat N] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lz4.block
import xxhash

from marsfs.log import Log, RecordType
from marsfs.log.record import encode_header, encode_payload
from marsfs.volume import ExtentIndex, Volume

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 << 30


def cpu_us(fn: Callable[[], object], n: int) -> float:
    """CPU µs of this thread per each of the ``n`` operations ``fn`` does."""
    t = time.thread_time_ns()
    fn()
    return (time.thread_time_ns() - t) / 1e3 / n


def make_data(kind: str, rng: random.Random, size: int) -> bytes:
    """``random``: incompressible; ``fio``: like fio's default buffers, which lz4 shrinks by
    about 4 % (random bytes with a run of 200 zeros in every 4 KiB); ``text``: shrinks by half
    or more."""
    if kind == "random":
        return rng.randbytes(size)
    if kind == "fio":
        return b"".join(rng.randbytes(4096 - 200) + bytes(200) for _ in range(0, size, 4096))[:size]
    words = [b"alpha", b"beta", b"gamma", b"delta", b"\x00" * 8, b"0123456789", b"\n"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


def whole_4k(work: Path, blocks: list[bytes], offs: list[int], every: int) -> dict[str, float]:
    vol = Volume.create(work / "vol", "bench", SIZE, sync_interval=None)
    try:
        t_write = 0
        t_flush = 0
        flushes = 0
        for i in range(0, len(offs), every):
            t = time.thread_time_ns()
            for j in range(i, min(i + every, len(offs))):
                vol.write(offs[j], blocks[j & 15])
            t2 = time.thread_time_ns()
            vol.flush()
            t_flush += time.thread_time_ns() - t2
            t_write += t2 - t
            flushes += 1
        extents = float(len(vol.index))
        t = time.thread_time_ns()
        while vol.applied_lsn < vol.durable_lsn:
            vol.writeback()
        t_wb = time.thread_time_ns() - t
        wall = time.perf_counter()
        for j in range(2000):
            vol.write(offs[j], blocks[j & 15])
        wall = (time.perf_counter() - wall) / 2000 * 1e6
        return {"write": t_write / 1e3 / len(offs), "flush": t_flush / 1e3 / flushes,
                "writeback": t_wb / 1e3 / len(offs), "wall": wall, "extents": extents}
    finally:
        vol.close()
        shutil.rmtree(work / "vol")


def whole_1m(work: Path, big: bytes, n: int) -> dict[str, float]:
    vol = Volume.create(work / "vol", "bench", SIZE, sync_interval=None)
    try:
        t = time.thread_time_ns()
        for i in range(n):
            vol.write(i * MiB, big)
            if i % 16 == 15:
                vol.flush()
        cpu = (time.thread_time_ns() - t) / 1e3 / n
        vol.flush()
        t = time.thread_time_ns()
        while vol.applied_lsn < vol.durable_lsn:
            vol.writeback()
        return {"write": cpu, "writeback": (time.thread_time_ns() - t) / 1e3 / n}
    finally:
        vol.close()
        shutil.rmtree(work / "vol")


def steps_4k(work: Path, blocks: list[bytes], offs: list[int]) -> dict[str, float]:
    n = len(offs)
    views = [memoryview(b) for b in blocks]
    out: dict[str, float] = {}
    out["copy of a 4 KiB memoryview into bytes"] = cpu_us(lambda: [bytes(views[j & 15]) for j in range(n)], n)
    out["lz4 attempt"] = cpu_us(lambda: [lz4.block.compress(blocks[j & 15], store_size=False) for j in range(n)], n)
    out["xxh3-128 of the payload"] = cpu_us(lambda: [xxhash.xxh3_128_digest(blocks[j & 15]) for j in range(n)], n)
    payloads = [encode_payload(b, compress=False) for b in blocks]
    chain = bytes(16)
    out["header (struct, blake2b, xxh3-64)"] = cpu_us(
        lambda: [encode_header(RecordType.WRITE, j + 1, offs[j], payloads[j & 15], 0, chain) for j in range(n)], n)
    log = Log.create(work / "log", chain)
    try:
        seg = log._segments[-1]
        head, _ = encode_header(RecordType.WRITE, 1, 0, payloads[0], 0, chain)
        fd = seg.fd

        def pw() -> None:
            pos = 64
            for j in range(n):
                os.pwritev(fd, [head, payloads[j & 15].stored], pos)
                pos += 80 + 4096
        out["pwritev (page cache)"] = cpu_us(pw, n)
        out["segment table row"] = cpu_us(lambda: [seg.append(j, offs[j], 4096, 4096, 256, 0) for j in range(n)], n)
    finally:
        log.close()
        shutil.rmtree(work / "log")
    log = Log.create(work / "log", chain)
    try:
        out["Log.append (header, pwritev, row)"] = cpu_us(
            lambda: [log.append(RecordType.WRITE, offs[j], payloads[j & 15], 0) for j in range(n)], n)
    finally:
        log.close()
        shutil.rmtree(work / "log")
    idx = ExtentIndex()
    out["index insert"] = cpu_us(lambda: [idx.insert(offs[j], 4096, j + 1) for j in range(n)], n)
    return out


def profile(work: Path, blocks: list[bytes], offs: list[int], every: int) -> None:
    vol = Volume.create(work / "vol", "bench", SIZE, sync_interval=None)
    pr = cProfile.Profile(time.thread_time)
    try:
        pr.enable()
        for i, o in enumerate(offs):
            vol.write(o, blocks[i & 15])
            if i % every == every - 1:
                vol.flush()
        pr.disable()
    finally:
        vol.close()
        shutil.rmtree(work / "vol")
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench writepath", description=__doc__.splitlines()[0])
    p.add_argument("--writes", type=int, default=20_000)
    p.add_argument("--fsync-every", type=int, default=64)
    p.add_argument("--mib", type=int, default=256, help="1 MiB writes in the large-write run")
    p.add_argument("--data", choices=("random", "fio", "text"), default="random")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also print a cProfile of the 4 KiB run (CPU time)")
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: under /var/tmp, on disk)")
    args = p.parse_args(argv)
    rng = random.Random(7)
    blocks = [make_data(args.data, rng, 4 * KiB) for _ in range(16)]
    big = make_data(args.data, rng, MiB)
    offs = [rng.randrange(SIZE // 4096) * 4096 for _ in range(args.writes)]
    work = Path(tempfile.mkdtemp(prefix="marsfs-bench-wp-", dir=args.dir or "/var/tmp"))
    load0 = os.getloadavg()[0]
    try:
        wholes = [whole_4k(work, blocks, offs, args.fsync_every) for _ in range(args.repeat)]
        larges = [whole_1m(work, big, args.mib) for _ in range(args.repeat)]
        steps = [steps_4k(work, blocks, offs) for _ in range(args.repeat)]
        if args.profile:
            profile(work, blocks, offs, args.fsync_every)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()[0]
    w = {k: min(r[k] for r in wholes) for k in wholes[0]}
    s = {k: min(r[k] for r in steps) for k in steps[0]}
    print(f"writepath: {args.writes:,} x 4 KiB {args.data} data, flush every {args.fsync_every}; "
          f"{args.mib} x 1 MiB; min of {args.repeat}; load {load0:.2f} -> {load1:.2f}; "
          f"Python {sys.version.split()[0]}")
    print(f"| {'measure':40} | CPU µs |")
    print(f"|{'-' * 42}|-------:|")
    print(f"| {'Volume.write 4 KiB (whole)':40} | {w['write']:6.1f} |")
    flush = f"Volume.flush (every {args.fsync_every} writes)"
    print(f"| {flush:40} | {w['flush']:6.1f} |")
    print(f"| {'Volume.writeback, per 4 KiB record':40} | {w['writeback']:6.1f} |")
    print(f"| {'Volume.write 1 MiB (whole, per MiB)':40} | {min(r['write'] for r in larges):6.0f} |")
    print(f"| {'Volume.writeback of those, per MiB':40} | {min(r['writeback'] for r in larges):6.0f} |")
    for k, v in s.items():
        print(f"| {'  step: ' + k:40} | {v:6.2f} |")
    print(f"(wall µs per 4 KiB write, last 2,000: {w['wall']:.1f}; extents {w['extents']:,.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
