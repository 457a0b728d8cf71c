"""Resync: bringing a volume to another node's version by receiving only some of its blocks.

Catch-up after the source dropped log (G8), fast sync (``invalidate``, join onto an existing
image, a resumed full copy) and split-brain resolution all end the same way: the volume's image
must become the source's image after LSN *L* (the *target*), its log must continue at *L+1*
with the source's chain, and readers must never see anything but a consistent version.

Theory of operation
-------------------
A resync lives in ``<volume>/resync/``:

* ``resync.json``: the target (LSN, chain, size, uuid), the volume's durable head *F* when the
  resync began (``base_lsn``), ``direct``, and the ``phase``: ``staging`` or ``switch``.
  Written atomically.
* ``staged.img``: a sparse file at volume offsets holding the staged blocks (not in direct mode).
* ``staged.ext``: the staged extent set, ``<QQ`` (offset, length) pairs, replaced atomically by
  :meth:`Resync.sync` *after* the staged data is fdatasync'd. Only extents in this file are
  trusted after a crash: bytes a crash left in ``staged.img`` outside them are never read.

The *staged image* is the volume's image at *F* with the staged extents laid over it. The caller
(replication) guarantees that every block where it differs from the target has been staged
(it compares block sums of :meth:`Resync.read` with the source's, or copies known extents).

Phases, each persisted before its effects (a crash anywhere leaves the old volume with the
resync resumable, or the switched one; opening the volume redoes the rest, idempotently):

1. ``staging``: writes go to ``staged.img``; readers see the volume's versions as before (the
   log does not grow: the caller stops fetching, and the volume refuses appends). The staged
   image stays readable across restarts, so a resync resumes, also toward a newer target
   (:meth:`Resync.retarget`).
2. :meth:`marsfs.volume.Volume.finish_resync` writes the old log back up to *F* (waiting, and
   saying so in :attr:`Resync.waiting_for`, while views below *F* are open: writeback never
   passes a pinned view), then persists ``switch`` and does the switch: the log restarts after
   *L* (:meth:`marsfs.log.Log.restart`), the volume grows to the target size, ``applied.json``
   says *A = L*, then the directory is renamed ``<volume>/merge/`` (the merge phase; its own
   name, so that the next resync may begin before it is merged). From then on the base image
   *overlaid* with the staged extents (:class:`Overlay`) is version *L*; versions before *L*
   are gone for new opens.
3. merge: as soon as no view opened before the switch is left (those read the base without
   the overlay, byte-exact), the staged extents are copied into the base, the base is
   fdatasync'd and ``merge/`` is removed. Until then writeback waits, because the overlay would
   shadow records after *L*, and the next resync's switch waits too. Opening a volume (no views
   exist) merges at once, before it resumes a resync that began meanwhile (whose image at its
   *F* is the base with the overlay, i.e. the merged base).

Direct mode (a new replica nobody reads yet): blocks are staged straight into the base, which
is the volume's image at *F* only when nothing is unapplied (*A = F*, checked). The switch is
the same without an overlay, and aborting leaves the staged bytes in the base (the volume was
unreadable before and stays so until a resync finishes).

:func:`checkpoint` names every durable step; tests replace it to crash there.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sortedcontainers import SortedDict

from marsfs.errors import DiskFailed, InvalidRequest, OutOfRange
from marsfs.fsutil import fsync_dir, read_json, write_all, write_atomic, write_json
from marsfs.log import Log, io_error
from marsfs.volume import writeback as wb

RESYNC_DIR = "resync"
MERGE_DIR = "merge"
STATE_FILE = "resync.json"
STAGED_IMAGE = "staged.img"
STAGED_EXTENTS = "staged.ext"
_PAIR = struct.Struct("<QQ")
#: bytes one merge step copies from the staged image into the base
MERGE_CHUNK = 4 * 1024 * 1024

STAGING, SWITCH = "staging", "switch"


def checkpoint(step: str) -> None:
    """A durable step of the switch or the merge is done (a seam: crash tests raise here)."""


class Extents:
    """A set of byte ranges, merged: ``start -> end``, never overlapping nor touching."""

    def __init__(self) -> None:
        self._ends: SortedDict = SortedDict()
        self.total = 0  #: bytes covered

    def __len__(self) -> int:
        return len(self._ends)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(offset, length) of every range, in order."""
        for start, end in self._ends.items():
            yield start, end - start

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        start, end = offset, offset + length
        ends = self._ends
        i = ends.bisect_left(start)
        if i and ends.peekitem(i - 1)[1] >= start:  # the previous range reaches us: join it
            i -= 1
        while i < len(ends):
            s, e = ends.peekitem(i)
            if s > end:
                break
            start, end = min(start, s), max(end, e)
            self.total -= e - s
            del ends[s]
        ends[start] = end
        self.total += end - start

    def pieces(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Cover ``[offset, offset+length)`` with ``(pos, length, inside)`` pieces in order."""
        end = offset + length
        out: list[tuple[int, int, bool]] = []
        pos = offset
        ends = self._ends
        i = ends.bisect_right(offset)
        if i:
            i -= 1
        while i < len(ends) and pos < end:
            s, e = ends.peekitem(i)
            i += 1
            if e <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                out.append((pos, s - pos, False))
                pos = s
            stop = min(e, end)
            out.append((pos, stop - pos, True))
            pos = stop
        if pos < end:
            out.append((pos, end - pos, False))
        return out

    def to_bytes(self) -> bytes:
        return b"".join(_PAIR.pack(s, n) for s, n in self)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Extents:
        out = cls()
        for s, n in _PAIR.iter_unpack(raw):
            out.add(s, n)
        return out


@dataclass(frozen=True, slots=True)
class ResyncState:
    """What ``resync.json`` holds (see the module docstring)."""

    target_lsn: int
    target_chain: bytes
    size: int
    uuid: str
    base_lsn: int
    direct: bool
    phase: str = STAGING

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_chain"] = self.target_chain.hex()
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ResyncState:
        return cls(int(raw["target_lsn"]), bytes.fromhex(raw["target_chain"]), int(raw["size"]), str(raw["uuid"]),
                   int(raw["base_lsn"]), bool(raw["direct"]), str(raw["phase"]))


def resync_dir(volume_path: Path) -> Path:
    return volume_path / RESYNC_DIR


def load_state(volume_path: Path) -> ResyncState | None:
    """The persisted resync of the volume in ``volume_path``, None if there is none. A resync
    directory without its state file is what a crash left while creating or removing it
    (likewise a merge directory: :func:`merge_pending` is False for it)."""
    if (volume_path / MERGE_DIR).exists() and not merge_pending(volume_path):
        remove(volume_path, MERGE_DIR)
    d = resync_dir(volume_path)
    if not (d / STATE_FILE).exists():
        if d.exists():
            remove(volume_path)
        return None
    return ResyncState.from_json(read_json(d / STATE_FILE))


def persist_state(volume_path: Path, state: ResyncState) -> None:
    try:
        write_json(resync_dir(volume_path) / STATE_FILE, state.to_json())
    except OSError as e:
        raise io_error(f"cannot write the resync state of {volume_path}", e, DiskFailed) from e


def merge_pending(volume_path: Path) -> bool:
    """Does a switched resync wait to be merged into the base (see :func:`merge_at_open`)?"""
    return (volume_path / MERGE_DIR / STATE_FILE).exists()


def load_extents(d: Path) -> Extents:
    """The durable staged extents of the resync (or merge) directory ``d``."""
    f = d / STAGED_EXTENTS
    return Extents.from_bytes(f.read_bytes()) if f.exists() else Extents()


def remove(volume_path: Path, which: str = RESYNC_DIR) -> None:
    """Drop the resync (or merge) directory: the state file first (atomic), so that a crash
    half way leaves a directory that :func:`load_state` recognises as garbage."""
    d = volume_path / which
    (d / STATE_FILE).unlink(missing_ok=True)
    if d.exists():
        fsync_dir(d)
        shutil.rmtree(d)
        fsync_dir(volume_path)


def create(volume_path: Path, state: ResyncState) -> None:
    """Make the resync directory (empty staged image of the target size, no extents) and,
    last, its state file."""
    d = resync_dir(volume_path)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    if not state.direct:
        fd = os.open(d / STAGED_IMAGE, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, state.size)
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(d)
    fsync_dir(volume_path)
    persist_state(volume_path, state)


def open_staged(d: Path) -> int:
    return os.open(d / STAGED_IMAGE, os.O_RDWR)


def _pread(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; zeros past the end of the file (a volume that grows)."""
    data = os.pread(fd, length, offset)
    return data if len(data) == length else data + bytes(length - len(data))


def merge_into(base_fd: int, staged_fd: int, extents: Extents) -> None:
    """Copy the staged extents into the base and fdatasync it (idempotent: redo after a crash)."""
    try:
        for start, n in extents:
            for at in range(start, start + n, MERGE_CHUNK):
                k = min(MERGE_CHUNK, start + n - at)
                write_all(base_fd, _pread(staged_fd, k, at), at)
        os.fdatasync(base_fd)
    except OSError as e:
        raise io_error("cannot merge the resynced blocks into the base image", e, DiskFailed) from e


def switch(volume_path: Path, log: Log, state: ResyncState) -> ResyncState | None:
    """The switch, from the persisted ``switch`` phase on (idempotent: open redoes it).

    Restarts the log after the target (unless it already was), grows the volume, persists
    *A = L*, then the ``merge`` phase; returns that state, or None in direct mode (nothing to
    merge: the resync is over and its directory gone)."""
    assert state.phase == SWITCH
    L = state.target_lsn
    if not (log.first_lsn == L + 1 and log.last_lsn == L and log.last_chain == state.target_chain):
        log.restart(L, state.target_chain)
    checkpoint("log-restarted")
    meta = read_json(volume_path / "volume.json")
    try:
        if state.size > int(meta["size"]) or meta.get("resizes"):  # sizes of versions before L are gone
            fd = os.open(volume_path / "base.img", os.O_RDWR)
            try:
                if os.fstat(fd).st_size < state.size:
                    os.ftruncate(fd, state.size)
                    os.fsync(fd)
            finally:
                os.close(fd)
            write_json(volume_path / "volume.json", {**meta, "size": state.size, "resizes": []})
    except OSError as e:
        raise io_error(f"cannot grow volume {meta['name']} to {state.size} bytes", e, DiskFailed) from e
    checkpoint("grown")
    wb.persist_applied(volume_path, L)
    checkpoint("applied")
    if state.direct:
        remove(volume_path)
        checkpoint("removed")
        return None
    # The merge phase is its own directory, so that a new resync may begin before it is done.
    assert not merge_pending(volume_path), "the previous switch is merged before the next one"
    try:
        os.rename(resync_dir(volume_path), volume_path / MERGE_DIR)
        fsync_dir(volume_path)
    except OSError as e:
        raise io_error(f"cannot persist the switch of {volume_path}", e, DiskFailed) from e
    checkpoint("merge-intent")
    return state


def merge_at_open(volume_path: Path) -> None:
    """Merge a switched resync's staged extents into the base and drop its directory (no
    views exist while a volume opens)."""
    d = volume_path / MERGE_DIR
    extents = load_extents(d)
    base = os.open(volume_path / "base.img", os.O_RDWR)
    try:
        staged = open_staged(d)
        try:
            merge_into(base, staged, extents)
        finally:
            os.close(staged)
    finally:
        os.close(base)
    checkpoint("merged")
    remove(volume_path, MERGE_DIR)


class Overlay:
    """The staged extents of a finished resync over the base, until they are merged into it."""

    def __init__(self, extents: Extents, staged_fd: int) -> None:
        self.extents = extents
        self.fd = staged_fd

    def read(self, base_fd: int, offset: int, length: int) -> bytes:
        """Bytes of the base with the staged extents over it."""
        parts = [_pread(self.fd if inside else base_fd, n, pos)
                 for pos, n, inside in self.extents.pieces(offset, length)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Resync:
    """A running resync of one volume (see the module docstring). Thread-safe.

    Made by :meth:`marsfs.volume.Volume.begin_resync` or found by ``Volume.open``; ``read_old``
    reads the volume's image at *F* (a view pinned there), ``fd`` is ``staged.img`` or, in
    direct mode, the base image (not owned).
    """

    def __init__(self, volume_path: Path, state: ResyncState, extents: Extents, fd: int,
                 read_old: Callable[[int, int], bytes] | None, old_size: int,
                 release: Callable[[], None]) -> None:
        self._path = volume_path
        self._state = state
        self._extents = extents
        self._fd = fd
        self._read_old = read_old
        self._old_size = old_size  #: the volume's size: the image at F reads zeros past it
        self._release = release
        self._lock = threading.Lock()
        # True at first: what an earlier process staged may sit unsynced in the page cache
        # (direct mode reads the base whole, so those bytes count): the next sync covers them.
        self._dirty = True
        #: "" or why :meth:`Volume.finish_resync` could not switch yet (views pinned below F)
        self.waiting_for = ""

    @property
    def state(self) -> ResyncState:
        return self._state

    @property
    def target_lsn(self) -> int:
        return self._state.target_lsn

    @property
    def target_chain(self) -> bytes:
        return self._state.target_chain

    @property
    def size(self) -> int:
        return self._state.size

    @property
    def uuid(self) -> str:
        return self._state.uuid

    @property
    def base_lsn(self) -> int:
        return self._state.base_lsn

    @property
    def direct(self) -> bool:
        return self._state.direct

    @property
    def staged_bytes(self) -> int:
        """Bytes staged so far (overlaps counted once)."""
        return self._extents.total

    @property
    def extents(self) -> Extents:
        """The staged extents (including those not yet made durable by :meth:`sync`)."""
        return self._extents

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._state.size:
            raise OutOfRange(f"range {offset}+{length} lies outside the resync target of "
                             f"{self._state.size} bytes")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Stage ``data`` at ``offset``: kept, invisible to readers, durable after :meth:`sync`."""
        self._check(offset, len(data))
        assert self._fd >= 0, "write to a finished or aborted resync"
        try:
            write_all(self._fd, data, offset)
        except OSError as e:
            raise io_error("cannot stage resync data", e, DiskFailed) from e
        with self._lock:
            self._extents.add(offset, len(data))
            self._dirty = True

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the staged image (the image at F with what is staged laid over it)."""
        self._check(offset, length)
        with self._lock:
            pieces = self._extents.pieces(offset, length)
        try:
            parts = [self._read_piece(pos, n, inside) for pos, n, inside in pieces]
        except OSError as e:
            raise io_error("cannot read the staged resync image", e, DiskFailed) from e
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_piece(self, pos: int, n: int, staged: bool) -> bytes:
        if staged or self._read_old is None:  # direct: the base is the staged image
            return _pread(self._fd, n, pos)
        if pos >= self._old_size:
            return bytes(n)
        inside = min(n, self._old_size - pos)
        data = self._read_old(pos, inside)
        return data if inside == n else data + bytes(n - inside)

    def sync(self) -> None:
        """Make everything staged so far durable: the data first, then the extent set."""
        with self._lock:
            if not self._dirty:
                return
            raw = self._extents.to_bytes()
            self._dirty = False
        try:
            os.fdatasync(self._fd)
            write_atomic(resync_dir(self._path) / STAGED_EXTENTS, raw)
        except OSError as e:
            with self._lock:
                self._dirty = True
            raise io_error("cannot make the staged resync data durable", e, DiskFailed) from e

    def retarget(self, lsn: int, chain: bytes, size: int) -> None:
        """Aim at another version of the source (newer, usually: the source moved on while this
        resync was interrupted). What is staged stays; the caller re-compares sums."""
        if size < self._state.size:
            raise InvalidRequest(f"the new resync target has {size} bytes, less than the {self._state.size} of the "
                                 "old one; volumes never shrink: resync from the node that holds this volume")
        try:
            if os.fstat(self._fd).st_size < size:  # the staged image (or, direct, the base) grows
                os.ftruncate(self._fd, size)
        except OSError as e:
            raise io_error(f"cannot grow the staged resync image to {size} bytes", e, DiskFailed) from e
        with self._lock:
            self._state = replace(self._state, target_lsn=lsn, target_chain=chain, size=size)
        persist_state(self._path, self._state)

    def set_phase(self, phase: str) -> None:
        self._state = replace(self._state, phase=phase)
        persist_state(self._path, self._state)

    def detach(self) -> int:
        """Stop serving reads of the old image (unpin it) and hand over the staged fd."""
        self._release()
        self._read_old = None
        fd, self._fd = self._fd, -1
        return fd

    def close(self) -> None:
        """Release the pinned view and (outside direct mode) the staged image."""
        fd = self.detach()
        if fd >= 0 and not self._state.direct:
            os.close(fd)
