"""Resolving a split brain: ``invalidate`` on the losing node, between real nodes.

a is primary, b its mirror; b falls behind, a writes its tail (raw blocks in the upper half of
the volume, and files fsynced on an ext4 filesystem in its lower half, still mounted) and is
SIGKILLed; b fails over (``primary --force``) and writes a tail of its own; a restarts and both
report the split brain. ``marsfs invalidate vm`` on a then

* keeps a's divergent state readable as ``.versions/vm/split-a-<fork>.img`` (every block of
  a's tail is there, and the rest is the common history);
* makes a a mirror of b, identical to it, and both leave the split-brain state;
* moves at most 1.2x the bytes the two tails touched over a's link to b (a byte-counting fault
  proxy sits on it).

The split version is then inspected the runbook's way (a clone, whose journal ext4 replays at
mount: the files fsynced just before the kill are there), is shown in status with its space, is
not removable through the mount (the log names ``marsfs discard``), and ``marsfs discard``
removes it once its clone is gone.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from marsfs.testing.checks import check_tree, sha, status, wait_for, wait_synced, write_tree
from marsfs.testing.faultproxy import ProxyProcess
from marsfs.testing.harness import Harness, run

MiB = 1 << 20
BLOCK = 4096
SIZE = 32 * MiB
EXT4 = 16 * MiB  #: the filesystem's size: the raw blocks stay above it
TAIL = 128  #: raw blocks each side writes after the fork


def blocks(seed: int, avoid: set[int]) -> dict[int, bytes]:
    rng = random.Random(seed)
    out: dict[int, bytes] = {}
    while len(out) < TAIL:
        b = rng.randrange(EXT4 // BLOCK, SIZE // BLOCK)
        if b not in avoid and b not in out:
            out[b] = rng.randbytes(BLOCK)
    return out


def write_blocks(image: os.PathLike[str], data: dict[int, bytes]) -> None:
    fd = os.open(image, os.O_WRONLY)
    try:
        for b, d in data.items():
            os.pwrite(fd, d, b * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)


def changed_blocks(before: bytes, after: bytes) -> set[int]:
    return {i // BLOCK for i in range(0, len(before), BLOCK) if before[i : i + BLOCK] != after[i : i + BLOCK]}


@pytest.mark.allow_log("forced failover", "split brain", "stopped: .*diverged", "refused to unlink")
def test_invalidate_on_the_loser_keeps_its_writes_and_resyncs_only_the_tails(harness: Harness, tmp_path: Path) -> None:
    with ProxyProcess() as proxy:
        nodes = harness.cluster(["a", "b"], start=False)
        a, b = nodes["a"], nodes["b"]
        port = proxy.start(harness.ports["b"])
        i = a.extra.index(f"b=127.0.0.1:{harness.ports['b']}")
        a.extra[i] = f"b=127.0.0.1:{port}"  # a reaches b through the proxy: the resync is counted there
        a.start()
        b.start()
        a.cli("create", "vm", "--size", str(SIZE))
        b.cli("join", "vm", "--from", "a")
        dev = harness.attach(a.image("vm"))
        run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev, str(EXT4 // 1024)])
        ext = harness.mount_fs(dev, tmp_path / "ext")
        files = write_tree(ext, seed=1, files=5)
        os.sync()
        common = blocks(1, set())
        write_blocks(a.image("vm"), common)
        at_fork = a.image("vm").read_bytes()  # at or before the fork (ext4 may write more before it)
        wait_synced(b, "vm")
        b.cli("pause-fetch", "vm")
        files.update(write_tree(ext, seed=2, files=5))  # fsynced on a alone, just before the kill
        tail_a = blocks(2, set(common))
        write_blocks(a.image("vm"), tail_a)
        a.kill()
        a.abort()
        harness.umount_fs(ext)
        harness.detach(dev)
        a.unmount()
        b.cli("primary", "vm", "--force")
        tail_b = blocks(3, set(common) | set(tail_a))
        write_blocks(b.image("vm"), tail_b)
        a.start()
        for n in (a, b):
            wait_for(lambda n=n: status(n, "vm")["state"] == "split-brain", timeout=60,
                     what=f"{n.name} to report the split brain")
        fork = status(a, "vm")["fork_lsn"]
        split = f"split-a-{fork}"
        before_a = a.image("vm").read_bytes()
        moved0 = proxy.stats()

        r = a.cli("invalidate", "vm")
        assert f"{split}.img" in r.stdout, r.stdout
        wait_for(lambda: status(a, "vm")["role"] == "mirror" and status(a, "vm")["state"] == "synced",
                 timeout=120, what="a to resync from b")
        wait_synced(a, "vm")
        moved = sum(proxy.stats()[k] - moved0[k] for k in ("bytes_up", "bytes_down"))
        assert sha(a.image("vm")) == sha(b.image("vm"))
        touched = len(changed_blocks(at_fork, before_a) | set(tail_b)) * BLOCK
        print(f"resync after the split brain: {moved} bytes over the link for {touched} bytes the tails touched")
        assert moved <= 1.2 * touched, f"{moved} bytes moved for {touched} bytes the tails touched"

        image = a.mount / ".versions" / "vm" / f"{split}.img"
        assert image.read_bytes() == before_a  # a's divergent state, whole
        with open(image, "rb") as f:
            for blk, data in tail_a.items():
                f.seek(blk * BLOCK)
                assert f.read(BLOCK) == data
        assert f"{split}.img" in os.listdir(a.mount / ".versions" / "vm")
        with pytest.raises(OSError):
            os.open(image, os.O_RDWR)
        wait_for(lambda: status(b, "vm")["state"] == "up" and not status(b, "vm")["split_brain"], timeout=30,
                 what="b to see the split brain resolved")
        sa = status(a, "vm")
        assert not sa["split_brain"] and sa["source"] == "b" and not sa["errors"]

        # status shows the split version and its space
        [kept] = sa["split_versions"]
        assert (kept["name"], kept["node"], kept["size"], kept["clones"]) == (split, "a", SIZE, [])
        on_disk = (a.state / "volumes" / "vm" / "splits" / f"{split}.img").stat().st_blocks * 512
        assert 0 < kept["disk_bytes"] == sa["split_versions_bytes"] == on_disk < SIZE  # holes stay holes
        assert f"vm: split version {split} " in (out := a.cli("status").stdout) and f"marsfs discard vm@{split}" in out

        # not removable through the mount; the log names the command
        with pytest.raises(PermissionError) as e:
            os.unlink(image)
        assert e.value.errno == errno.EPERM
        wait_for(lambda: f"marsfs discard vm@{split}" in a.logfile.read_text(), timeout=10,
                 what="the refused unlink to name marsfs discard")

        # the runbook's way to look inside: a clone, mounted (its journal replayed) like any disk
        out = a.cli("clone", f"vm@{split}", "rescue").stdout
        assert f"cloned vm@{split} as rescue" in out, out
        dev = harness.attach(a.image("rescue"))
        mnt = harness.mount_fs(dev, tmp_path / "rescue")
        check_tree(mnt, files)  # the files fsynced just before the kill too
        harness.umount_fs(mnt)
        harness.detach(dev)

        # discard: refused while the clone reads from it, then gone for good
        r = a.cli("discard", f"vm@{split}", check=False)
        assert r.returncode == 1 and "has clones (rescue)" in r.stderr and "marsfs delete rescue" in r.stderr, r.stderr
        a.cli("delete", "rescue")
        out = a.cli("discard", f"vm@{split}").stdout
        assert f"discarded split version {split} of vm" in out, out
        assert f"{split}.img" not in os.listdir(a.mount / ".versions" / "vm")
        row = status(a, "vm")
        assert row["split_versions"] == [] and row["split_versions_bytes"] == 0 and row["state"] == "synced"
        assert not any((a.state / "volumes" / "vm" / "splits").iterdir())
