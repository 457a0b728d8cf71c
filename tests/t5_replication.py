"""Replication between real node processes on loopback (each its own state dir, mount, port)."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from marsfs.testing.checks import check_tree, sha, status, wait_for, wait_synced, write_random, write_synced, write_tree
from marsfs.testing.harness import Harness, run

MiB = 1 << 20


def test_join_copies_image_then_fetches_and_ext4_checks_clean(harness: Harness, tmp_path: Path) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "128M")
    dev = harness.attach(a.image("vm"))
    run(["mkfs.ext4", "-q", dev])
    ext = harness.mount_fs(dev, tmp_path / "ext")

    sums = write_tree(ext, seed=1, files=20)  # before the join: arrives with the image copy
    r = b.cli("join", "vm", "--from", "a")
    assert "joining vm from a" in r.stdout
    sums.update(write_tree(ext, seed=2, files=20))  # after: arrives through the log
    wait_synced(b, "vm")
    # a copy of the mirror's image is a crash-consistent ext4 with every fsync'd file
    copy = tmp_path / "mirror-copy.img"
    shutil.copyfile(b.image("vm"), copy)
    run(["e2fsck", "-E", "journal_only", "-y", os.fspath(copy)], check=False)
    r2 = run(["e2fsck", "-fn", os.fspath(copy)], check=False)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    cdev = harness.attach(copy)
    cext = harness.mount_fs(cdev, tmp_path / "copy")
    check_tree(cext, sums)
    harness.umount_fs(cext)
    harness.detach(cdev)
    # G5: once writes stop, the images are byte-identical
    harness.umount_fs(ext)
    harness.detach(dev)
    wait_synced(b, "vm")
    assert sha(a.image("vm")) == sha(b.image("vm"))
    st = status(a, "vm")
    assert [p["node"] for p in st["peers"]] == ["b"] and st["peers"][0]["lag_records"] == 0
    sb = status(b, "vm")
    assert sb["role"] == "mirror" and sb["state"] == "synced"
    assert sb["lag_bytes"] == 0 and sb["lag_seconds"] == 0
    assert sb["fetched_lsn"] == sb["replayed_lsn"] == st["durable_lsn"]


def test_mirror_image_is_read_only_and_each_open_keeps_its_version(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "8M")
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    with pytest.raises(OSError):
        os.open(b.image("vm"), os.O_RDWR)
    fd = os.open(a.image("vm"), os.O_RDWR)
    try:
        os.pwrite(fd, b"1" * 4096, 0)
        os.fsync(fd)
        wait_synced(b, "vm")
        with open(b.image("vm"), "rb") as old:
            assert old.read(4096) == b"1" * 4096
            os.pwrite(fd, b"2" * 4096, 0)
            os.fsync(fd)
            wait_synced(b, "vm")
            with open(b.image("vm"), "rb") as new:
                assert new.read(4096) == b"2" * 4096
            old.seek(0)
            assert old.read(4096) == b"1" * 4096, "an open mirror image changed under its reader"
            os.posix_fadvise(old.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            old.seek(0)
            assert old.read(4096) == b"1" * 4096, "the old version changed after dropping its cache"
    finally:
        os.close(fd)


def test_three_nodes_one_paused_both_converge(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b", "c"])
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    a.cli("create", "vm", "--size", "32M")
    b.cli("join", "vm", "--from", "a")
    c.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    wait_synced(c, "vm")
    c.cli("pause-fetch", "vm")
    b.cli("pause-replay", "vm")
    replayed_before = status(b, "vm")["replayed_lsn"]
    write_random(a.image("vm"), seed=3, count=60, size=32 * MiB)
    head = status(a, "vm")["durable_lsn"]
    wait_for(lambda: status(b, "vm")["fetched_lsn"] == head, what="b fetches while its replay is paused")
    sb = status(b, "vm")
    assert sb["replayed_lsn"] == replayed_before and sb["state"] == "replay-paused" and sb["lag_records"] > 0
    sc = status(c, "vm")
    assert sc["state"] == "fetch-paused" and sc["fetched_lsn"] < head
    # the pauses persist across restarts
    assert b.stop() == 0 and c.stop() == 0
    b.start()
    c.start()
    assert status(b, "vm")["replayed_lsn"] == replayed_before
    time.sleep(1)
    assert status(c, "vm")["fetched_lsn"] < head
    b.cli("resume-replay", "vm")
    c.cli("resume-fetch", "vm")
    wait_synced(b, "vm")
    wait_synced(c, "vm")
    want = sha(a.image("vm"))
    assert sha(b.image("vm")) == want and sha(c.image("vm")) == want


def test_mirror_sigkilled_ten_times_resumes_from_its_persisted_lsn(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "64M")
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(5)
        fd = os.open(a.image("vm"), os.O_RDWR)
        try:
            i = 0
            while not stop.is_set():
                os.pwrite(fd, rng.randbytes(65536), rng.randrange(0, 64 * MiB - 65536) // 4096 * 4096)
                i += 1
                if i % 8 == 0:
                    os.fsync(fd)
        except BaseException as e:
            errors.append(e)
        finally:
            os.close(fd)

    t = threading.Thread(target=writer)
    t.start()
    fetched: list[int] = []
    try:
        for _ in range(10):
            time.sleep(random.uniform(0.3, 1.0))
            b.kill()
            b.abort()
            b.unmount()
            b.start()
            fetched.append(status(b, "vm")["fetched_lsn"])
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert fetched == sorted(fetched), f"the mirror went back after a crash: {fetched}"
    wait_synced(b, "vm")
    assert sha(a.image("vm")) == sha(b.image("vm"))


def test_cli_replication_errors(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "8M")
    r = b.cli("join", "vm", "--from", "nobody", check=False)
    assert r.returncode == 1 and "unknown peer 'nobody'" in r.stderr
    r = b.cli("join", "nope", "--from", "a", check=False)
    assert r.returncode == 1 and "has no volume 'nope'" in r.stderr
    r = a.cli("pause-fetch", "vm", check=False)
    assert r.returncode == 1 and "not a mirror" in r.stderr
    r = a.cli("leave", "vm", check=False)
    assert r.returncode == 1 and "not a mirror" in r.stderr
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    r = b.cli("join", "vm", "--from", "a", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = a.cli("delete", "vm", check=False)
    assert r.returncode == 1 and "mirrors" in r.stderr
    r = b.cli("delete", "vm", check=False)
    assert r.returncode == 1 and "marsfs leave" in r.stderr
    r = b.cli("join", "vm2", "--from", "b", check=False)
    assert r.returncode == 1 and "b is this node" in r.stderr, r.stderr  # not "unknown peer 'b'"
    # history is written on the primary only: a mark on the mirror would fork its log
    r = b.cli("mark", "vm", "m1", check=False)
    assert r.returncode == 1 and "is a mirror" in r.stderr and "on its primary" in r.stderr, r.stderr
    write_synced(a.image("vm"), 0, b"m" * 4096)
    wait_synced(b, "vm")
    assert status(b, "vm")["state"] == "synced"
    # a leave refused because the image is open changes nothing: the mirror keeps following
    with open(b.image("vm"), "rb"):
        r = b.cli("leave", "vm", check=False)
        assert r.returncode == 1 and "is open" in r.stderr, r.stderr
        write_synced(a.image("vm"), 0, b"n" * 4096)
        wait_synced(b, "vm")
        st = status(b, "vm")
        assert st["state"] == "synced" and st["replayed_lsn"] == status(a, "vm")["durable_lsn"], st
    b.cli("leave", "vm")
    assert not b.image("vm").exists()
    wait_for(lambda: not status(a, "vm")["peers"], what="the primary to forget the mirror that left")
    a.cli("delete", "vm")
