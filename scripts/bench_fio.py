"""fio benchmark: a volume image used as a block device through a loop device, three ways.

One invocation measures the same fio jobs on three images, each attached with
``losetup --direct-io=on`` (no second page cache) and exercised with O_DIRECT fio:

* **A** a plain sparse file in /var/tmp (the filesystem marsfs state would live on);
* **B** ``marsfs.testing.memfs``: a minimal pyfuse3 filesystem holding the image in memory, with
  marsfs's mount options and connection tuning: the Python FUSE ceiling;
* **C** a marsfs primary (``marsfs serve`` plus ``marsfs create``).

Jobs, each on the first 1 GiB of a 4 GiB image that one sequential 1 MiB pass has filled first:
4 KiB random write QD16, 1 MiB sequential write QD4, 4 KiB random read QD16, 4 KiB random
write + fsync QD1 (ops/s and latency p50/p99). The ratios C/A and C/B are what we track.
A target that cannot start is reported as not available; the others still run.

Write amplification (C): for the fill pass and every job, the daemon's ``write_bytes`` from
``/proc/PID/io`` (page-cache folios it dirtied, counted whole: too high for 4 KiB writes into
cached large folios) from the start of the job until its writeback has caught up after it
(status: ``applied_lsn`` reached ``writeback_target_lsn``), divided by the bytes fio wrote in
the job (its ``io_bytes``); ``wchar`` for contrast; and with ``--state-fs`` the state's own
ext4's count (``lifetime_write_kbytes``: what reached the device, journal included), the exact
one. The next job starts once writeback has caught up, so no job pays for the one before.

Usage: ``scripts/bench fio [--quick] [--runtime S] [--only A,B,C] [--dir DIR] [--state-fs SIZE]
[--out docs/benchmarks.md]`` (needs root, fio, losetup, fusermount3; mkfs.ext4 for --state-fs).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import exit_on_sigterm, splice  # scripts/ is on sys.path: this file runs as a script
from marsfs.faces.client import call

GiB = 1 << 30
IMAGE_SIZE = 4 * GiB
REGION = "1G"
VOLUME = "vol"
# measured: keeps each 1 MiB request buffer off mmap/munmap; doubled 1 MiB write speed.
DAEMON_ENV = {"MALLOC_MMAP_THRESHOLD_": "8388608", "MALLOC_TRIM_THRESHOLD_": "268435456"}
MOUNT_TIMEOUT = 30.0
CATCHUP_TIMEOUT = 600.0  # writeback of a job's data after it ends (a 1 MiB job may leave GiBs)

Cleanup = Callable[[], None]
# what a target's start gives: the image, how to stop it, and the pid of the daemon serving it (None: no daemon)
Started = tuple[Path, Cleanup, int | None]


class Unavailable(Exception):
    """A target could not be brought up; the message says why."""


# ---------------------------------------------------------------------- small process helpers


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    return r


def _unescape(field_: str) -> str:
    return field_.encode().decode("unicode_escape")  # mountinfo writes ' ' as \040 etc.


def is_mounted(path: Path) -> bool:
    """From /proc/self/mountinfo, so a dead FUSE mount (ENOTCONN on stat) still counts."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def fuse_connection(path: Path) -> dict[str, int] | None:
    """max_background and congestion_threshold of the FUSE mount at ``path``, if readable."""
    target, dev = os.path.realpath(path), None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fs = line.split()
            if _unescape(fs[4]) == target:
                dev = fs[2]
    if dev is None:
        return None
    major, minor = (int(x) for x in dev.split(":"))
    conn = Path("/sys/fs/fuse/connections") / str(major << 20 | minor)
    try:
        return {k: int((conn / k).read_text()) for k in ("max_background", "congestion_threshold")}
    except OSError:
        return None


