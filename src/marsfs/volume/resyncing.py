"""Resyncing: a volume's resyncs from begin to merge, on top of the volume's core.

The mechanism (staging, the switch's durable steps, the merge) is :mod:`marsfs.volume.resync`,
the rules (when a resync may begin and switch) are :mod:`marsfs.volume.resync_control`; this
module runs them against one volume (:class:`ResyncRunner`), which the volume owns and
delegates ``begin_resync``, ``finish_resync`` and ``abort_resync`` to. It holds what a resync
adds to a volume's state:

* the running resync (staging; the volume refuses appends while there is one);
* the *overlay* of a switched resync (its staged blocks over the base, until merged);
* the *generation*: +1 at each switch; views of older generations read the base alone, and
  the merge waits until none of them is open (``old_views``);
* why a switch failed half way (only a reopen goes on from there).

It reaches the volume only through :class:`ResyncHost`, the few public methods of the volume it
needs (as views do through :class:`~marsfs.volume.views.VersionSource`), and the volume's two
locks and base image, given at construction: its state is guarded by the volume lock, and a
switch or a merge holds the writeback lock too (lock order: writeback lock, then volume lock).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

from marsfs.errors import MarsError, StateError, VolumeBusy
from marsfs.log import Log
from marsfs.volume import resync as rs
from marsfs.volume import resync_control as rc
from marsfs.volume.clone import CloneLink
from marsfs.volume.faults import IO_FAULTS, Faults
from marsfs.volume.resync import Overlay, Resync, ResyncState
from marsfs.volume.views import VersionIndexes, VolumeView


class ResyncHost(Protocol):
    """What a resync runs on: a volume (:class:`marsfs.volume.Volume` is one)."""

    path: Path
    name: str
    uuid: str
    log: Log
    #: a mirror's visible LSN (None: a primary); a finish raises it to F, the switch sets it to L
    replay_limit: int | None
    fault_state: Faults

    @property
    def size(self) -> int: ...

    @property
    def clone_of(self) -> CloneLink | None: ...

    @property
    def head_lsn(self) -> int: ...

    @property
    def applied_lsn(self) -> int: ...

    @property
    def open_versions(self) -> VersionIndexes: ...

    @property
    def versions_building(self) -> int:
        """Version indexes being built from log records (a switch waits for them)."""
        ...

    def view(self, lsn: int) -> VolumeView:
        """Open (and pin) version ``lsn``."""
        ...

    def writeback(self, upto: int | None = None, *, max_bytes: int | None = ..., past_limit: bool = False) -> int:
        """Apply durable records up to ``upto`` to the base; returns A."""
        ...

    def fault(self, where: str) -> MarsError | None:
        """The failure standing at ``where``, None if it works."""
        ...

    def free_clones(self) -> dict[int, str]:
        """Make every clone of this volume take its own copy (none may hold up a switch);
        LSN -> the clone that could not, and why."""
        ...

    def switched_to(self, lsn: int, size: int) -> None:
        """The log restarted after ``lsn``: the base (with the overlay) is that version, of
        ``size`` bytes, and nothing older is left. Caller holds both locks."""
        ...


class ResyncRunner:
    """The resyncs of one volume: begin, resume (at open), finish (the switch), merge, abort.

    Thread-safe through the volume's locks (see the module docstring)."""

    def __init__(self, volume: ResyncHost, lock: threading.RLock, writeback_lock: threading.Lock,
                 base_fd: int) -> None:
        self._volume = volume
        self._lock = lock
        self._writeback_lock = writeback_lock
        self._base_fd = base_fd  #: the volume's base image (not owned)
        self.running: Resync | None = None  #: the running resync (see :mod:`marsfs.volume.resync`)
        self.overlay: Overlay | None = None  #: a switched resync's staged blocks, until merged
        self.generation = 0  #: +1 at each switch; views of older generations read the old base
        self.old_views = 0  #: open views of older generations (the merge waits for them)
        self.switch_failed = ""  #: why a switch failed half way ("" if it did not)
        self._holders: dict[int, str] = {}  #: LSN -> the clone holding it that could not let go
        #: (LSN, since) of the versions open at the last switch (the merge waits for them)
        self._old_pins: list[tuple[int, float]] = []

    def busy(self) -> VolumeBusy:
        """What an append meets while a resync runs. Caller locks."""
        r = self.running
        assert r is not None
        return rc.busy(self._volume.name, r.target_lsn)

    def view_closed(self, generation: int) -> None:
        """A view opened in ``generation`` closed (the merge may be waiting for it). Caller locks."""
        if generation < self.generation:
            self.old_views -= 1
            assert self.old_views >= 0

    def begin(self, lsn: int, chain: bytes, size: int, uuid: str, *, direct: bool) -> Resync:
        """The work of :meth:`marsfs.volume.Volume.begin_resync` (whose docstring says what holds)."""
        v = self._volume
        rc.check_begin(v.name, v.uuid, v.size, v.clone_of is not None,
                       None if self.running is None else self.running.target_lsn, target_uuid=uuid, target_size=size)
        if direct and self.overlay is not None:
            self.merge()  # a direct resync writes the base: nothing may be laid over it later
        v.log.sync()
        with self._lock:
            if direct and self.overlay is not None:
                raise VolumeBusy(f"volume {v.name} has not merged its previous resync yet; retry in a moment")
            if self.running is not None or v.log.dirty:
                raise VolumeBusy(f"volume {v.name} was written while a resync began; stop writing and retry")
            base = v.head_lsn
            if direct and v.open_versions:
                raise VolumeBusy(f"volume {v.name} has {v.open_versions.total()} open version(s); a direct "
                                 "resync overwrites the base they read: close them first")
            if direct and v.applied_lsn != base:
                raise StateError(f"volume {v.name} has records after lsn-{v.applied_lsn} that are not written "
                                 "back; a direct resync needs none: write back first")
            state = ResyncState(lsn, chain, size, uuid, base, direct)
            rs.create(v.path, state)
            return self.resume(state)

    def resume(self, state: ResyncState) -> Resync:
        """Expose a persisted resync that is staging (pins the image at F it reads under)."""
        assert state.phase == rs.STAGING, state
        v = self._volume
        d = rs.resync_dir(v.path)
        if state.direct:
            fd = self._base_fd
            if os.fstat(fd).st_size < state.size:
                os.ftruncate(fd, state.size)
            r = Resync(v.path, state, rs.load_extents(d), fd, None, v.size, lambda: None)
        else:
            old = v.view(state.base_lsn)
            try:
                fd = rs.open_staged(d)
            except BaseException:
                old.close()
                raise
            r = Resync(v.path, state, rs.load_extents(d), fd, old.read, old.size, old.close)
        with self._lock:
            self.running = r
        return r

    def _switch_waits(self, base: int) -> str:
        """Why a resync from ``base`` cannot switch now ("" if it can; :func:`.resync_control.switch_waits`).
        Caller locks."""
        v = self._volume
        pins = v.open_versions
        still = set(pins.pinned())
        return rc.switch_waits(base, merging=self.overlay is not None, old_views=self.old_views,
                               merge_fault=v.fault("writeback"),
                               pinned=[(lsn, pins.since(lsn)) for lsn in pins.pinned()],
                               building=v.versions_building, holders=self._holders,
                               old_pins=[(lsn, t) for lsn, t in self._old_pins if lsn in still])

    def finish(self) -> bool:
        """The work of :meth:`marsfs.volume.Volume.finish_resync` (whose docstring says what holds)."""
        v = self._volume
        r = self.running
        if r is None:
            raise StateError(f"no resync of volume {v.name} is running")
        r.sync()
        base = r.base_lsn
        if self.overlay is not None:
            self.merge()
        if not r.direct:
            # Clones hold views of any version, also of F and newer ones (the merge would wait for
            # those): each takes its own copy now. No lock is held; a copy takes a while.
            self._holders = v.free_clones()
            with self._lock:
                if v.replay_limit is not None and v.replay_limit < base:
                    v.replay_limit = base  # writeback passes it now; base is a replayed, durable prefix
            while True:
                with self._lock:
                    r.waiting_for = self._switch_waits(base)
                if r.waiting_for:
                    return False
                if v.applied_lsn >= base:
                    break
                v.writeback(base, max_bytes=None, past_limit=True)
        with self._writeback_lock, self._lock:
            r.waiting_for = self._switch_waits(base)
            if r.waiting_for:
                return False
            assert v.applied_lsn == base == v.head_lsn, (v.applied_lsn, base, v.head_lsn)
            rs.checkpoint("written-back")
            staged_fd = r.detach()  # unpins the image at F
            try:
                r.set_phase(rs.SWITCH)
                rs.checkpoint("switch-intent")
                merging = rs.switch(v.path, v.log, r.state)
            except BaseException as e:  # the resync is detached: only a reopen goes on from here
                self.switch_failed = (f"the switch of a resync failed half way ({e}); restart the daemon: "
                                      "opening the volume finishes it")
                if not r.direct:
                    os.close(staged_fd)
                raise
            self.generation += 1
            self.old_views = v.open_versions.total()
            self._old_pins = [(lsn, v.open_versions.since(lsn)) for lsn in v.open_versions.pinned()]
            v.switched_to(r.target_lsn, r.size)
            self.running = None
            if merging is not None:
                self.overlay = Overlay(r.extents, staged_fd)
        try:
            self.merge()
        except IO_FAULTS as e:  # switched all the same: writeback retries the merge
            v.fault_state.record("writeback", e)
        return True

    def merge(self) -> bool:
        """Merge a switched resync's staged blocks into the base once no view opened before the
        switch needs the base as it was; True when no overlay is left."""
        if self.overlay is None:  # the cheap check writeback makes every time
            return True
        with self._writeback_lock:
            with self._lock:
                overlay = self.overlay
                if overlay is None:
                    return True
                if self.old_views:
                    return False
            rs.merge_into(self._base_fd, overlay.fd, overlay.extents)
            rs.checkpoint("merged")
            rs.remove(self._volume.path, rs.MERGE_DIR)
            with self._lock:
                self.overlay = None
        overlay.close()  # frees the staged image's blocks: may take a while, holds no lock
        return True

    def abort(self) -> None:
        """The work of :meth:`marsfs.volume.Volume.abort_resync` (whose docstring says what holds)."""
        r = self.running
        if r is None:
            return
        rs.remove(self._volume.path)
        with self._lock:
            self.running = None
        r.close()

    def close(self) -> None:
        """Release the running resync's files and the overlay's (the volume closes)."""
        if self.running is not None:
            self.running.close()
        if self.overlay is not None:
            self.overlay.close()
