"""Checks shared by tests and scripts that drive real nodes: file trees, hashes, waits, fsck."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pyfuse3

from marsfs.node import Node
from marsfs.testing.faultproxy import ProxyProcess
from marsfs.testing.harness import Harness, NodeProcess, run

MiB = 1 << 20
PAGE = 4096


def write_tree(root: Path, seed: int, files: int = 40) -> dict[str, str]:
    """Files of mixed sizes in a few directories, each fsync'd; returns relpath -> sha256."""
    rng = random.Random(seed)
    sums: dict[str, str] = {}
    for i in range(files):
        d = root / f"d{i % 5}"
        d.mkdir(exist_ok=True)
        size = rng.choice([0, 100, 4096, 70000, 1 << 20])
        data = rng.randbytes(size // 2) + bytes(size - size // 2)
        p = d / f"f{seed}-{i}"
        with open(p, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        sums[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    fd = os.open(root, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return sums


def check_tree(root: Path, sums: dict[str, str]) -> None:
    for rel, want in sums.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == want, rel


def fsck_clean(image: Path) -> None:
    r = run(["e2fsck", "-fn", os.fspath(image)], check=False)
    assert r.returncode == 0, f"e2fsck -fn found problems ({r.returncode}):\n{r.stdout}\n{r.stderr}"


def flush_points(node: NodeProcess, vol: str) -> int:
    versions = json.loads(node.cli("versions", vol, "--json").stdout)["versions"]
    return sum(1 for v in versions if v["kind"] == "flush")


def status(node: NodeProcess, vol: str) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(node.cli("status", vol, "--json").stdout)
    return row


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def wait_synced(node: NodeProcess, vol: str, timeout: float = 60) -> None:
    r = node.cli("wait", vol, "--synced", "--timeout", str(timeout), check=False, timeout=timeout + 30)
    assert r.returncode == 0, f"{node.name} not synced: {r.stderr}\n{node.log_tail()}"


def wait_for(cond: Any, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def write_random(image: Path, seed: int, count: int, size: int, *, fsync_every: int = 10) -> None:
    rng = random.Random(seed)
    fd = os.open(image, os.O_RDWR)
    try:
        for i in range(count):
            n = rng.choice([4096, 65536, 300_000])
            off = rng.randrange(0, size - n) // 4096 * 4096
            os.pwrite(fd, rng.randbytes(n), off)
            if i % fsync_every == 0:
                os.fsync(fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_mirror(node: Node, name: str, source: str = "x") -> None:
    """Let an in-process node treat its volume ``name`` as a mirror of ``source`` (tests of the
    faces and commands, which need a mirror's behaviour but no replication)."""
    node.set_role(name, role="mirror", source=source)
    vol = node.volume(name)
    vol.replay_limit = vol.head_lsn


def setattr_fields(**set_: bool) -> pyfuse3.SetattrFields:
    """The fields a SETATTR changes, ``size=True`` for ``update_size`` and so on: a stand-in,
    since pyfuse3 fills its read-only SetattrFields only from a kernel request."""
    names = ("update_atime", "update_ctime", "update_gid", "update_mode", "update_mtime", "update_size", "update_uid")
    return cast(pyfuse3.SetattrFields, SimpleNamespace(**{n: set_.get(n.removeprefix("update_"), False) for n in names}))


def write_synced(image: Path, offset: int, data: bytes) -> None:
    """One write into a volume image through the mount, made durable by fsync before returning."""
    fd = os.open(image, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """Known data in numbered 64 KiB slots (write i goes to slot i), fsync after each write.

    Slot ``i`` is written once, by write ``i``, in order, so the image after any prefix of the
    primary's log is: slots ``< k`` complete, slot ``k`` possibly partly written (page-wise, in
    ascending order), every later page zero. :meth:`check_prefix` asserts exactly that.
    """

    def __init__(self, image: Path, seed: int, slot: int = 64 * 1024) -> None:
        self.image, self.seed, self.slot = image, seed, slot
        self.done = 0
        self.error: BaseException | None = None
        self.crash_expected = False  #: the primary is killed on purpose: a failing write ends the writer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def payload(self, i: int) -> bytes:
        return random.Random(self.seed * 1_000_003 + i).randbytes(self.slot)

    def write(self, count: int | None, pause: float = 0.0) -> None:
        """``count`` writes (None: until :meth:`stop`), each followed by fsync and ``pause`` s."""
        fd = os.open(self.image, os.O_RDWR)
        try:
            while (count is None or count > 0) and not self._stop.is_set():
                os.pwrite(fd, self.payload(self.done), self.done * self.slot)
                os.fsync(fd)
                self.done += 1
                if count is not None:
                    count -= 1
                if pause:
                    time.sleep(pause)
        except BaseException as e:
            self.error = e
            if not self.crash_expected:
                raise
        finally:
            try:
                os.close(fd)
            except OSError:
                if not self.crash_expected:
                    raise

    def start(self, count: int | None, pause: float = 0.0) -> Writer:
        self._thread = threading.Thread(target=self.write, args=(count, pause), daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
            assert not self._thread.is_alive(), "the writer hangs"
        assert self.error is None, f"a write on the primary failed: {self.error!r}"

    def crashed(self) -> None:
        """The primary was killed under the writer (``crash_expected`` set first): wait for it
        to end; its failed last write is not a test failure."""
        assert self.crash_expected
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
            assert not self._thread.is_alive(), "the writer hangs"

    def check_prefix(self, image: Path) -> int:
        """Assert that ``image`` is the image after a prefix of the writes; returns the complete slots."""
        with open(image, "rb") as f:  # the open fixes the version; anything newer is not in it
            n = self.done + 1  # the version may hold the write in progress when it was opened
            data = f.read((n + 1) * self.slot)
        complete, gap = 0, None
        for i in range(n + 1):
            want = self.payload(i) if i < n else bytes(self.slot)
            for p in range(0, self.slot, PAGE):
                page = data[i * self.slot + p:i * self.slot + p + PAGE]
                if page == want[p:p + PAGE] and any(page):
                    assert gap is None, f"slot {i} page {p // PAGE} is written but {gap} is not: not a prefix"
                else:
                    assert not any(page), f"slot {i} page {p // PAGE} holds bytes never written there"
                    gap = gap or f"slot {i} page {p // PAGE}"
            if gap is None:
                complete = i + 1
        return complete


def proxied_pair(harness: Harness, proxy: ProxyProcess, *, extra_a: list[str] | None = None,
                 insecure: bool = False) -> tuple[NodeProcess, NodeProcess]:
    """Nodes ``a`` and ``b``; ``b`` reaches ``a`` through ``proxy`` (started here, towards a's
    port); ``extra_a``: more ``serve`` arguments for ``a``. Mutual TLS (the proxy forwards its
    bytes), or plain TCP with ``insecure``."""
    nodes = harness.cluster(["a", "b"], start=False)
    a, b = nodes["a"], nodes["b"]
    a.extra += extra_a or []
    if insecure:
        a.extra.append("--insecure")
        b.extra.append("--insecure")
    a.start()
    port = proxy.start(harness.ports["a"])
    i = b.extra.index(f"a=127.0.0.1:{harness.ports['a']}")
    b.extra[i] = f"a=127.0.0.1:{port}"
    b.start()
    return a, b


def converge(a: NodeProcess, b: NodeProcess, vol: str = "vm", timeout: float = 90) -> int:
    """Writes have stopped and the link is clear: the mirror must reach the primary's durable LSN.

    ``marsfs wait --synced`` is used, but not trusted alone: behind a slow link it can return
    early (t4_replication_faults shows it), so LSNs are compared as well.
    """
    wait_for(lambda: (s := status(a, vol))["durable_lsn"] == s["head_lsn"], what="the primary's log to be durable")
    head = int(status(a, vol)["durable_lsn"])
    wait_synced(b, vol, timeout=timeout)
    wait_for(lambda: (s := status(b, vol))["fetched_lsn"] == s["replayed_lsn"] == head, timeout=timeout,
             what=f"{b.name} to fetch and replay up to LSN {head}")
    return head