def call_with_timeout(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run ``fn`` in a helper thread: a stat() on a stuck FUSE mount must not hang the harness."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise Unavailable(f"{what}: no answer within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def log_tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def remove_tree(path: Path) -> None:
    """rmtree, unless something is still mounted below ``path`` (then say so and leave it)."""
    root = os.path.realpath(path) + "/"
    with open("/proc/self/mountinfo") as f:
        busy = [m for m in (_unescape(line.split()[4]) for line in f) if m.startswith(root)]
    if busy:
        say(f"  NOT removing {path}: still mounted: {', '.join(busy)}")
        return
    shutil.rmtree(path, ignore_errors=True)


class FsDaemon:
    """A FUSE daemon started by this harness; stopped by its pid, never by name."""

    def __init__(self, cmd: list[str], mount: Path, log: Path, stop_timeout: float) -> None:
        self.mount, self.log, self.stop_timeout = mount, log, stop_timeout
        env = dict(os.environ, **DAEMON_ENV)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)  # our Ctrl-C is not theirs

    def wait_mounted(self, timeout: float = MOUNT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mount):
            if self.proc.poll() is not None:
                raise Unavailable(f"exited with status {self.proc.returncode} before mounting:\n{log_tail(self.log)}")
            if time.monotonic() > deadline:
                raise Unavailable(f"not mounted after {timeout:.0f} s:\n{log_tail(self.log)}")
            time.sleep(0.05)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise Unavailable(f"exited with status {self.proc.returncode}:\n{log_tail(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                say(f"  pid {self.proc.pid} still running {self.stop_timeout:.0f} s after SIGTERM: SIGKILL")
                self.proc.kill()
                self.proc.wait(30)
        if is_mounted(self.mount):
            if run(["fusermount3", "-u", str(self.mount)], check=False, timeout=30).returncode != 0 \
                    or is_mounted(self.mount):
                run(["fusermount3", "-z", "-u", str(self.mount)], check=False, timeout=30)
        if is_mounted(self.mount):
            raise RuntimeError(f"{self.mount} is still mounted after cleanup")


def wait_for_image(image: Path, daemon: FsDaemon, timeout: float = MOUNT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        daemon.check_alive()
        st = call_with_timeout(lambda: os.stat(image) if image.exists() else None, timeout, f"stat {image}")
        if st is not None:
            if st.st_size < GiB:
                raise Unavailable(f"{image} is only {st.st_size} bytes")
            return
        if time.monotonic() > deadline:
            raise Unavailable(f"{image} did not appear within {timeout:.0f} s:\n{log_tail(daemon.log)}")
        time.sleep(0.1)


# ---------------------------------------------------------------------- targets


def start_plain(tmp: Path) -> Started:
    """A: a sparse file on the filesystem of ``tmp``."""
    image = tmp / f"{VOLUME}.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return image, lambda: image.unlink(missing_ok=True), None


def start_memfs(tmp: Path, extra_args: list[str] | None = None) -> Started:
    """B: ``python -m marsfs.testing.memfs`` in a subprocess, on its own mount point."""
    mount = tmp / "mnt"
    mount.mkdir()
    cmd = [sys.executable, "-m", "marsfs.testing.memfs", "--mount", str(mount), "--name", VOLUME,
           "--size", str(IMAGE_SIZE), *(extra_args or [])]
    d = FsDaemon(cmd, mount, tmp / "memfs.log", stop_timeout=20)
    try:
        d.wait_mounted()
        wait_for_image(mount / f"{VOLUME}.img", d)
        deadline = time.monotonic() + 10
        while "memfs ready" not in log_tail(d.log, 50):  # its connection tuning is done
            d.check_alive()
            if time.monotonic() > deadline:
                raise Unavailable(f"memfs did not report ready within 10 s:\n{log_tail(d.log)}")
            time.sleep(0.05)
    except BaseException:
        d.stop()
        raise
    return mount / f"{VOLUME}.img", d.stop, d.proc.pid


def start_marsfs(tmp: Path) -> Started:
    """C: ``marsfs serve`` for a node ``bench``, then ``marsfs create vol --size 4G`` (primary)."""
    state, mount = tmp / "state", tmp / "mnt"
    state.mkdir()
    mount.mkdir()
    marsfs = [sys.executable, "-m", "marsfs"]
    cmd = [*marsfs, "serve", "--node", "bench", "--state", str(state), "--mount", str(mount)]
    d = FsDaemon(cmd, mount, tmp / "marsfs.log", stop_timeout=120)
    try:
        d.wait_mounted()
        r = run([*marsfs, "--state", str(state), "create", VOLUME, "--size", str(IMAGE_SIZE)],
                check=False, timeout=120)
        if r.returncode != 0:
            raise Unavailable(f"`marsfs create` failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
        wait_for_image(mount / f"{VOLUME}.img", d)
    except BaseException:
        d.stop()
        raise
    return mount / f"{VOLUME}.img", d.stop, d.proc.pid


def own_filesystem(tmp: Path, size: int) -> tuple[Path, Cleanup]:
    """An ext4 filesystem of ``size`` bytes that nothing else writes to, mounted at ``tmp/fs``
    (a sparse image file in ``tmp`` on a loop device with direct I/O): its count of bytes
    written is then its writers' alone."""
    img, mnt = tmp / "fs.img", tmp / "fs"
    with open(img, "wb") as f:
        f.truncate(size)
    run(["mkfs.ext4", "-q", "-F", str(img)], timeout=300)
    dev = attach(img, None)
    try:
        mnt.mkdir()
        run(["mount", dev, str(mnt)])
    except BaseException:
        detach(dev)
        img.unlink()
        raise

    def cleanup() -> None:
        run(["umount", str(mnt)], check=False, timeout=120)
        detach(dev)
        img.unlink(missing_ok=True)
    return mnt, cleanup


def start_marsfs_own_fs(tmp: Path, size: int) -> Started:
    """C with its state (and its mount point) on :func:`own_filesystem` at ``tmp/fs``."""
    home, drop = own_filesystem(tmp, size)
    try:
        image, stop, pid = start_marsfs(home)
    except BaseException:
        drop()
        raise

    def cleanup() -> None:
        try:
            stop()
        finally:
            drop()
    return image, cleanup, pid


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


@dataclass
class Target:
    key: str
    title: str
    start: Callable[[Path], Started]
    mount_of: Callable[[Path], Path | None] = lambda tmp: None
    state_of: Callable[[Path], Path | None] = lambda tmp: None  # a marsfs state directory: writes counted
    own_fs: bool = False  # the state is on a filesystem nothing else writes to


# ---------------------------------------------------------------------- loop device and fio


def attach(image: Path, sector_size: int | None) -> str:
    cmd = ["losetup", "--find", "--show", "--direct-io=on"]
    if sector_size:
        cmd += ["--sector-size", str(sector_size)]
    r = call_with_timeout(lambda: run([*cmd, str(image)], check=False, timeout=60), 90, "losetup")
    dev = r.stdout.strip()
    if r.returncode != 0 or not dev.startswith("/dev/loop"):
        raise Unavailable(f"losetup failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return dev


def loop_attr(dev: str, name: str) -> str | None:
    try:
        return (Path("/sys/block") / Path(dev).name / "loop" / name).read_text().strip()
    except OSError:
        return None


def detach(dev: str) -> None:
    """``losetup -d`` and wait until the device has really let go of its backing file."""
    run(["losetup", "-d", dev], check=False, timeout=60)
    deadline = time.monotonic() + 30
    while loop_attr(dev, "backing_file") is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{dev} still attached 30 s after losetup -d")
        time.sleep(0.05)


@dataclass
class Job:
    key: str
    title: str
    unit: str  # "IOPS", "MB/s" or "ops/s"
    args: list[str]
    latency: bool = False  # report write+fsync latency percentiles


FILL = Job("fill", "1 MiB sequential fill", "MB/s", ["--rw=write", "--bs=1M", "--iodepth=4"])
JOBS = [
    Job("randwrite", "4 KiB random write, QD16", "IOPS", ["--rw=randwrite", "--bs=4k", "--iodepth=16"]),
    Job("seqwrite", "1 MiB sequential write, QD4", "MB/s", ["--rw=write", "--bs=1M", "--iodepth=4"]),
    Job("randread", "4 KiB random read, QD16", "IOPS", ["--rw=randread", "--bs=4k", "--iodepth=16"]),
    Job("fsync", "4 KiB random write + fsync, QD1", "ops/s",
        ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"], latency=True),
]


def fio(dev: str, job: Job, runtime: int | None) -> dict[str, float]:
    cmd = ["fio", f"--name={job.key}", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
           f"--size={REGION}", "--offset=0", "--randrepeat=0", "--norandommap", "--group_reporting",
           "--lat_percentiles=1", "--percentile_list=50:99", "--output-format=json", *job.args]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}"]
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=(runtime or 0) * 3 + 600)
    out = r.stdout
    if r.returncode != 0 or "{" not in out:
        raise RuntimeError(f"fio {job.key} failed ({r.returncode}): {(r.stderr or out).strip()[-800:]}")
    j = json.loads(out[out.index("{"):])["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"fio {job.key}: error {j['error']}: {r.stderr.strip()[-500:]}")
    d = j["write"] if "write" in job.args[0] else j["read"]
    res = {"iops": d["iops"], "MBps": d["bw_bytes"] / 1e6, "ios": d["total_ios"],
           "runtime_s": d["runtime"] / 1000, "fio_written": j["write"]["io_bytes"]}

    def pct(lat: dict[str, Any], p: str) -> float:
        return lat.get("percentile", {}).get(p, float("nan")) / 1e6  # ns -> ms

    lat = d["lat_ns"] if "percentile" in d.get("lat_ns", {}) else d["clat_ns"]
    res["p50_ms"], res["p99_ms"] = pct(lat, "50.000000"), pct(lat, "99.000000")
    if job.latency:
        sync = j.get("sync", {}).get("lat_ns", {})
        res["write_p50_ms"], res["write_p99_ms"] = res["p50_ms"], res["p99_ms"]
        res["sync_p50_ms"], res["sync_p99_ms"] = pct(sync, "50.000000"), pct(sync, "99.000000")
        res["p50_ms"] = res["write_p50_ms"] + res["sync_p50_ms"]
        res["p99_ms"] = res["write_p99_ms"] + res["sync_p99_ms"]
    return res


def daemon_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads) the daemon ``pid`` has used so far.

    Per operation, this is the measure a busy machine disturbs least: throughput on 2 shared cores
    moves 15-20 % between runs of the same code, the work a request costs the daemon does not."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def daemon_io(pid: int) -> dict[str, int]:
    """The daemon's I/O counters so far (``/proc/PID/io``, all its threads).

    ``write_bytes`` counts a page-cache folio when a write dirties it (again once an fdatasync
    cleaned it, as the disk writes it again; not again while it stays dirty) and O_DIRECT
    writes as issued. A folio counts whole: a 4 KiB write into a clean cached 64 KiB folio (ext4
    caches in large folios) counts 64 KiB, where ext4 writes the 4 KiB block. Not counted: the
    ext4 journal and metadata that jbd2 and the flusher threads write.
    ``wchar`` is every byte passed to write calls, to the page cache or not (a reply to
    ``/dev/fuse`` too)."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = int(value)
    return out


def fs_written(path: Path) -> tuple[str, int] | None:
    """(device, bytes) the ext4 filesystem holding ``path`` wrote since it was mounted
    (``/sys/fs/ext4/DEV/lifetime_write_kbytes``: every writer, journal included), after a
    syncfs so that its journal commit is in; None if not ext4."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        dev = Path(os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")).name
        return dev, int((Path("/sys/fs/ext4") / dev / "lifetime_write_kbytes").read_text()) * 1024
    except (OSError, ValueError):
        return None


def wait_writeback(state: Path, timeout: float = CATCHUP_TIMEOUT) -> dict[str, Any]:
    """Wait until the volume's log is durable and writeback has applied all it will (status:
    ``durable_lsn`` = ``head_lsn`` and ``applied_lsn`` >= ``writeback_target_lsn``, which the
    history window holds behind the head); the last status row, with the seconds waited."""
    t0 = time.monotonic()
    while True:
        row = dict(call(state, "status", timeout=30, volume=VOLUME)[0])
        target = row.get("writeback_target_lsn")
        if target is None:
            raise RuntimeError("status has no writeback_target_lsn: this daemon cannot say when writeback caught up")
        if row["durable_lsn"] == row["head_lsn"] and row["applied_lsn"] >= target:
            row["waited_s"] = time.monotonic() - t0
            return row
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"writeback did not catch up within {timeout:.0f} s: applied {row['applied_lsn']}, "
                               f"target {target}, durable {row['durable_lsn']}, head {row['head_lsn']}")
        time.sleep(0.2)


