"""Scale benchmark: one node with many volumes, in real ``marsfs serve`` processes.

Per source tree (this one, and with ``--baseline REV`` also that revision's ``src/``, taken with
``git archive``, measured in the same invocation) it measures:

* **creates**: ``marsfs create`` N times (default 100) from the command line, as a script would,
  each a new process: the wall time of all of them, and the CPU they cost (the command-line
  processes' own, and the daemon's meanwhile);
* **idle**: the daemon's CPU time from ``/proc/PID/stat`` over ``--idle-seconds`` of wall time,
  with 1 volume and with N (CPU seconds per wall second: a loaded machine barely changes it),
  its threads, and its RSS from ``/proc/PID/status``;
* **open versions**: the RSS a read-only version costs while it is open (K versions of a volume
  with ``--version-mib`` of 4 KiB random writes in its log, each opened at another LSN);
* **restart**: a clean stop (SIGTERM until the process ends) and a start until the control
  socket answers ``status`` with the FUSE mount up, with N+1 volumes;
* **recovery**: SIGKILL after 4 KiB random writes (never flushed by the writer) filled the log
  to each ``--log-mib`` length, then a start: the daemon's own "recovered ... verified in T s"
  line and the start's wall time, with the rate (MiB/s, records/s);
* **10 volumes at once**: fio 4 KiB random write QD16 through ``losetup --direct-io=on`` on one
  volume, then on ten at once (one fio, ten jobs, ten loop devices): the aggregate IOPS ratio.

Children run without ``PYTHONDONTWRITEBYTECODE`` (an installed marsfs has its bytecode) after
a ``compileall`` of each tree, so command-line start-up is what a user meets.

Usage: ``scripts/bench scale [--quick] [--baseline REV] [--volumes N] [--idle-seconds S]
[--runtime S] [--log-mib 64,256] [--only creates,versions,restart,recovery,fio]
[--out docs/benchmarks.md]`` (needs root, fio, losetup, fusermount3).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import exit_on_sigterm, shown_args, splice  # scripts/ is on sys.path: this file runs as a script
from marsfs.faces.control import call
from marsfs.testing.harness import MALLOC_ENV, Harness, NodeProcess, is_mounted

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("creates", "versions", "restart", "recovery", "fio")
RECOVERED = re.compile(r"volume (\S+) recovered: (\d+) records, ([\d.]+) MiB verified in ([\d.]+) s")
FIO_VOLUMES = 10
VERSIONS_OPEN = 8


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- /proc


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def idle_share(pid: int, seconds: float) -> float:
    """The daemon's CPU seconds per wall second over ``seconds``."""
    c0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_s(pid) - c0) / (time.monotonic() - t0)


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------- trees and nodes


@dataclass
class Tree:
    """A source tree whose ``marsfs`` the children run."""

    label: str
    src: Path

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": os.fspath(self.src), "PYTHONDONTWRITEBYTECODE": ""}

    def cli(self, state: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "marsfs", "--state", os.fspath(state), *args],
                           capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                           env={**os.environ, **self.env()})
        if r.returncode != 0:
            raise RuntimeError(f"marsfs {shlex.join(args)} exited {r.returncode}: {(r.stderr or r.stdout).strip()}")
        return r


class Node(NodeProcess):
    """A ``marsfs serve`` of one tree; ready when mounted and ``status`` answers over the socket
    from this process (polling with a command-line process would add its start-up to the time)."""

    def __init__(self, h: Harness, tree: Tree, name: str, extra: list[str] | None = None) -> None:
        super().__init__(h.root, name, extra=["--insecure", *(extra or [])], env=tree.env())
        self.tree = tree
        h.nodes.append(self)

    def start(self, timeout: float = 300) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [sys.executable, "-m", "marsfs", "serve", "--node", self.name, "--state", os.fspath(self.state),
               "--mount", os.fspath(self.mount), *self.extra]
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **MALLOC_ENV, **self.env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"marsfs serve exited {self.proc.returncode} during start:\n{self.log_tail()}")
            if is_mounted(self.mount):
                try:
                    call(self.state, "status", timeout=30)
                    return
                except Exception:
                    pass
            time.sleep(0.01)
        raise RuntimeError(f"marsfs serve did not come up within {timeout} s:\n{self.log_tail()}")

    @property
    def running_pid(self) -> int:
        assert self.proc is not None and self.proc.poll() is None, "not running"
        return self.proc.pid

    def create(self, volume: str, size: str, *, thin: bool = False) -> None:
        self.tree.cli(self.state, "create", volume, "--size", size, *(["--thin"] if thin else []))


