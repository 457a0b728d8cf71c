"""debootstrap benchmark: a Debian minbase install (dpkg, with its many fsyncs) into ext4 on a loop device.

Each case is a fresh 4 GiB image, attached with ``losetup --direct-io=on``, ``mkfs.ext4`` (inode
tables and journal written out at mkfs time, so no lazy init runs during the measurement),
mounted, then ``debootstrap --variant=minbase --unpack-tarball=TARBALL bookworm DIR`` (timed), a
``syncfs`` of the mount (timed) and ``umount`` (timed), and ``e2fsck -fn`` on the loop device to
show the filesystem is clean. Cases:

* **A**: a plain sparse file in ``--dir`` (default /var/tmp).
* **C**: the primary's image of fresh ``marsfs serve`` nodes (from
  :class:`marsfs.testing.harness.Harness`, mutual TLS on loopback) with a synced mirror following;
  after the umount the mirror must reach synced (``marsfs wait VOL --synced``: how long after
  debootstrap ended is reported) and its image, attached read-only, must pass ``e2fsck -fn`` too.
* **C0** (``--alone``): the same primary without a mirror, after each C.

Runs alternate A, C, A, C, ..., A (``--repeat`` C runs, each between two A runs; fresh nodes every
time); the ratio C/A is each C run against the mean of its A neighbours, and the median of those
is the result (the issue's target: at most 1.2), reported, never asserted. The daemons' CPU time
during debootstrap is recorded too (robust to load, unlike wall clock).

The tarball (``debootstrap --make-tarball``) is made once and cached under
/var/tmp/marsfs-bench-cache/ (``--refresh`` makes it again), so that later runs need no network.
The Debian mirror comes from this machine's apt sources (or ``--mirror URL``).

Usage: ``scripts/bench debootstrap [--repeat N] [--alone] [--mirror URL] [--refresh] [--dir DIR]
[--out docs/benchmarks.md] [--json FILE]`` (needs root, debootstrap, losetup, mkfs.ext4, e2fsck).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# scripts/ is on sys.path: this file runs as a script
from benchlib import Neighbours, exit_on_sigterm, pair, pair_ratios, shown_args, splice
from marsfs.faces.control import call
from marsfs.testing.harness import Harness, NodeProcess, run

SUITE = "bookworm"
VOLUME = "vm"
SIZE = "4G"
CACHE = Path("/var/tmp/marsfs-bench-cache")
SYNC_TIMEOUT = 900
DEBOOTSTRAP_TIMEOUT = 3600
TARGET = 1.2
KINDS = {"plain": "A plain file", "mirror": "C marsfs primary, mirror following", "alone": "C0 marsfs primary, no mirror"}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- apt sources


def deb822_mirrors(text: str, suite: str) -> list[str]:
    """The ``URIs:`` of the ``deb`` stanzas of a deb822 ``.sources`` file that list ``suite``."""
    out: list[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace() and key:  # a continuation line
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
            out += fields.get("uris", "").split()
    return out


def one_line_mirrors(text: str, suite: str) -> list[str]:
    """The URIs of the ``deb`` lines of a one-line-style ``sources.list`` that name ``suite``."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        line = re.sub(r"\[[^\]]*\]", " ", line)  # [arch=... signed-by=...]
        words = line.split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            out.append(words[1])
    return out


def apt_mirror(suite: str = SUITE, etc: Path = Path("/etc/apt")) -> str | None:
    """The first Debian mirror this machine's apt uses for ``suite``, or None."""
    found: list[str] = []
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        found += deb822_mirrors(f.read_text(errors="replace"), suite)
    for f in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        if f.exists():
            found += one_line_mirrors(f.read_text(errors="replace"), suite)
    return found[0] if found else None


