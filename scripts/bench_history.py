"""History benchmark: what opening a version costs, and reads from it against the live image.

One invocation, one volume, in-process (no mount, no root):

* per ``--log-mib`` value, a volume of ``--volume-gib`` (sparse) receives 4 KiB random writes,
  fsync'd every 64, until that much log is retained (nothing written back: the window holds it all);
* a version is opened at both ends of that log and in the middle: the first open builds the
  version's extent index (one pass over the records ``(A, lsn]``: the newest version is the far
  end, the costliest), a second open of the same version shares it; its memory is measured with
  tracemalloc in a separate pass (tracemalloc slows the build down);
* 4 KiB random reads per second over the whole volume from the newest-end version and from the
  live image, alternately, in the same run (the baseline).

Usage: ``scripts/bench history [--log-mib 256 1024] [--volume-gib 1] [--seconds 3] [--quick] [--dir DIR]
[--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from benchlib import splice  # scripts/ is on sys.path: this file runs as a script
from marsfs.volume import Volume

MiB = 1 << 20
KiB = 1 << 10


def fill(vol: Volume, log_bytes: int, rng: random.Random) -> int:
    """4 KiB random writes (fsync every 64) until the log holds ``log_bytes``; returns the count."""
    blocks = vol.size // 4096
    n = 0
    while vol.log.end_bytes < log_bytes:
        for _ in range(64):
            vol.write(rng.randrange(blocks) * 4096, rng.randbytes(4096))
        vol.flush()
        n += 64
    return n


def timed_open(vol: Volume, lsn: int) -> tuple[float, float]:
    """Seconds of the first open (builds the index) and of a second open (shares it)."""
    t0 = time.perf_counter()
    a = vol.view(lsn)
    t1 = time.perf_counter()
    b = vol.view(lsn)
    t2 = time.perf_counter()
    assert vol.open_versions.builds >= 1
    b.close()
    a.close()
    return t1 - t0, t2 - t1


def index_memory(vol: Volume, lsn: int) -> tuple[int, int]:
    """(bytes, extents) of the shared index of version ``lsn``."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    view = vol.view(lsn)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    extents = vol.open_versions.shared()[lsn]
    view.close()
    return used, extents


def reads_per_s(read: Callable[[int, int], bytes], size: int, seconds: float, rng: random.Random) -> float:
    blocks = size // 4096
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(256):
            read(rng.randrange(blocks) * 4096, 4096)
        n += 256
    return n / (seconds + (time.perf_counter() - end))


def run(work: Path, log_mib: int, volume_gib: float, seconds: float, rng: random.Random) -> list[str]:
    """One volume with ``log_mib`` of retained log: its table rows (markdown lines)."""
    size = int(volume_gib * (1 << 30)) // 4096 * 4096
    vol = Volume.create(work / f"v{log_mib}", "v", size)
    try:
        t = time.perf_counter()
        writes = fill(vol, log_mib * MiB, rng)
        fill_s = time.perf_counter() - t
        oldest, head = vol.oldest_version_lsn, vol.head_lsn
        ends = {"oldest end (lsn A+1)": oldest + 1, "middle": (oldest + head) // 2, "newest end (head)": head}
        opens = {name: timed_open(vol, lsn) for name, lsn in ends.items()}
        mem = {name: index_memory(vol, lsn) for name, lsn in ends.items()}
        view = vol.view(head)
        live_rate: list[float] = []
        view_rate: list[float] = []
        for _ in range(2):  # alternate, so that a change of load hits both
            live_rate.append(reads_per_s(vol.read, size, seconds / 2, rng))
            view_rate.append(reads_per_s(view.read, size, seconds / 2, rng))
        view.close()
        log_bytes = vol.log.end_bytes
    finally:
        vol.close()
    live, ver = sum(live_rate) / len(live_rate), sum(view_rate) / len(view_rate)
    lines = [
        f"**{log_bytes / MiB:,.0f} MiB of retained log**: a {volume_gib:g} GiB volume, {writes:,} 4 KiB random "
        f"writes (fsync every 64), records {oldest + 1:,}..{head:,} (filled in {fill_s:.1f} s).",
        "",
        "| version | records scanned | first open | second open (shared) | index memory | extents |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, lsn in ends.items():
        first, second = opens[name]
        used, extents = mem[name]
        lines.append(f"| {name} | {lsn - oldest:,} | {first * 1000:,.1f} ms | {second * 1e6:,.0f} µs | "
                     f"{used / MiB:,.1f} MiB | {extents:,} |")
    lines += [
        "",
        "| 4 KiB random reads over the whole volume, same run | reads/s |",
        "|---|---:|",
        f"| live image (`Volume.read`) | {live:,.0f} |",
        f"| newest-end version (`VolumeView.read`) | {ver:,.0f} |",
        f"| version / live | {ver / live:.2f} |",
        "",
    ]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log-mib", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--volume-gib", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--quick", action="store_true", help="32 MiB of log, 1 s of reads")
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="splice the results into this markdown file")
    args = p.parse_args()
    if args.quick:
        args.log_mib, args.seconds = [32], 1.0
    work = Path(tempfile.mkdtemp(prefix="marsfs-bench-history-", dir=args.dir))
    rng = random.Random(11)
    load = os.getloadavg()[0]
    lines = [
        f"Run: `scripts/bench history` — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, kernel "
        f"{platform.release()}, Python {platform.python_version()}; load average {load:.1f} at the start.",
        "",
        "In-process (no FUSE, no page cache of the mount). Opening a version builds its extent index from "
        "the records between the applied LSN *A* and the version (their rows in the log's in-memory tables; "
        "no payload is read), so the newest end is the costliest; a second open of the same version "
        "shares the index. Memory by tracemalloc. Reads: uniformly random 4 KiB blocks of the whole "
        "volume, so most come from the (sparse) base image and the rest from log records.",
        "",
    ]
    try:
        for mib in args.log_mib:
            lines += run(work, mib, args.volume_gib, args.seconds, rng)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = "\n".join(lines).rstrip()
    print(body)
    if args.out is not None:
        splice(args.out, "history", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