def count_writes(state: Path, pid: int, io0: dict[str, int], fs0: tuple[str, int] | None,
                 r: dict[str, float], own_fs: bool) -> dict[str, str]:
    """After a job: wait for writeback, then add what the daemon wrote since ``io0`` to ``r``;
    returns the history window and the state's filesystem device, for the notes."""
    row = wait_writeback(state)
    io1, fs1 = daemon_io(pid), fs_written(state)
    r["disk_write_bytes"] = io1["write_bytes"] - io0["write_bytes"]
    r["cancelled_write_bytes"] = io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"]
    r["wchar"] = io1["wchar"] - io0["wchar"]
    r["catchup_s"] = row["waited_s"]
    info = {"history": str(row["history"])}
    if fs0 is not None and fs1 is not None and fs0[0] == fs1[0]:
        r["fs_written"] = fs1[1] - fs0[1]
        info["fs_device"] = fs1[0]
    if r["fio_written"]:
        r["amplification"] = r["disk_write_bytes"] / r["fio_written"]
        r["wchar_per_byte"] = r["wchar"] / r["fio_written"]
        if "fs_written" in r and own_fs:  # else other writers' bytes are in it
            r["fs_amplification"] = r["fs_written"] / r["fio_written"]
    return info


@dataclass
class Outcome:
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def bench_target(t: Target, work: Path, runtime: int, sector_size: int | None) -> Outcome:
    out = Outcome()
    tmp = work / t.key
    tmp.mkdir()
    say(f"== {t.key}: {t.title}")
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(remove_tree, tmp)
            image, cleanup, pid = t.start(tmp)
            stack.callback(cleanup)
            dev = attach(image, sector_size)
            stack.callback(detach, dev)
            out.info = {"loop": dev, "dio": loop_attr(dev, "dio"),
                        "sector_size": (Path("/sys/block") / Path(dev).name / "queue" / "logical_block_size")
                        .read_text().strip()}
            if (mnt := t.mount_of(tmp)) is not None:
                out.info["fuse"] = fuse_connection(mnt)
            say(f"  {image} on {dev} (direct I/O: {'on' if out.info['dio'] == '1' else 'OFF'})"
                + (f", FUSE {out.info['fuse']}" if out.info.get("fuse") else ""))
            state = t.state_of(tmp)
            if state is not None:
                out.info["own_fs"] = t.own_fs
            for job in [FILL, *JOBS]:
                before = (daemon_io(pid), fs_written(state)) if state is not None and pid is not None else None
                cpu0 = daemon_cpu_s(pid)
                r = fio(dev, job, None if job is FILL else runtime)
                cpu1 = daemon_cpu_s(pid)
                if cpu0 is not None and cpu1 is not None and r["ios"]:
                    r["cpu_us_per_op"] = (cpu1 - cpu0) * 1e6 / r["ios"]
                if before is not None and state is not None and pid is not None:
                    out.info.update(count_writes(state, pid, *before, r, t.own_fs))
                out.results[job.key] = r
                say(f"  {job.title:34} {fmt_value(job, r)} {job.unit}"
                    + (f"   p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms" if job.latency else "")
                    + (f"   state disk {r['amplification']:.2f} B (wchar {r['wchar_per_byte']:.2f} B) per byte "
                       f"fio wrote, writeback caught up in {r['catchup_s']:.1f} s" if "amplification" in r else ""))
    except Unavailable as e:
        out.error = str(e)
    except Exception as e:
        out.error = f"{type(e).__name__}: {e}"
    if out.error:
        say(f"  {t.key} not available: {out.error}")
    return out


