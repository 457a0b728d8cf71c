"""``marsfs resize`` with real nodes, loop devices and ext4: ext4 on the
primary's image grows online with resize2fs after ``resize`` and ``losetup -c``, files intact;
the mirror's image grows at the same version (a version just below keeps the old size) and a
copy of it passes e2fsck."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from marsfs.testing.checks import check_tree, status, wait_synced, write_tree
from marsfs.testing.harness import Harness, run

MiB = 1 << 20


def test_ext4_grows_online_and_the_mirror_grows_at_the_same_version(harness: Harness, tmp_path: Path) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "64M")
    dev = harness.attach(a.image("vm"))
    run(["mkfs.ext4", "-q", dev])
    ext = harness.mount_fs(dev, tmp_path / "ext")
    sums = write_tree(ext, seed=1, files=20)
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")

    r = a.cli("resize", "vm", "128M")
    m = re.fullmatch(r"resized vm to 128\.0 MiB \(134217728 bytes\) at lsn-(\d+); a loop device on \S+ sees it "
                     r"after: losetup -c DEVICE\n", r.stdout)
    assert m, r.stdout
    lsn = int(m.group(1))
    assert os.stat(a.image("vm")).st_size == 128 * MiB  # the kernel knows (writeback cache owns the size)
    assert status(a, "vm")["size"] == 128 * MiB
    run(["losetup", "-c", dev])
    assert int(run(["blockdev", "--getsize64", dev]).stdout) == 128 * MiB
    online = run(["resize2fs", dev], check=False)  # online: the filesystem stays mounted
    if online.returncode != 0:
        # the online resize ioctl needs CAP_SYS_RESOURCE, which some containers drop: offline then
        assert "Permission denied" in online.stderr, online.stderr
        harness.umount_fs(ext)
        run(["e2fsck", "-f", "-y", dev])
        run(["resize2fs", dev])
        ext = harness.mount_fs(dev, tmp_path / "ext")
    assert shutil.disk_usage(ext).total > 100 * MiB
    sums.update(write_tree(ext, seed=2, files=40))
    check_tree(ext, sums)
    assert a.cli("resize", "vm", "128M").stdout == "vm is 128.0 MiB already: nothing to do\n"
    r = a.cli("resize", "vm", "100M", check=False)
    assert r.returncode == 1 and "shrinking it to 104857600 is not supported" in r.stderr
    r = b.cli("resize", "vm", "256M", check=False)
    assert r.returncode == 1 and "grow it on its primary" in r.stderr

    harness.umount_fs(ext)
    harness.detach(dev)
    wait_synced(b, "vm")
    assert os.stat(b.image("vm")).st_size == 128 * MiB
    assert status(b, "vm")["size"] == 128 * MiB
    versions = b.mount / ".versions" / "vm"
    assert os.stat(versions / f"lsn-{lsn - 1}.img").st_size == 64 * MiB  # just below the record
    assert os.stat(versions / f"lsn-{lsn}.img").st_size == 128 * MiB
    copy = tmp_path / "mirror-copy.img"
    shutil.copyfile(b.image("vm"), copy)
    run(["e2fsck", "-E", "journal_only", "-y", os.fspath(copy)], check=False)
    fsck = run(["e2fsck", "-fn", os.fspath(copy)], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cdev = harness.attach(copy)
    cext = harness.mount_fs(cdev, tmp_path / "copy")
    check_tree(cext, sums)
    assert shutil.disk_usage(cext).total > 100 * MiB
