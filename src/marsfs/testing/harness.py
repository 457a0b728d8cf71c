"""Run real marsfs nodes, loop devices and filesystems, and always clean them up.

A :class:`Harness` owns everything a test (or a script) starts: daemon processes, loop devices,
filesystem mounts. :meth:`Harness.close` releases them in the order the kernel needs
(a FUSE mount under a busy loop device cannot go first): unmount filesystems on loop devices, detach the loops, stop the daemons by pid
(SIGTERM, then SIGKILL), and unmount FUSE (``fusermount3 -u``, lazily as a fallback). Nothing
is ever killed or detached by name; only what this harness started is touched.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: What only a bug writes into a daemon's log (see :meth:`Harness.bug_lines`).
BUG_LINE = re.compile(r"Traceback \(most recent call last\)|unexpected error|internal error| CRITICAL ")
#: how a daemon's log line starts (what is not one continues the line before: a traceback)
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "8388608", "MALLOC_TRIM_THRESHOLD_": "268435456"}


def run(cmd: list[str], *, check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; a failure raises with its stderr in the message."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def mount_source_dev(mount: Path) -> str | None:
    """``major:minor`` of what is mounted at ``mount`` (from mountinfo; works on dead FUSE mounts)."""
    target = os.fspath(mount)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == target:
                return parts[2]
    return None


def is_mounted(mount: Path) -> bool:
    return mount_source_dev(mount) is not None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeProcess:
    """One ``marsfs serve`` child process with its own state dir, mount point and log file."""

    def __init__(self, root: Path, name: str, *, extra: list[str] | None = None, certificates: bool = True,
                 ca_root: Path | None = None, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:
        """``certificates``: before each start, issue this node a certificate of the cluster CA
        in ``ca_root/ca-CLUSTER`` (default ``root``; made once) into ``STATE/tls`` unless it
        has one, the daemon runs ``--insecure`` or is given its own ``--tls-dir``; so every
        node of a test talks TLS to its peers, as a deployed one does."""
        self.name = name
        self.ca_root = ca_root if ca_root is not None else root
        self.certificates = certificates
        self.dir = root / name
        self.state = self.dir / "state"
        self.mount = self.dir / "mnt"
        self.logfile = self.dir / "daemon.log"
        self.extra = extra or []
        self.env = env or {}  #: added to the daemon's environment (NOTIFY_SOCKET, say)
        self.prefix = prefix or []  #: a command that runs the daemon (setpriv with a unit's restrictions, say)
        self.proc: subprocess.Popen[bytes] | None = None
        self.mount.mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def image(self, volume: str) -> Path:
        return self.mount / f"{volume}.img"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def issue_certificate(self) -> None:
        """Give this node a certificate of the harness's CA for its ``--cluster`` (see __init__)."""
        from marsfs.node.cluster import DEFAULT_CLUSTER
        from marsfs.node.tls import CA_CERT, NODE_KEY, TLS_DIR, add_node, init_ca

        if "--insecure" in self.extra or "--tls-dir" in self.extra or (self.state / TLS_DIR / NODE_KEY).exists():
            return
        cluster = self.extra[self.extra.index("--cluster") + 1] if "--cluster" in self.extra else DEFAULT_CLUSTER
        ca = self.ca_root / f"ca-{cluster}"
        if not (ca / CA_CERT).exists():
            init_ca(ca, cluster)
        add_node(ca, self.name, self.state / TLS_DIR)

    def start(self, timeout: float = 30) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if self.certificates:
            self.issue_certificate()
        cmd = [*self.prefix, sys.executable, "-m", "marsfs", "serve", "--node", self.name,
               "--state", os.fspath(self.state), "--mount", os.fspath(self.mount), *self.extra]
        logf = open(self.logfile, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **MALLOC_ENV, **self.env})
        finally:
            logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"marsfs serve {self.name} exited {self.proc.returncode} during start:\n"
                                   + self.log_tail())
            if is_mounted(self.mount) and self.cli("status", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"marsfs serve {self.name} did not come up within {timeout} s:\n" + self.log_tail())

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, "-m", "marsfs", "--state", os.fspath(self.state), *args],
                   check=check, timeout=timeout)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: a crash. The FUSE mount stays behind, dead, until :meth:`abort` and unmount."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def abort(self) -> None:
        """Abort a dead daemon's FUSE connection, so that waiters get errors instead of hanging."""
        dev = mount_source_dev(self.mount)
        if dev is None:
            return
        conn = Path("/sys/fs/fuse/connections") / dev.split(":")[1] / "abort"
        if not conn.parent.exists():
            run(["mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"], check=False)
        try:
            conn.write_text("1")
        except OSError:
            pass

    def unmount(self) -> None:
        if is_mounted(self.mount):
            if run(["fusermount3", "-u", os.fspath(self.mount)], check=False).returncode != 0:
                run(["fusermount3", "-u", "-z", os.fspath(self.mount)], check=False)


