"""`marsfs serve` through the real kernel path: FUSE mount, loop device, ext4, e2fsck."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import sys
import threading
from pathlib import Path

import pytest

from marsfs.testing.checks import check_tree, flush_points, fsck_clean, write_tree
from marsfs.testing.harness import Harness, run

MiB = 1 << 20


def test_ext4_on_loop_survives_restart(harness: Harness, tmp_path: Path) -> None:
    node = harness.node("n1")
    node.cli("create", "vm1", "--size", "256M")
    image = node.image("vm1")
    assert image.stat().st_size == 256 * MiB
    dev = harness.attach(image)
    run(["mkfs.ext4", "-q", dev])
    ext = harness.mount_fs(dev, tmp_path / "ext")
    sums = write_tree(ext, seed=1)
    harness.umount_fs(ext)
    harness.detach(dev)
    fsck_clean(image)
    assert node.stop() == 0
    node.start()
    fsck_clean(image)
    dev = harness.attach(image)
    ext = harness.mount_fs(dev, tmp_path / "ext")
    check_tree(ext, sums)


def test_fsync_and_loop_flush_reach_the_core(harness: Harness, tmp_path: Path) -> None:
    node = harness.node("n1")
    node.cli("create", "vm1", "--size", "64M")
    image = node.image("vm1")
    before = flush_points(node, "vm1")
    fd = os.open(image, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        os.fsync(fd)
        after_fsync = flush_points(node, "vm1")
        os.pwrite(fd, b"y" * 4096, 8192)
        os.fdatasync(fd)
        after_fdatasync = flush_points(node, "vm1")
        os.fsync(fd)  # nothing new: no flush record
        assert flush_points(node, "vm1") == after_fdatasync
    finally:
        os.close(fd)
    assert after_fsync == before + 1
    assert after_fdatasync == after_fsync + 1
    # ext4 on a loop device: an application fsync becomes FLUSH/FUA, which must reach the core
    dev = harness.attach(image)
    run(["mkfs.ext4", "-q", dev])
    ext = harness.mount_fs(dev, tmp_path / "ext")
    start = flush_points(node, "vm1")
    for i in range(5):
        with open(ext / f"f{i}", "wb") as f:
            f.write(os.urandom(8192))
            f.flush()
            os.fsync(f.fileno())
    assert flush_points(node, "vm1") >= start + 5


def test_image_behaves_like_a_disk(harness: Harness) -> None:
    node = harness.node("n1")
    node.cli("create", "a", "--size", "1M")
    node.cli("create", "b", "--size", "2M")
    assert sorted(os.listdir(node.mount)) == ["a.img", "b.img"]
    a = node.image("a")
    fd = os.open(a, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    buf.write(b"d" * 4096)
    try:
        assert os.pread(fd, 4096, MiB) == b""  # read at the end: EOF
        assert os.preadv(fd, [bytearray(4096)], MiB - 2048) == 2048  # read across the end: short
        with pytest.raises(OSError) as e:
            os.pwrite(fd, buf, MiB)  # write at the end: no space, like a block device
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:
            os.pwrite(fd, buf, MiB - 2048)  # write across the end: refused whole
        assert e.value.errno == errno.ENOSPC
        assert os.pread(fd, 4096, MiB - 4096) == bytes(4096)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        os.truncate(a, 4096)
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.open(a, os.O_RDWR | os.O_TRUNC)
    assert e.value.errno == errno.EPERM
    assert a.stat().st_size == MiB
    with pytest.raises(OSError):
        (node.mount / "new.img").write_bytes(b"")
    # Buffered writes past the end land in the kernel's page cache first (the writeback cache
    # owns the size); the write-back is refused, fsync reports it, the volume does not grow.
    fd = os.open(node.image("b"), os.O_RDWR)
    try:
        os.pwrite(fd, b"z" * 512, 2 * MiB)
        with pytest.raises(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
    assert json.loads(node.cli("status", "b", "--json").stdout)["size"] == 2 * MiB
    st, backing = os.statvfs(node.mount), os.statvfs(node.state)
    assert (st.f_blocks, st.f_bsize) == (backing.f_blocks, backing.f_bsize)


def test_concurrent_readers_and_writers(harness: Harness) -> None:
    node = harness.node("n1")
    node.cli("create", "vm", "--size", "32M")
    image = node.image("vm")
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            rng = random.Random(k)
            fd = os.open(image, os.O_RDWR)
            try:
                region = k * 4 * MiB
                for i in range(60):
                    off = region + rng.randrange(0, 4 * MiB - 65536) // 512 * 512
                    data = rng.randbytes(rng.choice([512, 4096, 65536]))
                    os.pwrite(fd, data, off)
                    assert os.pread(fd, len(data), off) == data
                    if i % 20 == 0:
                        os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # and the same bytes after a restart, read without the page cache of the old mount
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    assert node.stop() == 0
    node.start()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest


def test_start_refusals(harness: Harness, tmp_path: Path) -> None:
    n1 = harness.node("n1")
    busy = harness.node("n2", start=False)
    busy.mount = n1.mount  # mount point busy
    with pytest.raises(RuntimeError, match="busy"):
        busy.start(timeout=15)
    locked = harness.node("n1", start=False)  # same state dir, other mount point
    locked.state = n1.state
    locked.mount = tmp_path / "other"
    locked.mount.mkdir()
    with pytest.raises(RuntimeError, match="in use by a running daemon"):
        locked.start(timeout=15)
    assert n1.stop() == 0
    other = harness.node("n9", start=False)
    other.state = n1.state
    with pytest.raises(RuntimeError, match="belongs to node 'n1'"):
        other.start(timeout=15)
    notdir = harness.node("n3", start=False)
    notdir.mount = tmp_path / "file"
    notdir.mount.write_text("")
    with pytest.raises(RuntimeError, match="not a directory"):
        notdir.start(timeout=15)


def test_sigterm_unmounts_and_keeps_data(harness: Harness) -> None:
    node = harness.node("n1")
    node.cli("create", "vm", "--size", "8M")
    fd = os.open(node.image("vm"), os.O_RDWR)
    os.pwrite(fd, b"kept" * 1024, 4096)  # no fsync: SIGTERM must still flush it
    os.close(fd)
    assert node.stop() == 0
    assert not os.path.ismount(node.mount)
    node.start()
    with open(node.image("vm"), "rb") as f:
        f.seek(4096)
        assert f.read(4096) == b"kept" * 1024


def test_cli_errors(harness: Harness, tmp_path: Path) -> None:
    node = harness.node("n1")
    cases = [
        (["create", "bad/name", "--size", "1M"], "invalid volume name"),
        (["create", ".hidden", "--size", "1M"], "invalid volume name"),
        (["create", "x" * 65, "--size", "1M"], "invalid volume name"),
        (["create", "v", "--size", "1000"], "multiple of 512"),
        (["delete", "nope"], "no volume 'nope'"),
        (["status", "nope"], "no volume 'nope'"),
        (["mark", "nope", "m1"], "no volume 'nope'"),
        (["versions", "nope"], "no volume 'nope'"),
    ]
    for args, msg in cases:
        r = node.cli(*args, check=False)
        assert r.returncode == 1, (args, r)
        assert msg in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    node.cli("create", "v", "--size", "1M")
    r = node.cli("create", "v", "--size", "1M", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = node.cli("mark", "v", "lsn-3", check=False)
    assert r.returncode == 1 and "invalid" in r.stderr
    fd = os.open(node.image("v"), os.O_RDONLY)
    try:
        r = node.cli("delete", "v", check=False)
        assert r.returncode == 1 and "is open" in r.stderr
    finally:
        os.close(fd)
    node.cli("delete", "v")
    assert not (node.mount / "v.img").exists()
    r = node.cli("create", check=False)
    assert r.returncode == 2  # usage error
    r = node.cli("create", "v", "--size", "12Q", check=False)  # so is a size that cannot be read
    assert r.returncode == 2 and "marsfs: error: cannot read size '12Q'" in r.stderr and "Traceback" not in r.stderr
    r = node.cli("bogus", check=False)
    assert r.returncode == 2
    down = tmp_path / "nostate"
    r = run([sys.executable, "-m", "marsfs", "--state", os.fspath(down), "status"], check=False)
    assert r.returncode == 1 and "no marsfs daemon is running" in r.stderr and "marsfs serve" in r.stderr
    env_state = run([sys.executable, "-m", "marsfs", "status"], check=False,
                    env={**os.environ, "MARSFS_STATE": os.fspath(down)})
    assert env_state.returncode == 1 and os.fspath(down) in env_state.stderr