# ---------------------------------------------------------------------- report


def fmt_value(job: Job, r: dict[str, float]) -> str:
    v = r["MBps"] if job.unit == "MB/s" else r["iops"]
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def _value(job: Job, r: dict[str, float] | None, what: str) -> float | None:
    if r is None:
        return None
    return {"thr": r["MBps"] if job.unit == "MB/s" else r["iops"], "p50": r["p50_ms"], "p99": r["p99_ms"],
            "cpu": r.get("cpu_us_per_op"), "amp": r.get("amplification"), "fs": r.get("fs_amplification")}[what]


def writes(job: Job) -> bool:
    return "write" in job.args[0]


def rows(outcomes: dict[str, Outcome]) -> list[tuple[str, str, str, dict[str, float | None]]]:
    """(measure, unit, kind, {target: value}); kind 'thr' (higher is better) or 'lat'."""
    out = []
    for job in JOBS:
        vals = {k: _value(job, o.results.get(job.key), "thr") for k, o in outcomes.items()}
        out.append((job.title, job.unit, "thr", vals))
        if job.latency:
            for p in ("p50", "p99"):
                vals = {k: _value(job, o.results.get(job.key), p) for k, o in outcomes.items()}
                out.append((f"{job.title}: {p} latency (write + fsync)", "ms", "lat", vals))
    for job in JOBS:
        vals = {k: _value(job, o.results.get(job.key), "cpu") for k, o in outcomes.items()}
        out.append((f"{job.title}: daemon CPU per operation", "µs", "lat", vals))
    for job in [FILL, *JOBS]:
        if writes(job):
            vals = {k: _value(job, o.results.get(job.key), "amp") for k, o in outcomes.items()}
            out.append((f"{job.title}: state disk bytes written per byte fio wrote (daemon's write_bytes)", "B/B",
                        "lat", vals))
    for job in [FILL, *JOBS]:
        vals = {k: _value(job, o.results.get(job.key), "fs") for k, o in outcomes.items()}
        if writes(job) and any(v is not None for v in vals.values()):  # only with --state-fs
            out.append((f"{job.title}: the same, as the state's filesystem counted them (journal included)", "B/B",
                        "lat", vals))
    return out