def tarball(mirror: str, refresh: bool, work: Path) -> Path:
    """The cached ``debootstrap --make-tarball`` of minbase (made now if missing or ``refresh``)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{SUITE}-minbase.tgz"
    if path.exists() and not refresh:
        return path
    say(f"== making the {SUITE} minbase tarball (once; cached at {path})")
    part = path.with_suffix(".part")
    part.unlink(missing_ok=True)
    target = Path(tempfile.mkdtemp(prefix="make-tarball-", dir=work))
    try:
        run(["debootstrap", "--variant=minbase", f"--make-tarball={part}", SUITE, os.fspath(target), mirror],
            timeout=DEBOOTSTRAP_TIMEOUT)
        part.replace(path)
    finally:
        shutil.rmtree(target, ignore_errors=True)
        part.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------- one case


@dataclass
class Result:
    kind: str
    debootstrap_s: float | None = None
    syncfs_s: float | None = None
    umount_s: float | None = None
    synced_after_s: float | None = None  #: mirror synced, seconds after debootstrap ended
    fsck: str = ""
    mirror_fsck: str = ""
    cpu_primary_s: float | None = None  #: the primary daemon's CPU time during debootstrap + syncfs + umount
    cpu_mirror_s: float | None = None
    log_MB: float | None = None  #: what the primary's log grew by during debootstrap + syncfs + umount
    load: float = 0.0
    error: str | None = None

    @property
    def total_s(self) -> float | None:
        if self.debootstrap_s is None or self.syncfs_s is None or self.umount_s is None:
            return None
        return self.debootstrap_s + self.syncfs_s + self.umount_s


def cpu_s(node: NodeProcess | None) -> float:
    """User + system CPU seconds of a daemon process so far (all its threads)."""
    if node is None or node.pid is None:
        return 0.0
    fields = Path(f"/proc/{node.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_bytes(node: NodeProcess | None) -> int:
    """How many bytes the volume's log on ``node`` holds (its status row)."""
    if node is None:
        return 0
    return int(call(node.state, "status", timeout=30, volume=VOLUME)[0]["log_bytes"])


def umount_below(where: Path) -> None:
    """Unmount what a failed debootstrap left mounted inside the target (proc, sys), deepest first."""
    prefix = os.fspath(where) + "/"
    with open("/proc/self/mountinfo") as f:
        inside = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    for m in sorted(inside, key=len, reverse=True):
        if run(["umount", m], check=False).returncode != 0:
            run(["umount", "-l", m], check=False)


def fsck(dev: str) -> str:
    r = run(["e2fsck", "-fn", dev], check=False, timeout=600)
    return "clean" if r.returncode == 0 else f"e2fsck exited {r.returncode}: {(r.stdout + r.stderr).strip()[-300:]}"


def settle() -> None:
    """Let the previous run's dirty pages (its image, its removed directory) reach the disk first."""
    os.sync()
    time.sleep(2)


