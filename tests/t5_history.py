"""History through real daemons and mounts: ``.versions/<vol>/`` read by the kernel, on the
primary and on a mirror, ext4 mounted from versions, time names, and a SIGKILL in between."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from marsfs.testing.checks import check_tree, sha, status, wait_synced, write_tree
from marsfs.testing.harness import Harness, NodeProcess, run
from marsfs.volume.versions import format_time_ns

KiB = 1 << 10
MiB = 1 << 20


def version(node: NodeProcess, vol: str, name: str) -> Path:
    return node.mount / ".versions" / vol / f"{name}.img"


def versions(node: NodeProcess, vol: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(node.cli("versions", vol, "--json").stdout)
    return out


def test_model_200_random_versions_on_primary_and_mirror(harness: Harness) -> None:
    """Every write is one record (O_DIRECT: the kernel sends each pwrite as one FUSE write), so the
    model knows the LSN of every write and flush and the image at any LSN."""
    size = 4 * MiB
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "4M")
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    lsn = status(a, "vm")["head_lsn"]
    first = lsn
    rng = random.Random(9)
    ops: list[tuple[int, int, bytes] | None] = []  # per LSN after ``first``: a write, or None (a FLUSH)
    buf = mmap.mmap(-1, 16 * KiB)  # O_DIRECT wants aligned buffers
    fd = os.open(a.image("vm"), os.O_RDWR | os.O_DIRECT)
    try:
        for _ in range(400):
            n = rng.choice([4, 8, 12, 16]) * KiB
            off = rng.randrange(0, (size - n) // (4 * KiB)) * 4 * KiB
            data = rng.randbytes(n)
            buf[:n] = data
            assert os.pwrite(fd, memoryview(buf)[:n], off) == n
            ops.append((off, n, data))
            if rng.random() < 0.1:
                os.fsync(fd)
                ops.append(None)
        os.fsync(fd)
        ops.append(None)
    finally:
        os.close(fd)
        buf.close()
    head = first + len(ops)
    assert status(a, "vm")["head_lsn"] == head, "each pwrite should have become exactly one record"
    wait_synced(b, "vm")
    assert status(b, "vm")["replayed_lsn"] == head
    picks = sorted(rng.sample(range(first, head + 1), 200))
    models: dict[int, str] = {}
    image = bytearray(size)
    at = first
    for want in picks:
        while at < want:
            op = ops[at - first]
            if op is not None:
                image[op[0] : op[0] + op[1]] = op[2]
            at += 1
        models[want] = hashlib.sha256(image).hexdigest()
    for node in (a, b):
        for want in picks:
            assert sha(version(node, "vm", f"lsn-{want}")) == models[want], f"{node.name}: lsn-{want}"
    oldest = versions(b, "vm")["oldest_lsn"]
    assert oldest <= first  # the mirror's history starts where its image copy was taken
    with pytest.raises(FileNotFoundError):
        os.stat(version(a, "vm", f"lsn-{head + 1}"))
    with pytest.raises(OSError) as e:
        os.open(version(a, "vm", f"lsn-{head}"), os.O_RDWR)
    assert e.value.errno == errno.EROFS


def _round(ext: Path, k: int, state: dict[str, str], rng: random.Random) -> None:
    """Change the tree: new files, one rewritten, one deleted; ``state`` is what it holds after."""
    state.update(write_tree(ext, seed=k, files=6))
    old = sorted(state)
    rewrite, delete = rng.sample(old, 2)
    data = rng.randbytes(rng.choice([100, 5000, 200_000]))
    (ext / rewrite).write_bytes(data)
    state[rewrite] = hashlib.sha256(data).hexdigest()
    (ext / delete).unlink()
    del state[delete]


def _check_exactly(root: Path, state: dict[str, str]) -> None:
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert files == set(state), (files ^ set(state))
    check_tree(root, state)


def test_ext4_marks_mount_read_only_and_stay_while_the_primary_writes(harness: Harness, tmp_path: Path) -> None:
    """A short window (1 MiB of log): writeback runs all the time, up to the oldest mounted
    version, which keeps its files; once released, it leaves the window."""
    a = harness.node("a", extra=["--history", "1M"])
    a.cli("create", "vm", "--size", "64M")
    dev = harness.attach(a.image("vm"))
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
    ext = harness.mount_fs(dev, tmp_path / "ext")
    rng = random.Random(5)
    state: dict[str, str] = {}
    mounted: dict[str, tuple[str, Path, dict[str, str]]] = {}
    for k in range(1, 5):
        _round(ext, k, state, rng)
        # freeze: everything synced and the journal checkpointed, so the version mounts with noload
        run(["fsfreeze", "-f", os.fspath(ext)])
        try:
            mark = f"round{k}"
            a.cli("mark", "vm", mark)
        finally:
            run(["fsfreeze", "-u", os.fspath(ext)])
        vdev = harness.attach(version(a, "vm", mark), read_only=True)
        vmnt = harness.mount_fs(vdev, tmp_path / f"v-{mark}", "ro", "noload")
        mounted[mark] = (vdev, vmnt, dict(state))
        _check_exactly(vmnt, state)
    for k in range(3):  # the primary writes on; maintenance runs once a second
        _round(ext, 10 + k, state, rng)
        os.sync()
    first = next(iter(mounted))
    mark_lsn = {v["name"]: v["lsn"] for v in versions(a, "vm")["versions"] if v["kind"] == "mark"}
    time.sleep(1.5)
    assert status(a, "vm")["applied_lsn"] == mark_lsn[first]  # written back up to the oldest open version
    for _, vmnt, want in mounted.values():
        _check_exactly(vmnt, want)
    for vdev, vmnt, _ in mounted.values():
        harness.umount_fs(vmnt)
        harness.detach(vdev)
    harness.umount_fs(ext)
    harness.detach(dev)
    deadline = time.monotonic() + 10
    while status(a, "vm")["oldest_version_lsn"] <= mark_lsn[first] and time.monotonic() < deadline:
        time.sleep(0.2)
    oldest = status(a, "vm")["oldest_version_lsn"]
    assert oldest > mark_lsn[first]
    with pytest.raises(FileNotFoundError):
        os.stat(version(a, "vm", first))
    assert f"oldest available: lsn-{oldest}" in a.cli("versions", "vm").stdout


def test_time_names_are_the_newest_flush_before(harness: Harness) -> None:
    a = harness.node("a")
    a.cli("create", "vm", "--size", "1M")
    fd = os.open(a.image("vm"), os.O_RDWR)
    try:
        for i in range(6):
            os.pwrite(fd, bytes([65 + i]) * 4096, 0)
            os.fsync(fd)
            time.sleep(0.05)
    finally:
        os.close(fd)
    flushes = [v for v in versions(a, "vm")["versions"] if v["kind"] == "flush"]
    assert len(flushes) == 6
    for i, (f, g) in enumerate(zip(flushes, flushes[1:])):
        t = (f["timestamp_ns"] + g["timestamp_ns"]) // 2
        by_time = version(a, "vm", format_time_ns(t))
        by_lsn = version(a, "vm", f"lsn-{f['lsn']}")
        assert os.stat(by_time).st_ino == os.stat(by_lsn).st_ino
        assert by_time.read_bytes()[:4096] == bytes([65 + i]) * 4096
        assert sha(by_time) == sha(by_lsn)
    whole = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(flushes[-1]["timestamp_ns"] // 10**9 + 1))
    assert os.stat(version(a, "vm", whole)).st_ino == os.stat(version(a, "vm", f"lsn-{flushes[-1]['lsn']}")).st_ino
    early = format_time_ns(flushes[0]["timestamp_ns"] - 1)
    with pytest.raises(FileNotFoundError):
        os.stat(version(a, "vm", early))


def test_versions_survive_sigkill_and_restart(harness: Harness) -> None:
    a = harness.node("a", extra=["--history", "64M", "--history", "24h"])
    a.cli("create", "vm", "--size", "8M")
    fd = os.open(a.image("vm"), os.O_RDWR)
    rng = random.Random(3)
    try:
        for k in range(5):
            for _ in range(20):
                os.pwrite(fd, rng.randbytes(8192), rng.randrange(0, 1000) * 8192)
            os.fsync(fd)
            a.cli("mark", "vm", f"m{k}")
        os.pwrite(fd, b"unsynced" * 512, 0)  # may be lost: not part of any version named below
    finally:
        os.close(fd)
    info = versions(a, "vm")
    assert "history window: 64.0 MiB or 1d" in a.cli("versions", "vm").stdout
    st = status(a, "vm")
    assert st["history"] == "64.0 MiB or 1d" and st["oldest_version_lsn"] == 0
    flushes = [v for v in info["versions"] if v["kind"] == "flush"]
    names = [f"m{k}" for k in range(5)] + [f"lsn-{v['lsn']}" for v in flushes]
    names.append(format_time_ns(flushes[2]["timestamp_ns"] + 1))
    before = {n: sha(version(a, "vm", n)) for n in names}
    listed = sorted(os.listdir(a.mount / ".versions" / "vm"))
    a.kill()
    a.abort()
    a.unmount()
    a.start()
    assert {n: sha(version(a, "vm", n)) for n in names} == before
    assert sorted(os.listdir(a.mount / ".versions" / "vm")) == listed
    assert os.listdir(a.mount / ".versions") == ["vm"]
    assert sorted(os.listdir(a.mount)) == ["vm.img"]  # .versions is looked up, not listed
