"""A volume on one node: base image + transaction log + extent index, its I/O, views and holds.

Theory of operation
-------------------
A volume directory holds ``volume.json`` (identity and size), ``base.img`` (a sparse file),
``applied.json`` (the applied LSN *A*) and ``log/``. The image after LSN *n* is the base image
(which equals the image after *A*) with the data of records ``(A, n]`` laid over it.

* **Write**: the data becomes a WRITE record; the extent index points at it at once, so reads
  return the newest data before anything is durable.
* **Flush** (what fsync calls): appends a FLUSH record when something was written since the
  last one, then group-commits the log. Returns only when everything before it is durable.
* **Autosync**: while the log has records that are not durable, a background thread makes it
  durable at least every ``sync_interval`` seconds (100 ms at most, G3); while it has none, the
  thread sleeps until an append wakes it (an idle volume costs no CPU).
* **Writeback** applies durable records ``(A, target]`` in LSN order to the base image,
  fdatasyncs it, and only then persists ``A = target``. Before it touches the base it persists
  its intent (``writeback_lsn = target`` beside ``A`` in ``applied.json``): after a crash in
  between, the base holds part of those records and is the image at no LSN at all (versions
  from ``A`` on would read newer bytes from it), so opening the volume first re-applies all of
  them (redo is idempotent) and persists ``A = target``. Writeback never passes an open view's
  LSN, and never passes the durable LSN, so the base is always the image after a durable prefix.
* **Views**: the image at any LSN in ``[A, head]`` opens read-only. A view is pinned: writeback
  stops at it until it is closed. Extents of a view whose records writeback has since applied
  are read from the base, which holds exactly those bytes. Views of the same LSN share one
  extent index, built by the first open and freed by the last close (``views``).
* **Resync** (``resync``): staging another node's version *L* invisibly, then switching to it
  (the log restarts after *L*). Views opened before a switch belong to an older *generation*
  and read the base alone (it holds their version until the merge, which waits for them);
  newer readers see the switch's staged blocks over the base until they are merged.
* **Clones** (``clone``): a volume whose ``volume.json`` links it to another volume's version
  reads what it has not written from a view of that version instead of its base, and never
  writes back. Until :meth:`Volume.attach_source` gives it that view it refuses all I/O. The
  source knows its clones' views (:meth:`Volume.lend`); before a resync of the source switches,
  each clone takes its own copy (:meth:`Volume.own_copy`), so no clone holds up a switch.

* **Resize** (:meth:`Volume.resize`, primary): the volume grows at one point in history, a
  RESIZE record whose offset is the new size. Every version has the size of its LSN
  (:meth:`Volume.size_at`): views, ``.versions/`` and clones of older versions keep the old
  size; writes past the old end are refused until the record is appended, and reads of a
  version below it never see past its end. A mirror grows when it appends the record and shows
  the new size when it replays it. The base image is extended before the record is appended
  (reserved unless the volume is thin), so it is never shorter than any version. The sizes
  live in ``volume.json``: ``size`` (the first version's) and ``resizes`` (``[lsn, size]``
  pairs), written right after each RESIZE record is appended; at open the RESIZE records still
  in the log are the truth for their LSNs (a record lost in a crash takes its entry along), the
  entries below the log's first LSN (trimmed, hence durable) are trusted. Shrinking is not
  supported: a filesystem on the volume would lose its end.

Log deletion (G8), the one place that decides it (:meth:`Volume._trim`): a segment is deleted
when every record in it is

* written back (at or below A), which also means no open version pins it: writeback never
  passes an open view, and a clone holds a view of its source's version; and outside the
  history window, which decides how far writeback goes (:mod:`.retention`, the node's
  ``maintain``);
* and fetched, durable and replayed by every mirror (``hold``: the mirror's ACKed position,
  persisted in ``holds.json`` by :meth:`persist_holds` once per maintenance pass and loaded on
  open, so a primary restart keeps holding a disconnected mirror's log), or *dropped* for that
  mirror: when log space runs out, :meth:`free_log` (called by the node's space enforcement,
  :mod:`marsfs.node.space`) writes back up to a cut point, cutting the history window, and,
  when that is not enough, adds the extents of the records a mirror misses to that mirror's
  persisted :class:`~marsfs.volume.changes.ChangeSet` and counts the mirror as at the cut
  point. :meth:`changed_ranges` tells a returning mirror what to copy; its set is cleared when
  its position passes the drop point (it caught up). Only an open version can stop a cut.

Failures of the disk under the state directory (G11) are the volume's, never the process's:
a full disk (:class:`NoSpace`), a failing one (:class:`DiskFailed`, or :class:`LogFailed` from
the log) reaches the caller of the operation that met it and stands in :attr:`Volume.faults`
(by path: ``write``, ``flush``, ``writeback``) until the same path next succeeds, so a volume
recovers by itself when space returns. The exception is a log that a failed fdatasync
poisoned (fsyncgate): it refuses every write until the daemon restarts and re-verifies it
(:attr:`Volume.needs_restart`). A failed writeback changes nothing that a retry does not redo:
the intent stands and A stays.

Invariants (asserted): ``A <= durable_lsn <= head_lsn``; every extent in the live index has an
LSN in ``(A, head]``; the log retains every record after ``min(A, hold_floor)``.

Beside this module: ``writeback`` (the intent record, the apply and the crash redo),
``views`` (views and their shared indexes), ``resync`` (staging and switching to another
node's version), ``resync_control`` (when a resync may begin and switch), ``resyncing`` (the
:class:`~marsfs.volume.resyncing.ResyncRunner` this volume delegates its resyncs to: begin,
switch, merge, abort, the overlay and the generation), ``versions`` (listing versions and
resolving their names), ``retention`` (the history window), ``clone`` (the link of a clone to its source),
``encoding`` (the lz4 backoff), ``index`` (the extent index), ``changes`` (what a mirror whose
log was dropped must copy), ``holds`` (the :class:`~marsfs.volume.holds.HoldLedger` of mirror
positions and change sets this volume owns and delegates to), ``sizes`` (the
:class:`~marsfs.volume.sizes.SizeHistory`) and ``faults`` (the standing disk failures and the
``io_path`` decorator that records them).
"""

from __future__ import annotations

import os
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

