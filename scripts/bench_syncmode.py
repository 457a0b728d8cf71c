"""Sync mode benchmark: what a 4 KiB write+fsync costs in sync mode, against async and a plain file.

One process writes 4 KiB at a random aligned offset and fsyncs, again and again (QD1), for N
seconds per case, timing each write+fsync pair; reported: ops/s, p50 and p99 in milliseconds.
Cases, in one invocation:

* **plain file**: a regular file on the filesystem of the work directory (the state
  directories live there too): the disk's own fsync cost;
* for each link to the mirror: direct (loopback, mutual TLS, as deployed), through the fault
  proxy without delay (what the proxy itself costs: it is one more process on the same cores),
  and with a latency of 1 ms and of 10 ms (each way: the proxy's ``latency``, so the round
  trip grows by twice that), fresh nodes ``a`` (primary) and ``b`` (mirror, synced), the
  volume's image on a's FUSE mount written directly: first in **async** mode, then, on the same
  nodes and volume, in **sync** mode (``marsfs mode vm sync``, once the volume is in sync).

Usage: ``scripts/bench sync [--quick] [--runtime S] [--links direct,proxy,1ms,10ms] [--out docs/benchmarks.md]``
(needs root and fusermount3). ``--quick``: 3 s per case, a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import exit_on_sigterm, shown_args, splice  # scripts/ is on sys.path: this file runs as a script
from marsfs.testing.faultproxy import ProxyProcess
from marsfs.testing.harness import Harness, NodeProcess

VOLUME = "vm"
SIZE = 256 * 1024 * 1024
BLOCK = 4096
LINKS = {"direct": None, "proxy": 0.0, "1ms": 0.001, "10ms": 0.010}
LINK_TITLES = {"direct": "loopback", "proxy": "proxy, no delay", "1ms": "proxy +1 ms each way",
               "10ms": "proxy +10 ms each way"}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Case:
    what: str  #: plain file, async, sync
    link: str
    ops: int = 0
    seconds: float = 0.0
    p50: float = 0.0  #: ms
    p99: float = 0.0
    error: str = ""

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0


def write_fsync(path: Path, runtime: float, case: Case, *, size: int = SIZE) -> Case:
    """4 KiB writes at random aligned offsets, each followed by fsync, for ``runtime`` seconds."""
    rng = random.Random(7)
    data = os.urandom(BLOCK)
    lat: list[float] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        end = time.perf_counter() + runtime
        start = time.perf_counter()
        while (now := time.perf_counter()) < end:
            os.pwrite(fd, data, rng.randrange(size // BLOCK) * BLOCK)
            os.fsync(fd)
            lat.append(time.perf_counter() - now)
        case.seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    case.ops = len(lat)
    qs = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [lat[0] if lat else 0.0] * 99
    case.p50, case.p99 = qs[49] * 1e3, qs[98] * 1e3
    say(f"  {case.what:10} {LINK_TITLES.get(case.link, case.link):24} {case.rate:8.0f} ops/s  p50 {case.p50:.2f} ms  "
        f"p99 {case.p99:.2f} ms")
    return case


def status(node: NodeProcess) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(node.cli("status", VOLUME, "--json").stdout)
    return row


def wait(cond: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def run_link(work: Path, link: str, runtime: float) -> list[Case]:
    """Fresh nodes, the mirror behind ``link``: async, then sync, on the same volume."""
    root = work / f"link-{link}"
    root.mkdir()
    cases = [Case("async", link), Case("sync", link)]
    with Harness(root) as h, ProxyProcess() as proxy:
        try:
            nodes = h.cluster(["a", "b"], start=False)
            a, b = nodes["a"], nodes["b"]
            a.start()
            if LINKS[link] is not None:
                port = proxy.start(h.ports["a"])
                i = b.extra.index(f"a=127.0.0.1:{h.ports['a']}")
                b.extra[i] = f"a=127.0.0.1:{port}"
            b.start()
            a.cli("create", VOLUME, "--size", str(SIZE))
            b.cli("join", VOLUME, "--from", "a")
            r = b.cli("wait", VOLUME, "--synced", "--timeout", "120", check=False, timeout=180)
            if r.returncode != 0:
                raise RuntimeError(f"mirror did not sync: {r.stderr.strip()}")
            if LINKS[link] is not None:
                proxy.set(latency=LINKS[link])
            image = a.image(VOLUME)
            write_fsync(image, runtime, cases[0])
            a.cli("mode", VOLUME, "sync")
            wait(lambda: (status(a).get("sync_mode") or {}).get("state") == "in-sync"
                 or _flush_once(image), "the volume to be in sync")
            write_fsync(image, runtime, cases[1])
            sm = status(a)["sync_mode"]
            if sm["degradations"]:
                cases[1].error = f"degraded {sm['degradations']} time(s) during the run"
        except Exception as e:  # one link's failure is reported, the others still run
            for c in cases:
                c.error = c.error or str(e)[:300]
            say(f"  {link}: {e}")
    return cases


def _flush_once(image: Path) -> bool:
    """One fsync (the first one after the switch waits for the mirror to hold everything)."""
    fd = os.open(image, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return False


def report(cases: list[Case], runtime: float, quick: bool, argv: list[str], load: float) -> str:
    base = {c.link: c for c in cases if c.what == "async"}
    lines = [
        "## Sync mode: what a flush costs",
        "",
        f"4 KiB write+fsync, QD1 (one writer: pwrite at a random aligned offset, then fsync), {runtime:g} s per "
        f"case{' (--quick: a smoke test)' if quick else ''}; `scripts/bench sync {' '.join(argv)}`".rstrip() + "; "
        f"{platform.node()}, {os.cpu_count()} cores, load {load:.2f} at start. The image is written directly on "
        "the primary's FUSE mount; the mirror on the same machine (its fdatasync shares the disk).",
        "",
        "| case | link to the mirror | ops/s | p50 ms | p99 ms | vs async |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in cases:
        vs = ""
        if c.what == "sync" and c.link in base and base[c.link].rate and c.rate:
            vs = f"{c.rate / base[c.link].rate:.2f}x"
        note = f" ({c.error})" if c.error else ""
        link = "" if c.what == "plain file" else LINK_TITLES[c.link]
        lines.append(f"| {c.what}{note} | {link} | {c.rate:.0f} | {c.p50:.2f} | {c.p99:.2f} | {vs} |")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="scripts/bench sync", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 s per case (a smoke test, not for the record)")
    p.add_argument("--runtime", type=float, default=None, metavar="S", help="seconds per case (default 15)")
    p.add_argument("--links", default="direct,proxy,1ms,10ms",
                   help="mirror links: direct, proxy (no delay), 1ms, 10ms (default all)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the work directory goes")
    p.add_argument("--out", type=Path, default=None, help="splice the table into this markdown file")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    runtime = args.runtime or (3.0 if args.quick else 15.0)
    links = [x.strip() for x in args.links.split(",") if x.strip()]
    if bad := [x for x in links if x not in LINKS]:
        p.error(f"unknown link(s) {bad}: choose from {', '.join(LINKS)}")
    if os.geteuid() != 0 or shutil.which("fusermount3") is None:
        print("scripts/bench sync: needs root and fusermount3 (FUSE mounts)", file=sys.stderr)
        return 1
    exit_on_sigterm()
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="marsfs-bench-sync-", dir=args.dir))
    try:
        say("plain file:")
        cases = [write_fsync(work / "plain.img", runtime, Case("plain file", ""))]
        for link in links:
            say(f"mirror link {link}:")
            cases += run_link(work, link, runtime)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shown = shown_args(argv)
    table = report(cases, runtime, args.quick, shown, load)
    print(table)
    if args.json:
        args.json.write_text(json.dumps([c.__dict__ for c in cases], indent=2))
    if args.out:
        splice(args.out, "sync", table)
        print(f"written to {args.out}")
    return 1 if any(c.error for c in cases) else 0


if __name__ == "__main__":
    raise SystemExit(main())
