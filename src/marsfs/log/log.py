"""The transaction log of one volume: segment files, recovery, append, group commit.

Theory of operation
-------------------
A log is a directory of segment files ``<first_lsn:020d>.seg``. Each starts with a segment
header (first LSN, chain value before it) and holds records back to back. Only the newest
segment grows; a segment is fdatasync'd before the next one is created, and a new segment
appears atomically (written as ``.tmp``, fsync'd, renamed, directory fsync'd). Hence:

* every segment but the last is complete: any bad record in it is damage;
* in the last segment, a bad record with no valid record after it is a torn tail (an append
  that a crash interrupted) and is cut; a bad record followed by a valid one is damage.

Recovery verifies every record (header sum, payload hash, LSN sequence, chain link) and stops at
the first damaged one with :class:`~marsfs.errors.LogDamaged` naming segment, offset and LSN.

Durability: :meth:`Log.sync` is group commit. Callers that arrive while an fdatasync is in
flight wait for it; if it did not cover them, one of them leads the next. ``durable_lsn``
only advances after an fdatasync returned. A failed fdatasync poisons the log (the kernel may
have dropped the pages), and every later append or sync raises :class:`LogFailed`.

Thread safety: ``append``, ``sync``, ``rotate`` and the properties are safe from any thread.
Reads (``read_data``, ``read_stored``, ``info``) are safe against appends; the caller must
ensure that nobody reads records that a concurrent :meth:`trim` removes.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from marsfs.errors import LogDamaged, LogFailed, MarsError
from marsfs.fsutil import fsync_dir
from marsfs.log.record import (
    HEADER_SIZE,
    RECORD_MAGIC,
    SEGMENT_HEADER_SIZE,
    BadRecord,
    Flags,
    Header,
    Payload,
    RecordType,
    decode_header,
    decode_payload,
    decode_segment_header,
    encode_header,
    encode_segment_header,
    verify_link,
    verify_payload,
)

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
_SUFFIX = ".seg"
_DECOMPRESSED_CACHE = 8


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}{_SUFFIX}"


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """Where a retained record is and what it says (payload not included)."""

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


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What opening a log found."""

    segments: int
    records: int
    bytes_scanned: int
    torn_bytes: int  #: bytes cut (or, without repair, ignored) at the tail
    torn_reason: str  #: why the tail was cut; empty when it was clean


class _Segment:
    """One segment file and the compact per-record table of what it holds.

    The table is struct-of-arrays (about 34 bytes a record) because a volume may retain
    millions of records.
    """

    __slots__ = ("path", "first_lsn", "prev_chain", "fd", "end", "last_chain",
                 "pos", "offset", "length", "stored", "kind", "ts")

    def __init__(self, path: Path, first_lsn: int, prev_chain: bytes, fd: int, end: int) -> None:
        self.path = path
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

    @property
    def count(self) -> int:
        return len(self.pos)

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + len(self.pos) - 1

    def add(self, h: Header, pos: int) -> None:
        self.append(pos, h.offset, h.length, h.stored_len, int(h.type) << 8 | h.flags, h.timestamp_ns, h.chain)

    def append(self, pos: int, offset: int, length: int, stored: int, kind: int, ts: int, chain: bytes) -> None:
        self.pos.append(pos)
        self.offset.append(offset)
        self.length.append(length)
        self.stored.append(stored)
        self.kind.append(kind)
        self.ts.append(ts)
        self.last_chain = chain

    def info(self, lsn: int) -> RecordInfo:
        i = lsn - self.first_lsn
        assert 0 <= i < len(self.pos), (lsn, self.first_lsn, len(self.pos))
        kind = self.kind[i]
        return RecordInfo(lsn, RecordType(kind >> 8), kind & 0xFF, self.offset[i], self.length[i],
                          self.stored[i], self.ts[i], self.path.name, self.pos[i])