def debootstrap(tar: Path, target: Path, mirror: str, log: Path) -> int:
    """Run the measured debootstrap in its own process group, its output in ``log``; on a timeout
    or an interruption (SIGTERM) the whole group goes (dpkg in the chroot too, which would keep
    the target busy), so that the target can be unmounted."""
    with open(log, "w") as out:
        proc = subprocess.Popen(["debootstrap", "--variant=minbase", f"--unpack-tarball={tar}", SUITE,
                                 os.fspath(target), mirror], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C"}, start_new_session=True)
        try:
            return proc.wait(DEBOOTSTRAP_TIMEOUT)
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group of our child: its pid is the group's id
            except ProcessLookupError:
                pass
            proc.wait()
            raise


def measure(work: Path, kind: str, tar: Path, mirror: str) -> Result:
    res = Result(kind, load=os.getloadavg()[0])
    root = Path(tempfile.mkdtemp(prefix=f"deboot-{kind}-", dir=work))
    target = root / "target"
    try:
        with Harness(root) as h:
            a = b = None
            if kind == "plain":
                image = root / "plain.img"
                with open(image, "wb") as f:
                    f.truncate(4 << 30)
            elif kind == "mirror":
                a, b = pair(h, VOLUME, SIZE)
                image = a.image(VOLUME)
            else:
                a = h.cluster(["a"])["a"]
                a.cli("create", VOLUME, "--size", SIZE)
                image = a.image(VOLUME)
            dev = h.attach(image)
            run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev], timeout=600)
            h.mount_fs(dev, target)
            try:
                settle()
                if b is not None:
                    r = b.cli("wait", VOLUME, "--synced", "--timeout", str(SYNC_TIMEOUT), check=False,
                              timeout=SYNC_TIMEOUT + 60)
                    if r.returncode != 0:
                        raise RuntimeError(f"mirror not synced after mkfs: {r.stderr.strip()}")
                c0a, c0b, l0 = cpu_s(a), cpu_s(b), log_bytes(a)
                t0 = time.monotonic()
                log = root / "debootstrap.log"
                rc = debootstrap(tar, target, mirror, log)
                t1 = time.monotonic()
                if rc != 0:
                    tail = "\n    ".join(log.read_text(errors="replace").splitlines()[-15:])
                    raise RuntimeError(f"debootstrap exited {rc}:\n    {tail}")
                res.debootstrap_s = t1 - t0
                run(["sync", "-f", os.fspath(target)], timeout=600)
                t2 = time.monotonic()
                res.syncfs_s = t2 - t1
            finally:
                umount_below(target)
            t2 = time.monotonic()
            h.umount_fs(target)
            res.umount_s = time.monotonic() - t2
            if a is not None:
                res.cpu_primary_s = cpu_s(a) - c0a
                res.log_MB = (log_bytes(a) - l0) / 1e6
            if b is not None:
                res.cpu_mirror_s = cpu_s(b) - c0b
                r = b.cli("wait", VOLUME, "--synced", "--timeout", str(SYNC_TIMEOUT), check=False,
                          timeout=SYNC_TIMEOUT + 60)
                if r.returncode != 0:
                    raise RuntimeError(f"mirror not synced {SYNC_TIMEOUT} s after the umount: {r.stderr.strip()}")
                res.synced_after_s = time.monotonic() - t1
            res.fsck = fsck(dev)
            h.detach(dev)
            if b is not None:
                mdev = h.attach(b.image(VOLUME), read_only=True)
                res.mirror_fsck = fsck(mdev)
                h.detach(mdev)
            if bugs := h.bug_lines():
                raise RuntimeError("daemon log shows a bug: " + bugs[0][:500])
        say(f"  debootstrap {res.debootstrap_s:.1f} s, syncfs {res.syncfs_s:.2f} s, umount {res.umount_s:.2f} s; "
            f"e2fsck: {res.fsck}"
            + (f"; mirror synced {res.synced_after_s:.1f} s after debootstrap ended, its e2fsck: {res.mirror_fsck}"
               if res.synced_after_s is not None else "")
            + (f"; daemon CPU {res.cpu_primary_s:.1f} s" if res.cpu_primary_s is not None else "")
            + (f" for {res.log_MB:.0f} MB of log" if res.log_MB is not None else "")
            + (f" (mirror {res.cpu_mirror_s:.1f} s)" if res.cpu_mirror_s is not None else ""))
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
        say(f"  failed: {res.error}")
        for logf in sorted(root.glob("*/daemon.log")):
            say(f"  --- {logf.parent.name}/daemon.log\n    "
                + "\n    ".join(logf.read_text(errors="replace").splitlines()[-30:]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return res


def order(repeat: int, alone: bool) -> list[str]:
    """A, C, (C0,) A, C, (C0,) ..., A: every C run has an A run on each side."""
    return ["plain"] + (["mirror", "alone", "plain"] if alone else ["mirror", "plain"]) * repeat


# ---------------------------------------------------------------------------------------------- report


def _n(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def ratios(results: list[Result], kind: str, total: bool = False) -> list[float]:
    """Each ``kind`` run's time against the mean of its A neighbours (debootstrap alone, or with syncfs+umount)."""
    return pair_ratios([(r.kind, r.total_s if total else r.debootstrap_s) for r in results], kind, "plain")


def report(results: list[Result], argv: list[str], load: float, neighbours: list[str], tar: Path) -> str:
    version = run(["debootstrap", "--version"], check=False).stdout.strip()
    lines = [
        f"Run: `scripts/bench debootstrap{' ' + shlex.join(argv) if argv else ''}` — {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, kernel {platform.release()}, {version}, Python {platform.python_version()}; "
        f"load average {load:.1f} at the start; "
        + (f"**disturbed: {len(neighbours)} other marsfs/fio/pytest processes ran meanwhile**."
           if neighbours else "no other marsfs, fio or pytest process ran meanwhile."),
        "",
        f"`debootstrap --variant=minbase --unpack-tarball` of {SUITE} ({tar.stat().st_size / 1e6:.0f} MB tarball, "
        "made once with `--make-tarball`, so no network) into ext4 on a fresh 4 GiB image, attached with "
        "`losetup --direct-io=on`; mkfs writes the inode tables and journal up front. Runs alternate, fresh nodes "
        "each time; C is the primary of two `marsfs serve` nodes on loopback (mutual TLS) with a synced mirror "
        "following.",
        "",
        "| # | case | load at start | debootstrap, s | syncfs, s | umount, s | daemon CPU, s (mirror) | "
        "log written, MB | mirror synced after debootstrap, s | e2fsck (mirror's) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n, r in enumerate(results, 1):
        if r.error:
            lines.append(f"| {n} | {KINDS[r.kind]} | {r.load:.1f} | failed: {' '.join(r.error.split())[:300]} "
                         "| | | | | | |")
            continue
        cpu = "" if r.cpu_primary_s is None else _n(r.cpu_primary_s) + (
            f" ({_n(r.cpu_mirror_s)})" if r.cpu_mirror_s is not None else "")
        fs = r.fsck + (f" ({r.mirror_fsck})" if r.mirror_fsck else "")
        lines.append(f"| {n} | {KINDS[r.kind]} | {r.load:.1f} | {_n(r.debootstrap_s)} | {_n(r.syncfs_s, 2)} | "
                     f"{_n(r.umount_s, 2)} | {cpu} | {'' if r.log_MB is None else _n(r.log_MB, 0)} | "
                     f"{_n(r.synced_after_s)} | {fs} |")
    for kind in ("mirror", "alone"):
        pr, pt = ratios(results, kind), ratios(results, kind, total=True)
        if pr:
            lines += ["", f"{KINDS[kind]} ÷ A plain file, debootstrap time: **{statistics.median(pr):.2f}** (median; "
                          f"each run against the mean of its A neighbours: {', '.join(f'{x:.2f}' for x in pr)}); "
                          f"with syncfs and umount: {statistics.median(pt):.2f} "
                          f"({', '.join(f'{x:.2f}' for x in pt)})."
                          + (f" Target: ≤ {TARGET}; reported, not asserted." if kind == "mirror" else "")]
    per = {k: [r.cpu_primary_s / r.log_MB for r in results if r.kind == k and not r.error and r.cpu_primary_s
               is not None and r.log_MB] for k in ("mirror", "alone")}
    if per["mirror"]:
        mirror_cpu = [r.cpu_mirror_s / r.log_MB for r in results if r.kind == "mirror" and not r.error
                      and r.cpu_mirror_s is not None and r.log_MB]
        lines += ["", f"The primary's CPU per MB of log (robust to load, unlike the times): "
                      f"{statistics.median(per['mirror']) * 1000:.0f} ms with a mirror following"
                      + (f", {statistics.median(per['alone']) * 1000:.0f} ms without" if per["alone"] else "")
                      + (f"; the mirror's: {statistics.median(mirror_cpu) * 1000:.0f} ms" if mirror_cpu else "")
                      + " (medians)."]
    if neighbours:
        lines += ["", "Other processes seen: " + "; ".join(f"`{x}`" for x in sorted(neighbours)[:8])]
    return "\n".join(lines)


def summary(results: list[Result], load: float, disturbed: bool) -> str:
    """The "Targets" table's result cell."""
    pr = ratios(results, "mirror")
    if not pr:
        return "not measured (the runs failed; see debootstrap)"
    med = statistics.median(pr)
    syn = [r.synced_after_s for r in results if r.synced_after_s is not None]
    alone = ratios(results, "alone")
    return (f"{'met' if med <= TARGET else 'missed'}: {med:.2f} (runs {', '.join(f'{x:.2f}' for x in pr)}"
            + (f"; without a mirror {statistics.median(alone):.2f}" if alone else "")
            + f"; load {load:.1f}{', disturbed' if disturbed else ''}); mirror synced {min(syn):.1f}-{max(syn):.1f} s "
            "after debootstrap ended; e2fsck "
            + ("clean" if all(r.fsck == "clean" and r.mirror_fsck in ("", "clean") for r in results if not r.error)
               else "found errors") + " (see debootstrap)")


TARGET_ROW = re.compile(r"^\| debootstrap: .*$", re.M)


def target_row(doc: Path, results: list[Result], load: float, disturbed: bool) -> None:
    """Add or refresh the row of the "Targets" table at the top of ``doc``."""
    row = (f"| debootstrap: minbase into ext4 on a loop device, marsfs primary with a mirror following ≤ {TARGET}× "
           f"a plain file | workloads | {summary(results, load, disturbed)} |")
    text = doc.read_text()
    if TARGET_ROW.search(text):
        text = TARGET_ROW.sub(lambda _m: row, text, count=1)
    else:
        table = text.index("| target | from | result |")
        end = text.index("\n\n", table)
        text = text[:end] + "\n" + row + text[end:]
    doc.write_text(text)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="scripts/bench debootstrap", description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=2, metavar="N", help="C runs, each between two A runs (default 2)")
    p.add_argument("--alone", action="store_true", help="also the marsfs primary without a mirror after each C")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help="the Debian mirror for --make-tarball (default: this machine's apt sources for bookworm)")
    p.add_argument("--refresh", action="store_true", help=f"make the cached tarball in {CACHE} again")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the work directory (and A's image) goes")
    p.add_argument("--out", type=Path, default=None, help="splice the table into this markdown file")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if os.geteuid() != 0:
        print("scripts/bench debootstrap: needs root (losetup, mount, debootstrap)", file=sys.stderr)
        return 1
    for tool in ("debootstrap", "losetup", "mkfs.ext4", "e2fsck", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"scripts/bench debootstrap: {tool} not found: apt-get install debootstrap e2fsprogs fuse3",
                  file=sys.stderr)
            return 1
    mirror = args.mirror or apt_mirror()
    if mirror is None:
        print(f"scripts/bench debootstrap: no apt source for {SUITE} in /etc/apt: pass --mirror URL", file=sys.stderr)
        return 1
    exit_on_sigterm()
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="marsfs-bench-deboot-", dir=args.dir))
    results: list[Result] = []
    try:
        tar = tarball(mirror, args.refresh, work)
        with Neighbours() as neighbours:
            runs = order(args.repeat, args.alone)
            for n, kind in enumerate(runs, 1):
                say(f"== {n}/{len(runs)}: {KINDS[kind]}")
                results.append(measure(work, kind, tar, mirror))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if neighbours.seen:
        say("other processes ran meanwhile:\n  " + "\n  ".join(sorted(neighbours.seen)))
    shown = shown_args(argv, "--mirror")
    table = report(results, shown, load, sorted(neighbours.seen), tar)
    print(table)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    if args.out:
        splice(args.out, "debootstrap", "## debootstrap: a Debian install with dpkg's fsyncs\n\n" + table)
        target_row(args.out, results, load, bool(neighbours.seen))
        print(f"written to {args.out}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