def baseline_tree(rev: str, work: Path) -> Tree:
    """``src/`` of ``rev`` in ``work``, by git archive (the repository is not touched)."""
    dest = work / f"baseline-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", os.fspath(ROOT), "archive", rev, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", os.fspath(dest)], input=archive.stdout, check=True)
    short = subprocess.run(["git", "-C", os.fspath(ROOT), "rev-parse", "--short", rev], capture_output=True,
                           text=True, check=True).stdout.strip()
    return Tree(f"before ({short})", dest / "src")


def this_tree() -> Tree:
    git = ["git", "-C", os.fspath(ROOT)]
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip()
    return Tree(f"this tree ({rev}{'+' if dirty else ''})", ROOT / "src")


# ---------------------------------------------------------------------- fio


def fio(jobs: list[str], runtime: int | None = None, io_size: str | None = None) -> dict[str, float]:
    """4 KiB random writes QD16, one job per file in ``jobs``, reported as a group."""
    cmd = ["fio", "--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=1G",
           "--offset=0", "--randrepeat=0", "--norandommap", "--group_reporting", "--output-format=json"]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}"]
    if io_size:
        cmd += [f"--io_size={io_size}"]
    for i, f in enumerate(jobs):
        cmd += [f"--name=j{i}", f"--filename={f}"]
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=(runtime or 0) + 900)
    if r.returncode != 0 or "{" not in r.stdout:
        raise RuntimeError(f"fio failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    j = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"fio: error {j['error']}: {r.stderr.strip()[-500:]}")
    return {"iops": j["write"]["iops"], "ios": j["write"]["total_ios"]}


def settle() -> None:
    os.sync()
    time.sleep(2)


# ---------------------------------------------------------------------- the measurements


@dataclass
class Result:
    tree: Tree
    values: dict[str, float] = field(default_factory=dict)
    recovery: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def measure_creates(h: Harness, res: Result, n: int, size: str, idle_s: float, parts: set[str]) -> None:
    """Creates, idle with 1 and with ``n`` volumes, memory, open versions, restart: one node."""
    node = Node(h, res.tree, "scale")
    node.start()
    v = res.values
    pid = node.running_pid
    time.sleep(3)
    v["rss0_mib"] = status_kib(pid, "VmRSS") / 1024
    v["idle0"] = idle_share(pid, idle_s)
    wall = cpu_cli = cpu_daemon = 0.0

    def create(i: int) -> None:
        nonlocal wall, cpu_cli, cpu_daemon
        c0, d0, t0 = children_cpu_s(), cpu_s(pid), time.monotonic()
        node.create(f"v{i:03d}", size)
        wall += time.monotonic() - t0
        cpu_cli += children_cpu_s() - c0
        cpu_daemon += cpu_s(pid) - d0

    say(f"  {res.tree.label}: creating v000, then idle for {idle_s:g} s")
    create(0)
    time.sleep(3)
    v["rss1_mib"] = status_kib(pid, "VmRSS") / 1024
    v["threads1"] = threads(pid)
    v["idle1"] = idle_share(pid, idle_s)
    say(f"  idle with 1 volume: {v['idle1'] * 100:.2f} % of a core; creating {n - 1} more")
    for i in range(1, n):
        create(i)
    v["create_wall_s"], v["create_cli_cpu_s"], v["create_daemon_cpu_s"] = wall, cpu_cli, cpu_daemon
    say(f"  {n} creates: {wall:.1f} s wall, command lines {cpu_cli:.1f} s CPU, daemon {cpu_daemon:.1f} s CPU")
    time.sleep(3)
    v["rssN_mib"] = status_kib(pid, "VmRSS") / 1024
    v["threadsN"] = threads(pid)
    v["idleN"] = idle_share(pid, idle_s)
    say(f"  idle with {n} volumes: {v['idleN'] * 100:.2f} % of a core, RSS {v['rssN_mib']:.1f} MiB")
    if "versions" in parts:
        measure_versions(node, res, pid)
    if "restart" in parts:
        t0 = time.monotonic()
        node.stop(timeout=120)
        t1 = time.monotonic()
        node.unmount()
        node.start()
        t2 = time.monotonic()
        v["stop_s"], v["start_s"] = t1 - t0, t2 - t1
        say(f"  restart with {len(node_volumes(node))} volumes: stop {t1 - t0:.2f} s, start {t2 - t1:.2f} s")
    node.stop(timeout=120)
    node.unmount()


def node_volumes(node: Node) -> list[str]:
    return [r["volume"] for r in call(node.state, "status", timeout=60)]


def measure_versions(node: Node, res: Result, pid: int) -> None:
    """RSS per open version: K versions of a volume whose log holds 4 KiB random writes."""
    mib = int(res.values.get("version_mib", 64))
    node.create("ver", "1G", thin=True)
    image = node.image("ver")
    fio([os.fspath(image)], io_size=f"{mib}M")
    head = int(call(node.state, "status", volume="ver", timeout=60)[0]["head_lsn"])
    step = max(1, head // (2 * VERSIONS_OPEN))
    lsns = [head - k * step for k in range(VERSIONS_OPEN)]
    time.sleep(2)
    rss0 = status_kib(pid, "VmRSS")
    fds = [os.open(node.mount / ".versions" / "ver" / f"lsn-{n}.img", os.O_RDONLY) for n in lsns]
    try:
        time.sleep(2)
        rss1 = status_kib(pid, "VmRSS")
    finally:
        for fd in fds:
            os.close(fd)
    res.values["version_records"] = sum(lsns) / len(lsns)
    res.values["version_kib"] = (rss1 - rss0) / len(lsns)
    say(f"  {len(lsns)} open versions of ~{res.values['version_records']:,.0f} records each: "
        f"{res.values['version_kib']:,.0f} KiB RSS each")


def measure_recovery(h: Harness, res: Result, lengths: list[int]) -> None:
    """SIGKILL with the log at each length, then a start: recovery time against log length."""
    node = Node(h, res.tree, "recover", extra=["--history", "64G"])
    node.start()
    node.create("rec", "2G", thin=True)
    written = 0
    for mib in lengths:
        fio([os.fspath(node.image("rec"))], io_size=f"{mib - written}M")
        written = mib
        node.kill()
        node.abort()
        node.unmount()
        t0 = time.monotonic()
        node.start()
        wall = time.monotonic() - t0
        found = [m for m in RECOVERED.finditer(node.logfile.read_text(errors="replace")) if m.group(1) == "rec"]
        if not found:
            raise RuntimeError(f"no recovery line for rec in the daemon log:\n{node.log_tail()}")
        m = found[-1]
        row = {"written_mib": mib, "records": int(m.group(2)), "log_mib": float(m.group(3)),
               "verify_s": float(m.group(4)), "start_s": wall}
        res.recovery.append(row)
        say(f"  recovery of {row['log_mib']:.0f} MiB ({row['records']:,} records): verified in {row['verify_s']:.2f} s, "
            f"start {wall:.2f} s")
    node.stop(timeout=120)
    node.unmount()


def measure_fio(h: Harness, res: Result, runtime: int) -> None:
    """Aggregate 4 KiB random write IOPS on ten volumes at once against one alone."""
    # reserved volumes, as create makes them by default (a thin volume's every write asks the log
    # space for room, a sum over all volumes); a history window that keeps every record, so
    # that the first run's volume is not written back during the second
    node = Node(h, res.tree, "fio", extra=["--history", "64G"])
    node.start()
    devs = []
    for i in range(FIO_VOLUMES):
        node.create(f"f{i}", "1G")
        devs.append(h.attach(node.image(f"f{i}")))
    pid = node.running_pid
    out: dict[str, dict[str, float]] = {}
    for key, jobs in (("one", devs[:1]), ("ten", devs)):
        settle()
        c0 = cpu_s(pid)
        out[key] = fio(jobs, runtime)
        out[key]["cpu_us"] = (cpu_s(pid) - c0) * 1e6 / max(1, out[key]["ios"])
        say(f"  fio on {len(jobs)} volume(s): {out[key]['iops']:,.0f} IOPS, daemon {out[key]['cpu_us']:.0f} µs CPU/op")
    for dev in devs:
        h.detach(dev)
    res.values.update({"iops1": out["one"]["iops"], "iops10": out["ten"]["iops"],
                       "cpu1_us": out["one"]["cpu_us"], "cpu10_us": out["ten"]["cpu_us"]})
    node.stop(timeout=120)
    node.unmount()


def measure(tree: Tree, work: Path, args: argparse.Namespace, parts: set[str]) -> Result:
    res = Result(tree)
    res.values["version_mib"] = args.version_mib
    say(f"== {tree.label}: {tree.src}")
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.fspath(tree.src)], check=False,
                   env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""}, stdout=subprocess.DEVNULL)
    steps = [("creates", lambda h: measure_creates(h, res, args.volumes, args.volume_size, args.idle_seconds, parts)),
             ("recovery", lambda h: measure_recovery(h, res, args.log_mib)),
             ("fio", lambda h: measure_fio(h, res, args.runtime))]
    for part, step in steps:
        if part not in parts:
            continue
        root = Path(tempfile.mkdtemp(prefix=f"{part}-", dir=work))
        try:
            with Harness(root) as h:
                step(h)
        except Exception as e:
            res.errors.append(f"{part}: {type(e).__name__}: {' '.join(str(e).split())[:600]}")
            say(f"  {part} failed: {e}")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return res


