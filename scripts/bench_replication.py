"""Replication benchmark: a primary under fio and a mirror following it, two nodes on loopback.

Two measurements, each on fresh nodes (``marsfs serve`` processes from
:class:`marsfs.testing.harness.Harness`, volumes of 1 GiB, fio through ``losetup --direct-io=on``):

* **follow**: fio 1 MiB sequential writes, QD4, for N seconds on the primary while a synced
  mirror follows, once over a direct loopback connection (mutual TLS, as deployed), once the same
  with both nodes ``--insecure`` (plain TCP: what TLS costs is the difference between the two),
  and once through a fault proxy with no faults (``--links``), then once more directly with fio paced (``--paced``, default 40 MiB/s)
  so that the mirror can keep up and its lag while keeping up shows. Status (the same JSON as ``marsfs status --json``, read from the control
  sockets) is sampled every 0.5 s on both nodes. Reported: the primary's write MB/s (fio), the
  mirror's fetched and replayed MB/s while fio runs (LSN progress times the payload bytes per LSN,
  calibrated from fio's byte count and the primary's head LSN), how long the mirror needs to catch
  up after fio stops, and the largest lag in seconds: as the mirror reports it, as the primary
  reports it for the mirror, and as measured from the two LSN timelines (now minus the last
  sample time at which the primary's durable LSN was no further than the mirror's fetched LSN).
* **decoupling** (G4): fio 4 KiB random writes, QD16, N seconds, alternately on a primary without
  a mirror and on one whose mirror sits behind a 1 MB/s proxy (``--repeat`` mirror runs, each
  between two runs without; fresh nodes every time); the IOPS ratio is reported (the issue's
  target: within 10 % of the run without mirror), never asserted.
* **TLS cost** (``--tls-iops N``): the same fio job on a primary whose synced mirror follows
  directly, over mutual TLS and over plain TCP (``--insecure``), alternating on fresh nodes; the
  IOPS ratio is reported.

Usage: ``scripts/bench replication [--quick] [--runtime S] [--links direct,insecure,proxy] [--paced MIB_S]
[--repeat N] [--skip-decoupling] [--tls-iops N] [--out docs/benchmarks.md]``
(needs root, fio, losetup, fusermount3). ``--quick`` is 5 s per fio run: a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# scripts/ is on sys.path: this file runs as a script
from benchlib import Neighbours, exit_on_sigterm, pair_ratios, shown_args, splice
from benchlib import pair as benchlib_pair
from marsfs.faces.control import call
from marsfs.testing.faultproxy import ProxyProcess
from marsfs.testing.harness import Harness, NodeProcess

MB = 1e6
VOLUME = "vm"
SIZE = "1G"
SAMPLE_EVERY = 0.5
CATCH_UP_TIMEOUT = 600.0


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def say_logs(root: Path, lines: int = 40) -> None:
    """The daemons' log tails of a failed run (its directory is removed afterwards)."""
    for log in sorted(root.glob("*/daemon.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        say(f"  --- {log.parent.name}/daemon.log (last {lines} lines)\n    " + "\n    ".join(tail))


def st(node: NodeProcess) -> dict[str, Any]:
    """One status row of the volume: what ``marsfs status vm --json`` prints."""
    return dict(call(node.state, "status", timeout=30, volume=VOLUME)[0])


# ---------------------------------------------------------------------------------------------- fio


def settle() -> None:
    """Let the previous run's dirty pages (its logs, its removed directory) reach the disk first."""
    os.sync()
    time.sleep(2)


def fio(dev: str, args: list[str], runtime: int, *, settle_first: bool = True) -> dict[str, Any]:
    if settle_first:
        settle()
    cmd = ["fio", "--name=bench", f"--filename={dev}", "--ioengine=libaio", "--direct=1", f"--size={SIZE}",
           "--offset=0", "--randrepeat=0", "--norandommap", "--group_reporting", "--output-format=json",
           "--time_based", f"--runtime={runtime}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=runtime + 600)
    out = r.stdout
    if r.returncode != 0 or "{" not in out:
        raise RuntimeError(f"fio failed ({r.returncode}): {(r.stderr or out).strip()[-800:]}")
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio: error {job['error']}: {r.stderr.strip()[-500:]}")
    w = job["write"]
    return {"iops": w["iops"], "MBps": w["bw_bytes"] / MB, "bytes": w["io_bytes"], "ios": w["total_ios"],
            "runtime_s": w["runtime"] / 1000, "lat_max_ms": w["lat_ns"]["max"] / 1e6,
            "lat_mean_ms": w["lat_ns"]["mean"] / 1e6}


SEQ = ["--rw=write", "--bs=1M", "--iodepth=4"]
RAND = ["--rw=randwrite", "--bs=4k", "--iodepth=16"]


# ---------------------------------------------------------------------------------------------- nodes


def pair(h: Harness, proxy: ProxyProcess | None, *, insecure: bool = False) -> tuple[NodeProcess, NodeProcess]:
    """Primary ``a`` with volume vm, mirror ``b`` joined and synced (see :func:`benchlib.pair`)."""
    return benchlib_pair(h, VOLUME, SIZE, proxy, insecure=insecure)


class Sampler:
    """Samples both nodes' status every 0.5 s in a thread: (t, primary row, mirror row)."""

    def __init__(self, a: NodeProcess, b: NodeProcess) -> None:
        self.a, self.b = a, b
        self.samples: list[tuple[float, dict[str, Any], dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, dict[str, Any], dict[str, Any]]:
        s = (time.monotonic(), st(self.a), st(self.b))
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_EVERY)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Follow:
    link: str
    rate: int = 0  #: fio --rate in MiB/s (0: as fast as it goes)
    fio: dict[str, Any] = field(default_factory=dict)
    bytes_per_lsn: float = 0.0
    fetched_MBps: float = 0.0
    replayed_MBps: float = 0.0
    catch_up_s: float | None = None
    end_to_end_MBps: float = 0.0
    max_lag_mirror_s: float = 0.0
    max_lag_primary_s: float = 0.0
    max_lag_measured_s: float = 0.0
    kept_up: bool = False
    series: list[tuple[float, float, float, float]] = field(default_factory=list)  # t, primary, fetched, replayed MB
    error: str | None = None

    @property
    def title(self) -> str:
        return LINK_TITLES[self.link] + (f", fio paced to {self.rate} MiB/s" if self.rate else "")


def measured_lag(samples: list[tuple[float, dict[str, Any], dict[str, Any]]], i: int) -> float:
    """Seconds since the primary was last no further than the mirror is at sample ``i``."""
    t, _pa, pb = samples[i]
    f = pb["fetched_lsn"]
    for t0, pa0, _ in reversed(samples[: i + 1]):
        if pa0["durable_lsn"] <= f:
            return t - t0
    return t - samples[0][0]


def run_follow(work: Path, link: str, rate: int, runtime: int) -> Follow:
    res = Follow(link, rate)
    say(f"== follow, {res.title}: fio 1 MiB sequential writes QD4 for {runtime} s on the primary")
    root = Path(tempfile.mkdtemp(prefix=f"follow-{link}-", dir=work))
    try:
        with Harness(root) as h, ProxyProcess() as proxy:
            a, b = pair(h, proxy if link == "proxy" else None, insecure=link == "insecure")
            dev = h.attach(a.image(VOLUME))
            settle()
            with Sampler(a, b) as sampler:
                t0, pa0, pb0 = sampler.sample()
                res.fio = fio(dev, SEQ + ([f"--rate={rate}m"] if rate else []), runtime, settle_first=False)
                t1, pa1, pb1 = sampler.sample()
            h.detach(dev)
            head = st(a)["durable_lsn"]
            while True:  # catch-up: until the mirror has fetched and replayed what the primary has
                t2, pa2, pb2 = sampler.sample()
                head = pa2["durable_lsn"]
                if pa2["durable_lsn"] == pa2["head_lsn"] and pb2["fetched_lsn"] == pb2["replayed_lsn"] == head:
                    break
                if t2 - t1 > CATCH_UP_TIMEOUT:
                    raise RuntimeError(f"mirror not caught up {CATCH_UP_TIMEOUT:.0f} s after the writes: "
                                       f"{pb2['fetched_lsn']}/{pb2['replayed_lsn']} of {head}")
                time.sleep(0.1)
            samples = sorted(sampler.samples, key=lambda s: s[0])
            lsns = pa1["head_lsn"] - pa0["head_lsn"]
            bpl = res.fio["bytes"] / lsns if lsns else 0.0
            res.bytes_per_lsn = bpl
            dt = t1 - t0
            res.fetched_MBps = (pb1["fetched_lsn"] - pb0["fetched_lsn"]) * bpl / dt / MB
            res.replayed_MBps = (pb1["replayed_lsn"] - pb0["replayed_lsn"]) * bpl / dt / MB
            res.catch_up_s = t2 - t1
            res.end_to_end_MBps = (head - pb0["fetched_lsn"]) * bpl / (t2 - t0) / MB
            during = [i for i, (t, _, _) in enumerate(samples) if t0 <= t <= t1]
            res.max_lag_mirror_s = max((samples[i][2]["lag_seconds"] for i in during), default=0.0)
            res.max_lag_primary_s = max((p["lag_seconds"] for i in during for p in samples[i][1]["peers"]),
                                        default=0.0)
            res.max_lag_measured_s = max((measured_lag(samples, i) for i in during), default=0.0)
            res.kept_up = res.fetched_MBps >= 0.95 * (pa1["head_lsn"] - pa0["head_lsn"]) * bpl / dt / MB
            base = pa0["head_lsn"]
            res.series = [(t - t0, (pa["durable_lsn"] - base) * bpl / MB, (pb["fetched_lsn"] - base) * bpl / MB,
                           (pb["replayed_lsn"] - base) * bpl / MB) for t, pa, pb in samples]
            say(f"  primary {res.fio['MBps']:.0f} MB/s; mirror fetched {res.fetched_MBps:.0f} MB/s, replayed "
                f"{res.replayed_MBps:.0f} MB/s while writing; caught up {res.catch_up_s:.1f} s after; lag max "
                f"{res.max_lag_mirror_s:.1f} s (mirror) / {res.max_lag_primary_s:.1f} s (primary) / "
                f"{res.max_lag_measured_s:.1f} s (measured)")
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
        say(f"  failed: {res.error}")
        say_logs(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return res


@dataclass
class Decouple:
    #: (kind, fio result or {"error": ...}) in the order run; kind is "alone" or "mirror"
    runs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def iops(self, kind: str) -> list[float]:
        return [r["iops"] for k, r in self.runs if k == kind and "iops" in r]

    def pair_ratios(self, kind: str = "mirror", base: str = "alone") -> list[float]:
        """Each ``kind`` run divided by the mean of the ``base`` runs just before and after it."""
        return pair_ratios([(k, r.get("iops")) for k, r in self.runs], kind, base)


KINDS = {"alone": "no mirror", "mirror": "mirror behind a 1 MB/s proxy",
         "tls": "mirror following, mutual TLS", "insecure": "mirror following, --insecure (plain TCP)"}


def run_decouple(work: Path, runtime: int, repeat: int) -> Decouple:
    """no mirror, mirror, no mirror, ... (``repeat`` mirror runs, each between two runs without)."""
    return run_iops(work, runtime, ["alone"] + ["mirror", "alone"] * repeat, "decoupling")


def run_tls_iops(work: Path, runtime: int, repeat: int) -> Decouple:
    """What TLS costs the primary's small writes: a synced mirror following directly, over mutual TLS
    and over plain TCP, alternating (``repeat`` TLS runs, each between two plain ones)."""
    return run_iops(work, runtime, ["insecure"] + ["tls", "insecure"] * repeat, "TLS cost")


def run_iops(work: Path, runtime: int, order: list[str], what: str) -> Decouple:
    """fio 4 KiB random writes QD16 on the primary of fresh nodes, one run per entry of ``order``
    (a key of KINDS)."""
    res = Decouple()
    for n, kind in enumerate(order, 1):
        say(f"== {what} {n}/{len(order)}, {KINDS[kind]}: fio 4 KiB random writes QD16 for {runtime} s")
        root = Path(tempfile.mkdtemp(prefix=f"iops-{kind}-", dir=work))
        try:
            with Harness(root) as h, ProxyProcess() as proxy:
                mirrored = kind != "alone"
                if kind == "mirror":
                    a, b = pair(h, proxy)
                    proxy.set(bandwidth=1_000_000)
                elif mirrored:
                    a, b = pair(h, None, insecure=kind == "insecure")
                else:
                    a = h.cluster(["a"])["a"]
                    a.cli("create", VOLUME, "--size", SIZE)
                dev = h.attach(a.image(VOLUME))
                r = fio(dev, RAND, runtime)
                h.detach(dev)
                if mirrored:
                    r["mirror_behind_records"] = st(a)["durable_lsn"] - st(b)["fetched_lsn"]
                if kind == "mirror":
                    r["proxy"] = proxy.stats()
                res.runs.append((kind, r))
                say(f"  {r['iops']:,.0f} IOPS, write latency max {r['lat_max_ms']:.1f} ms"
                    + (f"; the mirror is {r['mirror_behind_records']:,} records behind" if mirrored else ""))
        except Exception as e:
            res.runs.append((kind, {"error": f"{type(e).__name__}: {e}"}))
            say(f"  failed: {res.runs[-1][1]['error']}")
            say_logs(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------- report


def _n(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


LINK_TITLES = {"direct": "direct loopback (mutual TLS)", "proxy": "via a clean fault proxy (TLS)",
               "insecure": "direct loopback, --insecure (plain TCP)"}


def iops_rows(dec: Decouple) -> list[str]:
    """The table of one series of alternating 4 KiB random write runs."""
    lines = ["| # | run | IOPS | mean write latency, ms | max write latency, ms | mirror behind at the end, records |",
             "|---:|---|---:|---:|---:|---:|"]
    for n, (kind, r) in enumerate(dec.runs, 1):
        if "error" in r:
            lines.append(f"| {n} | {KINDS[kind]} | failed: {' '.join(r['error'].split())[:200]} | | | |")
        else:
            behind = r.get("mirror_behind_records")
            lines.append(f"| {n} | {KINDS[kind]} | {_n(r['iops'])} | {_n(r['lat_mean_ms'], 2)} | "
                         f"{_n(r['lat_max_ms'], 1)} | {'' if behind is None else f'{behind:,}'} |")
    return lines


def report(follows: list[Follow], dec: Decouple, tls: Decouple, runtime: int, quick: bool, argv: list[str], load: float,
           neighbours: int) -> str:
    fio_v = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"Run: `scripts/bench replication{' ' + shlex.join(argv) if argv else ''}` — {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, kernel {platform.release()}, {fio_v}, Python {platform.python_version()}; "
        f"load average {load:.1f} at the start; {runtime} s per fio run"
        f"{' (quick: a smoke test, not for the record)' if quick else ''}; "
        + (f"**disturbed: {neighbours} other marsfs/fio/pytest processes ran meanwhile**." if neighbours
           else "no other marsfs, fio or pytest process ran meanwhile."),
        "",
        "Two `marsfs serve` nodes on this machine (primary and mirror share its cores and disk), volume of 1 GiB, "
        "fio (libaio, O_DIRECT) through `losetup --direct-io=on` on the primary's image. Status sampled every "
        f"{SAMPLE_EVERY} s from both nodes' control sockets (the `marsfs status --json` rows).",
        "",
        "**Following a primary under 1 MiB sequential writes, QD4**",
        "",
        "| measure | unit | " + " | ".join(f.title for f in follows) + " |",
        "|---|---|" + "---:|" * len(follows),
    ]

    def row(title: str, unit: str, fn: Any) -> None:
        vals = [("failed" if f.error else fn(f)) for f in follows]
        lines.append(f"| {title} | {unit} | " + " | ".join(vals) + " |")

    row("primary writes (fio)", "MB/s", lambda f: _n(f.fio["MBps"]))
    row("mirror fetches, while fio runs", "MB/s", lambda f: _n(f.fetched_MBps))
    row("mirror replays, while fio runs", "MB/s", lambda f: _n(f.replayed_MBps))
    row("mirror kept up (fetched ≥ 95 % of written)", "", lambda f: "yes" if f.kept_up else "no")
    row("catch-up after fio stops", "s", lambda f: _n(f.catch_up_s, 1))
    row("mirror end to end (start of writes → synced)", "MB/s", lambda f: _n(f.end_to_end_MBps))
    row("largest lag while writing, as the mirror reports it", "s", lambda f: _n(f.max_lag_mirror_s, 1))
    row("largest lag while writing, as the primary reports it", "s", lambda f: _n(f.max_lag_primary_s, 1))
    row("largest lag while writing, measured from the LSN timelines", "s", lambda f: _n(f.max_lag_measured_s, 1))
    row("payload bytes per LSN (calibration)", "KiB", lambda f: _n(f.bytes_per_lsn / 1024, 1))
    for f in follows:
        if f.error:
            lines.append(f"\n- {f.title}: failed — {' '.join(f.error.split())[:400]}")
    if dec.runs:
        lines += ["", "**Decoupling: 4 KiB random writes, QD16, on the primary** (fresh nodes for every run, "
                      "runs alternate)", "", *iops_rows(dec)]
        alone, mirror, pairs = dec.iops("alone"), dec.iops("mirror"), dec.pair_ratios()
        if alone and mirror:
            behind = [r.get("mirror_behind_records", 0) for k, r in dec.runs if k == "mirror" and "iops" in r]
            lines += ["", f"IOPS with the mirror behind 1 MB/s ÷ IOPS without mirror: **{statistics.median(pairs):.2f}** "
                          f"(median over the mirror runs, each against the mean of its two neighbours without: "
                          f"{', '.join(f'{x:.2f}' for x in pairs)}; ratio of the medians of all runs: "
                          f"{statistics.median(mirror) / statistics.median(alone):.2f}). Target: ≥ 0.90; "
                          f"reported, not asserted. Without a mirror the same job varies "
                          f"{min(alone):,.0f}–{max(alone):,.0f} IOPS here. When fio stopped, the mirror was "
                          f"{min(behind):,}–{max(behind):,} records behind."]
    if tls.runs:
        lines += ["", "**What TLS costs the primary: 4 KiB random writes, QD16, a synced mirror following "
                      "directly** (fresh nodes for every run, runs alternate)", "", *iops_rows(tls)]
        plain, secure, pairs = tls.iops("insecure"), tls.iops("tls"), tls.pair_ratios("tls", "insecure")
        if plain and secure and pairs:
            lines += ["", f"IOPS over mutual TLS ÷ IOPS over plain TCP: **{statistics.median(pairs):.2f}** (median "
                          f"over the TLS runs, each against the mean of its plain neighbours: "
                          f"{', '.join(f'{x:.2f}' for x in pairs)}); plain TCP varies "
                          f"{min(plain):,.0f}–{max(plain):,.0f} IOPS here."]
    lines += ["", "- Fetched/replayed MB/s = LSN progress × payload bytes per LSN (fio's bytes ÷ the primary's new "
              "LSNs), so they compare directly with fio's MB/s; record headers are not counted.",
              "- Lag as reported comes from `lag_seconds` in status; the measured lag is the age of the primary "
              "state the mirror had fetched, from the sampled LSN timelines (0.5 s resolution)."]
    return "\n".join(lines)


def plot(follows: list[Follow], dec: Decouple, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [f for f in follows if not f.error and f.series]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0]
    colors = ["#4477aa", "#ee6677", "#228833", "#ccbb44"]
    for n, f in enumerate(ok):
        t = [s[0] for s in f.series]
        c = colors[n % len(colors)]
        what = f.link + (f", {f.rate} MiB/s" if f.rate else "")
        ax.plot(t, [s[1] for s in f.series], color=c, lw=1.8, label=f"primary durable ({what})")
        ax.plot(t, [s[2] for s in f.series], color=c, lw=1, ls="--", label=f"mirror fetched ({what})")
        ax.plot(t, [s[3] for s in f.series], color=c, lw=1, ls=":", label=f"mirror replayed ({what})")
        if f.fio:
            ax.axvline(f.fio["runtime_s"], color=c, lw=0.6, alpha=0.5)
    ax.set_xlabel("seconds since fio started (vertical line: fio ends)")
    ax.set_ylabel("MB written since start")
    ax.set_title("mirror following 1 MiB sequential writes", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    done = [(n, k, r["iops"]) for n, (k, r) in enumerate(dec.runs, 1) if "iops" in r]
    if done:
        ax.bar(range(len(done)), [v for _n, _k, v in done],
               color=["#4477aa" if k == "mirror" else "#bbbbbb" for _n, k, _v in done])
        ax.set_xticks(range(len(done)), [f"{n}\n{'mirror' if k == 'mirror' else 'alone'}" for n, k, _v in done],
                      fontsize=7)
        for i, (_n, _k, v) in enumerate(done):
            ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("IOPS (4 KiB random write, QD16)")
    ax.set_title("primary IOPS (blue: mirror at 1 MB/s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- main



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="scripts/bench replication", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 s per fio run (a smoke test, not for the record)")
    p.add_argument("--runtime", type=int, default=None, metavar="S", help="seconds per fio run (default 20)")
    p.add_argument("--links", default="direct,insecure,proxy",
                   help="follow runs: direct (mutual TLS), insecure (direct, plain TCP: the TLS cost is the "
                        "difference) and proxy (through a fault proxy with no faults); default all three")
    p.add_argument("--paced", type=int, default=40, metavar="MIB_S",
                   help="one more direct follow run with fio limited to this rate, so that the mirror can keep "
                        "up and its lag shows (default 40; 0 skips it)")
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="decoupling: N runs with the mirror, each between runs without (default 3; 1 with --quick)")
    p.add_argument("--skip-decoupling", action="store_true", help="only the follow runs")
    p.add_argument("--tls-iops", type=int, default=None, metavar="N",
                   help="what TLS costs the primary's 4 KiB writes with a mirror following: N runs over TLS, each "
                        "between runs over plain TCP (default 1 when --links has direct and insecure, else 0)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the work directory goes")
    p.add_argument("--out", type=Path, default=None, help="splice the table into this markdown file")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    runtime = args.runtime or (5 if args.quick else 20)
    links = [x.strip() for x in args.links.split(",") if x.strip()]
    if bad := [x for x in links if x not in LINK_TITLES]:
        p.error(f"unknown link(s) {bad}: choose from direct, insecure, proxy")
    if os.geteuid() != 0:
        print("scripts/bench replication: needs root (losetup, FUSE mounts)", file=sys.stderr)
        return 1
    for tool in ("fio", "losetup", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"scripts/bench replication: {tool} not found", file=sys.stderr)
            return 1
    exit_on_sigterm()
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="marsfs-bench-repl-", dir=args.dir))
    try:
        with Neighbours() as neighbours:
            runs = [(link, 0) for link in links] + ([("direct", args.paced)] if args.paced else [])
            follows = [run_follow(work, link, rate, runtime) for link, rate in runs]
            repeat = args.repeat or (1 if args.quick else 3)
            dec = Decouple() if args.skip_decoupling else run_decouple(work, runtime, repeat)
            n_tls = args.tls_iops if args.tls_iops is not None else int({"direct", "insecure"} <= set(links))
            tls = run_tls_iops(work, runtime, n_tls) if n_tls else Decouple()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if neighbours.seen:
        say("other processes ran meanwhile:\n  " + "\n  ".join(sorted(neighbours.seen)))
    shown = shown_args(argv)
    table = report(follows, dec, tls, runtime, args.quick, shown, load, len(neighbours.seen))
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"follow": [f.__dict__ for f in follows], "decoupling": dec.runs,
                                         "tls_iops": tls.runs},
                                        indent=2, default=str))
    if args.out:
        png = args.out.parent / "bench-replication.png"
        body = table + ("\n\n![replication: mirror following the primary; IOPS with and without mirror]"
                        "(bench-replication.png)" if plot(follows, dec, png) else "")
        splice(args.out, "replication", body)
        print(f"written to {args.out}" + (f" and {png}" if png.exists() else ""))
    failed = [f for f in follows if f.error] + [r for _k, r in dec.runs + tls.runs if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
