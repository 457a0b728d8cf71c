"""Clones through real daemons, loop devices and ext4: every mark of a changing file tree
cloned, its journal replayed, fsck'd and mounted, on the primary and on a mirror while the
primary writes on; clones across a SIGKILL of the daemon."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

from marsfs.testing.checks import check_tree, fsck_clean, sha, status, wait_for, wait_synced, write_tree
from marsfs.testing.harness import Harness, NodeProcess, run


def _round(ext: Path, k: int, state: dict[str, str], rng: random.Random) -> None:
    """Change the tree (new files, one rewritten, one deleted) and sync it; ``state``: what it holds."""
    state.update(write_tree(ext, seed=k, files=5))
    rewrite, delete = rng.sample(sorted(state), 2)
    data = rng.randbytes(rng.choice([100, 5000, 200_000]))
    (ext / rewrite).write_bytes(data)
    state[rewrite] = hashlib.sha256(data).hexdigest()
    (ext / delete).unlink()
    del state[delete]
    os.sync()


def _check_exactly(root: Path, state: dict[str, str]) -> None:
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent.name != "lost+found"}
    assert files == set(state), files ^ set(state)
    check_tree(root, state)


def _marks(node: NodeProcess, vol: str) -> dict[str, int]:
    info: dict[str, Any] = json.loads(node.cli("versions", vol, "--json").stdout)
    return {v["name"]: v["lsn"] for v in info["versions"] if v["kind"] == "mark"}


def _mount_clone(harness: Harness, node: NodeProcess, clone: str, where: Path, state: dict[str, str]) -> None:
    """Journal replay, a clean fsck, a mount showing exactly ``state``, a write, then release."""
    dev = harness.attach(node.image(clone))
    run(["e2fsck", "-E", "journal_only", "-y", dev], check=False)  # exit 1: it replayed the journal
    r = run(["e2fsck", "-fn", dev], check=False)
    assert r.returncode == 0, f"{clone}: e2fsck -fn found problems:\n{r.stdout}\n{r.stderr}"
    mnt = harness.mount_fs(dev, where)
    _check_exactly(mnt, state)
    (mnt / "written-in-clone").write_bytes(b"clone" * 1000)  # a clone takes writes
    harness.umount_fs(mnt)
    harness.detach(dev)


def test_every_mark_clones_to_its_files_and_clones_survive_sigkill(harness: Harness, tmp_path: Path) -> None:
    a = harness.node("a", extra=["--history", "1M"])  # a short window: only the clones keep old versions
    a.cli("create", "vm", "--size", "64M")
    dev = harness.attach(a.image("vm"))
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
    ext = harness.mount_fs(dev, tmp_path / "ext")
    rng = random.Random(11)
    state: dict[str, str] = {}
    for k in range(1, 4):
        _round(ext, k, state, rng)
        a.cli("mark", "vm", f"round{k}")
        out = a.cli("clone", f"vm@round{k}", f"c{k}").stdout
        assert f"as c{k}: writable at {a.image(f'c{k}')}" in out
        _mount_clone(harness, a, f"c{k}", tmp_path / f"c{k}", state)
    harness.umount_fs(ext)
    harness.detach(dev)
    marks = _marks(a, "vm")
    wait_for(lambda: status(a, "vm")["applied_lsn"] == marks["round1"], 10, "writeback up to the oldest clone")
    row = status(a, "vm")
    assert row["clones"] == [{"name": f"c{k}", "lsn": marks[f"round{k}"]} for k in range(1, 4)]
    assert status(a, "c2")["clone_of"] == f"vm@lsn-{marks['round2']}" and status(a, "c2")["role"] == "clone"
    before = {f"c{k}": sha(a.image(f"c{k}")) for k in range(1, 4)}
    a.kill()
    a.abort()
    a.unmount()
    a.start()
    assert {f"c{k}": sha(a.image(f"c{k}")) for k in range(1, 4)} == before
    assert status(a, "vm")["clones"] == row["clones"]
    fd = os.open(a.image("c1"), os.O_RDWR)
    try:
        os.pwrite(fd, b"after restart" * 100, 0)
        os.fsync(fd)
        assert os.pread(fd, 13, 0) == b"after restart"
    finally:
        os.close(fd)
    r = a.cli("delete", "vm", check=False)
    assert r.returncode == 1 and "has clones (c1, c2, c3)" in r.stderr and "Traceback" not in r.stderr
    for k in range(1, 4):
        a.cli("delete", f"c{k}")
    wait_for(lambda: status(a, "vm")["applied_lsn"] > marks["round1"], 10, "writeback after the clones went")


def test_clones_on_a_mirror_while_the_primary_writes(harness: Harness, tmp_path: Path) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "64M")
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    dev = harness.attach(a.image("vm"))
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
    ext = harness.mount_fs(dev, tmp_path / "ext")
    rng = random.Random(12)
    state: dict[str, str] = {}
    at_mark: dict[str, dict[str, str]] = {}
    for k in range(1, 4):
        _round(ext, k, state, rng)
        a.cli("mark", "vm", f"round{k}")
        at_mark[f"round{k}"] = dict(state)
    marks = _marks(a, "vm")
    wait_for(lambda: status(b, "vm")["replayed_lsn"] >= marks["round3"], 30, "the mirror to replay the marks")
    stop = threading.Event()

    def keep_writing() -> None:  # the primary writes on while the mirror's clones are checked
        i = 0
        while not stop.is_set():
            (ext / f"busy{i % 4}").write_bytes(os.urandom(256 * 1024))
            os.sync()
            i += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        for name, want in at_mark.items():
            b.cli("clone", f"vm@{name}", f"c-{name}")
            _mount_clone(harness, b, f"c-{name}", tmp_path / f"c-{name}", want)
        assert status(b, "vm")["replayed_lsn"] > marks["round3"]  # replay went on
    finally:
        stop.set()
        writer.join()
    row = status(b, "vm")
    assert row["role"] == "mirror" and row["clones"] == [{"name": f"c-{n}", "lsn": marks[n]} for n in at_mark]
    assert row["applied_lsn"] <= marks["round1"]  # the pin holds the mirror's writeback
    r = b.cli("leave", "vm", check=False)
    assert r.returncode == 1 and "has clones" in r.stderr
    wait_synced(b, "vm")  # the mirror still follows its primary
    harness.umount_fs(ext)
    harness.detach(dev)
    wait_synced(b, "vm")
    assert status(b, "vm")["replayed_lsn"] == status(a, "vm")["head_lsn"]
    fsck_clean(b.image("vm"))
