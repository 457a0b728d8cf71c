"""The transaction log of one volume: positions, the append path, group commit, reads, trim.

Theory of operation
-------------------
A log is a directory of segment files (:mod:`marsfs.log.segment`); opening one verifies every
record and cuts a torn tail (:mod:`marsfs.log.recovery`). Only the newest segment grows.

Appending: :meth:`Log.append` (one record), :meth:`Log.append_many` (a volume write cut into
chunks) and :meth:`Log.append_raw` (a record another node stored, bytes unchanged) are front
ends of one routine, :meth:`Log._append_locked`, which under the log lock

* starts a new segment when the next record does not fit the current one (rotation: the old
  segment is fdatasync'd first, so every segment but the last is complete; when the new
  segment cannot be made, the old one stays the active, writable one);
* writes the records that fit with one ``pwritev`` (at most 512 records: IOV_MAX);
* on any failure (including a short write) truncates the segment back to where that
  ``pwritev`` started, so the log is exactly as before it, and raises
  :class:`~marsfs.errors.NoSpace` (ENOSPC, EDQUOT, short write) or
  :class:`~marsfs.errors.LogFailed`; if the truncate fails too, the log is poisoned;
* only after the write succeeded adds the per-record table rows and the marks, so readers
  (which take no lock) never see a record whose bytes are not in the file.

Records that went to an earlier segment in the same call stay when a later segment fails
(Volume.write indexes exactly what reached the log).

Durability: :meth:`Log.sync` is group commit. Callers that arrive while an fdatasync is in
flight wait for it; if it did not cover them, one of them leads the next. A caller that must
not block (the trio thread) becomes the leader with :meth:`Log.lead_sync` and finishes with
:meth:`Log.finish_sync` after its own fdatasync (an AIO fdsync, :mod:`marsfs.log.kaio`);
everything else sees that sync as any other. ``durable_lsn``
only advances after an fdatasync returned. A failed fdatasync poisons the log (the kernel may
have dropped the pages), and every later append or sync raises :class:`LogFailed`.

Thread safety: the append front ends, ``sync``, ``rotate``, ``trim`` and the properties are
safe from any thread. Reads (``read_data``, ``read_stored``, ``read_raw``, ``info``) are safe
against appends; the caller must ensure that nobody reads records that a concurrent
:meth:`trim` removes.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, NoReturn

from marsfs.errors import LogFailed, MarsError, NoSpace, RecordRefused
from marsfs.fsutil import fsync_dir
from marsfs.log.kaio import FdatasyncAio
from marsfs.log.record import (
    HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    BadRecord,
    Flags,
    Header,
    Payload,
    RecordType,
    decode_header,
    decode_payload,
    encode_header,
    verify_link,
    verify_payload,
)
from marsfs.log.recovery import RecoveryReport, finish_restart, recover
from marsfs.log.segment import RecordInfo, Segment, segment_name
from marsfs.stats import LatencyHistogram

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
_DECOMPRESSED_CACHE = 8
#: Records one ``pwritev`` carries at most: two buffers each, and Linux takes 1024 (IOV_MAX).
_BATCH_RECORDS = 512
#: Errors of a write that mean the filesystem is full, not that it is broken.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_REFETCH = "the log is unchanged and the mirror fetches again; if this repeats, resync it (marsfs invalidate)"


class SyncLead(NamedTuple):
    """A group commit leader's sync (:meth:`Log.lead_sync`): fdatasync ``fd``, then every
    record up to ``upto`` is durable."""

    upto: int
    fd: int
    started: float  #: perf_counter when it began (the fsync latency histogram)


class Log:
    """A volume's transaction log. Open with :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, segments: list[Segment], segment_bytes: int,
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
        #: the AIO context of leaders that fdatasync from the trio thread (:meth:`fdatasync_aio`)
        self._aio: FdatasyncAio | None = None
        self._aio_refused = ""  #: why the kernel's AIO is not used ("" while it may be)
        self._aio_lead: SyncLead | None = None  #: the lead whose AIO fdatasync is in flight
        self._aio_thread = 0  #: the thread that submitted it (see :meth:`_wait_synced_locked`)
        #: a lead the submitting thread finished itself while its task still awaits the eventfd:
        #: until that task claims it (:meth:`poll_sync_aio`), the eventfd's count is its wake-up,
        #: so no new AIO request may start on it (whose poll would drain that count, or whose
        #: task would wait on the same fd beside it)
        self._aio_unclaimed: SyncLead | None = None
        self._open = True
        #: wakes the threads parked in :meth:`wait_dirty` (a volume's autosync) when an append
        #: makes the log dirty; notified only while one waits, so an append pays one int test
        self._appended = threading.Condition(self._lock)
        self._dirty_waiters = 0
        #: how long each group commit's fdatasync took (also a failed one): ``serve --metrics``
        self.sync_latency = LatencyHistogram()
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
        seg = Segment.create(path, first_lsn, prev_chain)
        report = RecoveryReport(1, 0, SEGMENT_HEADER_SIZE, 0, "")
        return cls(path, [seg], segment_bytes, report)

    @classmethod
    def open(cls, path: Path, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES, repair: bool = True) -> Log:
        """Open and verify every record; cut a torn tail (only when ``repair``).

        Raises :class:`LogDamaged` at the first damaged record before the tail.
        """
        segments, report = recover(path, repair=repair)
        log = cls(path, segments, segment_bytes, report)
        try:
            os.fdatasync(segments[-1].fd)  # what a dead process left in the page cache is now durable
        except OSError as e:
            log.close()
            raise LogFailed(f"fdatasync of the log in {path} failed while opening it: {e.strerror}; "
                            "check the state directory's disk (dmesg), then restart the daemon") from e
        return log

    def close(self) -> None:
        with self._lock:
            while self._syncing:
                self._wait_synced_locked()
            for seg in self._segments:
                seg.close()
            self._open = False
            if self._aio is not None:
                self._aio.close()
                self._aio = None

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
            return self._append_locked(rtype, ts, ((offset, payload),), None)

    def append_many(self, rtype: RecordType, items: Sequence[tuple[int, Payload]],
                    timestamp_ns: int | None = None) -> int:
        """Append one record per ``(offset, payload)`` (not yet durable); returns the last LSN.

        Same records as that many :meth:`append` calls, but one lock hold and one ``pwritev`` per
        segment: a 1 MiB volume write is 16 records, and per-record syscalls and lock handoffs
        between writer threads cost more than the copy into the page cache. When a later
        segment fails, the records already in earlier segments stay (check :attr:`last_lsn`).
        """
        ts = time.time_ns() if timestamp_ns is None else timestamp_ns
        with self._lock:
            return self._append_locked(rtype, ts, items, None)

    def append_raw(self, raw: bytes | memoryview, *, volume_size: int | None = None) -> Header:
        """Append a record exactly as another log stored it (replication); returns its header.

        The record must verify and continue this log: next LSN, chain from our last record; with
        ``volume_size``, a WRITE record must also lie inside the volume, and a RESIZE record must
        grow it (to a multiple of 512 bytes). The bytes stay identical,
        so the chain hashes of both logs stay identical. A refused record raises
        :class:`RecordRefused` and leaves the log as it was.
        """
        view = memoryview(raw)
        head = view[:HEADER_SIZE]
        try:
            h = decode_header(head)
            verify_payload(h, view[HEADER_SIZE:])
            if h.flags & Flags.LZ4:  # the checksum proves only what the sender stored: it must decompress
                decode_payload(h.flags, h.length, view[HEADER_SIZE:])
        except BadRecord as e:
            raise RecordRefused(f"refused a replicated record: {e.reason}; {_REFETCH}") from None
        if volume_size is not None and h.type == RecordType.WRITE and h.offset + h.length > volume_size:
            raise RecordRefused(f"refused replicated record {h.lsn}: it writes past the end of the volume "
                                f"({h.offset}+{h.length} > {volume_size} bytes); resync it (marsfs invalidate)")
        if volume_size is not None and h.type == RecordType.RESIZE and (h.offset < volume_size or h.offset % 512):
            raise RecordRefused(f"refused replicated record {h.lsn}: it resizes the volume of {volume_size} bytes "
                                f"to {h.offset}; volumes only grow, by multiples of 512 bytes; resync it "
                                "(marsfs invalidate)")
        payload = Payload(h.flags, h.length, view[HEADER_SIZE:], h.payload_hash)
        with self._lock:
            self._check_failed()  # a poisoned log says so before judging the link
            try:
                verify_link(h, head, self.last_lsn + 1, self.last_chain)
            except BadRecord as e:
                raise RecordRefused(f"refused a replicated record that does not continue this log: {e.reason}; "
                                    f"{_REFETCH}") from None
            self._append_locked(h.type, h.timestamp_ns, ((h.offset, payload),), (head, h.chain))
        return h

    def _append_locked(self, rtype: RecordType, ts: int, items: Sequence[tuple[int, Payload]],
                       given: tuple[bytes | memoryview, bytes] | None) -> int:
        """The one append path (caller holds the lock); returns the LSN of the last record.

        ``given`` is the header and chain of a single record that arrived encoded (append_raw);
        otherwise each header is encoded here, where its LSN and chain are known. Per segment
        (and per ``_BATCH_RECORDS``): rotate if the next record does not fit, then one
        ``pwritev``; the table rows, ``end``, ``last_chain`` and marks change only after it
        succeeded. This is the hottest code of the write path: no per-record work beyond
        encoding, one list append per buffer and one table row.
        """
        self._check_failed()
        if self._dirty_waiters:  # they wake once we release the lock, when this append is done (or failed)
            self._appended.notify_all()
        kind = int(rtype) << 8
        limit = self.segment_bytes
        n = len(items)
        at = 0
        seg = self._segments[-1]
        lsn = seg.last_lsn
        while at < n:
            while seg.pos and seg.end + HEADER_SIZE + len(items[at][1].stored) > limit:
                self._rotate_locked(seg)
                seg = self._segments[-1]
                lsn = seg.last_lsn  # another writer may have appended while the rotation waited
            first = at
            start = pos = seg.end
            chain = seg.last_chain
            bufs: list[bytes | memoryview] = []
            head: bytes | memoryview
            while at < n:  # the first record always goes in: it fits, or the segment is empty
                offset, payload = items[at]
                end = pos + HEADER_SIZE + len(payload.stored)
                if at > first and (end > limit or at - first == _BATCH_RECORDS):
                    break  # the rest goes to the next segment (or the next pwritev)
                lsn += 1
                if given is None:
                    head, chain = encode_header(rtype, lsn, offset, payload, ts, chain)
                else:
                    head, chain = given
                bufs.append(head)
                bufs.append(payload.stored)
                pos = end
                at += 1
            try:
                if os.pwritev(seg.fd, bufs, start) != pos - start:
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as e:
                self._undo_append(seg, start, e)
            written = items[first:at]  # the whole tuple of a single append: no copy
            pos = start
            for offset, payload in written:
                stored = len(payload.stored)
                seg.append(pos, offset, payload.length, stored, kind | payload.flags, ts)
                pos += HEADER_SIZE + stored
            seg.last_chain = chain
            seg.end = pos
            if rtype == RecordType.MARK:
                for i, (_, payload) in enumerate(written):
                    self._marks[lsn - len(written) + 1 + i] = payload_text(payload)
        return lsn

    def _undo_append(self, seg: Segment, pos: int, err: OSError) -> NoReturn:
        """Cut what a failed write may have left at ``pos`` and raise what the caller sees."""
        try:
            os.ftruncate(seg.fd, pos)
        except OSError as e2:
            self._failed = e2
            raise LogFailed(f"log append failed ({err.strerror}) and could not be undone "
                            f"({e2.strerror}); restart the daemon to re-verify the log") from err
        raise io_error(f"cannot append to the log in {self.path}", err) from err

    def fits(self, nbytes: int, nrecords: int = 1) -> bool:
        """Would ``nrecords`` records of ``nbytes`` payload in all go into the active segment
        without a rotation (an fdatasync and a new file: milliseconds)? A hint, without the lock."""
        seg = self._segments[-1]
        return not seg.pos or seg.end + nrecords * HEADER_SIZE + nbytes <= self.segment_bytes

    def make_room(self, nbytes: int, nrecords: int = 1) -> None:
        """Rotate now if ``nrecords`` records of ``nbytes`` payload would not fit the active
        segment: what the append would do, done before the caller takes its own locks, so that
        readers under those locks do not wait for the rotation's fdatasync."""
        with self._lock:
            self._check_failed()
            seg = self._segments[-1]
            if seg.pos and seg.end + nrecords * HEADER_SIZE + nbytes > self.segment_bytes:
                self._rotate_locked(seg)

    def rotate(self) -> None:
        """Start a new segment now (the current one must hold at least one record)."""
        with self._lock:
            self._check_failed()
            if self._segments[-1].count:
                self._rotate_locked(self._segments[-1])

    def trim_points(self) -> list[int]:
        """The LSNs up to which :meth:`trim` can free something: the last LSN of each segment
        but the active one, oldest first (freeing up to an LSN between them frees only up to
        the one below it)."""
        with self._lock:
            return [seg.last_lsn for seg in self._segments[:-1]]

    def seal_oversized(self) -> bool:
        """Start a new segment when the active one is larger than :attr:`segment_bytes` (the
        size was lowered after it was started, e.g. a smaller log space at a restart): until it
        is sealed, :meth:`trim` cannot delete it, and without writes nothing else seals it.
        Returns whether it did."""
        with self._lock:
            self._check_failed()
            seg = self._segments[-1]
            if not seg.count or seg.end <= self.segment_bytes:
                return False
            self._rotate_locked(seg)
            return True

    def _rotate_locked(self, old: Segment) -> None:
        """Close the active segment ``old`` durably and start the next one.

        Waiting for a sync in flight lets other writers in: when one of them rotated
        meanwhile, ``old`` is no longer the active segment and nothing is done.

        The new segment is made before the old one turns read-only, so a failure to make it
        (a full disk) leaves the old one active and the log as it was; only a failure after the
        new file got its final name poisons the log (appending on to the old segment would make
        the log unopenable: its successor already exists).
        """
        while self._syncing:  # the sync leader uses the current fd outside the lock
            self._wait_synced_locked()
        if self._segments[-1] is not old:
            return
        self._check_failed()  # a failed fdatasync meanwhile: a later one may falsely succeed
        try:
            os.fdatasync(old.fd)
        except OSError as e:
            self._failed = e
            raise LogFailed(f"fdatasync of {old.path} failed: {e.strerror}; "
                            "restart the daemon to re-verify the log") from e
        self._durable_lsn = old.last_lsn
        first = old.last_lsn + 1
        try:
            seg = Segment.create(self.path, first, old.last_chain)
        except OSError as e:
            if (self.path / segment_name(first)).exists():
                self._failed = e
                raise LogFailed(f"starting log segment {segment_name(first)} failed half way ({e.strerror}); "
                                "restart the daemon to re-verify the log") from e
            raise io_error(f"cannot start a new log segment in {self.path}", e) from e
        old.reopen_readonly()
        self._segments.append(seg)
        self._firsts.append(seg.first_lsn)

    def restart(self, after_lsn: int, chain: bytes) -> None:
        """Drop every record and continue the log at ``after_lsn + 1`` from ``chain``.

        What a resync's switch does: the volume's image is now another node's version
        ``after_lsn``, whose chain is ``chain``, so the next replicated record verifies against it.
        Crash-safe through a marker (:data:`~marsfs.log.recovery.RESTART_FILE`, written first,
        removed last): recovery that finds it finishes the restart (:func:`finish_restart`), so
        a crash leaves the old log or the restarted one. The caller makes sure that nobody reads
        the old records any more (their segments' fds are closed here).
        """
        with self._lock:
            self._check_failed()
            while self._syncing:
                self._wait_synced_locked()
            for seg in self._segments:
                seg.close()
            try:
                seg = finish_restart(self.path, after_lsn, chain)
            except OSError as e:
                self._failed = e  # the segments are closed: nothing but a reopen can go on
                raise LogFailed(f"restarting the log in {self.path} failed ({e.strerror}); "
                                "restart the daemon: opening the volume finishes it") from e
            self._segments = [seg]
            self._firsts = [seg.first_lsn]
            self._durable_lsn = after_lsn
            self._marks.clear()
            with self._cache_lock:
                self._cache.clear()

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
                self._wait_synced_locked()
            lead = self._lead_locked()
        return self.complete_sync(lead)

    def lead_sync(self) -> SyncLead | int | None:
        """Become the group commit's leader for every record appended so far, without blocking
        (the trio thread's flush, which does the fdatasync itself, see :mod:`marsfs.log.kaio`).

        Returns the durable LSN when it already covers the newest record (nothing to do); None
        when another sync is in flight (call :meth:`sync`, in a thread: it waits for that one
        and leads the next if needed); otherwise a :class:`SyncLead`: the caller must fdatasync
        its fd and then call :meth:`finish_sync` exactly once (or :meth:`complete_sync`), failed
        or not: until then every other sync, rotation and close waits. LogFailed when poisoned.
        """
        with self._lock:
            self._check_failed()
            if self._durable_lsn >= self.last_lsn:
                return self._durable_lsn
            if self._syncing:
                return None
            return self._lead_locked()

    def _lead_locked(self) -> SyncLead:
        self._syncing = True
        return SyncLead(self.last_lsn, self._segments[-1].fd, time.perf_counter())

    def complete_sync(self, lead: SyncLead) -> int:
        """The leader's blocking part: fdatasync, then :meth:`finish_sync`."""
        err: OSError | None = None
        try:
            os.fdatasync(lead.fd)
        except OSError as e:
            err = e
        return self.finish_sync(lead, err)

    def finish_sync(self, lead: SyncLead, err: OSError | None) -> int:
        """End the leader's sync: with ``err`` None its fdatasync succeeded and every record up
        to ``lead.upto`` is durable (returned); otherwise the log is poisoned (LogFailed)."""
        with self._lock:
            return self._finish_locked(lead, err)

    def _finish_locked(self, lead: SyncLead, err: OSError | None) -> int:
        self.sync_latency.observe(time.perf_counter() - lead.started)
        self._syncing = False
        if err is None:
            self._durable_lsn = max(self._durable_lsn, lead.upto)
        else:
            self._failed = err
            self._appended.notify_all()  # a parked autosync sees the log poisoned
        self._synced.notify_all()
        if err is not None:
            raise LogFailed(f"fdatasync of the log failed: {err.strerror}; the log refuses further "
                            "writes; restart the daemon to re-verify it") from err
        return lead.upto

    def fdatasync_aio(self) -> FdatasyncAio | None:
        """This log's AIO context for a leader's fdatasync (made at the first call), None when
        the kernel has no AIO for it (then, and after :meth:`no_aio`, leaders use threads)."""
        if self._aio is None and not self._aio_refused:
            with self._lock:
                if self._aio is None and not self._aio_refused and self._open:
                    try:
                        self._aio = FdatasyncAio()
                    except OSError as e:
                        self._refuse_aio_locked(f"{e.strerror or e}")
        return self._aio

    def start_sync_aio(self, lead: SyncLead) -> int | None:
        """Submit the lead's fdatasync as an AIO request; returns the fd to await (readable
        when it may be done: then :meth:`poll_sync_aio`), None when the kernel has no AIO or
        refused it (nothing started: finish with :meth:`complete_sync`, in a thread)."""
        aio = self.fdatasync_aio()
        if aio is None:
            return None
        with self._lock:
            if self._aio_unclaimed is not None:  # its task's wake-up is still on the eventfd
                return None
            try:
                aio.submit(lead.fd)
            except OSError as e:
                self._refuse_aio_locked(f"io_submit: {e.strerror}")
                return None
            self._aio_lead = lead
            self._aio_thread = threading.get_ident()
            return aio.fileno()

    def poll_sync_aio(self, lead: SyncLead) -> int | None:
        """Never blocks: the durable LSN once the AIO fdatasync of ``lead`` is done and
        finished (here, or by a thread that waited for it, see :meth:`_wait_synced_locked`),
        None while it runs; LogFailed when it failed."""
        with self._lock:
            if self._aio_lead is lead:
                assert self._aio is not None
                try:
                    res = self._aio.reap()
                except OSError as e:  # the request's outcome is unknown: as a failed fdatasync
                    res = e.errno or errno.EIO
                if res is None:
                    return None
                self._aio_lead = None
                return self._finish_locked(lead, OSError(res, os.strerror(res)) if res else None)
            if self._aio_unclaimed is lead:  # finished by its own thread: take the wake-up it left
                self._aio_unclaimed = None
                if self._aio is not None:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._aio.fileno())
        self._check_failed()
        return max(self._durable_lsn, lead.upto)

    def _wait_synced_locked(self) -> None:
        """Wait (holding the lock on return) until the sync in flight ends. When it is an AIO
        fdatasync submitted by this very thread (the trio thread, appending a small write that
        has to rotate, while another of its tasks awaits the flush), a condition wait would
        never end: wait for the request right here and finish the lead. Any other thread waits
        on the condition, without the lock, so appends go on meanwhile; the leader finishes."""
        if self._aio_lead is None or self._aio_thread != threading.get_ident():
            self._synced.wait()
            return
        assert self._aio is not None
        lead = self._aio_lead
        try:
            res: int | None = self._aio.reap(block=True)
        except OSError as e:  # the request's outcome is unknown: as a failed fdatasync
            res = e.errno or errno.EIO
        if res is None:  # a blocking reap never says "still running"; never count it as done
            res = errno.EIO
        self._aio_lead = None  # only now: poll_sync_aio takes "not mine any more" for finished
        self._aio_unclaimed = lead  # its task still awaits the eventfd (reap wrote it a wake-up)
        try:
            self._finish_locked(lead, OSError(res, os.strerror(res)) if res else None)
        except LogFailed:
            pass  # the poisoned log raises for the waiter as soon as it looks (and for the leader)

    def no_aio(self, why: str) -> None:
        """The kernel refused an AIO fdatasync (nothing was started): use threads from now on."""
        with self._lock:
            self._refuse_aio_locked(why)

    def _refuse_aio_locked(self, why: str) -> None:
        """Leaders fdatasync in threads from now on. Said once, in the daemon's log and in
        :attr:`aio_refused` (status): the fallback is correct but costs every fsync a thread
        hand-off, which an operator chasing fsync latency has to be able to see."""
        if not self._aio_refused:
            logger.warning("%s: the kernel refused AIO for fdatasync (%s): fsync runs in threads, "
                           "slower; the log stays correct", self.path, why)
        self._aio_refused = why or "refused"

    @property
    def aio_refused(self) -> str:
        """Why this log's fdatasyncs run in threads instead of the kernel's AIO; "" while AIO
        may be used."""
        return self._aio_refused

    def wait_dirty(self, stop: threading.Event) -> bool:
        """Block while every record is durable, the log is healthy and ``stop`` is not set;
        return whether some record is not durable.

        Where a volume's autosync thread waits between bursts of writes, so that an idle volume
        costs no CPU (no timer, no polling): each append notifies it under the log lock, so no
        wake-up is lost between the test and the wait, and it sees the append finished. Whoever
        sets ``stop`` calls :meth:`wake` after it."""
        with self._lock:
            while not stop.is_set() and self._failed is None and self.last_lsn <= self._durable_lsn:
                self._dirty_waiters += 1
                try:
                    self._appended.wait()
                finally:
                    self._dirty_waiters -= 1
            return self.last_lsn > self._durable_lsn

    def wake(self) -> None:
        """Wake the threads in :meth:`wait_dirty` (after their ``stop`` was set)."""
        with self._lock:
            self._appended.notify_all()

    @property
    def failed(self) -> BaseException | None:
        """Why the log refuses every append and sync until the daemon restarts (a failed
        fdatasync or an append that could not be undone), None while it is healthy."""
        return self._failed

    @property
    def dirty(self) -> bool:
        return self.last_lsn > self._durable_lsn

    def failed_reason(self) -> str:
        """Why the log is poisoned and what to do (one line); see :attr:`failed`."""
        return (f"the log of {self.path} failed earlier ({self._failed}); it refuses writes until the daemon "
                "restarts and re-verifies it: restart the daemon (marsfs serve)")

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise LogFailed(self.failed_reason())

    # ------------------------------------------------------------------ reading

    def _segment_of(self, lsn: int) -> Segment:
        """The segment holding record ``lsn``, without the lock.

        A trim (or a rotation) changes ``_segments`` and ``_firsts`` one after the other, and a
        reader without the lock may see one list changed and the other not: the bisect then
        names a neighbour (a volume's 4 KiB reads beside a writeback that trimmed met that as
        an AssertionError, EIO through a loop device). The row found is checked, and on a
        mismatch the segments are searched again."""
        i = bisect.bisect_right(self._firsts, lsn) - 1
        segments = self._segments
        if 0 <= i < len(segments):
            seg = segments[i]
            if seg.first_lsn <= lsn <= seg.last_lsn:
                return seg
        for seg in list(self._segments):
            if seg.first_lsn <= lsn <= seg.last_lsn:
                return seg
        raise AssertionError(f"record {lsn} is not in the log ({self.first_lsn}..{self.last_lsn})")

    def _read_header(self, seg: Segment, lsn: int) -> tuple[int, bytes]:
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
                raise LogFailed(f"log segment {seg.path} is shorter than recorded; "
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
                seg.close()
                try:
                    seg.path.unlink()
                except OSError as e:  # recovery finds it before the first retained segment
                    raise io_error(f"cannot delete log segment {seg.path}", e) from e
                freed += seg.end
                for lsn in [m for m in self._marks if m <= seg.last_lsn]:
                    del self._marks[lsn]
                with self._cache_lock:
                    for lsn in [c for c in self._cache if c <= seg.last_lsn]:
                        del self._cache[lsn]
        if freed:
            try:
                fsync_dir(self.path)
            except OSError as e:
                raise io_error(f"cannot sync the log directory {self.path}", e) from e
        return freed




def payload_text(payload: Payload) -> str:
    """A MARK record's name."""
    return decode_payload(payload.flags, payload.length, payload.stored).decode("utf-8", "replace")


def io_error(what: str, err: OSError, failed: type[MarsError] = LogFailed) -> MarsError:
    """What a failed write on the state directory means to the caller: a full disk
    (:class:`NoSpace`, ENOSPC or EDQUOT), or a failing one (``failed``, EIO). Both are worth a
    retry: nothing was acknowledged that is not on disk."""
    if err.errno in _NO_SPACE:
        return NoSpace(f"{what}: {err.strerror}; free space on the state directory's filesystem")
    return failed(f"{what}: {err.strerror}; check the state directory's disk (dmesg), then retry")
