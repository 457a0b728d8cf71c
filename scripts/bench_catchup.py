"""Catch-up benchmark: a mirror that missed 64 MiB of random 4 KiB writes, against rsync.

The catch-up benchmark. One invocation, same machine, same change:

* **marsfs**: primary ``a`` and mirror ``b`` (through a clean fault proxy, which counts the
  bytes), a ``--volume-gib`` thin volume filled with random data first (a used VM disk: rsync
  must checksum all of it, as it would in life), synced. The mirror's fetch is paused (it keeps
  serving its version); the primary takes ``--change-mib`` of 4 KiB writes at random aligned
  offsets (fsync every 256). Then the proxy's counters are read, the fetch resumes, and we
  time until ``wait --synced`` returns and count what crossed the proxy. Two cases:
  ``log``: the primary still holds the log, so the mirror fetches it; ``dropped``: the primary
  runs with a log space limit below the change (``--log-space``), so it drops the log and the
  mirror copies only the changed extents (G8).
* **rsync** (the baseline): the mirror's image before and the primary's image after, copied
  into two directories; ``rsync --inplace --no-whole-file`` brings the old one up to date. We
  time it and take its own byte counts (``--stats``: literal data and total bytes sent).

The target: catch-up at least 10x faster than rsync and at most 1.2x the bytes of
the change (distinct blocks written x 4 KiB).

Usage: ``scripts/bench catchup [--volume-gib 2] [--change-mib 64] [--cases log,dropped]
[--quick] [--dir DIR] [--out docs/benchmarks.md]``. Needs root (FUSE mounts).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import splice  # scripts/ is on sys.path: this file runs as a script
from marsfs.faces.control import call
from marsfs.testing.checks import sha, status
from marsfs.testing.faultproxy import ProxyProcess
from marsfs.testing.harness import Harness, NodeProcess

MiB = 1 << 20
BLOCK = 4096


def say(msg: str) -> None:
    print(f"[catchup] {msg}", file=sys.stderr, flush=True)


@dataclass
class Result:
    case: str
    seconds: float
    bytes_moved: int
    changed_bytes: int
    note: str = ""


def write_change(image: Path, change: int, seed: int) -> int:
    """``change`` bytes of 4 KiB writes at random aligned offsets; returns the distinct bytes."""
    rng = random.Random(seed)
    size = image.stat().st_size
    blocks = size // BLOCK
    touched: set[int] = set()
    fd = os.open(image, os.O_WRONLY)
    try:
        for i in range(change // BLOCK):
            b = rng.randrange(blocks)
            touched.add(b)
            os.pwrite(fd, rng.randbytes(BLOCK), b * BLOCK)
            if i % 256 == 255:
                os.fsync(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(touched) * BLOCK


def fill(image: Path) -> None:
    """Random data over the whole image, 1 MiB at a time."""
    rng = random.Random(1)
    fd = os.open(image, os.O_WRONLY)
    try:
        for off in range(0, image.stat().st_size, MiB):
            os.pwrite(fd, rng.randbytes(MiB), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def run_case(work: Path, case: str, gib: int, change: int) -> tuple[Result, Path, Path]:
    """One marsfs catch-up; returns the result and copies of the images before and after."""
    root = work / case
    root.mkdir()
    before, after = work / f"{case}-before.img", work / f"{case}-after.img"
    with Harness(root) as h, ProxyProcess() as proxy:
        nodes = h.cluster(["a", "b"], start=False)
        a, b = nodes["a"], nodes["b"]
        if case == "dropped":
            a.extra += ["--log-space", f"{max(16, change // MiB // 4)}M"]
        a.start()
        port = proxy.start(h.ports["a"])
        i = b.extra.index(f"a=127.0.0.1:{h.ports['a']}")
        b.extra[i] = f"a=127.0.0.1:{port}"
        b.start()
        a.cli("create", "vm", "--size", f"{gib}G", "--thin")
        fill(a.image("vm"))
        b.cli("join", "vm", "--from", "a")
        wait(b)
        subprocess.run(["cp", "--sparse=always", os.fspath(b.image("vm")), os.fspath(before)], check=True)
        b.cli("pause-fetch", "vm")
        say(f"{case}: writing {change // MiB} MiB of 4 KiB random writes")
        changed = write_change(a.image("vm"), change, seed=7)
        if case == "dropped":
            peers = status(a, "vm").get("peers", [])
            say(f"{case}: primary log {status(a, 'vm').get('log_bytes', 0) / MiB:.0f} MiB, peers {peers}")
        target = status(a, "vm")["durable_lsn"]  # the writes are over and fsync'd: the head stays
        moved0 = proxy.stats()
        t0 = time.perf_counter()
        call(b.state, "resume-fetch", volume="vm")
        while _replayed(b) < target:  # timed in-process: a CLI's start-up is not catch-up
            time.sleep(0.005)
        seconds = time.perf_counter() - t0
        wait(b)
        moved = sum(proxy.stats()[k] - moved0[k] for k in ("bytes_up", "bytes_down"))
        assert sha(a.image("vm")) == sha(b.image("vm")), "mirror differs from the primary after catch-up"
        subprocess.run(["cp", "--sparse=always", os.fspath(a.image("vm")), os.fspath(after)], check=True)
    return Result(case, seconds, moved, changed), before, after


def _replayed(b: NodeProcess) -> int:
    rows = call(b.state, "status", volume="vm")
    row = rows[0] if isinstance(rows, list) else rows
    return int(row.get("replayed_lsn") or 0)


def wait(b: NodeProcess) -> None:
    r = b.cli("wait", "vm", "--synced", "--timeout", "600", check=False, timeout=700)
    if r.returncode != 0:
        raise RuntimeError(f"mirror did not sync: {r.stderr.strip()}\n{b.log_tail()}")


def run_rsync(work: Path, before: Path, after: Path, changed: int) -> Result:
    old, new = work / "rsync-old", work / "rsync-new"
    old.mkdir()
    new.mkdir()
    shutil.move(before, old / "vm.img")
    shutil.move(after, new / "vm.img")
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    r = subprocess.run(["rsync", "--inplace", "--no-whole-file", "--stats", os.fspath(new / "vm.img"),
                        os.fspath(old / "vm.img")], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    stats = {k: int(v.replace(",", "")) for k, v in re.findall(r"^([A-Za-z ]+): ([\d,]+)", r.stdout, re.M)}
    moved = stats.get("Total bytes sent", 0) + stats.get("Total bytes received", 0)
    return Result("rsync", seconds, moved, changed, note=f"literal data {stats.get('Literal data', 0) / MiB:.1f} MiB")


def report(results: list[Result], rsyncs: dict[str, Result], args: argparse.Namespace, load: float) -> str:
    lines = [
        "## Catch-up after a missed change, against rsync",
        "",
        f"`scripts/bench catchup {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{platform.node()}, {os.cpu_count()} cores, load average {load:.1f} at the start. A "
        f"{args.volume_gib} GiB volume full of random data; the mirror misses {args.change_mib} MiB of 4 KiB random writes "
        "(fetch paused), then catches up through a clean fault proxy that counts the bytes. The baseline is "
        "`rsync --inplace --no-whole-file` of the same two images between two directories, run in the same "
        "invocation. Target: at least 10x faster than rsync, at most 1.2x the bytes of the change.",
        "",
        "| case | changed (distinct) | marsfs time | marsfs bytes | bytes / change | rsync time | rsync bytes | "
        "speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rs = rsyncs[r.case]
        lines.append(f"| {CASES[r.case]} | {r.changed_bytes / MiB:.1f} MiB | {r.seconds:.2f} s | "
                     f"{r.bytes_moved / MiB:.1f} MiB | {r.bytes_moved / r.changed_bytes:.2f} | {rs.seconds:.2f} s | "
                     f"{rs.bytes_moved / MiB:.1f} MiB ({rs.note}) | {rs.seconds / r.seconds:.1f}x |")
    return "\n".join(lines)


CASES = {"log": "log still held: the mirror fetches it", "dropped": "log dropped (--log-space): changed extents"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volume-gib", type=int, default=2)
    p.add_argument("--change-mib", type=int, default=64)
    p.add_argument("--cases", default="log,dropped")
    p.add_argument("--quick", action="store_true", help="1 GiB volume, 16 MiB change")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args()
    if args.quick:
        args.volume_gib, args.change_mib = 1, 16
    if shutil.which("rsync") is None:
        print("bench catchup: rsync is missing (apt-get install rsync)", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    results: list[Result] = []
    rsyncs: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="marsfs-bench-catchup-") as tmp:
        work = Path(tmp)
        for case in args.cases.split(","):
            assert case in CASES, f"unknown case {case!r}: {', '.join(CASES)}"
            r, before, after = run_case(work, case, args.volume_gib, args.change_mib * MiB)
            say(f"{case}: {r.seconds:.2f} s, {r.bytes_moved / MiB:.1f} MiB moved for {r.changed_bytes / MiB:.1f} MiB")
            rs = run_rsync(work / case, before, after, r.changed_bytes)
            say(f"rsync: {rs.seconds:.2f} s, {rs.bytes_moved / MiB:.1f} MiB ({rs.note})")
            results.append(r)
            rsyncs[case] = rs
    body = report(results, rsyncs, args, load)
    print(body)
    if not args.quick:
        splice(args.out, "catchup", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