from marsfs.errors import (
    DiskFailed,
    InvalidRequest,
    MarsError,
    NoSpace,
    OutOfRange,
    StateError,
    VersionNotFound,
    VolumeBusy,
    VolumeReadOnly,
)
from marsfs.fsutil import fsync_dir, read_json, write_all, write_json
from marsfs.log import (
    DEFAULT_SEGMENT_BYTES,
    MAX_PAYLOAD,
    Log,
    RecordType,
    SyncLead,
    encode_payload,
    genesis_chain,
    io_error,
)
from marsfs.stats import VolumeCounters
from marsfs.volume import changes as ch
from marsfs.volume import resync as rs
from marsfs.volume import writeback as wb
from marsfs.volume.changes import ChangeSet
from marsfs.volume.clone import CloneLink, check_source, pin_source
from marsfs.volume.encoding import Lz4Policy
from marsfs.volume.faults import IO_FAULTS, Faults, io_path
from marsfs.volume.holds import HoldLedger, hold_mirror, mirror_hold
from marsfs.volume.index import ExtentIndex
from marsfs.volume.resync import Extents, Resync
from marsfs.volume.resyncing import ResyncRunner
from marsfs.volume.sizes import SizeHistory
from marsfs.volume.splits import SplitInfo, SplitView, list_splits, split_image
from marsfs.volume.versions import VersionInfo, check_mark_name, find_version, list_versions, listing, resolve_version
from marsfs.volume.views import VersionIndexes, VolumeView, build_index

FORMAT = 1
SYNC_INTERVAL = 0.05  # seconds; G3 wants at most 0.1
#: Writes are cut into records of at most this size: a small read of a compressed record
#: decompresses the whole record, and 64 KiB keeps that at tens of microseconds.
RECORD_CHUNK = 64 * 1024
assert RECORD_CHUNK <= MAX_PAYLOAD
WRITEBACK_BATCH = 32 * 1024 * 1024  # log bytes one writeback call applies (bounds lock hold times)
OWN_COPY_CHUNK = 4 * 1024 * 1024  #: a clone copies its source's version in pieces this large
OWN_COPY_RETRY = 10.0  #: seconds before a clone whose own copy failed (a full disk) tries again
_EMPTY = encode_payload(b"")

__all__ = ["RECORD_CHUNK", "SYNC_INTERVAL", "VersionInfo", "Volume", "VolumeView"]