class Harness:
    """Owns nodes, loop devices and filesystem mounts; :meth:`close` releases all of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[NodeProcess] = []
        self.loops: list[str] = []
        self.mounts: list[Path] = []
        self.ports: dict[str, int] = {}

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def node(self, name: str, *, start: bool = True, extra: list[str] | None = None) -> NodeProcess:
        n = NodeProcess(self.root, name, extra=extra)
        self.nodes.append(n)
        if start:
            n.start()
        return n

    def cluster(self, names: list[str], *, via: dict[tuple[str, str], int] | None = None,
                start: bool = True) -> dict[str, NodeProcess]:
        """Nodes that know each other: each listens on a free port and has all others as peers.

        ``via[(a, b)] = port`` makes node ``a`` reach node ``b`` at ``port`` instead (a fault proxy).
        """
        ports = {n: free_port() for n in names}
        nodes: dict[str, NodeProcess] = {}
        for n in names:
            extra = ["--listen", f"127.0.0.1:{ports[n]}"]
            for m in names:
                if m != n:
                    port = (via or {}).get((n, m), ports[m])
                    extra += ["--peer", f"{m}=127.0.0.1:{port}"]
            nodes[n] = self.node(n, start=start, extra=extra)
        self.ports = ports
        return nodes

    def attach(self, image: Path, *, direct_io: bool = True, read_only: bool = False) -> str:
        cmd = ["losetup", "--find", "--show"]
        if direct_io:
            cmd.append("--direct-io=on")
        if read_only:
            cmd.append("--read-only")
        dev = run([*cmd, os.fspath(image)]).stdout.strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev: str) -> None:
        if dev in self.loops:
            self.loops.remove(dev)
        for _ in range(50):
            if run(["losetup", "-d", dev], check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"could not detach {dev}")

    def mount_fs(self, dev: str, where: Path, *options: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        cmd = ["mount", dev, os.fspath(where)]
        if options:
            cmd[1:1] = ["-o", ",".join(options)]
        run(cmd)
        self.mounts.append(where)
        return where

    def umount_fs(self, where: Path) -> None:
        if where in self.mounts:
            self.mounts.remove(where)
        if run(["umount", os.fspath(where)], check=False).returncode != 0:
            run(["umount", "-l", os.fspath(where)], check=False)

    def bug_lines(self) -> list[str]:
        """Lines of the daemons' logs that only a bug in marsfs writes: tracebacks, handler
        failures that became EIO, internal errors of control commands. A test fails on them
        unless it says it expects them (``@pytest.mark.allow_log``)."""
        out: list[str] = []
        for n in self.nodes:
            try:
                text = n.logfile.read_text(errors="replace")
            except FileNotFoundError:
                continue
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if not BUG_LINE.search(line):
                    continue
                if line.startswith("Traceback"):  # the whole traceback, up to the next log line
                    end = next((j for j in range(i + 1, len(lines)) if LOG_LINE.match(lines[j])), len(lines))
                    line = "\n    ".join(lines[i:end])
                out.append(f"{n.name}: {line}")
        return out

    def close(self) -> None:
        """Release everything, also after failures; raise at the end if something resisted."""
        problems: list[str] = []
        for where in reversed(list(self.mounts)):
            try:
                self.umount_fs(where)
            except Exception as e:  # keep going: the rest must still be released
                problems.append(f"umount {where}: {e}")
        for dev in reversed(list(self.loops)):
            try:
                self.detach(dev)
            except Exception as e:
                problems.append(f"losetup -d {dev}: {e}")
        for n in self.nodes:
            try:
                if n.proc is not None and n.proc.poll() is None:
                    n.stop()
                else:
                    n.abort()
                n.unmount()
            except Exception as e:
                problems.append(f"node {n.name}: {e}")
        if problems:
            raise RuntimeError("cleanup incomplete: " + "; ".join(problems))
