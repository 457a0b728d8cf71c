"""G11 in the core: a full or failing disk is the volume's fault, with the right class and errno.

Failures are injected by patching ``os.pwritev`` (log appends), ``os.pwrite`` and
``os.fdatasync`` (writeback into the base image, the log's group commit) for one file only.
What holds:

* an append that meets ENOSPC raises NoSpace (ENOSPC), one that meets EIO raises LogFailed
  (EIO); either stands in ``Volume.faults`` until a write succeeds again, with no restart;
* writeback into a thin base on a full disk raises NoSpace (a short write is an error, never
  an assertion), EIO raises DiskFailed; A stays and the intent stands, and the next writeback
  redoes it all, so the base ends up right;
* a failed fdatasync of the log poisons it: the autosync thread records it and ends quietly,
  every later write fails with EIO, and the volume says it needs a restart;
* an interrupted writeback that cannot be redone at open raises NoSpace, not an OSError;
* a read that meets EIO (log or base) raises DiskFailed (EIO), not an OSError;
* ``create(reserve=True)`` allocates the base image; without it the base is sparse.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from marsfs.errors import DiskFailed, LogFailed, MarsError, NoSpace
from marsfs.volume import Volume
from marsfs.volume import writeback as wb

MiB = 1 << 20
SIZE = 4 * MiB


@contextmanager
def failing(monkeypatch: pytest.MonkeyPatch, name: str, fd: Callable[[], int], code: int, *,
            short: bool = False) -> Iterator[list[int]]:
    """``os.<name>`` on the file ``fd()`` fails with ``code`` (or, with ``short``, first writes
    half of what it was given, like a filesystem that ran out half way); other files work."""
    real = getattr(os, name)
    calls = [0]

    def patched(f: int, *args: Any) -> Any:
        if f != fd():
            return real(f, *args)
        calls[0] += 1
        if short and calls[0] == 1 and name == "pwrite":
            data, pos = args
            return real(f, bytes(data[: len(data) // 2]), pos)
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as m:
        m.setattr(os, name, patched)
        yield calls


def _volume(tmp_path: Path, **kw: Any) -> Volume:
    return Volume.create(tmp_path / "v", "v", SIZE, sync_interval=kw.pop("sync_interval", None), **kw)


def _log_fd(vol: Volume) -> int:
    return vol.log._segments[-1].fd


@pytest.mark.parametrize("code,cls", [(errno.ENOSPC, NoSpace), (errno.EDQUOT, NoSpace), (errno.EIO, LogFailed)])
def test_a_failed_append_is_the_volumes_fault_until_a_write_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, cls: type[MarsError]) -> None:
    with _volume(tmp_path) as vol:
        vol.write(0, b"a" * 4096)
        for data in (b"b" * 4096, b"c" * (3 * 64 * 1024)):  # one record, and several in one pwritev
            with failing(monkeypatch, "pwritev", lambda: _log_fd(vol), code), pytest.raises(cls) as exc:
                vol.write(0, data)
            assert exc.value.errno == (errno.ENOSPC if cls is NoSpace else errno.EIO)
            assert [str(f) for f in vol.faults] == [str(exc.value)] and not vol.needs_restart
            assert vol.read(0, 4096) == b"a" * 4096  # nothing of the failed write is visible
        lines = vol.fault_lines()
        assert len(lines) == 1 and ("ENOSPC" if cls is NoSpace else "EIO") in lines[0]
        vol.write(0, b"d" * 4096)  # the disk takes writes again: no restart
        assert vol.faults == [] and vol.fault_lines() == []
        vol.flush()
        assert vol.read(0, 4096) == b"d" * 4096


@pytest.mark.parametrize("how", ["short", "enospc", "eio-write", "eio-fdatasync"])
def test_a_failed_writeback_changes_nothing_and_the_next_one_redoes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    with _volume(tmp_path) as vol:
        data = {at: os.urandom(64 * 1024) for at in range(0, SIZE, 256 * 1024)}
        for at, chunk in data.items():
            vol.write(at, chunk)
        vol.flush()
        name, code = {"short": ("pwrite", errno.ENOSPC), "enospc": ("pwrite", errno.ENOSPC),
                      "eio-write": ("pwrite", errno.EIO), "eio-fdatasync": ("fdatasync", errno.EIO)}[how]
        cls = NoSpace if code == errno.ENOSPC else DiskFailed
        with failing(monkeypatch, name, lambda: vol._base_fd, code, short=how == "short") as calls, \
                pytest.raises(cls) as exc:
            vol.writeback()
        assert calls[0] >= 1 and exc.value.errno == code
        assert vol.applied_lsn == 0 and wb.read_state(vol.path)[:2] == (0, vol.head_lsn)  # the intent stands
        assert vol.fault("writeback") is exc.value and "writeback" in vol.fault_lines()[0]
        for at, chunk in data.items():  # reads never depended on the base for these
            assert vol.read(at, len(chunk)) == chunk
        assert vol.writeback() == vol.head_lsn
        assert vol.faults == [] and wb.read_state(vol.path)[:2] == (vol.head_lsn, vol.head_lsn)
        with open(vol.path / "base.img", "rb") as f:
            for at, chunk in data.items():
                f.seek(at)
                assert f.read(len(chunk)) == chunk


def test_a_failed_fdatasync_poisons_the_log_and_the_autosync_thread_ends_quietly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crashed: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    vol = _volume(tmp_path, sync_interval=0.01)
    try:
        fd = _log_fd(vol)
        with failing(monkeypatch, "fdatasync", lambda: fd, errno.EIO):
            vol.write(0, b"x" * 4096)
            deadline = time.monotonic() + 10
            while vol._syncer is not None and vol._syncer.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
        assert vol._syncer is not None and not vol._syncer.is_alive() and not crashed
        assert vol.needs_restart
        assert isinstance(vol.fault("flush"), LogFailed)
        [line] = vol.fault_lines()
        assert "EIO" in line and "restart the daemon" in line
        calls: tuple[Callable[[], object], ...] = (lambda: vol.write(0, b"y" * 512), vol.flush)
        for call in calls:
            with pytest.raises(LogFailed, match="restart the daemon") as exc:
                call()
            assert exc.value.errno == errno.EIO
        assert vol.read(0, 4096) == b"x" * 4096  # reads keep working
    finally:
        with pytest.raises(LogFailed):
            vol.close()


def test_an_interrupted_writeback_that_cannot_be_redone_is_one_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _volume(tmp_path) as vol:
        vol.write(0, b"z" * 8192)
        vol.flush()
        head = vol.head_lsn
    wb.persist_intent(tmp_path / "v", 0, head, 0)  # a crash between intent and applied
    real_open = os.open
    opened: list[int] = []

    def track(path: Any, *args: Any, **kw: Any) -> int:
        fd = real_open(path, *args, **kw)
        if str(path).endswith("base.img"):
            opened.append(fd)
        return fd

    monkeypatch.setattr(os, "open", track)
    with failing(monkeypatch, "pwrite", lambda: opened[-1] if opened else -1, errno.ENOSPC), \
            pytest.raises(NoSpace, match="cannot finish the writeback a crash interrupted.*free space") as exc:
        Volume.open(tmp_path / "v", sync_interval=None)
    assert "\n" not in str(exc.value)
    with Volume.open(tmp_path / "v", sync_interval=None) as vol:  # with room, it redoes and opens
        assert vol.applied_lsn == head and vol.read(0, 8192) == b"z" * 8192


@pytest.mark.parametrize("where", ["log", "base"])
def test_a_failed_read_is_disk_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    with _volume(tmp_path) as vol:
        vol.write(0, os.urandom(4096))
        vol.flush()
        if where == "base":
            vol.writeback()
        fd = _log_fd(vol) if where == "log" else vol._base_fd
        with failing(monkeypatch, "pread", lambda: fd, errno.EIO), pytest.raises(DiskFailed) as exc:
            vol.read(0, 4096)
        assert exc.value.errno == errno.EIO and "cannot read volume v" in str(exc.value)
        vol.read(0, 4096)


def test_create_reserves_the_base_image_unless_thin(tmp_path: Path) -> None:
    with Volume.create(tmp_path / "r", "r", SIZE, sync_interval=None, reserve=True) as vol:
        assert os.stat(vol.path / "base.img").st_blocks * 512 >= SIZE
    with Volume.create(tmp_path / "t", "t", SIZE, sync_interval=None) as vol:
        assert os.stat(vol.path / "base.img").st_blocks * 512 < SIZE // 4