class Log:
    """A volume's transaction log. Open with :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, segments: list[_Segment], segment_bytes: int,
                 report: RecoveryReport) -> None:
        assert segments, "a log always has at least one segment"
        self.path = path
        self.segment_bytes = segment_bytes
        self.recovery = report
        self._segments = segments
        self._firsts = [s.first_lsn for s in segments]
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)
        self._syncing = False
        self._failed: BaseException | None = None
        self._durable_lsn = self.last_lsn
        self._marks: dict[int, str] = {}
        self._cache: OrderedDict[int, bytes] = OrderedDict()  # decompressed payloads, LRU
        self._cache_lock = threading.Lock()
        for seg in segments:
            for i, kind in enumerate(seg.kind):
                if kind >> 8 == RecordType.MARK:
                    lsn = seg.first_lsn + i
                    self._marks[lsn] = self.read_data(lsn, 0, seg.length[i]).decode("utf-8", "replace")

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: Path, prev_chain: bytes, *, first_lsn: int = 1,
               segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> Log:
        """A new, empty log whose first record will have ``first_lsn`` and chain from ``prev_chain``.

        A fresh volume starts at LSN 1 from its genesis chain; a mirror that copied an image at
        LSN k starts at k+1 from the primary's chain at k.
        """
        path.mkdir(parents=True, exist_ok=False)
        seg = _new_segment(path, first_lsn, prev_chain)
        report = RecoveryReport(1, 0, SEGMENT_HEADER_SIZE, 0, "")
        return cls(path, [seg], segment_bytes, report)

    @classmethod
    def open(cls, path: Path, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES, repair: bool = True) -> Log:
        """Open and verify every record; cut a torn tail (only when ``repair``).

        Raises :class:`LogDamaged` at the first damaged record before the tail.
        """
        for stale in path.glob("*.tmp"):
            stale.unlink()
        names = sorted(p.name for p in path.iterdir() if p.name.endswith(_SUFFIX))
        if not names:
            raise MarsError(f"no log segments in {path}: the volume's log is missing; "
                            "restore the state directory or resync the volume")
        segments: list[_Segment] = []
        scanned = torn = 0
        torn_reason = ""
        expect_lsn: int | None = None
        chain = b""
        for n, name in enumerate(names):
            last = n == len(names) - 1
            try:
                seg, seg_scanned, cut, reason = _scan_segment(path / name, expect_lsn, chain, last)
            except BaseException:
                for done in segments:  # a damaged log must not leak the segments scanned so far
                    os.close(done.fd)
                raise
            segments.append(seg)
            scanned += seg_scanned
            expect_lsn, chain = seg.last_lsn + 1, seg.last_chain
            if last and cut:
                torn, torn_reason = cut, reason
                if repair:
                    os.ftruncate(seg.fd, seg.end)
                    os.fsync(seg.fd)
        for seg in segments[:-1]:
            _reopen_readonly(seg)
        records = sum(s.count for s in segments)
        report = RecoveryReport(len(segments), records, scanned, torn, torn_reason)
        log = cls(path, segments, segment_bytes, report)
        os.fdatasync(segments[-1].fd)  # what a dead process left in the page cache is now durable
        return log

    def close(self) -> None:
        with self._lock:
            while self._syncing:
                self._synced.wait()
            for seg in self._segments:
                if seg.fd >= 0:
                    os.close(seg.fd)
                    seg.fd = -1

    # ------------------------------------------------------------------ positions

    @property
    def first_lsn(self) -> int:
        """LSN of the oldest retained record (or of the next record, if none is retained)."""
        return self._segments[0].first_lsn

    @property
    def last_lsn(self) -> int:
        """LSN of the newest record (``first_lsn - 1`` when the log holds none)."""
        return self._segments[-1].last_lsn

    @property
    def last_chain(self) -> bytes:
        return self._segments[-1].last_chain

    @property
    def durable_lsn(self) -> int:
        return self._durable_lsn

    @property
    def end_bytes(self) -> int:
        """Total bytes of retained segment files."""
        return sum(s.end for s in self._segments)

    @property
    def marks(self) -> dict[int, str]:
        """LSN -> name of the retained mark records."""
        return dict(self._marks)

    def chain_at(self, lsn: int) -> bytes:
        """The chain value after record ``lsn`` (``first_lsn - 1`` gives the starting chain)."""
        if lsn == self.last_lsn:
            return self.last_chain
        if lsn == self.first_lsn - 1:
            return self._segments[0].prev_chain
        seg = self._segment_of(lsn)
        _, raw = self._read_header(seg, lsn)
        return decode_header(raw).chain

    # ------------------------------------------------------------------ append

    def append(self, rtype: RecordType, offset: int, payload: Payload, timestamp_ns: int | None = None) -> int:
        """Append one record (not yet durable) and return its LSN."""
        ts = time.time_ns() if timestamp_ns is None else timestamp_ns
        with self._lock:
            self._check_failed()
            seg = self._segments[-1]
            if seg.count and seg.end + HEADER_SIZE + len(payload.stored) > self.segment_bytes:
                self._rotate_locked()
                seg = self._segments[-1]
            lsn = seg.last_lsn + 1
            head, chain = encode_header(rtype, lsn, offset, payload, ts, seg.last_chain)
            pos = seg.end
            try:
                written = os.pwritev(seg.fd, [head, payload.stored], pos)
                if written != len(head) + len(payload.stored):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as e:
                self._undo_append(seg, pos, e)
            seg.append(pos, offset, payload.length, len(payload.stored), int(rtype) << 8 | payload.flags, ts, chain)
            seg.end = pos + len(head) + len(payload.stored)
            if rtype == RecordType.MARK:
                self._marks[lsn] = payload_text(payload)
            return lsn

    def append_many(self, rtype: RecordType, items: list[tuple[int, Payload]],
                    timestamp_ns: int | None = None) -> int:
        """Append one record per ``(offset, payload)`` (not yet durable); returns the last LSN.

        Same records as that many :meth:`append` calls, but one lock hold and one ``pwritev`` per
        segment: a 1 MiB volume write is 16 records, and per-record syscalls and lock handoffs
        between writer threads cost more than the copy into the page cache.
        """
        ts = time.time_ns() if timestamp_ns is None else timestamp_ns
        kind = int(rtype) << 8
        with self._lock:
            self._check_failed()
            at = 0
            lsn = self.last_lsn
            while at < len(items):
                seg = self._segments[-1]
                if seg.count and seg.end + HEADER_SIZE + len(items[at][1].stored) > self.segment_bytes:
                    self._rotate_locked()
                    seg = self._segments[-1]
                pos = start = seg.end
                lsn = seg.last_lsn
                chain = seg.last_chain
                bufs: list[bytes] = []
                rows: list[tuple[int, int, Payload, bytes]] = []
                while at < len(items):
                    offset, payload = items[at]
                    size = HEADER_SIZE + len(payload.stored)
                    if (rows or seg.count) and pos + size > self.segment_bytes:
                        break  # the rest goes to the next segment
                    lsn += 1
                    head, chain = encode_header(rtype, lsn, offset, payload, ts, chain)
                    bufs.append(head)
                    bufs.append(payload.stored)
                    rows.append((pos, offset, payload, chain))
                    pos += size
                    at += 1
                try:
                    written = os.pwritev(seg.fd, bufs, start)
                    if written != pos - start:
                        raise OSError(errno.ENOSPC, "short write")
                except OSError as e:
                    self._undo_append(seg, start, e)
                for p, offset, payload, c in rows:
                    seg.append(p, offset, payload.length, len(payload.stored), kind | payload.flags, ts, c)
                seg.end = pos
                if rtype == RecordType.MARK:
                    for i, (_, _, payload, _) in enumerate(rows):
                        self._marks[seg.last_lsn - len(rows) + 1 + i] = payload_text(payload)
            return lsn

    def append_raw(self, raw: bytes | memoryview) -> Header:
        """Append a record exactly as another log stored it (replication); returns its header.

        The record must verify and continue this log: next LSN, chain from our last record.
        The bytes stay identical, so the chain hashes of both logs stay identical.
        """
        try:
            h = decode_header(raw[:HEADER_SIZE])
            verify_payload(h, raw[HEADER_SIZE:])
        except BadRecord as e:
            raise MarsError(f"refused a replicated record: {e.reason}") from None
        with self._lock:
            self._check_failed()
            seg = self._segments[-1]
            try:
                verify_link(h, raw[:HEADER_SIZE], seg.last_lsn + 1, seg.last_chain)
            except BadRecord as e:
                raise MarsError(f"refused a replicated record that does not continue this log: {e.reason}") from None
            if seg.count and seg.end + len(raw) > self.segment_bytes:
                self._rotate_locked()
                seg = self._segments[-1]
            pos = seg.end
            try:
                if os.pwrite(seg.fd, raw, pos) != len(raw):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as e:
                self._undo_append(seg, pos, e)
            seg.add(h, pos)
            seg.end = pos + len(raw)
            if h.type == RecordType.MARK:
                self._marks[h.lsn] = decode_payload(h.flags, h.length, raw[HEADER_SIZE:]).decode("utf-8", "replace")
            return h

    def bytes_between(self, after: int, upto: int) -> int:
        """Bytes that the retained records ``(after, upto]`` take in the log."""
        total = 0
        for seg in list(self._segments):
            lo, hi = max(after + 1, seg.first_lsn), min(upto, seg.last_lsn)
            if lo > hi:
                continue
            j = hi - seg.first_lsn
            total += seg.pos[j] + HEADER_SIZE + seg.stored[j] - seg.pos[lo - seg.first_lsn]
        return total

    def _undo_append(self, seg: _Segment, pos: int, err: OSError) -> None:
        try:
            os.ftruncate(seg.fd, pos)
        except OSError as e2:
            self._failed = e2
            raise LogFailed(f"log append failed ({err.strerror}) and could not be undone "
                            f"({e2.strerror}); restart the daemon to re-verify the log") from err
        raise MarsError(f"cannot append to the log in {self.path}: {err.strerror}; "
                        "free space on the state directory's filesystem") from err

    def rotate(self) -> None:
        """Start a new segment now (the current one must hold at least one record)."""
        with self._lock:
            self._check_failed()
            if self._segments[-1].count:
                self._rotate_locked()

    def _rotate_locked(self) -> None:
        while self._syncing:  # the sync leader uses the current fd outside the lock
            self._synced.wait()
        old = self._segments[-1]
        try:
            os.fdatasync(old.fd)
        except OSError as e:
            self._failed = e
            raise LogFailed(f"fdatasync of {old.path} failed: {e.strerror}; "
                            "restart the daemon to re-verify the log") from e
        self._durable_lsn = old.last_lsn
        _reopen_readonly(old)
        seg = _new_segment(self.path, old.last_lsn + 1, old.last_chain)
        self._segments.append(seg)
        self._firsts.append(seg.first_lsn)

    # ------------------------------------------------------------------ durability

    def sync(self) -> int:
        """Make every record appended before this call durable; returns the durable LSN.

        Group commit: one fdatasync serves every caller waiting at the time it starts.
        """
        with self._lock:
            target = self.last_lsn
            while True:
                self._check_failed()
                if self._durable_lsn >= target:
                    return self._durable_lsn
                if not self._syncing:
                    break
                self._synced.wait()
            self._syncing = True
            upto = self.last_lsn
            fd = self._segments[-1].fd
        err: OSError | None = None
        try:
            os.fdatasync(fd)
        except OSError as e:
            err = e
        with self._lock:
            self._syncing = False
            if err is None:
                self._durable_lsn = max(self._durable_lsn, upto)
            else:
                self._failed = err
            self._synced.notify_all()
        if err is not None:
            raise LogFailed(f"fdatasync of the log failed: {err.strerror}; the log refuses further "
                            "writes; restart the daemon to re-verify it") from err
        return upto

    @property
    def dirty(self) -> bool:
        return self.last_lsn > self._durable_lsn

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise LogFailed(f"the log of {self.path} failed earlier ({self._failed}); "
                            "restart the daemon to re-verify it")

    # ------------------------------------------------------------------ reading

    def _segment_of(self, lsn: int) -> _Segment:
        i = bisect.bisect_right(self._firsts, lsn) - 1
        assert i >= 0, (lsn, self._firsts)
        seg = self._segments[i]
        assert seg.first_lsn <= lsn <= seg.last_lsn, (lsn, seg.first_lsn, seg.last_lsn)
        return seg

    def _read_header(self, seg: _Segment, lsn: int) -> tuple[int, bytes]:
        pos = seg.pos[lsn - seg.first_lsn]
        return pos, os.pread(seg.fd, HEADER_SIZE, pos)

    def info(self, lsn: int) -> RecordInfo:
        return self._segment_of(lsn).info(lsn)

    def records(self, first: int | None = None, last: int | None = None) -> Iterator[RecordInfo]:
        """Retained records with ``first <= lsn <= last``, in LSN order."""
        lo = self.first_lsn if first is None else max(first, self.first_lsn)
        hi = self.last_lsn if last is None else min(last, self.last_lsn)
        for seg in list(self._segments):
            if seg.count == 0 or seg.last_lsn < lo or seg.first_lsn > hi:
                continue
            for lsn in range(max(lo, seg.first_lsn), min(hi, seg.last_lsn) + 1):
                yield seg.info(lsn)

    def read_stored(self, lsn: int) -> bytes:
        """The stored (possibly compressed) payload bytes of a record."""
        seg = self._segment_of(lsn)
        i = lsn - seg.first_lsn
        return os.pread(seg.fd, seg.stored[i], seg.pos[i] + HEADER_SIZE)

    def read_raw(self, lsn: int) -> bytes:
        """Header and payload exactly as stored: what replication ships."""
        seg = self._segment_of(lsn)
        i = lsn - seg.first_lsn
        return os.pread(seg.fd, HEADER_SIZE + seg.stored[i], seg.pos[i])

    def read_data(self, lsn: int, delta: int, length: int) -> bytes:
        """``length`` logical payload bytes of record ``lsn`` starting at ``delta``."""
        seg = self._segment_of(lsn)
        i = lsn - seg.first_lsn
        assert 0 <= delta and delta + length <= seg.length[i], (lsn, delta, length)
        flags = seg.kind[i] & 0xFF
        if not flags & Flags.LZ4:
            data = os.pread(seg.fd, length, seg.pos[i] + HEADER_SIZE + delta)
            if len(data) != length:
                raise MarsError(f"log segment {seg.path} is shorter than recorded; "
                                "was it modified outside marsfs? restart the daemon to re-verify")
            return data
        with self._cache_lock:
            whole = self._cache.get(lsn)
            if whole is not None:
                self._cache.move_to_end(lsn)
        if whole is None:
            stored = os.pread(seg.fd, seg.stored[i], seg.pos[i] + HEADER_SIZE)
            whole = decode_payload(flags, seg.length[i], stored)
            with self._cache_lock:
                self._cache[lsn] = whole
                if len(self._cache) > _DECOMPRESSED_CACHE:
                    self._cache.popitem(last=False)
        if delta == 0 and length == len(whole):
            return whole
        return whole[delta : delta + length]

    def read_extent(self, lsn: int, volume_offset: int, length: int) -> bytes:
        """Bytes ``[volume_offset, volume_offset+length)`` of the volume as record ``lsn`` wrote them."""
        seg = self._segment_of(lsn)
        return self.read_data(lsn, volume_offset - seg.offset[lsn - seg.first_lsn], length)

    def floor_keeping(self, keep_bytes: int) -> int:
        """The smallest LSN F such that records ``(F, last]`` take at most ``keep_bytes``."""
        floor = self.last_lsn
        for seg in reversed(list(self._segments)):
            body = seg.end - SEGMENT_HEADER_SIZE
            if body <= keep_bytes:
                keep_bytes -= body
                floor = seg.first_lsn - 1
                continue
            i = bisect.bisect_left(seg.pos, seg.end - keep_bytes)
            return seg.first_lsn + i - 1
        return floor

    def flush_points(self) -> list[tuple[int, int]]:
        """(LSN, timestamp_ns) of every retained flush record, oldest first."""
        out: list[tuple[int, int]] = []
        for seg in list(self._segments):
            for i, kind in enumerate(seg.kind):
                if kind >> 8 == RecordType.FLUSH:
                    out.append((seg.first_lsn + i, seg.ts[i]))
        return out

    # ------------------------------------------------------------------ retention

    def trim(self, upto_lsn: int) -> int:
        """Delete whole segments whose records all have LSN <= ``upto_lsn``; keep the newest.

        Returns the number of bytes freed. The new first segment's header still holds the
        chain value before it, so the log stays verifiable on its own.
        """
        freed = 0
        with self._lock:
            while len(self._segments) > 1 and self._segments[0].last_lsn <= upto_lsn:
                seg = self._segments.pop(0)
                self._firsts.pop(0)
                os.close(seg.fd)
                seg.fd = -1
                seg.path.unlink()
                freed += seg.end
                for lsn in [m for m in self._marks if m <= seg.last_lsn]:
                    del self._marks[lsn]
                with self._cache_lock:
                    for lsn in [c for c in self._cache if c <= seg.last_lsn]:
                        del self._cache[lsn]
        if freed:
            fsync_dir(self.path)
        return freed


def payload_text(payload: Payload) -> str:
    return decode_payload(payload.flags, payload.length, payload.stored).decode("utf-8", "replace")


def _new_segment(path: Path, first_lsn: int, prev_chain: bytes) -> _Segment:
    final = path / segment_name(first_lsn)
    tmp = final.with_suffix(".tmp")
    head = encode_segment_header(first_lsn, prev_chain, time.time_ns())
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, head)
        os.fsync(fd)
        os.rename(tmp, final)
        fsync_dir(path)
    except BaseException:
        os.close(fd)
        raise
    return _Segment(final, first_lsn, prev_chain, fd, len(head))


def _reopen_readonly(seg: _Segment) -> None:
    """Swap the segment's fd for a read-only one in place: readers run without the log lock,
    so the fd number must stay valid throughout (close-then-reopen let another thread's open
    take the number, or a pread hit EBADF and killed the daemon)."""
    fd = os.open(seg.path, os.O_RDONLY)
    os.dup2(fd, seg.fd)
    os.close(fd)


def _has_valid_header_after(buf: memoryview | mmap.mmap, start: int) -> bool:
    """Is there any verifiable record header at or after ``start``? (damage vs torn tail)"""
    find = buf.find if isinstance(buf, mmap.mmap) else bytes(buf).find
    at = find(RECORD_MAGIC, start)
    while at >= 0:
        try:
            decode_header(buf[at : at + HEADER_SIZE])
            return True
        except BadRecord:
            at = find(RECORD_MAGIC, at + 1)
    return False


def _named_lsn(name: str) -> int:
    """The first LSN a segment's file name claims (0 if none), for naming damage."""
    stem = name.removesuffix(_SUFFIX)
    return int(stem) if stem.isdigit() else 0


