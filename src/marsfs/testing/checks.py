"""Checks shared by tests and scripts that drive real nodes: file trees, hashes, waits, fsck."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from marsfs.node import Node
from marsfs.testing.harness import NodeProcess, run

MiB = 1 << 20


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
    vol.visible_lsn = vol.head_lsn


def write_synced(image: Path, offset: int, data: bytes) -> None:
    """One write into a volume image through the mount, made durable by fsync before returning."""
    fd = os.open(image, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
