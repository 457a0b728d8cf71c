"""G11 through a real daemon whose state directory is a small loop-mounted ext4 that fills up.

The node keeps no history (``--history 0``), so writeback runs every second and meets the full
disk too, and the log shrinks again once writeback has caught up (a log that outgrows the disk
by itself is the log space limit's business, G8, not this test's). A thin 1 GiB volume is
written through the FUSE image with O_DIRECT (the writeback cache would turn the error into a
late one), at about 20 MiB/s so that writeback keeps up, until a write fails with ENOSPC. Then:

* ``status`` shows the thin volume as ``no-space`` with a line saying what failed and what to
  do; the daemon and its mount are alive;
* the other (reserved, 16 MiB) volume reads and writes as before: the thin volume's writes
  failed before they took the free space held for the logs (G8);
* after a scratch file on the small filesystem is deleted, the thin volume takes writes and
  fsync again without a restart, and status says ``up`` again;
* after SIGKILL and a restart every fsynced block of both volumes is intact;
* a SIGKILL in the middle of a writeback (the intent written, as the crash leaves it), then a
  restart while the filesystem is full: the daemon starts and serves the other volume; the
  one whose writeback cannot be redone shows as failed with one line (status and daemon log,
  no traceback); with room again, a restart redoes it and every fsynced block is there.

Cleanup order matters: the daemon must stop before the small filesystem is unmounted, so the
test stops it itself (the harness then unmounts, detaches, and finds the daemon gone).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import time
from pathlib import Path

import pytest

from marsfs.testing.checks import status, wait_for, wait_synced
from marsfs.testing.harness import Harness, NodeProcess, run
from marsfs.volume import writeback as wb

MiB = 1 << 20
CHUNK = 256 * 1024
FS_SIZE = 160 * MiB
SCRATCH = 48 * MiB
PACE = CHUNK / (20 * MiB)  #: seconds per chunk while filling


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


def _write(image: Path, offset: int, data: bytes, *, fsync: bool = True) -> None:
    """One O_DIRECT write (and fsync): the error reaches us, not the page cache."""
    fd = os.open(image, os.O_RDWR | os.O_DIRECT)
    buf = _aligned(data)
    try:
        n = os.pwrite(fd, buf, offset)
        if n != len(data):
            raise OSError(errno.ENOSPC, f"short write ({n} of {len(data)})")
        if fsync:
            os.fsync(fd)
    finally:
        buf.close()
        os.close(fd)


def _read(image: Path, offset: int, length: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _fill(image: Path, rng: random.Random, start: int, durable: dict[int, bytes]) -> int:
    """Write CHUNKs from ``start`` on, fsync every 16, until ENOSPC; returns where it failed.

    ``durable`` gets every chunk an fsync covered."""
    pending: dict[int, bytes] = {}
    at = start
    fd = os.open(image, os.O_RDWR | os.O_DIRECT)
    try:
        while at < 1024 * MiB:
            data = rng.randbytes(CHUNK)
            buf = _aligned(data)
            try:
                n = os.pwrite(fd, buf, at)
                assert n == CHUNK, f"short write {n} at {at}"
                pending[at] = data
                if len(pending) == 16:
                    os.fsync(fd)
                    durable.update(pending)
                    pending.clear()
            except OSError as e:
                assert e.errno == errno.ENOSPC, f"write at {at} failed with {e!r}, not ENOSPC"
                return at
            finally:
                buf.close()
            at += CHUNK
            time.sleep(PACE)
    finally:
        os.close(fd)
    raise AssertionError("a 1 GiB thin volume on a 160 MiB filesystem never met ENOSPC")


def _small_fs(harness: Harness, node: NodeProcess, size: int = FS_SIZE) -> Path:
    image = harness.root / "small.ext4"
    with open(image, "wb") as f:
        f.truncate(size)
    run(["mkfs.ext4", "-q", "-m", "0", os.fspath(image)])
    dev = harness.attach(image, direct_io=False)
    return harness.mount_fs(dev, node.state)


@pytest.mark.allow_log(r"writeback of thin: ", r"is not served: it could not be opened")
def test_a_full_state_filesystem_is_the_thin_volumes_error_and_passes(harness: Harness) -> None:
    node = harness.node("n1", start=False, extra=["--history", "0"])
    state = _small_fs(harness, node)
    scratch = state / "scratch"
    with open(scratch, "wb") as f:
        f.write(os.urandom(SCRATCH))
        os.fsync(f.fileno())
    rng = random.Random(11)
    try:
        node.start()
        node.cli("create", "small", "--size", "16M")
        node.cli("create", "thin", "--size", "1G", "--thin")
        refused = node.cli("create", "huge", "--size", "1G", check=False)
        assert refused.returncode == 1 and "does not fit" in refused.stderr and "--thin" in refused.stderr
        assert not (state / "volumes" / "huge").exists()
        small_data = rng.randbytes(4 * MiB)
        _write(node.image("small"), 0, small_data)

        durable: dict[int, bytes] = {}
        failed_at = _fill(node.image("thin"), rng, 0, durable)
        assert failed_at > 8 * MiB and durable

        row = status(node, "thin")
        assert row["state"] == "no-space", row
        assert any("ENOSPC" in e and "free space" in e for e in row["errors"]), row["errors"]
        assert node.proc is not None and node.proc.poll() is None
        text = node.cli("status").stdout
        assert "thin: error:" in text and "ENOSPC" in text

        assert _read(node.image("small"), 0, len(small_data)) == small_data  # reads keep working
        extra = rng.randbytes(CHUNK)
        _write(node.image("small"), 8 * MiB, extra)

        scratch.unlink()
        os.sync()
        more = {at: rng.randbytes(CHUNK) for at in range(failed_at + MiB, failed_at + 3 * MiB, CHUNK)}

        def takes_writes() -> bool:
            try:
                for at, data in more.items():
                    _write(node.image("thin"), at, data)
                return True
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return False

        wait_for(takes_writes, timeout=30, what="the thin volume to take writes again")
        durable.update(more)
        try:
            wait_for(lambda: status(node, "thin")["state"] == "up", timeout=30, what="thin to be up again")
        except AssertionError:
            raise AssertionError(f"{status(node, 'thin')}\n{run(['df', '-k', os.fspath(state)]).stdout}"
                                 f"{run(['ls', '-lsR', os.fspath(state)]).stdout}") from None
        assert status(node, "thin")["errors"] == [] and status(node, "small")["state"] == "up"

        node.kill()
        node.abort()
        node.unmount()
        node.start()
        assert _read(node.image("small"), 0, len(small_data)) == small_data
        assert _read(node.image("small"), 8 * MiB, CHUNK) == extra
        for at, data in sorted(durable.items()):
            assert _read(node.image("thin"), at, CHUNK) == data, f"fsynced chunk at {at} differs"

        # a crash in the middle of a writeback, then a restart on a full filesystem
        assert node.stop() == 0
        node.extra = ["--history", "64M"]  # the next writes stay in the log
        node.start()
        later = {at: rng.randbytes(CHUNK) for at in range(900 * MiB, 904 * MiB, CHUNK)}  # unallocated in the base
        for at, data in later.items():
            _write(node.image("thin"), at, data)
        durable.update(later)
        head = status(node, "thin")["durable_lsn"]
        node.kill()
        node.abort()
        node.unmount()
        vdir = state / "volumes" / "thin"
        applied, _, ts = wb.read_state(vdir)
        assert applied < head
        wb.persist_intent(vdir, applied, head, ts)  # what a SIGKILL during that writeback leaves
        with open(state / "scratch2", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * MiB)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        node.start()
        rows = {r["volume"]: r for r in json.loads(node.cli("status", "--json").stdout)}
        assert rows["small"]["state"] == "up" and rows["thin"]["state"] == "failed"
        [line] = rows["thin"]["errors"]
        assert line.startswith("volume thin is not served: it could not be opened: volume thin: cannot finish the "
                               "writeback a crash interrupted") and "free space" in line and "restart" in line
        assert [t for t in node.cli("status").stdout.splitlines() if t.startswith("thin: error:")] == [
            f"thin: error: {line}"]
        assert node.logfile.read_text().count("is not served: it could not be opened") == 1
        assert _read(node.image("small"), 0, len(small_data)) == small_data  # the other volume is served
        assert not node.image("thin").exists()

        (state / "scratch2").unlink()
        os.sync()
        assert node.stop() == 0
        node.start()  # room again: the redo runs and the volume is back
        assert [status(node, v)["state"] for v in ("small", "thin")] == ["up", "up"]
        for at, data in sorted(durable.items()):
            assert _read(node.image("thin"), at, CHUNK) == data, f"fsynced chunk at {at} differs"
    finally:
        node.stop()
        node.unmount()


def _fill_up(path: Path) -> None:
    """Fill the filesystem of ``path`` with the file ``path`` until not one block is left."""
    with open(path, "wb") as f:
        for chunk in (MiB, 4096):
            try:
                while True:
                    f.write(b"\1" * chunk)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_join_that_does_not_fit_is_refused_and_a_mirror_is_reserved(harness: Harness) -> None:
    """``join`` reserves the new copy's base image as ``create`` does, refuses one that does
    not fit (saying both numbers and how to join thin), and ``join --thin`` does not reserve."""
    nodes = harness.cluster(["a", "b"], start=False)
    a, b = nodes["a"], nodes["b"]
    state = _small_fs(harness, b, size=64 * MiB)
    try:
        a.start()
        b.start()
        a.cli("create", "mid", "--size", "8M")
        a.cli("create", "big", "--size", "128M", "--thin")
        free = _free(state)
        refused = b.cli("join", "big", "--from", "a", check=False)
        assert refused.returncode == 1, refused
        assert "does not fit" in refused.stderr and "128.0 MiB base" in refused.stderr and " MiB free" in refused.stderr
        assert "marsfs join big --from a --thin" in refused.stderr, refused.stderr
        assert not (state / "volumes" / "big").exists() and _free(state) >= free - MiB
        b.cli("join", "mid", "--from", "a")
        wait_synced(b, "mid")
        assert _allocated(state / "volumes" / "mid" / "base.img") >= 8 * MiB, "a mirror's base is reserved"
        b.cli("join", "big", "--from", "a", "--thin")  # the base exists once join answered
        assert _allocated(state / "volumes" / "big" / "base.img") < 8 * MiB, "a thin mirror's base is not"
        wait_synced(b, "big")

        # the thin mirror stops fetching short of the log space held on b; the reserved one follows
        for i in range(32):
            _write(a.image("big"), i * 2 * MiB, os.urandom(2 * MiB))
        wait_for(lambda: status(b, "big")["state"] == "no-space", timeout=60, what="the thin mirror to stop")
        assert any("held for the logs" in e for e in status(b, "big")["errors"]), status(b, "big")
        data = os.urandom(4 * MiB)
        _write(a.image("mid"), 0, data)
        wait_synced(b, "mid")
        assert _read(b.image("mid"), 0, len(data)) == data
    finally:
        b.stop()
        b.unmount()


def test_the_log_space_is_held_against_a_thin_volume_and_delete_frees_a_full_disk(harness: Harness) -> None:
    """A thin volume's writes fail with ENOSPC before they take the free space the log space
    holds, so the reserved volume beside it takes its writes, many times its size over, on
    the full disk. Then a scratch file takes the last block, and ``delete`` of the thin volume
    still works, frees its space, and a restart finds it gone and the rest served."""
    node = harness.node("n1", start=False)
    state = _small_fs(harness, node, size=64 * MiB)
    rng = random.Random(16)
    try:
        node.start()
        node.cli("create", "small", "--size", "8M")
        node.cli("create", "thin", "--size", "1G", "--thin")
        durable: dict[int, bytes] = {}
        _fill(node.image("thin"), rng, 0, durable)

        model = bytearray(8 * MiB)
        for i in range(16):  # 32 MiB, each write fsynced: the log cycles through the held space
            at = (i % 4) * 2 * MiB
            data = rng.randbytes(2 * MiB)
            _write(node.image("small"), at, data)  # no ENOSPC: the log space was held for it
            model[at : at + len(data)] = data
        assert _read(node.image("small"), 0, len(model)) == model
        assert status(node, "small")["state"] == "up"
        row = status(node, "thin")
        assert row["state"] == "no-space", row
        assert any("held for the logs" in e and "ENOSPC" in e for e in row["errors"]), row["errors"]

        _fill_up(state / "scratch")
        before = _free(state)
        node.cli("delete", "thin")  # on a disk without one free block
        assert _free(state) >= before + 8 * MiB, "delete frees the thin volume's space"
        assert [r["volume"] for r in json.loads(node.cli("status", "--json").stdout)] == ["small"]
        assert not (state / "volumes" / "thin").exists()
        (state / "scratch").unlink()
        assert node.stop() == 0
        node.start()
        assert [r["volume"] for r in json.loads(node.cli("status", "--json").stdout)] == ["small"]
        assert list((state / "trash").iterdir()) == []
        assert _read(node.image("small"), 0, len(model)) == model
    finally:
        node.stop()
        node.unmount()
