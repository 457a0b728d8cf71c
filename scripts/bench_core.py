"""Core benchmark: the storage core against plain file I/O, in one invocation.

Every number is paired with a baseline measured in the same run on the same filesystem, and
the ratio is what we track (absolute numbers depend on the machine's disk and load):

* 4 KiB random writes through ``Volume.write`` vs ``os.pwrite`` of the same blocks to a file;
* 1 MiB sequential writes through the core vs ``os.pwrite`` appends;
* 1 MiB reads of log-resident data vs ``os.pread`` of a plain file;
* recovery scan (``Log.open`` verifying every record) vs reading the same segment files;
* extent index memory per extent (tracemalloc), which has an absolute target (< 200 bytes).

Usage: ``scripts/bench core [--quick] [--dir DIR] [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchlib import splice  # scripts/ is on sys.path: this file runs as a script
from marsfs.log import Log
from marsfs.volume import ExtentIndex, Volume

MiB = 1 << 20


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_writes(work: Path, n4k: int, n1m: int) -> dict[str, float]:
    rng = random.Random(7)
    size = 8 << 30
    blk = rng.randbytes(4096)
    big = rng.randbytes(MiB)
    offs = [rng.randrange(size // 4096) * 4096 for _ in range(n4k)]
    res: dict[str, float] = {}

    raw = work / "raw.img"
    fd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)
    res["raw_4k_per_s"] = n4k / _timed(lambda: [os.pwrite(fd, blk, o) for o in offs])
    os.fdatasync(fd)
    res["raw_1m_MBps"] = n1m * MiB / 1e6 / _timed(lambda: [os.pwrite(fd, big, i * MiB) for i in range(n1m)])
    os.fdatasync(fd)
    res["raw_read_1m_MBps"] = n1m * MiB / 1e6 / _timed(lambda: [os.pread(fd, MiB, i * MiB) for i in range(n1m)])
    os.close(fd)
    raw.unlink()

    vol = Volume.create(work / "vol", "bench", size, sync_interval=None)
    res["core_4k_per_s"] = n4k / _timed(lambda: [vol.write(o, blk) for o in offs])
    vol.flush()
    res["core_1m_MBps"] = n1m * MiB / 1e6 / _timed(lambda: [vol.write(i * MiB, big) for i in range(n1m)])
    vol.flush()
    res["core_read_1m_MBps"] = n1m * MiB / 1e6 / _timed(lambda: [vol.read(i * MiB, MiB) for i in range(n1m)])
    log_bytes = vol.log.end_bytes
    vol.close()

    files = sorted((work / "vol" / "log").iterdir())
    gc.collect()
    scan = _timed(lambda: Log.open(work / "vol" / "log").close())
    res["recovery_MBps"] = log_bytes / 1e6 / scan

    def read_files() -> None:
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(8 * MiB):
                    pass
    res["raw_scan_MBps"] = log_bytes / 1e6 / _timed(read_files)
    shutil.rmtree(work / "vol")
    return res


def bench_index_memory(n: int) -> float:
    rng = random.Random(3)
    starts = rng.sample(range(0, n * 64), n)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    idx = ExtentIndex()
    for lsn, s in enumerate(starts, 1):
        idx.insert(s * 4096, 4096, lsn)  # gaps between extents: none merge
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(idx) == n
    return (after - before) / n


def run(work: Path, quick: bool, repeat: int) -> dict[str, float]:
    n4k, n1m = (10_000, 200) if quick else (60_000, 1024)
    runs = [bench_writes(work, n4k, n1m) for _ in range(repeat)]
    res = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    res["index_bytes_per_extent"] = bench_index_memory(50_000 if quick else 500_000)
    return res


def report(res: dict[str, float], quick: bool, repeat: int) -> str:
    rows = [
        ("4 KiB random writes", f"{res['core_4k_per_s']:,.0f} /s", f"{res['raw_4k_per_s']:,.0f} /s",
         res["core_4k_per_s"] / res["raw_4k_per_s"], "≥ 25,000 /s"),
        ("1 MiB sequential writes", f"{res['core_1m_MBps']:,.0f} MB/s", f"{res['raw_1m_MBps']:,.0f} MB/s",
         res["core_1m_MBps"] / res["raw_1m_MBps"], "≥ 300 MB/s"),
        ("1 MiB reads (from the log)", f"{res['core_read_1m_MBps']:,.0f} MB/s", f"{res['raw_read_1m_MBps']:,.0f} MB/s",
         res["core_read_1m_MBps"] / res["raw_read_1m_MBps"], ""),
        ("recovery scan", f"{res['recovery_MBps']:,.0f} MB/s", f"{res['raw_scan_MBps']:,.0f} MB/s",
         res["recovery_MBps"] / res["raw_scan_MBps"], "≥ 300 MB/s"),
    ]
    out = [f"Run: `scripts/bench core{' --quick' if quick else ''}` — median of {repeat}, "
           f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, Python {sys.version.split()[0]}.",
           "",
           "| measure | core | baseline (plain file, same run) | core/baseline | aim |",
           "|---|---:|---:|---:|---|"]
    out += [f"| {a} | {b} | {c} | {d:.2f} | {e} |" for a, b, c, d, e in rows]
    out.append(f"| extent index memory | {res['index_bytes_per_extent']:.0f} B/extent | | | < 200 B |")
    return "\n".join(out)


def plot(res: dict[str, float], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = ["4 KiB writes", "1 MiB writes", "1 MiB reads", "recovery scan"]
    ratios = [res["core_4k_per_s"] / res["raw_4k_per_s"], res["core_1m_MBps"] / res["raw_1m_MBps"],
              res["core_read_1m_MBps"] / res["raw_read_1m_MBps"], res["recovery_MBps"] / res["raw_scan_MBps"]]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(labels, ratios, color="#4477aa")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("core / plain file (same run)")
    ax.set_title("marsfs storage core vs plain file I/O")
    for i, r in enumerate(ratios):
        ax.text(r, i, f" {r:.2f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench core", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller runs (a smoke test, not for the record)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: under /var/tmp, on disk)")
    p.add_argument("--out", type=Path, default=None, help="splice the table into this markdown file")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="marsfs-bench-", dir=args.dir or "/var/tmp"))
    try:
        res = run(work, args.quick, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = report(res, args.quick, args.repeat)
    print(table)
    if args.out:
        png = args.out.parent / "bench-core.png"
        body = table + ("\n\n![core vs plain file](bench-core.png)" if plot(res, png) else "")
        splice(args.out, "core", body)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