class Volume:
    """One volume's storage core on this node. Thread-safe."""

    def __init__(self, path: Path, meta: dict[str, Any], log: Log, applied_lsn: int, *, sync_interval: float | None,
                 applied_timestamp_ns: int = 0) -> None:
        self.path = path
        self.name: str = meta["name"]
        self.uuid: str = meta["uuid"]
        self.log = log
        self._sizes = SizeHistory.load(meta, log)  #: the size of every version (:mod:`.sizes`)
        #: the size at the head (what writes may reach); a mirror shows :meth:`size_at` its version
        self.size: int = self._sizes.head
        #: created or joined --thin, or a clone: its base is not reserved, so neither is its growth
        #: (a volume.json without the key is a replica from before joins reserved: thin too)
        self.thin: bool = bool(meta.get("thin", True))
        self._applied = applied_lsn
        # Oldest servable version: A, or the target of a writeback in flight (or one that failed
        # half way), because the base may already hold bytes newer than A.
        self._oldest = applied_lsn
        self._oldest_ts = applied_timestamp_ns  # timestamp of record A (its record may be trimmed)
        #: A mirror shows (and writes back) only up to its replay position; None = everything.
        self.replay_limit: int | None = None
        #: why writes are refused ("": they are not): the node fences a primary that is no
        #: longer the designated one, and a former primary that became a mirror (marsfs.node.node)
        self.fence = ""
        self._lock = threading.RLock()
        self._writeback_lock = threading.Lock()
        #: bytes fetched (under ``_lock``), written back (under ``_writeback_lock``) and replayed
        #: (by the node's replay, on its one thread) since the volume was opened
        self.counters = VolumeCounters()
        self._views = VersionIndexes()  # open versions: pins and shared indexes
        # Mirrors' positions (hold key -> LSN they have durable and replayed), persisted in
        # holds.json by persist_holds(); and, per mirror whose log was dropped, what it missed.
        self._ledger = HoldLedger(path, self.name, self._lock)
        #: Called (from the writing thread, outside the volume lock) each time the log grew by
        #: about a quarter segment: the node's space enforcement wakes up (G8).
        self.on_growth: Callable[[], None] | None = None
        #: Called before a write (or a fetched record) of that many bytes, outside the volume lock: the node's check
        #: (set on thin volumes) that raises NoSpace when the write would take the free space
        #: that the log space holds for every volume's log (G8).
        self.room_for: Callable[[int], None] | None = None
        self._grown = 0
        self._writes_since_flush = False
        self._lz4 = Lz4Policy()
        self._closed = False
        self.errors: list[str] = []
        link = meta.get("clone_of")
        #: What this volume is a clone of (None: not a clone); see :mod:`marsfs.volume.clone`.
        self.clone_of = None if link is None else CloneLink.from_json(link, str(path / "volume.json"))
        self._below: VolumeView | SplitView | None = None  #: a clone's source version, once attached
        self._own_lock = threading.Lock()  #: a clone taking its own copy (close waits for it)
        #: on a source: id(view) -> [the view a clone reads, the clone's name, its own_copy, when
        #: its own copy last failed (monotonic seconds; 0: never), why]
        self._lent: dict[int, list[Any]] = {}
        #: path (write, flush, writeback) -> its standing disk failure (:mod:`.faults`)
        self.fault_state = Faults()
        self._building = 0  #: view indexes being built from log records (a switch waits for them)
        self._base_fd = os.open(path / "base.img", os.O_RDWR)
        #: resyncs, their overlay and generation (:mod:`marsfs.volume.resyncing`)
        self._resyncs = ResyncRunner(self, self._lock, self._writeback_lock, self._base_fd)
        if os.fstat(self._base_fd).st_size < self.size:
            os.ftruncate(self._base_fd, self.size)
        self.index = ExtentIndex()
        for rec in log.records(applied_lsn + 1):
            if rec.type == RecordType.WRITE and rec.length:
                self.index.insert(rec.offset, rec.length, rec.lsn)
        # Writes at the end of the log that no FLUSH record follows (the process ended before the
        # next fsync) still need one at the next flush. When trimming left no record to look at,
        # assume so: an extra FLUSH record at a completed fsync is true, a missing one loses a
        # consistent point.
        if log.last_lsn >= log.first_lsn:
            self._writes_since_flush = log.info(log.last_lsn).type == RecordType.WRITE
        else:
            self._writes_since_flush = log.last_lsn > 0
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        if sync_interval is not None:
            assert 0 < sync_interval <= 0.1
            self._syncer = threading.Thread(target=self._autosync, args=(sync_interval,),
                                            name=f"marsfs-sync-{self.name}", daemon=True)
            self._syncer.start()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, path: Path, name: str, size: int, *, volume_uuid: str | None = None,
               segment_bytes: int = DEFAULT_SEGMENT_BYTES, sync_interval: float | None = SYNC_INTERVAL,
               clone_of: CloneLink | None = None, reserve: bool = False) -> Self:
        """A new empty volume of ``size`` bytes (zeros) in the new directory ``path``; with
        ``clone_of``, a clone (detached until :meth:`attach_source`).

        ``reserve``: allocate the whole base image now (fallocate), so that writeback never
        meets a full disk; without it the base is sparse (thin) and grows as it is written.
        A reservation that does not fit raises the OSError (ENOSPC); the caller removes ``path``.
        """
        if size <= 0 or size % 512:
            raise InvalidRequest(f"volume size {size} is not a positive multiple of 512 bytes; "
                                 "give a size like 512M or 10G")
        path.mkdir(parents=True)
        meta = {"format": FORMAT, "name": name, "uuid": volume_uuid or str(uuidlib.uuid4()),
                "size": size, "segment_bytes": segment_bytes, "created_ns": time.time_ns(), "thin": not reserve}
        if clone_of is not None:
            meta["clone_of"] = clone_of.to_json()
        fd = os.open(path / "base.img", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            if reserve:
                os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        Log.create(path / "log", genesis_chain(str(meta["uuid"])), segment_bytes=segment_bytes).close()
        wb.persist_applied(path, 0)
        write_json(path / "volume.json", meta)  # last: a directory without it is an aborted create
        fsync_dir(path.parent)
        return cls.open(path, sync_interval=sync_interval)

    @classmethod
    def create_replica(cls, path: Path, name: str, size: int, volume_uuid: str, lsn: int, chain: bytes, *,
                       segment_bytes: int = DEFAULT_SEGMENT_BYTES, reserve: bool = False) -> Self:
        """A volume whose history starts after ``lsn`` of another node's (a mirror's copy).

        The caller fills the base image with that node's image at ``lsn`` through
        :meth:`write_base` and :meth:`sync_base` before anything reads it. ``path`` may exist
        (holding the node's role record) but must not hold a volume. ``reserve``: allocate the
        base now, as :meth:`create` does, so that the mirror (and the primary it may become)
        never meets a full disk at writeback; a reservation that does not fit raises the
        OSError (ENOSPC) and leaves no base image.
        """
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "name": name, "uuid": volume_uuid, "size": size,
                "segment_bytes": segment_bytes, "created_ns": time.time_ns(), "thin": not reserve}
        fd = os.open(path / "base.img", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            if reserve:
                os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            (path / "base.img").unlink()
            raise
        os.close(fd)
        Log.create(path / "log", chain, first_lsn=lsn + 1, segment_bytes=segment_bytes).close()
        wb.persist_applied(path, lsn)
        write_json(path / "volume.json", meta)
        fsync_dir(path.parent)
        vol = cls.open(path)
        vol.replay_limit = lsn
        return vol

    @classmethod
    def open(cls, path: Path, *, sync_interval: float | None = SYNC_INTERVAL, repair: bool = True) -> Self:
        """Recover a volume: verify its log, cut a torn tail, index what is not written back."""
        try:
            meta = read_json(path / "volume.json")
            applied, pending, applied_ts = wb.read_state(path)
        except FileNotFoundError as e:
            raise StateError(f"{path} is not a complete volume ({e.filename} is missing)") from None
        if meta.get("format") != FORMAT:
            raise StateError(f"{path}: volume format {meta.get('format')} is not supported by this marsfs")
        log = Log.open(path / "log", segment_bytes=meta["segment_bytes"], repair=repair)
        try:
            resync = rs.load_state(path)
            if rs.merge_pending(path):  # no views exist now: merge a switched resync at once
                rs.merge_at_open(path)
            if resync is not None and resync.phase == rs.SWITCH:  # a crash interrupted the switch
                rs.switch(path, log, resync)
                resync = None
                meta = read_json(path / "volume.json")
                applied, pending, applied_ts = wb.read_state(path)
                if rs.merge_pending(path):
                    rs.merge_at_open(path)
        except OSError as e:
            log.close()
            raise io_error(f"volume {meta['name']}: cannot finish the resync a crash interrupted", e, DiskFailed) from e
        except BaseException:
            log.close()
            raise
        if not log.first_lsn <= applied + 1 or applied > log.last_lsn:
            log.close()
            raise StateError(f"{path}: applied LSN {applied} lies outside the log "
                             f"({log.first_lsn}..{log.last_lsn}); the volume's files do not belong together")
        if pending > applied:
            try:
                applied = wb.redo(path, log, applied, pending)
                applied_ts = log.info(applied).timestamp_ns
            except (OSError, NoSpace, DiskFailed) as e:
                log.close()
                what = f"volume {meta['name']}: cannot finish the writeback a crash interrupted (LSN {applied + 1} to {pending})"
                if isinstance(e, OSError):
                    raise io_error(what, e, DiskFailed) from e
                raise type(e)(f"{what}: {e}") from e
            except BaseException:
                log.close()
                raise
        vol = cls(path, meta, log, applied, sync_interval=sync_interval, applied_timestamp_ns=applied_ts)
        try:
            if resync is not None:
                vol._resyncs.resume(resync)
            if vol._sizes.resizes() != meta.get("resizes", []):
                with vol._lock:  # the log's RESIZE records are the truth for their LSNs: before any trim
                    vol._sizes.persist(vol.path)
        except BaseException:
            vol.close()
            raise
        return vol

    def close(self) -> None:
        """Make the log durable and release files. Does not write back."""
        if self._closed:
            return
        self._stop.set()
        if self._syncer is not None:
            self.log.wake()
            self._syncer.join()
        try:
            self.persist_holds()
        except MarsError:
            pass  # an older holds.json only holds more log than needed; the next start goes on from it
        try:
            self.log.sync()
        finally:
            self._closed = True
            self._resyncs.close()
            self.log.close()
            with self._own_lock:  # an own copy in flight reads through the view: it ends first
                os.close(self._base_fd)
                if self._below is not None:
                    self._below.close()  # unpins the source

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def create_clone(cls, path: Path, name: str, source: Volume, lsn: int, *, split: str = "",
                     sync_interval: float | None = SYNC_INTERVAL) -> Self:
        """A new clone of ``source``'s version ``lsn`` in the new directory ``path``, attached;
        with ``split``, of that split version instead (``lsn`` is ignored: the split's head is
        recorded).

        The source's version is pinned before the clone exists, so writeback cannot pass it in
        between; VersionNotFound when it is not retained (or there is no such split version)."""
        check_source(source)
        below: VolumeView | SplitView = source.split_view(split) if split else source.view(lsn)
        if isinstance(below, SplitView):
            lsn, size = below.info.head_lsn, below.size
        else:
            size = source.size_at(lsn)
        try:
            vol = cls.create(path, name, size, sync_interval=sync_interval,
                             clone_of=CloneLink(source.name, lsn, source.uuid, split))
        except BaseException:
            below.close()
            raise
        with vol._lock:
            vol._below = below
        if isinstance(below, VolumeView):  # a split version's clone pins nothing: nothing to lend
            source.lend(below, name, vol.own_copy)
        return vol

    def attach_source(self, source: Volume) -> None:
        """Give a clone its source's version again (at start): pins the source at the clone's
        LSN. StateError or VersionNotFound, in one line, when that cannot be done. A clone that
        has its own copy needs no source: nothing to do."""
        link = self.clone_of
        assert link is not None and self._below is None, "attach only a detached clone"
        if link.own:
            return
        view = pin_source(link, self.name, source)
        with self._lock:
            self._below = view
        if isinstance(view, VolumeView):
            source.lend(view, self.name, self.own_copy)

    def lend(self, view: VolumeView, clone: str, own_copy: Callable[[], None]) -> None:
        """Clone ``clone`` reads this volume's ``view``; ``own_copy`` makes it take its own copy
        and close the view (:meth:`free_clones` calls it before a resync's switch)."""
        with self._lock:
            self._lent[id(view)] = [view, clone, own_copy, 0.0, ""]

    def free_clones(self) -> dict[int, str]:
        """Make every clone of this volume take its own copy, so that none holds a version of it
        (a resync's switch must not wait for them). Runs the copies in the caller's thread,
        outside the locks. Returns LSN -> the clone that could not, and why (it retries after
        ``OWN_COPY_RETRY`` seconds)."""
        with self._lock:
            for key in [k for k, e in self._lent.items() if e[0].closed]:
                del self._lent[key]
            lent = list(self._lent.items())
        failed: dict[int, str] = {}
        for key, entry in lent:
            view, clone, own_copy, failed_at, why = entry
            if not failed_at or time.monotonic() - failed_at >= OWN_COPY_RETRY:
                try:
                    own_copy()
                except (OSError, MarsError) as e:
                    what = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                    why = f"clone {clone}, whose own copy failed ({what}): free space, or marsfs delete {clone}"
                    entry[3:] = [time.monotonic(), why]
                else:
                    with self._lock:
                        self._lent.pop(key, None)
                    continue
            failed[view.lsn] = why
        return failed

    def own_copy(self) -> None:
        """A clone takes its own copy (see :mod:`marsfs.volume.clone`): its source's version goes
        into its base image, durably, then ``own`` into its link, then the view closes. Reads
        go on throughout (through the view until the link says ``own``). Raises OSError or
        MarsError when the copy fails; the clone then reads through as before."""
        with self._own_lock:
            with self._lock:
                link, below = self.clone_of, self._below
            if link is None or link.own or not isinstance(below, VolumeView) or self._closed:
                return  # a split version's clone reads a standalone file: it holds nothing
            zero = bytes(OWN_COPY_CHUNK)
            for off in range(0, below.size, OWN_COPY_CHUNK):
                data = below.read(off, min(OWN_COPY_CHUNK, below.size - off))
                if data != zero[: len(data)]:  # the base is sparse zeros: holes stay holes
                    write_all(self._base_fd, data, off)
            os.fsync(self._base_fd)
            own = replace(link, own=True)
            meta = read_json(self.path / "volume.json")
            meta["clone_of"] = own.to_json()
            write_json(self.path / "volume.json", meta)
            with self._lock:
                self.clone_of, self._below = own, None
            below.close()

    def _autosync(self, interval: float) -> None:
        """G3 without a flush: a dirty log is synced on a grid of ``interval`` seconds, so a
        record is durable at most ``interval`` plus one fdatasync after its append. Between
        bursts the thread waits in :meth:`Log.wait_dirty` (woken by the append that makes the
        log dirty), not on a timer: an idle volume costs no CPU, so a node's idle cost does not
        grow with its volumes. The grid is the monotonic clock's multiples of ``interval``, one
        for every volume: busy volumes' fdatasyncs start together (ext4 can then commit its journal
        once for several), and their threads want the GIL once per interval, not each at its
        own moment (10 volumes under fio: the sync threads' system time per write fell from
        ~40 to ~10-15 µs)."""
        while self.log.wait_dirty(self._stop):
            if self._stop.wait(interval - time.monotonic() % interval):
                return  # closing: close() makes the log durable itself
            try:
                self.log.sync()
            except MarsError as e:  # only LogFailed: the log is poisoned, nothing to retry
                self.fault_state.record("flush", e)
                return

    # ------------------------------------------------------------------ faults (G11)

    @property
    def faults(self) -> list[MarsError]:
        """The disk failures standing on this volume, one per message (see the module docstring)."""
        return self.fault_state.distinct()

    def fault(self, where: str) -> MarsError | None:
        """The failure standing at ``where`` (write, flush, writeback), None if it works."""
        return self.fault_state.get(where)

    @property
    def needs_restart(self) -> bool:
        """The log refuses writes until the daemon restarts (a failed fdatasync poisoned it, or
        a resync's switch failed half way: opening the volume finishes it)."""
        return self.log.failed is not None or bool(self._resyncs.switch_failed)

    def fault_lines(self) -> list[str]:
        """What ``status`` says about the faults: what fails, why, and what to do."""
        if self._resyncs.switch_failed:
            return [f"writes fail: {self._resyncs.switch_failed}"]
        if self.needs_restart:
            return [f"writes fail with EIO: {self.log.failed_reason()}"]
        return self.fault_state.lines()

    # ------------------------------------------------------------------ positions

    @property
    def head_lsn(self) -> int:
        return self.log.last_lsn

    @property
    def durable_lsn(self) -> int:
        return self.log.durable_lsn

    @property
    def applied_lsn(self) -> int:
        return self._applied

    @property
    def replayed_lsn(self) -> int:
        """The newest version readers should see: head on a primary, the replay position on a mirror."""
        return self.head_lsn if self.replay_limit is None else self.replay_limit

    @property
    def needs_flush(self) -> bool:
        """Would :meth:`flush` do anything? (The cheap check before a thread hop.)"""
        return self._writes_since_flush or self.log.dirty

    @property
    def oldest_version_lsn(self) -> int:
        return self._oldest

    @property
    def oldest_version_timestamp_ns(self) -> int:
        """When the oldest version was written (0: unknown, e.g. a mirror's first version)."""
        return self.version_timestamp_ns(self._oldest)

    def version_timestamp_ns(self, lsn: int) -> int:
        """Timestamp of record ``lsn`` (when that version began), 0 when not known."""
        if lsn == self._applied and self._oldest_ts:
            return self._oldest_ts
        if self.log.first_lsn <= lsn <= self.log.last_lsn:
            return self.log.info(lsn).timestamp_ns
        return 0

    # ------------------------------------------------------------------ I/O

    def _check_range(self, offset: int, length: int) -> None:
        if self._below is None and self.clone_of is not None and not self.clone_of.own:
            raise StateError(f"clone {self.name} is detached from {self.clone_of.describe()}: "
                             f"see marsfs status {self.name}; delete it with: marsfs delete {self.name}")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"range {offset}+{length} lies outside volume {self.name} "
                             f"of {self.size} bytes")

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``; returns the LSN of the (last) record. Not yet durable.

        Each ``RECORD_CHUNK`` of the data is its own record (disks do not promise that a large
        write lands whole either; a crash keeps a prefix of the chunks). A disk failure is
        recorded as the volume's write fault, as :func:`~marsfs.volume.faults.io_path` does; inlined here because
        this is the hottest call of the write path (the wrapper cost ~3 % of a 4 KiB write)."""
        if self.fence:
            raise VolumeReadOnly(self.fence)
        self._check_range(offset, len(data))
        n = len(data)
        if not n:
            return self.head_lsn
        try:
            if self.room_for is not None:
                self.room_for(n)
            records = -(-n // RECORD_CHUNK)
            if not self.log.fits(n, records):  # rotate before taking the lock that readers take
                self.log.make_room(n, records)
            if n <= RECORD_CHUNK:
                payload = self._lz4.encode(data)  # lz4 and hashing outside the lock
                with self._lock:
                    if self._resyncs.running is not None:
                        raise self._resyncs.busy()
                    lsn = self.log.append(RecordType.WRITE, offset, payload)
                    self.index.insert(offset, n, lsn)
                    self._writes_since_flush = True
            else:
                lsn = self._write_chunks(offset, data)
        except IO_FAULTS as e:
            self.fault_state.record("write", e)
            raise
        self.fault_state.clear("write")
        self._grown += n  # a lost update under a race only delays the wake by one write
        if self._grown >= self.log.segment_bytes >> 2:
            self._grew()
        return lsn

    def write_blocks(self, n: int) -> bool:
        """Would a write of ``n`` bytes now wait for the disk (start a new log segment: an
        fdatasync and a new file) rather than copy into the page cache? A hint for the FUSE
        layer, which runs small writes on its one thread unless they would wait."""
        return not self.log.fits(n, -(-n // RECORD_CHUNK))

    def _grew(self) -> None:
        self._grown = 0
        if self.on_growth is not None:
            self.on_growth()

    def _write_chunks(self, offset: int, data: bytes | memoryview) -> int:
        view = memoryview(data)
        encode = self._lz4.encode
        items = [(offset + at, encode(view[at : at + RECORD_CHUNK])) for at in range(0, len(data), RECORD_CHUNK)]
        with self._lock:  # one lock hold and one pwritev for all chunks (see Log.append_many)
            if self._resyncs.running is not None:
                raise self._resyncs.busy()
            before = self.log.last_lsn
            try:
                return self.log.append_many(RecordType.WRITE, items)
            finally:  # also when a later segment failed: what reached the log must be readable
                for i, lsn in enumerate(range(before + 1, self.log.last_lsn + 1)):
                    self.index.insert(items[i][0], items[i][1].length, lsn)
                self._writes_since_flush = True

    @io_path("write")
    def append_raw(self, raw: bytes | memoryview) -> int:
        """Append a record fetched from another node (same bytes, same chain); returns its LSN.
        A thin mirror asks :attr:`room_for` first, as a thin primary's writes do."""
        if self.room_for is not None:
            self.room_for(len(raw))
        with self._lock:
            if self._resyncs.running is not None:
                raise self._resyncs.busy()
            h = self.log.append_raw(raw, volume_size=self.size)
            self.counters.fetched_bytes += len(raw)
            if h.type == RecordType.WRITE and h.length:
                self.index.insert(h.offset, h.length, h.lsn)
            elif h.type == RecordType.RESIZE:  # the log refused one that would shrink us
                self._resized(h.lsn, h.offset)
                self._grow_base(h.offset, reserve=False)  # (open extends it too, after a crash)
            self._writes_since_flush = h.type == RecordType.WRITE
        self._grown += h.length
        if self._grown >= self.log.segment_bytes >> 2:
            self._grew()
        return h.lsn

    def write_base(self, offset: int, data: bytes) -> None:
        """Fill the base image directly: only while a replica is being built, before any read."""
        self._check_range(offset, len(data))
        assert self.head_lsn == self._applied, "the base of a volume with unapplied records is not writable"
        write_all(self._base_fd, data, offset)

    def sync_base(self) -> None:
        os.fdatasync(self._base_fd)

    @io_path("flush")
    def flush(self) -> int:
        """Make everything written so far durable, behind a FLUSH record; returns the durable LSN.
        While a resync runs the log does not grow: no FLUSH record then."""
        self._flush_record()
        return self.log.sync()

    def _flush_record(self, *, unless_it_rotates: bool = False) -> bool:
        """Append the FLUSH record when anything was written since the last one and no resync
        runs. With ``unless_it_rotates`` (the trio thread, which must not wait for a rotation's
        fdatasync) nothing is appended and False returned when the record would start a new
        segment."""
        with self._lock:
            if self._writes_since_flush and self._resyncs.running is None:
                if unless_it_rotates and not self.log.fits(0, 1):
                    return False
                self.log.append(RecordType.FLUSH, 0, _EMPTY)
                self._writes_since_flush = False
        return True

    def flush_lead(self) -> SyncLead | int | None:
        """The first half of :meth:`flush` for a caller that must not block (the trio thread):
        the FLUSH record, then the lead of the log's group commit (:meth:`Log.lead_sync`).
        Returns the durable LSN when nothing is to be synced; a :class:`SyncLead` whose
        fdatasync the caller starts (:meth:`Log.start_sync_aio`), then :meth:`flush_poll`, or
        :meth:`flush_complete` in a thread; None when this would wait (a rotation is due for the
        FLUSH record, or another sync is in flight): run :meth:`flush` in a thread instead,
        which is then all of it. Faults are recorded as flush's."""
        try:
            if not self._flush_record(unless_it_rotates=True):
                return None
            return self.log.lead_sync()
        except IO_FAULTS as e:
            self.fault_state.record("flush", e)
            raise

    @io_path("flush")
    def flush_poll(self, lead: SyncLead) -> int | None:
        """The second half (see :meth:`flush_lead`), after :meth:`Log.start_sync_aio`: the
        durable LSN once the lead's AIO fdatasync is done, None while it runs; LogFailed when
        it failed (the log is poisoned)."""
        return self.log.poll_sync_aio(lead)

    @io_path("flush")
    def flush_complete(self, lead: SyncLead) -> int:
        """The second half, blocking (a thread's): fdatasync the lead's fd and end the sync."""
        return self.log.complete_sync(lead)

    @io_path("flush")
    def mark(self, name: str) -> int:
        """Name the current point in history: flush, then a MARK record; returns its LSN."""
        raw = check_mark_name(name, self.log.marks.values(), self.name)
        self.flush()
        with self._lock:
            if self._resyncs.running is not None:
                raise self._resyncs.busy()
            lsn = self.log.append(RecordType.MARK, 0, encode_payload(raw))
        self.log.sync()
        return lsn

    def resize(self, size: int, *, reserve: bool) -> int | None:
        """Grow the volume to ``size`` bytes (a primary): extend the base (``reserve``: allocate
        it, fallocate), then a durable RESIZE record; returns its LSN, None when the volume
        already has that size. InvalidRequest for a smaller or unaligned size, NoSpace when
        the reservation does not fit (nothing changed then)."""
        if size <= 0 or size % 512:
            raise InvalidRequest(f"volume size {size} is not a positive multiple of 512 bytes; "
                                 "give a size like 512M or 10G")
        with self._lock:
            if size == self.size:
                return None
            if size < self.size:
                raise InvalidRequest(f"volume {self.name} is {self.size} bytes; shrinking it to {size} is not "
                                     "supported (a filesystem on it would lose its end): give a larger size")
            self._grow_base(size, reserve=reserve)
            lsn = self.log.append(RecordType.RESIZE, size, _EMPTY)
            self._resized(lsn, size)
        self.log.sync()
        return lsn

    def _grow_base(self, size: int, *, reserve: bool) -> None:
        """Make the base image at least ``size`` bytes before a RESIZE record says so. Caller locks."""
        old = os.fstat(self._base_fd).st_size
        if old >= size:
            return
        try:
            if reserve:
                os.posix_fallocate(self._base_fd, old, size - old)
            else:
                os.ftruncate(self._base_fd, size)
        except OSError as e:
            try:
                os.ftruncate(self._base_fd, old)  # give back what a partial reservation took
            except OSError:
                pass
            raise io_error(f"cannot grow the base image of {self.name} to {size} bytes", e, DiskFailed) from e

    @property
    def base_allocated(self) -> int:
        """Bytes the base image takes on disk (a thin one grows as it is written back); 0 once
        the volume is closed (a node pass may still hold a volume being deleted)."""
        try:
            return 0 if self._closed else os.fstat(self._base_fd).st_blocks * 512
        except OSError:
            return 0

    @property
    def unapplied_bytes(self) -> int:
        """Log bytes not yet written back: at most what writeback will still add to a thin base.
        Takes the volume lock (appends change the log's tables)."""
        with self._lock:
            return self.log.bytes_between(self._applied, self.log.last_lsn)

    def _resized(self, lsn: int, size: int) -> None:
        """Record ``size`` from ``lsn`` on, in memory and in volume.json. Caller locks."""
        assert size >= self.size, "a volume never shrinks"
        self._sizes.grow(lsn, size)
        self.size = size
        self._sizes.persist(self.path)

    def size_at(self, lsn: int) -> int:
        """The size of version ``lsn`` (the last RESIZE at or before it decides)."""
        return self._sizes.at(lsn)

    @property
    def current_size(self) -> int:
        """The size of the version readers see (a mirror's replayed one)."""
        return self.size_at(self.replayed_lsn)

    def read(self, offset: int, length: int) -> bytes:
        """The newest bytes ``[offset, offset+length)`` (durable or not)."""
        return self.read_indexed(self.index, offset, length, self._resyncs.generation)

    def read_indexed(self, index: ExtentIndex, offset: int, length: int, generation: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of the image ``index`` describes (live or a view's),
        as a reader opened in resync ``generation`` sees them (what a :class:`VolumeView` reads)."""
        self._check_range(offset, length)
        with self._lock:
            old = generation < self._resyncs.generation
            try:
                pieces = index.lookup(offset, length)
                if len(pieces) == 1:
                    return self._piece(*pieces[0], old)
                return b"".join([self._piece(*p, old) for p in pieces])
            except OSError as e:  # a failing disk: the reader gets EIO, the daemon goes on
                raise io_error(f"cannot read volume {self.name}", e, DiskFailed) from e

    def _piece(self, pos: int, length: int, lsn: int, old: bool) -> bytes:
        """One index piece; records already written back come from the base. Caller locks.

        A view opened before a resync's switch (``old``) reads everything from the base, which
        holds its version until the merge (that waits for it); newer readers see the staged
        blocks of the switch over the base until the merge."""
        if lsn > self._applied and not old:
            return self.log.read_extent(lsn, pos, length)
        if self._below is not None:  # a clone: what it never wrote is its source's version
            return self._below.read(pos, length)
        overlay = self._resyncs.overlay
        if overlay is not None and not old:
            return overlay.read(self._base_fd, pos, length)
        data = os.pread(self._base_fd, length, pos)
        assert len(data) == length, "base image shorter than the volume"
        return data

    # ------------------------------------------------------------------ writeback

    @io_path("writeback")
    def writeback(self, upto: int | None = None, *, max_bytes: int | None = WRITEBACK_BATCH,
                  past_limit: bool = False) -> int:
        """Apply durable records up to ``upto`` (default: all durable) to the base; returns A.

        Applies at most about ``max_bytes`` of log per call (None: no limit), so that the
        volume lock is never held long; call again until A reaches the target. Stops at the
        oldest open view. Trims log segments that hold only applied records. A clone never
        writes back (its base is its source's version). After a resync's switch, first merges
        its staged blocks into the base once no older view needs the base as it is, and writes
        nothing back before that (the staged blocks would shadow the newer records).
        ``past_limit``: also past a mirror's visible LSN (a resync's finish).
        """
        if self.clone_of is not None:
            return self._applied
        if not self._resyncs.merge():
            return self._applied
        with self._writeback_lock:
            with self._lock:
                bound = self.durable_lsn if upto is None else min(upto, self.durable_lsn)
                if self.replay_limit is not None and not past_limit:
                    bound = min(bound, self.replay_limit)
                pinned = self._views.oldest()
                if pinned is not None:
                    bound = min(bound, pinned)
                start = self._applied
                if bound <= start:
                    return start
            batch = wb.collect(self.log, start, bound, max_bytes)
            with self._lock:
                target = batch[-1].lsn
                pinned = self._views.oldest()  # a view may have opened meanwhile
                if pinned is not None:
                    target = min(target, pinned)
                if target <= start:
                    return start
                self._oldest = max(self._oldest, target)  # no view older than target may open now
            records = [r for r in batch if r.type == RecordType.WRITE and r.lsn <= target]
            target_ts = batch[target - batch[0].lsn].timestamp_ns
            if records:  # from here until A = target is persisted, the base is ahead of A
                wb.persist_intent(self.path, start, target, self._oldest_ts)
            wb.apply(self.log, self._base_fd, records)
            self.counters.writeback_bytes += sum(r.length for r in records)
            wb.persist_applied(self.path, target, target_ts)
            with self._lock:
                self._applied = target  # from now on extents <= target read from the base
                self._oldest_ts = target_ts
            for at in range(0, len(records), 256):  # a little at a time: writers wait microseconds
                with self._lock:
                    for rec in records[at : at + 256]:
                        self.index.discard(rec.offset, rec.length, target, rec.lsn)
            self._trim(target)
            return target

    # ------------------------------------------------------------------ log deletion (G8)

    def _trim(self, applied: int, *, keep_oldest: bool = True) -> None:
        """Delete the segments every rule lets go (see "Log deletion"). Caller holds the
        writeback lock (only writeback and :meth:`free_log` trim)."""
        keep = min(applied, self.hold_floor())
        if keep == self.log.last_lsn:
            self.log.rotate()  # the active segment is never trimmed: close it so it can go later
        # The record of the oldest version stays (its mark name and flush time still name it),
        # unless log space needs it gone (``keep_oldest`` false).
        self.log.trim(keep - 1 if keep_oldest else keep)

    def trim_points(self) -> list[int]:
        """The applied LSNs at which :meth:`free_log` lets each sealed log segment go, oldest
        first: once writeback passed its last record (the record of the oldest version stays),
        or reached it when it is the newest record (see :meth:`free_log`)."""
        last = self.log.last_lsn
        return [lsn + 1 if lsn < last else lsn for lsn in self.log.trim_points()]

    def hold_floor(self) -> int:
        """The log must keep every record after this for the mirrors: the oldest mirror
        position, where a mirror whose log was dropped counts as at its drop point."""
        return self._ledger.floor(self.log.last_lsn)

    def hold(self, key: str, lsn: int) -> None:
        """Keep records after ``lsn`` in the log (a mirror still has to fetch them). Cheap (the
        trio loop calls it at every ACK): persisted later by :meth:`persist_holds`. A mirror
        whose position passed its drop point has caught up: its set of changes is cleared."""
        self._ledger.hold(key, lsn)

    def release(self, key: str) -> None:
        """Forget a mirror (it left): its position and its set of changes."""
        self._ledger.release(key)

    @property
    def holds(self) -> dict[str, int]:
        """Hold key -> the position that holds the log (a copy)."""
        return self._ledger.positions()

    def persist_holds(self) -> None:
        """Write the mirrors' positions if they changed, and remove the files of cleared sets
        (in that order: a crash in between leaves a set whose mirror is past it, which
        opening clears). The node calls it once per maintenance pass (the rate limit)."""
        with self._writeback_lock:
            self._ledger.persist()

    def free_log(self, upto: int, *, drop: bool) -> int:
        """Free log space up to record ``upto`` (log space ran out; G8): write back up to it
        (cutting the history window), and with ``drop`` also drop it for every mirror that has
        not fetched it, remembering the extents it misses (:mod:`marsfs.volume.changes`);
        then trim. Returns the LSN writeback reached: less than ``upto`` when an open version
        (a view or a clone) pins it or the records are not durable yet. A clone never writes
        back, so it frees nothing."""
        if self.clone_of is not None:
            return self._applied
        while self._applied < upto:  # batch by batch: writers get the lock in between
            before = self._applied
            if self.writeback(upto) == before:
                break
        with self._writeback_lock:
            reach = self._applied
            if drop:
                self._ledger.drop(reach, self._extents_between_locked)
            # a quiet volume written back to its newest record: log space may take that record too
            # (the oldest version is the image itself; its time is kept apart), else a segment
            # started under a larger limit would stay until the next write
            self._trim(reach, keep_oldest=reach < self.log.last_lsn)
        return reach

    def dropped(self) -> dict[str, ChangeSet]:
        """Mirror (hold key) -> the set of changes it will copy, for every mirror whose log was
        dropped (copies: status reads them)."""
        return self._ledger.dropped()

    def changed_ranges(self, mirror: str, position: int, upto: int | None = None) -> list[tuple[int, int]] | None:
        """Merged ``(offset, length)`` ranges ``mirror`` (a node name) must copy when it comes back having
        everything up to ``position``, so that copying their content at version ``upto``
        (default: the head now; pick the target before calling) and fetching the log after
        it makes it equal: its set of dropped changes plus the extents of the retained
        records after the drop point (or after ``position`` when that is retained). None
        when that is not known (its position lies before what the log and its set cover:
        it needs a full sync)."""
        key = mirror if hold_mirror(mirror) is not None else mirror_hold(mirror)
        with self._writeback_lock:  # nothing is trimmed while the log is scanned
            cs = self._ledger.changes_of(key)
            ranges = cs.ranges() if cs is not None else []
            since, cs_upto = (cs.since, cs.upto) if cs is not None else (0, 0)
            end = self.head_lsn if upto is None else min(upto, self.head_lsn)
            if position >= self.log.first_lsn - 1:
                return self._extents_between_locked(position, end)
            if cs is not None and position >= since:
                after = self._extents_between_locked(max(position, cs_upto), end)
                assert after is not None, f"records after the drop point {cs_upto} were trimmed"
                return ch.merge(ranges, after)
            return None

    # ------------------------------------------------------------------ resync

    @property
    def resync(self) -> Resync | None:
        """The running resync (also one found on open), None if there is none."""
        return self._resyncs.running

    @property
    def generation(self) -> int:
        """How many resyncs switched this volume since it opened: a view whose
        :attr:`VolumeView.generation` is smaller shows a version from before the last switch."""
        return self._resyncs.generation

    def begin_resync(self, lsn: int, chain: bytes, size: int, uuid: str, *, direct: bool = False) -> Resync:
        """Start bringing this volume to another node's version ``lsn`` (its ``chain``, ``size``
        and volume ``uuid``); see :mod:`marsfs.volume.resync`. The volume keeps serving its
        versions and refuses appends until :meth:`finish_resync` or :meth:`abort_resync`.

        ``direct``: stage straight into the base (a new replica that nobody reads: views are
        refused until the switch); needs a volume with nothing unapplied."""
        return self._resyncs.begin(lsn, chain, size, uuid, direct=direct)

    def finish_resync(self) -> bool:
        """Switch to the resync's target (see :mod:`marsfs.volume.resync`): True when done;
        False when it has to wait for readers of older versions to close, with the reason in
        ``resync.waiting_for`` (call again later). Once True, version L is the volume's
        image, new readers see it, and the log continues at L+1."""
        return self._resyncs.finish()

    def abort_resync(self) -> None:
        """Drop the running resync and its staged data; the volume is as before (in direct mode
        the base keeps what was staged: it was unreadable and stays so)."""
        self._resyncs.abort()

    def switched_to(self, lsn: int, size: int) -> None:
        """A resync's switch restarted the log after ``lsn``: the base (with the switch's
        overlay) is that version, of ``size`` bytes, the oldest one; views opened from now on
        build their own indexes. Called by :class:`~marsfs.volume.resyncing.ResyncRunner`,
        which holds both locks."""
        self._applied = self._oldest = lsn
        self._oldest_ts = 0
        self.index = ExtentIndex()
        self.size = size
        self._sizes.reset(size)  # versions before the target are gone; rs.switch reset volume.json
        self._views.unshare()
        self._writes_since_flush = False
        if self.replay_limit is not None:
            self.replay_limit = lsn

    def extents_between(self, after: int, upto: int) -> list[tuple[int, int]] | None:
        """Merged ``(offset, length)`` ranges that WRITE records ``(after, upto]`` wrote, or None
        when the log no longer holds all of them."""
        with self._writeback_lock:  # only writeback trims the log
            return self._extents_between_locked(after, upto)

    def _extents_between_locked(self, after: int, upto: int) -> list[tuple[int, int]] | None:
        if after + 1 < self.log.first_lsn or upto > self.log.last_lsn:
            return None
        ext = Extents()
        for rec in self.log.records(after + 1, upto):
            if rec.type == RecordType.WRITE and rec.length:
                ext.add(rec.offset, rec.length)
        return list(ext)

    # ------------------------------------------------------------------ versions

    def view(self, lsn: int) -> VolumeView:
        """A read-only image of the volume after record ``lsn``; close it to unpin writeback.

        Views of one LSN share one extent index: only the first open scans records (A, lsn]."""
        with self._lock:
            running = self._resyncs.running
            if running is not None and running.direct:
                raise VolumeBusy(f"volume {self.name} is being copied from another node and has no version to "
                                 "read yet; wait until marsfs status shows it in sync")
            if not self._oldest <= lsn <= self.head_lsn:
                raise VersionNotFound(f"version lsn-{lsn} of volume {self.name} is not retained; "
                                      f"available: lsn-{self._oldest} to lsn-{self.head_lsn}")
            index = self._views.pin(lsn, time.time())
            first = self._applied + 1
            generation = self._resyncs.generation
            if index is None:
                self._building += 1
        if index is None:
            try:
                built = build_index(self.log.records(first, lsn))
            except BaseException:
                with self._lock:
                    self._building -= 1
                self.unpin(lsn, generation)
                raise
            with self._lock:
                self._building -= 1
                index = self._views.publish(lsn, built)
        return VolumeView(self, lsn, index, generation)

    def unpin(self, lsn: int, generation: int) -> None:
        """A view of ``lsn`` opened in resync ``generation`` closed (:meth:`VolumeView.close`
        calls it): writeback may pass it once no other view pins it."""
        with self._lock:
            self._views.unpin(lsn)
            self._resyncs.view_closed(generation)

    @property
    def open_versions(self) -> VersionIndexes:
        """The open versions (pins and shared indexes); read under no lock, for statistics."""
        return self._views

    @property
    def versions_building(self) -> int:
        """Version indexes being built from log records now (a resync's switch waits for them)."""
        return self._building

    def versions(self) -> list[VersionInfo]:
        """Oldest retained version, flush points, marks and head (the newest readers may see),
        in LSN order."""
        return list_versions(self.log, self._oldest, self.replayed_lsn)

    def splits(self) -> list[SplitInfo]:
        """The split versions a resolved split brain left here (``splits``)."""
        return list_splits(self.path)

    def split_view(self, name: str) -> SplitView:
        """Open split version ``name`` for reading; VersionNotFound if there is none."""
        return SplitView(*split_image(self.path, name))

    def version_listing(self) -> list[VersionInfo]:
        """What ``.versions/<vol>/`` lists: every retained mark and a bounded set of flush points
        up to what readers may see (the newest 100, then one per hour)."""
        return listing(self.log.flush_points(), self.log.marks, self._oldest, self.replayed_lsn)

    def resolve_version(self, spec: str) -> int:
        """LSN named by ``lsn-N``, a mark name, or an ISO-8601 UTC time (newest flush at or before)."""
        return resolve_version(self.log, spec, self._oldest, self.name)

    def find_version(self, spec: str) -> int:
        """The LSN of a version a reader may open now: retained (at least the oldest version)
        and visible (at most the head on a primary, the replay position on a mirror).
        VersionNotFound otherwise, naming the oldest available version."""
        return find_version(self.log, spec, self._oldest, self.replayed_lsn, self.name, self.head_lsn)