def _scan_segment(path: Path, expect_lsn: int | None, chain: bytes,
                  last: bool) -> tuple[_Segment, int, int, str]:
    """Verify one segment. Returns the segment, bytes scanned, bytes of torn tail and why."""
    # the LSN a damaged segment header is reported at: its first, as expected or as named
    first = expect_lsn if expect_lsn is not None else _named_lsn(path.name)
    fd = os.open(path, os.O_RDWR if last else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < SEGMENT_HEADER_SIZE:
            raise LogDamaged(path.name, 0, first, "segment shorter than its header")
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
            buf = memoryview(mm)
            try:
                # A BadRecord's traceback pins the memoryview slices it was given, and a pinned
                # slice makes closing the mmap fail (BufferError): so remember the reason and
                # raise LogDamaged only after the handler has dropped the BadRecord.
                bad = ""
                try:
                    sh = decode_segment_header(buf[:SEGMENT_HEADER_SIZE])
                except BadRecord as e:
                    bad = e.reason
                if bad:
                    raise LogDamaged(path.name, 0, first, bad)
                if expect_lsn is not None and (sh.first_lsn != expect_lsn or sh.prev_chain != chain):
                    raise LogDamaged(path.name, 0, expect_lsn,
                                     f"segment starts at LSN {sh.first_lsn} or with another chain "
                                     "than the previous segment ends; a segment is missing or foreign")
                if path.name != segment_name(sh.first_lsn):
                    raise LogDamaged(path.name, 0, sh.first_lsn, "segment file name does not match its header")
                seg = _Segment(path, sh.first_lsn, sh.prev_chain, fd, SEGMENT_HEADER_SIZE)
                pos = SEGMENT_HEADER_SIZE
                lsn = sh.first_lsn
                prev = sh.prev_chain
                while pos < size:
                    try:
                        h = decode_header(buf[pos : pos + HEADER_SIZE])
                        verify_payload(h, buf[pos + HEADER_SIZE : pos + HEADER_SIZE + h.stored_len])
                    except BadRecord as e:
                        bad = e.reason
                    if bad:
                        if last and not _has_valid_header_after(mm, pos + 1):
                            seg.end = pos  # the torn record is cut here, and appends go here
                            return seg, pos, size - pos, bad
                        raise LogDamaged(path.name, pos, lsn, bad)
                    try:  # a verified record that does not continue the log was never torn
                        verify_link(h, buf[pos : pos + HEADER_SIZE], lsn, prev)
                    except BadRecord as e:
                        bad = e.reason
                    if bad:
                        raise LogDamaged(path.name, pos, lsn, bad)
                    seg.add(h, pos)
                    prev = h.chain
                    pos += h.size
                    lsn += 1
                seg.end = pos
                return seg, size, 0, ""
            finally:
                buf.release()
    except BaseException:
        os.close(fd)
        raise
