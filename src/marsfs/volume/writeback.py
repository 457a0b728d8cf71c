"""Writeback: laying log records onto the base image, with an intent record for crash redo.

Theory of operation
-------------------
``applied.json`` in the volume directory holds the applied LSN *A*: the base image equals the
image after *A*. Beside it the timestamp of record *A* (``applied_timestamp_ns``, 0 when
unknown: a mirror's first LSN), because *A* is the oldest version and its record may be trimmed
from the log. Writing back ``(A, T]``:

1. persist the intent ``{"applied_lsn": A, "writeback_lsn": T}`` (only when a WRITE record is
   among them: FLUSH and MARK records do not touch the base);
2. write the data of the WRITE records into the base, in LSN order, and fdatasync it;
3. persist ``{"applied_lsn": T}``.

Between 1 and 3 the base holds part of ``(A, T]`` and is the image at no LSN at all. Opening a
volume whose ``applied.json`` holds an intent therefore first redoes the whole writeback
(:func:`redo`): laying the same records over the base again in LSN order is idempotent, and
the log still holds them because the log is only trimmed after step 3.

Failures: every step raises what the disk said as :class:`NoSpace` (a thin base on a full
disk; a short write is retried until it gives the error) or :class:`DiskFailed` (EIO). Nothing is lost by stopping anywhere: until
step 3 the intent stands and A is unchanged, so the caller may retry the whole writeback (a
failed fdatasync of the base may have dropped pages, and the retry writes them all again).

Every write of ``applied.json`` is atomic (:func:`marsfs.fsutil.write_json`). The volume
decides *what* to write back (durable records, never past an open view); this module does the
steps in order and nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

from marsfs.errors import DiskFailed, StateError
from marsfs.fsutil import read_json, write_all, write_json
from marsfs.log import Log, RecordInfo, RecordType, io_error

STATE_FILE = "applied.json"


def read_state(path: Path) -> tuple[int, int, int]:
    """``(A, T, timestamp of A)`` of the volume in ``path``: T > A when a writeback to T was
    interrupted."""
    state = read_json(path / STATE_FILE)
    applied = int(state["applied_lsn"])
    return applied, int(state.get("writeback_lsn", applied)), int(state.get("applied_timestamp_ns", 0))


def persist_intent(path: Path, applied: int, target: int, timestamp_ns: int) -> None:
    """Step 1: from now until :func:`persist_applied`, the base may be ahead of A."""
    _persist(path, {"applied_lsn": applied, "writeback_lsn": target, "applied_timestamp_ns": timestamp_ns})


def persist_applied(path: Path, applied: int, timestamp_ns: int = 0) -> None:
    """Step 3 (and the state of a new volume): the base is the image after ``applied``, whose
    record has ``timestamp_ns``."""
    _persist(path, {"applied_lsn": applied, "applied_timestamp_ns": timestamp_ns})


def _persist(path: Path, state: dict[str, int]) -> None:
    try:
        write_json(path / STATE_FILE, state)
    except OSError as e:
        raise io_error(f"cannot write {path / STATE_FILE}", e, DiskFailed) from e


def collect(log: Log, start: int, bound: int, max_bytes: int | None) -> list[RecordInfo]:
    """Records ``(start, bound]``, stopping after about ``max_bytes`` of log (None: no limit).

    Called without the volume lock: only writeback trims the log.
    """
    batch: list[RecordInfo] = []
    size = 0
    for rec in log.records(start + 1, bound):
        batch.append(rec)
        size += rec.size
        if max_bytes is not None and size >= max_bytes:
            break
    return batch


def apply(log: Log, base_fd: int, records: list[RecordInfo]) -> None:
    """Step 2: write the data of WRITE ``records`` into the base, in LSN order, durably."""
    try:
        for rec in records:
            write_all(base_fd, log.read_data(rec.lsn, 0, rec.length), rec.offset)
        os.fdatasync(base_fd)
    except OSError as e:
        raise io_error("cannot write back into the base image", e, DiskFailed) from e


def redo(path: Path, log: Log, applied: int, target: int) -> int:
    """Redo a writeback of ``(applied, target]`` that a crash interrupted; returns the new A."""
    if target > log.last_lsn:
        raise StateError(f"{path}: an interrupted writeback reached LSN {target}, but the log ends at "
                         f"{log.last_lsn}; the volume's files do not belong together")
    fd = os.open(path / "base.img", os.O_RDWR)
    try:
        apply(log, fd, [r for r in log.records(applied + 1, target) if r.type == RecordType.WRITE])
    finally:
        os.close(fd)
    persist_applied(path, target, log.info(target).timestamp_ns)
    return target
