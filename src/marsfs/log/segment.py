"""One segment file of a log and the compact table of the records it holds.

Rules that hold here:

* A segment file is named ``<first_lsn:020d>.seg`` and starts with a segment header (first
  LSN, chain value before it); records follow back to back (docs/log-format.md).
* A new segment appears atomically: its header is written to ``.tmp``, fsync'd, renamed to the
  final name and the directory fsync'd. A ``.tmp`` file is always garbage (recovery deletes it).
* Only the newest segment of a log is open read-write. An older one is switched to a read-only
  fd *in place* (``dup2`` onto the same fd number), because readers use the number without the
  log lock.
* The per-record table is struct-of-arrays (about 34 bytes a record) because a volume may
  retain millions of records. Row ``i`` is record ``first_lsn + i``; only the chain value after
  the last record is kept (older ones are read from the headers on demand).

This module does I/O on one file at a time and knows nothing of appending, syncing or recovery.
"""

from __future__ import annotations

import errno
import os
import time
from array import array
from pathlib import Path
from typing import NamedTuple

from marsfs.fsutil import fsync_dir
from marsfs.log.record import HEADER_SIZE, Header, RecordType, encode_segment_header

SEGMENT_SUFFIX = ".seg"
#: record type by its number: what :meth:`Segment.info` needs per row, without an enum call
_TYPES = {int(t): t for t in RecordType}


def segment_name(first_lsn: int) -> str:
    """The file name of the segment whose first record has ``first_lsn``."""
    return f"{first_lsn:020d}{SEGMENT_SUFFIX}"


def named_lsn(name: str) -> int:
    """The first LSN a segment's file name claims (0 if none), for naming damage."""
    stem = name.removesuffix(SEGMENT_SUFFIX)
    return int(stem) if stem.isdigit() else 0


class RecordInfo(NamedTuple):
    """Where a retained record is and what it says (payload not included).

    A named tuple, not a dataclass: writeback and opening a version make one per record, and
    a frozen dataclass's ``__init__`` cost about 1.2 µs of the ~13 µs a 4 KiB record's
    writeback took (measured)."""

    lsn: int
    type: RecordType
    flags: int
    offset: int
    length: int
    stored_len: int
    timestamp_ns: int
    segment: str
    pos: int  #: byte position of the record header in its segment file

    @property
    def size(self) -> int:
        return HEADER_SIZE + self.stored_len


class Segment:
    """One segment file (its fd stays open while the log is) and its per-record table.

    ``end`` is where the next record goes; bytes past it (a torn tail that was not cut) are
    not part of the log.
    """

    __slots__ = ("path", "name", "first_lsn", "prev_chain", "fd", "end", "last_chain",
                 "pos", "offset", "length", "stored", "kind", "ts")

    def __init__(self, path: Path, first_lsn: int, prev_chain: bytes, fd: int, end: int) -> None:
        self.path = path
        self.name = path.name  #: the file name (every RecordInfo of this segment carries it)
        self.first_lsn = first_lsn
        self.prev_chain = prev_chain
        self.fd = fd
        self.end = end
        self.last_chain = prev_chain
        self.pos = array("Q")
        self.offset = array("Q")
        self.length = array("I")
        self.stored = array("I")
        self.kind = array("H")  # type << 8 | flags
        self.ts = array("q")

    @classmethod
    def create(cls, directory: Path, first_lsn: int, prev_chain: bytes) -> Segment:
        """A new, empty, writable segment, made atomically in ``directory``.

        On failure no ``.tmp`` file is left behind; the final name exists only if the rename
        happened (the caller must then treat the directory as changed).
        """
        final = directory / segment_name(first_lsn)
        tmp = final.with_suffix(".tmp")
        head = encode_segment_header(first_lsn, prev_chain, time.time_ns())
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if os.write(fd, head) != len(head):
                raise OSError(errno.ENOSPC, "short write of a segment header")
            os.fsync(fd)
            os.rename(tmp, final)
            fsync_dir(directory)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return cls(final, first_lsn, prev_chain, fd, len(head))

    @property
    def count(self) -> int:
        return len(self.pos)

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + len(self.pos) - 1

    def add(self, h: Header, pos: int) -> None:
        """A row for a verified record found at ``pos`` (recovery)."""
        self.append(pos, h.offset, h.length, h.stored_len, int(h.type) << 8 | h.flags, h.timestamp_ns)
        self.last_chain = h.chain

    def append(self, pos: int, offset: int, length: int, stored: int, kind: int, ts: int) -> None:
        """A row for the next record; the caller sets ``last_chain`` and ``end`` after the last.

        ``pos`` goes last: ``count`` is its length, so a reader without the lock never sees a
        row whose other columns are not there yet.
        """
        self.offset.append(offset)
        self.length.append(length)
        self.stored.append(stored)
        self.kind.append(kind)
        self.ts.append(ts)
        self.pos.append(pos)

    def info(self, lsn: int) -> RecordInfo:
        i = lsn - self.first_lsn
        assert 0 <= i < len(self.pos), (lsn, self.first_lsn, len(self.pos))
        kind = self.kind[i]
        return RecordInfo(lsn, _TYPES[kind >> 8], kind & 0xFF, self.offset[i], self.length[i],
                          self.stored[i], self.ts[i], self.name, self.pos[i])

    def reopen_readonly(self) -> None:
        """Swap the fd for a read-only one in place.

        Readers run without the log lock, so the fd number must stay valid throughout
        (close-then-reopen let another thread's open take the number, or a pread hit EBADF and
        killed the daemon).
        """
        fd = os.open(self.path, os.O_RDONLY)
        os.dup2(fd, self.fd)
        os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