def _num(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit in ("ms", "µs"):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    if unit == "B/B":
        return f"{v:.2f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "—"


TITLES = {"A": "A plain file", "B": "B memfs (FUSE ceiling)", "C": "C marsfs primary"}


def report(outcomes: dict[str, Outcome], runtime: int, quick: bool, argv: list[str], load: float) -> str:
    fio_v = run(["fio", "--version"], check=False).stdout.strip()
    try:
        import pyfuse3
        pyfuse3_v = pyfuse3.__version__
    except ImportError:
        pyfuse3_v = "?"
    lines = [
        f"Run: `scripts/bench fio{' ' + shlex.join(argv) if argv else ''}` — {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, kernel {platform.release()}, {fio_v}, Python {platform.python_version()}, "
        f"pyfuse3 {pyfuse3_v}; load average {load:.1f} at the start; "
        f"{runtime} s per job{' (quick: a smoke test, not for the record)' if quick else ''}.",
        "",
        f"Each image is {IMAGE_SIZE // GiB} GiB, attached with `losetup --direct-io=on`; fio (libaio, O_DIRECT) "
        f"runs on its first {REGION[:-1]} GiB after one sequential 1 MiB fill pass. "
        "Ratios divide the numbers shown: above 1 is better for IOPS, MB/s and ops/s, worse for latencies.",
        "",
        "| measure | unit | " + " | ".join(TITLES[k] for k in "ABC") + " | C/A | C/B | B/A |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for title, unit, _kind, vals in rows(outcomes):
        a, b, c = (vals.get(k) for k in "ABC")
        lines.append(f"| {title} | {unit} | {_num(a, unit)} | {_num(b, unit)} | {_num(c, unit)} | "
                     f"{_ratio(c, a)} | {_ratio(c, b)} | {_ratio(b, a)} |")
    lines.append("")
    notes = []
    for k in "ABC":
        o = outcomes.get(k)
        if o is None:
            notes.append(f"- {TITLES[k]}: not run (`--only`).")
        elif o.error:
            reason = " ".join(o.error.split())
            notes.append(f"- {TITLES[k]}: not available — {reason[:400]}")
        else:
            fill = o.results.get("fill", {}).get("MBps")
            bits = [f"loop direct I/O {'on' if o.info.get('dio') == '1' else 'off'}",
                    f"sector {o.info.get('sector_size')} B"]
            if o.info.get("fuse"):
                bits.append("FUSE max_background {max_background}, congestion_threshold {congestion_threshold}"
                            .format(**o.info["fuse"]))
            if fill:
                bits.append(f"fill pass {fill:,.0f} MB/s")
            notes.append(f"- {TITLES[k]}: " + "; ".join(bits) + ".")
    notes.append("- write + fsync latency = p50 (p99) of the write's completion latency plus p50 (p99) of the "
                 "fsync's, as fio reports them separately: an estimate of the per-operation percentile, not "
                 "a measured one; ops/s counts write+fsync pairs.")
    notes.append("- daemon CPU per operation = the FUSE daemon's user + system CPU time (all its threads) during "
                 "the job, divided by the operations fio completed: the cost of a request, which a loaded "
                 "machine disturbs far less than it disturbs throughput. A has no daemon.")
    notes.append("- state disk bytes written per byte fio wrote = the daemon's `write_bytes` (/proc/PID/io) from the "
                 "start of the job until writeback caught up after it (status: `applied_lsn` reached "
                 "`writeback_target_lsn`; the next job waits for that), divided by the bytes fio wrote. `write_bytes` "
                 "counts a page-cache folio when a write dirties it: again after an fdatasync cleaned it (as the disk "
                 "writes it again), and whole, so a 4 KiB write into a clean cached 64 KiB folio counts 64 KiB where "
                 "ext4 writes 4 KiB. Not counted: the ext4 journal and metadata, written by kernel threads. The "
                 "filesystem's count (ext4 `lifetime_write_kbytes`, after a syncfs) is what reached its device, journal "
                 "included, from every writer on it: a row only with `--state-fs` (the state on an ext4 of its own). "
                 "The history window stays in the log: once it is full as many bytes leave it as enter, "
                 "but the fill pass leaves the window's worth of its bytes in it. Only C has a state disk.")
    if (oc := outcomes.get("C")) is not None and (counted := [(j, oc.results[j.key]) for j in [FILL, *JOBS]
                                                              if "disk_write_bytes" in oc.results.get(j.key, {})]):
        rs = [r for _j, r in counted]
        bits = (["state on an ext4 of its own (`--state-fs`)"] if oc.info.get("own_fs") else []) + [
                f"history window {oc.info.get('history')}",
                f"writeback caught up {min(r['catchup_s'] for r in rs):.1f}-{max(r['catchup_s'] for r in rs):.1f} s "
                "after a job ended",
                "wchar (bytes passed to write calls, FUSE replies included) per byte fio wrote: "
                + ", ".join(f"{j.key} {r['wchar_per_byte']:.2f}" for j, r in counted if "wchar_per_byte" in r)]
        if all("fs_written" in r for r in rs):
            bits.append(f"the state's filesystem ({oc.info.get('fs_device')}) wrote {sum(r['fs_written'] for r in rs) / GiB:.2f} "
                        f"GiB from the fill to the end{'' if oc.info.get('own_fs') else ' (every writer on it)'}, "
                        f"the daemon's `write_bytes` {sum(r['disk_write_bytes'] for r in rs) / GiB:.2f} GiB")
        notes.append(f"- {TITLES['C']}: " + "; ".join(bits) + ".")
    return "\n".join(lines + notes)


def plot(outcomes: dict[str, Outcome], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    thr = [(t, vals) for t, _u, kind, vals in rows(outcomes) if kind == "thr"]
    series = [(n, x, y) for n, x, y in (("C/A", "C", "A"), ("C/B", "C", "B"), ("B/A", "B", "A"))
              if any(v.get(x) and v.get(y) for _t, v in thr)]
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * len(thr) * len(series)))
    h = 0.8 / len(series)
    colors = {"C/A": "#4477aa", "C/B": "#ee6677", "B/A": "#bbbbbb"}
    for i, (name, x, y) in enumerate(series):
        ys = [j + (i - (len(series) - 1) / 2) * h for j in range(len(thr))]
        rs = [(v[x] / v[y]) if v.get(x) and v.get(y) else 0 for _t, v in thr]
        ax.barh(ys, rs, height=h, color=colors[name], label=name)
        for yy, r in zip(ys, rs):
            if r:
                ax.text(r, yy, f" {r:.2f}", va="center", fontsize=8)
    ax.set_yticks(range(len(thr)), [t for t, _v in thr])
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.8)
    allr = [v[x] / v[y] for _n, x, y in series for _t, v in thr if v.get(x) and v.get(y)]
    if max(allr) / min(allr) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _p: f"{v:g}"))
    ax.set_xlim(right=max(allr) * 1.25)
    ax.set_xlabel("throughput ratio, same run (1 = equal)")
    missing = [TITLES[k] for k in "ABC" if k not in outcomes or outcomes[k].error]
    ax.set_title("fio through a loop device" + (f" ({', '.join(missing)}: n/a)" if missing else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------- main



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="scripts/bench fio", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 s per job (a smoke test, not for the record)")
    p.add_argument("--runtime", type=int, default=None, metavar="S", help="seconds per job (default 15; 3 with --quick)")
    p.add_argument("--only", default="A,B,C", help="targets to run, like A,B (default A,B,C)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="where the work directory goes (default /var/tmp: where marsfs state would be)")
    p.add_argument("--out", type=Path, default=None, help="splice the table into this markdown file")
    p.add_argument("--json", type=Path, default=None, help="also write all parsed fio results here")
    p.add_argument("--sector-size", type=int, default=None, help="losetup --sector-size (default: 512)")
    p.add_argument("--memfs-args", default="", help="extra arguments for memfs, like '--max-background 0'")
    p.add_argument("--state-fs", default=None, metavar="SIZE",
                   help="put C's state on an ext4 of its own of SIZE (like 12G; an image file in --dir on a loop "
                        "device), so that the filesystem's count of bytes written is the state disk's alone")
    args = p.parse_args(argv)
    runtime = args.runtime or (3 if args.quick else 15)
    only = [k.strip().upper() for k in args.only.split(",") if k.strip()]
    if bad := [k for k in only if k not in TITLES]:
        p.error(f"unknown target(s) {bad}: choose from A, B, C")
    if os.geteuid() != 0:
        print("scripts/bench fio: needs root (losetup, FUSE mounts)", file=sys.stderr)
        return 1
    for tool in ("fio", "losetup", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"scripts/bench fio: {tool} not found", file=sys.stderr)
            return 1
    memfs_args = shlex.split(args.memfs_args)
    targets = {
        "A": Target("A", "plain sparse file", start_plain),
        "B": Target("B", "marsfs.testing.memfs", lambda tmp: start_memfs(tmp, memfs_args), lambda tmp: tmp / "mnt"),
        "C": Target("C", "marsfs primary", start_marsfs, lambda tmp: tmp / "mnt", lambda tmp: tmp / "state"),
    }
    if args.state_fs:
        try:
            fs_size = parse_size(args.state_fs)
        except (ValueError, IndexError):
            p.error(f"--state-fs {args.state_fs!r}: give a size like 12G")
        targets["C"] = Target("C", "marsfs primary, state on an ext4 of its own",
                              lambda tmp: start_marsfs_own_fs(tmp, fs_size), lambda tmp: tmp / "fs" / "mnt",
                              lambda tmp: tmp / "fs" / "state", own_fs=True)
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="marsfs-bench-fio-", dir=args.dir))
    outcomes: dict[str, Outcome] = {}
    load = os.getloadavg()[0]
    try:
        for k in "ABC":
            if k in only:
                outcomes[k] = bench_target(targets[k], work, runtime, args.sector_size)
    finally:
        remove_tree(work)
    shown = []  # the command line as run, without where the results went
    it = iter(argv)
    for a in it:
        if a in ("--out", "--json"):
            next(it, None)
        elif not a.startswith(("--out=", "--json=")):
            shown.append(a)
    table = report(outcomes, runtime, args.quick, shown, load)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({k: {"results": o.results, "error": o.error, "info": o.info}
                                         for k, o in outcomes.items()}, indent=2))
    if args.out:
        png = args.out.parent / "bench-fio.png"
        body = table + ("\n\n![fio through a loop device: throughput ratios](bench-fio.png)"
                        if plot(outcomes, png) else "")
        splice(args.out, "fio", body)
        print(f"written to {args.out}" + (f" and {png}" if png.exists() else ""))
    return 0 if outcomes and all(o.error is None for k, o in outcomes.items() if k != "C") else 1


if __name__ == "__main__":
    raise SystemExit(main())
