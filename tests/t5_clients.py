"""Clients nobody here wrote, on real volumes: fio's own verify, QEMU's block layer, dpkg.

Our own checkers know our assumptions; these do not. Each one writes through the primary
(through a loop device, or on the image file itself) and checks with its own means, on the
primary and on a mirror's image, that what it wrote is what is there.

* fio writes random 4 KiB blocks with checksummed headers (``--verify=crc32c``) through a
  loop device with O_DIRECT, verifies them there, and then verifies a copy of the mirror's
  image with ``--verify_only`` (which opens its file read-write).
* ``qemu-io`` writes patterns on the raw image file and reads them back with ``-P`` (it
  fails on a mismatch); ``qemu-img convert`` writes a qcow2 image into a volume and
  ``qemu-img compare`` compares a mirror against it; ``qemu-img check`` checks the qcow2 it
  made out of a mirror.
* dpkg installs packages into a root filesystem on ext4 on a volume (dpkg fsyncs every file
  it unpacks); ``dpkg --verify`` checks every installed file's md5sum on the primary and in a
  copy of the mirror's image after e2fsck.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from marsfs.testing.checks import fsck_clean, wait_synced
from marsfs.testing.harness import Harness, run

#: Packages without dependencies that matter to dpkg --verify, with files of many sizes;
#: downloaded from the machine's own package sources (as apt is configured), never installed.
PACKAGES = ["hello", "bible-kjv-text", "fortune-mod", "fortunes-min", "libjs-jquery", "libjs-underscore",
            "libjs-sphinxdoc", "sphinx-rtd-theme-common", "fonts-dejavu-core"]


def fio(*args: str) -> None:
    r = run(["fio", "--name=verify", "--ioengine=libaio", "--iodepth=16", "--bs=4k", "--rw=randwrite",
             "--verify=crc32c", "--verify_fatal=1", "--randseed=4242", "--size=48M", *args], check=False, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_fio_verify_through_the_primary_and_on_the_mirror(harness: Harness, tmp_path: Path) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "64M")
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    dev = harness.attach(a.image("vm"))
    fio(f"--filename={dev}", "--direct=1", "--do_verify=1")
    run(["blockdev", "--flushbufs", dev])
    harness.detach(dev)
    wait_synced(b, "vm")
    # fio's verify_only opens read-write even with nothing to write: check a copy of the mirror
    copy = tmp_path / "mirror.img"
    shutil.copyfile(b.image("vm"), copy)
    fio(f"--filename={copy}", "--verify_only")


def test_qemu_io_and_qemu_img_on_the_image_files(harness: Harness, tmp_path: Path) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "32M")
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    writes = [("0x5a", "1M", "2M"), ("0xa5", "5M", "64k"), ("0x11", "31M", "1M"), ("0x77", "3M", "512")]
    cmds = [c for p, off, n in writes for c in ("-c", f"write -P {p} {off} {n}")]
    run(["qemu-io", "-f", "raw", *cmds, "-c", "flush", os.fspath(a.image("vm"))])
    wait_synced(b, "vm")
    reads = [c for p, off, n in writes for c in ("-c", f"read -P {p} {off} {n}")]
    for image in (a.image("vm"), b.image("vm")):
        r = run(["qemu-io", "-r", "-f", "raw", *reads, os.fspath(image)])
        assert "Pattern verification failed" not in r.stdout + r.stderr, r.stdout
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", os.fspath(a.image("vm")), os.fspath(b.image("vm"))])

    # a qcow2 made elsewhere, written into the volume by qemu-img, arrives on the mirror
    src = tmp_path / "src.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", os.fspath(src), "32M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 0 4M", "-c", "write -P 0xc3 20M 3M", os.fspath(src)])
    run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", os.fspath(src), os.fspath(a.image("vm"))])
    run(["sync"])
    wait_synced(b, "vm")
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", os.fspath(src), os.fspath(b.image("vm"))])
    out = tmp_path / "mirror.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(b.image("vm")), os.fspath(out)])
    run(["qemu-img", "check", os.fspath(out)])
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", os.fspath(out), os.fspath(a.image("vm"))])


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    where = tmp_path_factory.mktemp("debs")
    r = run(["apt-get", "download", *PACKAGES], cwd=where, check=False, timeout=300)
    assert r.returncode == 0, f"apt-get download failed (the package sources must be reachable): {r.stderr[-2000:]}"
    return sorted(where.glob("*.deb"))


def dpkg(root: Path, *args: str) -> str:
    r = run(["dpkg", f"--root={root}", "--log=/dev/null", *args], check=False, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_dpkg_installs_into_a_rootfs_on_a_volume_and_the_mirror_verifies(harness: Harness, tmp_path: Path,
                                                                        debs: list[Path]) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "ct", "--size", "128M")
    b.cli("join", "ct", "--from", "a")
    dev = harness.attach(a.image("ct"))
    run(["mkfs.ext4", "-q", dev])
    root = harness.mount_fs(dev, tmp_path / "rootfs")
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    (root / "var/lib/dpkg/updates").mkdir()
    (root / "var/lib/dpkg/status").touch()
    dpkg(root, "--force-script-chrootless", "--force-depends", "-i", *map(os.fspath, debs))
    dpkg(root, "--verify")
    installed = [ln.split()[1] for ln in dpkg(root, "-l").splitlines() if ln.startswith("ii ")]
    assert sorted(installed) == sorted(PACKAGES)

    # dpkg fsyncs what it unpacks: the mirror's version is a clean ext4 with every package
    wait_synced(b, "ct")
    copy = tmp_path / "mirror.img"
    shutil.copyfile(b.image("ct"), copy)
    run(["e2fsck", "-E", "journal_only", "-y", os.fspath(copy)], check=False)  # mounted on a: replay its journal
    fsck_clean(copy)
    cdev = harness.attach(copy, read_only=True)
    croot = harness.mount_fs(cdev, tmp_path / "copy", "ro,noload")
    dpkg(croot, "--verify")
    assert sorted(ln.split()[1] for ln in dpkg(croot, "-l").splitlines() if ln.startswith("ii ")) == sorted(PACKAGES)
    harness.umount_fs(croot)
    harness.detach(cdev)
    harness.umount_fs(root)
    harness.detach(dev)
