"""G11 through a real daemon whose state directory is a small loop-mounted ext4 that fills up.

The node keeps no history (``--history 0``), so writeback runs every second and meets the full
disk too, and the log shrinks again once writeback has caught up (a log that outgrows the disk
by itself is the log space limit's business, G8, not this test's). A thin 1 GiB volume is
written through the FUSE image with O_DIRECT (the writeback cache would turn the error into a
late one), at about 20 MiB/s so that writeback keeps up, until a write fails with ENOSPC. Then:

* ``status`` shows the thin volume as ``no-space`` with a line saying what failed and what to
  do; the daemon and its mount are alive;
* the other (reserved, 16 MiB) volume reads as before. Its writes need log space, which its
  reservation does not cover (the log space limit, G8, is separate work): they either work
  or fail with ENOSPC, never EIO, and they work again with the thin one;
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

from marsfs.testing.checks import status, wait_for
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


def _small_fs(harness: Harness, node: NodeProcess) -> Path:
    image = harness.root / "small.ext4"
    with open(image, "wb") as f:
        f.truncate(FS_SIZE)
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
        try:
            _write(node.image("small"), 8 * MiB, extra)
            small_extra = True
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            small_extra = False

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
        if not small_extra:
            _write(node.image("small"), 8 * MiB, extra)
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
