"""``scripts/demo``: the whole story on an embedded default, one sentence a step.

The default run is a three-node cluster on loopback, told with the commands an operator types:
the cluster's CA and node certificates (``marsfs cluster init``, ``cluster add-node``), three
daemons talking mutual TLS, a volume with ext4 on it through a loop device, mirrors catching up
in the status view, a mark opened read-only under ``.versions/`` and as a writable clone, a
planned handover, a forced failover after SIGKILL of the primary, the split brain its return
causes and its resolution with ``invalidate``; then it releases every mount, loop device,
process and file it made. ``--keep`` leaves the cluster running and prints how to explore it
and how to stop it (``--stop DIR``). Needs root, /dev/fuse and loop devices (scripts/demo sets
the machine up).

``--core`` runs the storage core alone, without root: create a volume, write, flush, reopen
from disk, verify every byte, open an older version, write back and verify again.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from marsfs.testing.harness import Harness, NodeProcess, is_mounted, mount_source_dev, run
from marsfs.volume import Volume

MiB = 1024 * 1024


def _pattern(rng: random.Random, n: int) -> bytes:
    """Half compressible text, half random: shows lz4 used only where it helps."""
    text = (b"marsfs demo block %d " % rng.randrange(1 << 30)) * (n // 40 + 1)
    return text[: n // 2] + rng.randbytes(n - n // 2)


def run_core(state: Path, size: int, writes: int, seed: int) -> None:
    rng = random.Random(seed)
    model = bytearray(size)
    say = print
    say(f"marsfs demo: state dir {state}")
    t0 = time.perf_counter()
    vol = Volume.create(state / "volumes" / "demo", "demo", size)
    say(f"  created volume 'demo' of {size // MiB} MiB (sparse base image, empty log)")

    for _ in range(writes):
        n = rng.choice([4096, 65536, MiB])
        off = rng.randrange(0, size - n + 1) // 512 * 512
        data = _pattern(rng, n)
        vol.write(off, data)
        model[off : off + n] = data
    first_flush = vol.flush()
    say(f"  wrote {writes} blocks of 4 KiB to 1 MiB; flush made LSN {first_flush} durable")
    older = bytes(model)
    for _ in range(writes // 4):
        off = rng.randrange(0, size // 4096) * 4096
        data = rng.randbytes(4096)
        vol.write(off, data)
        model[off : off + 4096] = data
    head = vol.flush()
    log_bytes = vol.log.end_bytes
    say(f"  wrote {writes // 4} more 4 KiB blocks, flushed at LSN {head}; log holds {log_bytes / MiB:.1f} MiB")
    vol.close()
    say("  closed the volume (as a daemon stop would)")

    vol = Volume.open(state / "volumes" / "demo")
    rep = vol.log.recovery
    say(f"  reopened: recovery verified {rep.records} records in {rep.segments} segment(s), "
        f"{rep.bytes_scanned / MiB:.1f} MiB, torn tail: {rep.torn_bytes} bytes")
    assert vol.read(0, size) == model, "image differs after restart"
    say(f"  image after restart equals what was written: sha256 {hashlib.sha256(model).hexdigest()[:16]}")
    with vol.view(first_flush) as view:
        assert view.read(0, size) == older, "historical version differs"
    say(f"  version lsn-{first_flush} (before the last {writes // 4} writes) opens read-only and is exact")
    applied = vol.writeback()
    say(f"  writeback applied LSN 1..{applied} to the base image; log now {vol.log.end_bytes / MiB:.1f} MiB")
    assert vol.read(0, size) == model, "image differs after writeback"
    vol.close()
    vol = Volume.open(state / "volumes" / "demo")
    assert vol.read(0, size) == model, "image differs after writeback and restart"
    vol.close()
    say(f"  after writeback and another restart the image is still exact ({time.perf_counter() - t0:.2f} s in all)")
    say("marsfs demo: OK")


class Story:
    """The cluster demo: real nodes, the operator's commands shown as typed, one sentence a step.

    Every ``marsfs`` verb runs as a subprocess of the real CLI with ``MARSFS_STATE`` set to the
    node's state directory, so what is printed (``b$ marsfs primary vm``) is what an operator
    types on that node; paths under the demo directory print as ``$DEMO/...``. What the story
    starts (daemons, loop devices, filesystem mounts) belongs to one :class:`Harness`, which
    releases all of it, also when a step fails.
    """

    def __init__(self, root: Path, h: Harness, size_mib: int, files: int, seed: int) -> None:
        self.root = root
        self.h = h
        self.size_mib = size_mib
        self.files = files
        self.rng = random.Random(seed)
        self.step_no = 0
        self.nodes: dict[str, NodeProcess] = {}
        self.ext: dict[str, tuple[str, Path]] = {}  #: node -> (loop device, ext4 mount) open there

    # -- printing and running --------------------------------------------------------------

    def short(self, text: str) -> str:
        return text.replace(os.fspath(self.root), "$DEMO")

    def step(self, sentence: str) -> None:
        self.step_no += 1
        print(f"\n{self.step_no:2}. {sentence}", flush=True)

    def out(self, text: str, limit: int = 40) -> None:
        lines = [ln for ln in self.short(text).rstrip("\n").splitlines()]
        if len(lines) > limit:
            lines = [*lines[:limit], f"... ({len(lines) - limit} more lines)"]
        for ln in lines:
            print(f"      {ln}")
        sys.stdout.flush()

    def marsfs(self, node: str, *args: str, check: bool = True, show: bool = True,
               timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run ``marsfs ARGS`` on ``node`` as its operator would, printing command and output."""
        if show:
            print(f"    {node}$ " + self.short(shlex.join(["marsfs", *args])), flush=True)
        env = {**os.environ, "MARSFS_STATE": os.fspath(self.nodes[node].state)} if node in self.nodes else None
        r = subprocess.run([sys.executable, "-m", "marsfs", *args], capture_output=True, text=True,
                           timeout=timeout, env=env)
        if show:
            self.out(r.stdout + r.stderr)
        if check and r.returncode != 0:
            raise DemoFailed(f"marsfs {' '.join(args)} on {node} exited {r.returncode}: "
                             f"{(r.stderr or r.stdout).strip()}")
        return r

    def shell(self, node: str, shown: str) -> None:
        """Print a command this step runs by other means (the harness, a few lines of Python)."""
        print(f"    {node}$ {self.short(shown)}", flush=True)

    def status(self, node: str, vol: str = "vm") -> dict[str, Any]:
        row: dict[str, Any] = json.loads(self.marsfs(node, "status", vol, "--json", show=False).stdout)
        return row

    def in_state(self, node: str, state: str) -> bool:
        return bool(self.status(node)["state"] == state)

    def wait_until(self, what: str, cond: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise DemoFailed(f"gave up after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)

    # -- the filesystem on the volume ------------------------------------------------------

    def open_ext4(self, node: str, *, mkfs: bool = False) -> Path:
        n = self.nodes[node]
        where = self.root / f"ext4-{node}"
        self.shell(node, f"dev=$(losetup --find --show --direct-io=on {n.image('vm')})")
        dev = self.h.attach(n.image("vm"))
        if mkfs:
            self.shell(node, 'mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$dev"')
            run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
        self.shell(node, f'mkdir -p {where} && mount "$dev" {where}')
        self.h.mount_fs(dev, where)
        self.ext[node] = (dev, where)
        return where

    def close_ext4(self, node: str) -> None:
        dev, where = self.ext.pop(node)
        self.shell(node, f'umount {where} && losetup -d "$dev"')
        self.h.umount_fs(where)
        self.h.detach(dev)

    def write_files(self, node: str, tag: str, count: int) -> dict[str, str]:
        """``count`` files of 4 KiB to 1 MiB, each fsync'd (a FLUSH record each)."""
        where = self.ext[node][1]
        sums: dict[str, str] = {}
        total = 0
        for i in range(count):
            data = _pattern(self.rng, self.rng.choice([4096, 65536, 256 * 1024, MiB]))
            p = where / f"{tag}-{i:02}.bin"
            with open(p, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            sums[p.name] = hashlib.sha256(data).hexdigest()
            total += len(data)
        fd = os.open(where, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.shell(node, f"# wrote {count} files {tag}-*.bin ({total / MiB:.1f} MiB) into {where}, each fsync'd")
        return sums

    def check_files(self, where: Path, sums: dict[str, str], what: str) -> None:
        bad = [n for n, d in sums.items()
               if not (where / n).exists() or hashlib.sha256((where / n).read_bytes()).hexdigest() != d]
        if bad:
            raise DemoFailed(f"{what}: {len(bad)} of {len(sums)} files missing or different ({bad[:3]})")
        print(f"      {len(sums)} files checked byte for byte: {what}")

    # -- the story -------------------------------------------------------------------------

    def tell(self) -> None:
        h, root = self.h, self.root
        print(f"marsfs demo in DEMO={root}; each node's commands run with MARSFS_STATE=$DEMO/NODE/state")
        names = ["a", "b", "c"]
        self.nodes = h.cluster(names, start=False)

        self.step("Make the cluster's own CA and a certificate for each node: nodes talk mutual TLS 1.3 "
                  "and refuse anyone without one.")
        ca = root / "ca"
        self.marsfs("admin", "cluster", "init", "--dir", os.fspath(ca))
        for name in names:
            self.marsfs("admin", "cluster", "add-node", name, "--ca", os.fspath(ca),
                        "--out", os.fspath(self.nodes[name].state / "tls"))

        self.step("Start three nodes on loopback, each with its own state directory, FUSE mount and port.")
        for name in names:
            n = self.nodes[name]
            self.shell(name, self.short(shlex.join(["marsfs", "serve", "--node", name, "--state", os.fspath(n.state),
                                                    "--mount", os.fspath(n.mount), *n.extra])) + " &")
            n.start()

        self.step(f"Node a creates volume vm ({self.size_mib} MiB); b and c join it as mirrors.")
        self.marsfs("a", "create", "vm", "--size", f"{self.size_mib}M")
        self.marsfs("b", "join", "vm", "--from", "a")
        self.marsfs("c", "join", "vm", "--from", "a")

        self.step("On a, ext4 goes onto the volume through a loop device and files are written while c's "
                  "fetch is paused, so c falls behind.")
        self.marsfs("b", "wait", "vm", "--synced", "--timeout", "60")
        self.marsfs("c", "wait", "vm", "--synced", "--timeout", "60")
        self.marsfs("c", "pause-fetch", "vm")
        self.open_ext4("a", mkfs=True)
        first = self.write_files("a", "first", self.files)

        self.step("The status view on a shows b following and c lagging; once c resumes it catches up "
                  "and every mirror is in sync.")
        self.marsfs("a", "status", "vm")
        self.marsfs("c", "resume-fetch", "vm")
        self.marsfs("c", "wait", "vm", "--synced", "--timeout", "60")
        self.marsfs("a", "status", "vm")

        self.step("Freeze ext4 for a consistent point, mark it v1, write more, then open v1 read-only "
                  "under .versions/ and as a writable clone: both hold exactly the first files.")
        where = self.ext["a"][1]
        self.shell("a", f"fsfreeze -f {where}")
        run(["fsfreeze", "-f", os.fspath(where)])
        try:
            self.marsfs("a", "mark", "vm", "v1")
        finally:
            self.shell("a", f"fsfreeze -u {where}")
            run(["fsfreeze", "-u", os.fspath(where)])
        second = self.write_files("a", "second", self.files)
        a = self.nodes["a"]
        v1 = a.mount / ".versions" / "vm" / "v1.img"
        ro = root / "v1-readonly"
        self.shell("a", f"dev=$(losetup --find --show --read-only {v1}); mkdir -p {ro}; mount -o ro,noload \"$dev\" {ro}")
        rodev = h.attach(v1, read_only=True)
        h.mount_fs(rodev, ro, "ro", "noload")
        self.check_files(ro, first, f"{self.short(os.fspath(v1))} has the first files")
        if any(ro.glob("second-*")):
            raise DemoFailed("version v1 shows files written after the mark")
        self.shell("a", f'umount {ro} && losetup -d "$dev"')
        h.umount_fs(ro)
        h.detach(rodev)
        self.marsfs("a", "clone", "vm@v1", "vm-v1")
        cl = root / "v1-clone"
        self.shell("a", f"dev=$(losetup --find --show {a.image('vm-v1')}); mkdir -p {cl}; mount \"$dev\" {cl}")
        cdev = h.attach(a.image("vm-v1"))
        h.mount_fs(cdev, cl)
        self.check_files(cl, first, "the clone vm-v1 has the first files, and is writable")
        (cl / "written-in-the-clone").write_text("a clone is a volume of its own\n")
        self.shell("a", f'umount {cl} && losetup -d "$dev"')
        h.umount_fs(cl)
        h.detach(cdev)
        self.marsfs("a", "delete", "vm-v1")

        self.step("Hand the primary over to b: close the image on a, run marsfs primary on b; nothing is lost.")
        self.close_ext4("a")
        self.marsfs("b", "primary", "vm")
        on_b = self.open_ext4("b")
        self.check_files(on_b, {**first, **second}, "b has every file a wrote")

        self.step("Pause fetching on a and c, write on b (those writes are only on b), then kill b's "
                  "daemon with SIGKILL and clean up its dead mount as the runbook says.")
        for m in ("a", "c"):
            self.marsfs(m, "wait", "vm", "--synced", "--timeout", "60")
        for m in ("a", "c"):
            self.marsfs(m, "pause-fetch", "vm")
        only_b = self.write_files("b", "only-on-b", max(2, self.files // 4))
        b = self.nodes["b"]
        self.shell("b", f"kill -KILL {b.pid}")
        b.kill()
        dev_b, ext_b = self.ext.pop("b")
        minor = (mount_source_dev(b.mount) or "0:?").split(":")[1]
        self.shell("b", f"echo 1 > /sys/fs/fuse/connections/{minor}/abort   # waiters get errors, not a hang")
        b.abort()
        self.shell("b", f'umount {ext_b} || umount -l {ext_b}; losetup -d "$dev"')
        h.umount_fs(ext_b)
        h.detach(dev_b)
        self.shell("b", f"fusermount3 -u {b.mount} || fusermount3 -u -z {b.mount}")
        b.unmount()

        self.step("Fail over to c with --force: it asks the other members first and says what may be lost.")
        self.marsfs("c", "primary", "vm", "--force")
        self.marsfs("a", "resume-fetch", "vm")
        self.open_ext4("c")
        self.check_files(self.ext["c"][1], {**first, **second}, "c has everything b had handed over")
        self.write_files("c", "only-on-c", max(2, self.files // 4))

        self.step("Start b again: it finds the newer epoch, refuses writes, and b and c both report "
                  "the split brain, with how much each side wrote after the fork.")
        self.shell("b", self.short(shlex.join(["marsfs", "serve", "--node", "b", "--state", os.fspath(b.state),
                                               "--mount", os.fspath(b.mount), *b.extra])) + " &")
        b.start()
        for who in ("b", "c"):
            self.wait_until(f"{who} to report the split brain", functools.partial(self.in_state, who, "split-brain"))
        self.marsfs("c", "status", "vm")

        self.step("Resolve it: keep c's side; on b, the loser (its image is closed), marsfs invalidate keeps "
                  "b's writes as a split version, whose clone gives b's files back, and resyncs b from c.")
        self.marsfs("b", "invalidate", "vm")
        self.marsfs("b", "wait", "vm", "--synced", "--timeout", "120")
        self.marsfs("a", "wait", "vm", "--synced", "--timeout", "120")
        self.wait_until("c to see the split brain resolved", lambda: not self.status("c")["split_brain"])
        versions = b.mount / ".versions" / "vm"
        self.shell("b", f"ls {versions}")
        self.out("\n".join(sorted(os.listdir(versions))))
        split = next(p.stem for p in versions.iterdir() if p.name.startswith("split-"))
        self.marsfs("b", "clone", f"vm@{split}", "vm-split")
        sp = root / "split-clone"
        self.shell("b", f"dev=$(losetup --find --show {b.image('vm-split')}); mkdir -p {sp}; "
                        f"mount \"$dev\" {sp}   # replays the journal")
        sdev = h.attach(b.image("vm-split"))
        h.mount_fs(sdev, sp)
        self.check_files(sp, only_b, "the files only b wrote are in its split version")
        self.shell("b", f'umount {sp} && losetup -d "$dev"')
        h.umount_fs(sp)
        h.detach(sdev)
        self.marsfs("b", "delete", "vm-split")
        self.marsfs("b", "discard", f"vm@{split}")
        self.marsfs("c", "status", "vm")
        self.marsfs("c", "verify", "vm")

    def explore(self) -> str:
        """What --keep prints: the commands to look around, and how to stop it all."""
        script = Path(__file__).resolve().parents[2] / "scripts" / "demo"
        me = shlex.join([os.fspath(script)] if script.exists() else [sys.executable, "-m", "marsfs.demo"])
        lines = ["", "The cluster keeps running (--keep): c is the primary of vm, a and b its mirrors. To explore it:",
                 f"  export DEMO={self.root}",
                 "  export MARSFS_STATE=$DEMO/c/state       # the node the commands ask; a and b likewise",
                 "  marsfs status                          # the cluster view; --watch refreshes it",
                 "  marsfs versions vm; marsfs status vm --json",
                 "  ls $DEMO/c/mnt $DEMO/c/mnt/.versions/vm"]
        if "c" in self.ext:
            dev, where = self.ext["c"]
            lines.append(f"  ls {self.short(os.fspath(where))}                  # ext4 on c, from {dev}")
        lines += ["  tail $DEMO/*/daemon.log",
                  "To stop it (unmount, detach the loop device, stop the daemons by pid, remove $DEMO):",
                  f"  {me} --stop {self.root}",
                  "or by hand:"]
        if "c" in self.ext:
            dev, where = self.ext["c"]
            lines.append(f"  umount {self.short(os.fspath(where))} && losetup -d {dev}")
        lines += [f"  kill -TERM {' '.join(str(n.pid) for n in self.h.nodes)}    # each unmounts its FUSE mount",
                  "  rm -rf $DEMO"]
        return "\n".join(lines)


MANIFEST = "demo.json"  #: what --keep leaves running, for --stop


class DemoFailed(Exception):
    """A step did not do what the story says; the message says which and why."""


def run_cluster(root: Path, size_mib: int, files: int, seed: int, keep: bool) -> None:
    """Tell the story; release everything unless ``keep`` (then write the manifest --stop reads)."""
    t0 = time.perf_counter()
    h = Harness(root)
    story = Story(root, h, size_mib, files, seed)
    try:
        story.tell()
    except BaseException:
        for n in h.nodes:
            print(f"--- last lines of node {n.name}'s log ---\n{n.log_tail(15)}", file=sys.stderr)
        h.close()
        raise
    if keep:
        manifest = {"nodes": [{"name": n.name, "pid": n.pid, "mount": os.fspath(n.mount)} for n in h.nodes],
                    "loops": list(h.loops), "mounts": [os.fspath(m) for m in h.mounts]}
        (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        print(story.explore())
        print(f"\nmarsfs demo: OK ({time.perf_counter() - t0:.1f} s)")
        return
    story.step("Clean up: unmount every filesystem, detach every loop device, stop the daemons by pid, "
               "remove the FUSE mounts and $DEMO.")
    if "c" in story.ext:
        story.close_ext4("c")
    for n in h.nodes:
        story.shell(n.name, f"kill -TERM {n.pid}   # a clean stop: flush, unmount, exit 0")
    h.close()
    shutil.rmtree(root)
    story.shell("admin", f"rm -rf {root}")
    print(f"\nmarsfs demo: OK ({time.perf_counter() - t0:.1f} s)")


def _backing_file(dev: str) -> str:
    try:
        return Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text().strip()
    except OSError:
        return ""


def _pid_runs_under(pid: int, root: Path) -> bool:
    """Whether ``pid`` is a live process whose command line names ``root`` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and os.fsencode(root) in cmdline


def stop(root: Path) -> None:
    """Release what ``--keep`` left running in ``root``: the reverse of the story, by its manifest.

    Only what the manifest names and what still points into ``root`` is touched: a loop device
    whose backing file lies elsewhere, or a pid that now runs something else, is left alone.
    """
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DemoFailed(f"{root} is not a directory that scripts/demo --keep left ({e}); "
                         "give the path it printed") from None
    problems: list[str] = []
    for where in reversed(manifest["mounts"]):
        if is_mounted(Path(where)) and run(["umount", where], check=False).returncode != 0:
            run(["umount", "-l", where], check=False)
        print(f"unmounted {where}")
    for dev in reversed(manifest["loops"]):
        if _backing_file(dev).startswith(os.fspath(root)):
            if run(["losetup", "-d", dev], check=False).returncode != 0:
                problems.append(f"losetup -d {dev} failed")
            else:
                print(f"detached {dev}")
    for n in manifest["nodes"]:
        pid = n["pid"]
        if pid and _pid_runs_under(pid, root):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while _pid_runs_under(pid, root) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_runs_under(pid, root):
                os.kill(pid, signal.SIGKILL)
            print(f"stopped node {n['name']} (pid {pid})")
        mount = Path(n["mount"])
        if is_mounted(mount) and run(["fusermount3", "-u", n["mount"]], check=False).returncode != 0:
            run(["fusermount3", "-u", "-z", n["mount"]], check=False)
    left = [m for m in [*manifest["mounts"], *(n["mount"] for n in manifest["nodes"])] if is_mounted(Path(m))]
    if left or problems:
        raise DemoFailed("could not release everything: " + "; ".join([*problems, *(f"{m} still mounted" for m in left)]))
    shutil.rmtree(root)
    print(f"removed {root}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/demo", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--core", action="store_true", help="the storage core alone (no FUSE, no root)")
    p.add_argument("--size", type=int, help="volume size in MiB (default 128; --core: 256)")
    p.add_argument("--writes", type=int, default=200, help="--core: number of writes (default 200)")
    p.add_argument("--files", type=int, default=12, help="files written in each batch (default 12)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true",
                   help="leave the cluster running and print how to explore and stop it (--core: keep the directory)")
    p.add_argument("--stop", type=Path, metavar="DIR", help="stop and remove what --keep left in DIR")
    args = p.parse_args(argv)
    try:
        if args.stop is not None:
            stop(args.stop)
            return 0
        state = Path(tempfile.mkdtemp(prefix="marsfs-demo-"))
        if args.core:
            try:
                run_core(state, (args.size or 256) * MiB, args.writes, args.seed)
            finally:
                if args.keep:
                    print(f"kept {state}")
                else:
                    shutil.rmtree(state, ignore_errors=True)
            return 0
        try:
            run_cluster(state, args.size or 128, args.files, args.seed, args.keep)
        except BaseException:
            shutil.rmtree(state, ignore_errors=True)
            raise
        return 0
    except DemoFailed as e:
        print(f"marsfs demo: FAILED: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a node that would not start: its log's last lines are printed above
        print(f"marsfs demo: FAILED: {str(e).splitlines()[0].rstrip(':')} (its log is above)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("marsfs demo: interrupted; everything it started is released", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