# ---------------------------------------------------------------------- report


def _f(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def rows(res: Result, n: int) -> list[tuple[str, str, str]]:
    """(measure, value, target) of one tree."""
    v = res.values.get
    out: list[tuple[str, str, str]] = []

    def add(title: str, value: str, target: str = "") -> None:
        out.append((title, value, target))

    pct = (lambda key: None if v(key) is None else v(key) * 100)  # noqa: E731
    add(f"{n} creates (`marsfs create`, each a new process): wall time, s", _f(v("create_wall_s")), "< 10")
    add(f"{n} creates: CPU of the command-line processes, s", _f(v("create_cli_cpu_s")))
    add(f"{n} creates: CPU of the daemon meanwhile, s", _f(v("create_daemon_cpu_s"), 2))
    add("idle daemon, no volume: % of a core", _f(pct("idle0"), 2))
    add("idle daemon, 1 volume: % of a core", _f(pct("idle1"), 2))
    add(f"idle daemon, {n} volumes: % of a core", _f(pct("idleN"), 2), "< 1, flat")
    add(f"daemon threads, 1 / {n} volumes", f"{_f(v('threads1'), 0)} / {_f(v('threadsN'), 0)}")
    add("daemon RSS, no volume / 1 volume, MiB", f"{_f(v('rss0_mib'))} / {_f(v('rss1_mib'))}")
    add(f"daemon RSS, {n} volumes (idle), MiB", _f(v("rssN_mib")), "reported")
    if v("rss1_mib") is not None and v("rssN_mib") is not None:
        add("daemon RSS per further volume, KiB", _f((v("rssN_mib") - v("rss1_mib")) * 1024 / (n - 1), 0))
    add(f"RSS per open version (~{_f(v('version_records'), 0)} records of 4 KiB in its index), KiB",
        _f(v("version_kib"), 0), "reported")
    add(f"clean stop with {n + 1} volumes, s", _f(v("stop_s"), 2))
    add(f"start until ready with {n + 1} volumes, s", _f(v("start_s"), 2), "restart < 5")
    for r in res.recovery:
        add(f"recovery after SIGKILL, {r['written_mib']:.0f} MiB of 4 KiB writes ({r['records']:,.0f} records): "
            "log verified / start until ready, s", f"{r['log_mib']:.0f} MiB: {r['verify_s']:.2f} / {r['start_s']:.2f}")
    if len(res.recovery) >= 1:
        last = res.recovery[-1]
        rate = last["log_mib"] / last["verify_s"] if last["verify_s"] else None
        recs = last["records"] / last["verify_s"] if last["verify_s"] else None
        add("recovery rate at the longest log, MiB/s (records/s)", f"{_f(rate, 0)} ({_f(recs, 0)})", "stated")
    if len(res.recovery) >= 2:
        a, b = res.recovery[0], res.recovery[-1]
        if a["verify_s"] and a["log_mib"]:
            add("recovery time ratio / log length ratio (1 = linear)",
                _f((b["verify_s"] / a["verify_s"]) / (b["log_mib"] / a["log_mib"]), 2), "linear")
    add("fio 4 KiB random write QD16, 1 volume, IOPS", _f(v("iops1"), 0))
    add(f"fio 4 KiB random write QD16, {FIO_VOLUMES} volumes at once, aggregate IOPS", _f(v("iops10"), 0))
    if v("iops1") and v("iops10"):
        add(f"aggregate IOPS ratio, {FIO_VOLUMES} volumes / 1", _f(v("iops10") / v("iops1"), 2), "≥ 0.9")
    add(f"daemon CPU per write, 1 / {FIO_VOLUMES} volumes, µs", f"{_f(v('cpu1_us'), 0)} / {_f(v('cpu10_us'), 0)}")
    return out


def report(results: list[Result], args: argparse.Namespace, argv: list[str], load: tuple[float, float]) -> str:
    quick = " (quick: a smoke test, not for the record)" if args.quick else ""
    lines = [
        f"Run: `scripts/bench scale{' ' + shlex.join(argv) if argv else ''}` — {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, kernel {platform.release()}, Python {platform.python_version()}; load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end{quick}.",
        "",
        f"One `marsfs serve` node per measurement, volumes of {args.volume_size} (reserved) for the creates; idle "
        f"CPU is the daemon's CPU time (/proc/PID/stat, all threads) over {args.idle_seconds:g} s of wall time; "
        "RSS from /proc/PID/status; the versions' and the recovery's volumes are thin, of 1-2 GiB; "
        f"fio's {FIO_VOLUMES} are reserved, of 1 GiB, with a history window that keeps every record (no writeback); "
        "fio runs libaio, O_DIRECT, through `losetup --direct-io=on`"
        f"{f', {args.runtime} s per run' if 'fio' in args.parts else ''}.",
        "",
    ]
    per = [rows(r, args.volumes) for r in results]
    head = "| measure | " + " | ".join(r.tree.label for r in results) + " | target |"
    lines += [head, "|---|" + "---:|" * len(results) + "---|"]
    for i, (title, _value, target) in enumerate(per[-1]):
        vals = [p[i][1] if i < len(p) and p[i][0] == title else "n/a" for p in per]
        lines.append(f"| {title} | " + " | ".join(vals) + f" | {target} |")
    for r in results:
        for e in r.errors:
            lines.append(f"\n- {r.tree.label}: {e}")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="scripts/bench scale", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20 volumes, 5 s idle, 3 s fio, logs of 16 and 64 MiB")
    p.add_argument("--baseline", metavar="REV", help="also measure this git revision's src/, first (before/after)")
    p.add_argument("--volumes", type=int, default=None, help="volumes to create (default 100)")
    p.add_argument("--volume-size", default="64M", help="size of each created volume (default 64M, reserved)")
    p.add_argument("--idle-seconds", type=float, default=None, help="wall seconds of each idle measurement (20)")
    p.add_argument("--runtime", type=int, default=None, help="seconds per fio run (default 15)")
    p.add_argument("--log-mib", default=None, help="log lengths for recovery, MiB (default 64,256)")
    p.add_argument("--version-mib", type=int, default=None, help="4 KiB writes behind the open versions (64)")
    p.add_argument("--only", default=",".join(PARTS), help=f"parts to run (default {','.join(PARTS)})")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the work directory goes")
    p.add_argument("--out", type=Path, default=None, help="splice the table into this markdown file")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="measure nothing: the table of an earlier run's --json (the same options as that run)")
    args = p.parse_args(argv)
    args.volumes = args.volumes or (20 if args.quick else 100)
    args.idle_seconds = args.idle_seconds or (5.0 if args.quick else 20.0)
    args.runtime = args.runtime or (3 if args.quick else 15)
    args.log_mib = [int(x) for x in (args.log_mib or ("16,64" if args.quick else "64,256")).split(",")]
    args.version_mib = args.version_mib or (16 if args.quick else 64)
    args.parts = {x.strip() for x in args.only.split(",") if x.strip()}
    if bad := args.parts - set(PARTS):
        p.error(f"unknown part(s) {sorted(bad)}: choose from {', '.join(PARTS)}")
    if {"versions", "restart"} & args.parts:
        args.parts.add("creates")  # they run on the node the creates filled
    if os.geteuid() != 0:
        print("scripts/bench scale: needs root (losetup, FUSE mounts)", file=sys.stderr)
        return 1
    for tool in ("fio", "losetup", "fusermount3", "git"):
        if shutil.which(tool) is None:
            print(f"scripts/bench scale: {tool} not found", file=sys.stderr)
            return 1
    exit_on_sigterm()
    load = (os.getloadavg()[0], 0.0)
    results: list[Result] = []
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        results = [Result(Tree(r["tree"], Path()), r["values"], r["recovery"], r["errors"]) for r in saved["results"]]
        load = tuple(saved["load"])  # type: ignore[assignment]
    else:
        work = Path(tempfile.mkdtemp(prefix="marsfs-bench-scale-", dir=args.dir))
        try:
            trees = ([baseline_tree(args.baseline, work)] if args.baseline else []) + [this_tree()]
            for tree in trees:
                results.append(measure(tree, work, args, args.parts))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        load = (load[0], os.getloadavg()[0])
    shown = shown_args(argv, "--report")
    table = report(results, args, shown, load)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"load": load, "results": [
            {"tree": r.tree.label, "values": r.values, "recovery": r.recovery, "errors": r.errors}
            for r in results]}, indent=2))
    if args.out:
        splice(args.out, "scale", table)
        print(f"written to {args.out}")
    return 0 if all(not r.errors for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
