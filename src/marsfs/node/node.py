"""A node: one state directory, its volumes, their roles, and the policies that run on them.

State directory layout::

    DIR/node.json            {"node": NAME, "created_ns": ...}: the immutable node name
    DIR/node-id              this node's random id (0600; marsfs.node.identity), made once
    DIR/lock                 flock'd by the running daemon
    DIR/control.sock         the daemon's control socket (faces layer)
    DIR/volumes/<vol>/       one volume (see marsfs.volume), plus role.json and, when the
                             volume has its own history window, history.json; splits.json
                             while it has unresolved split brains or a forced failover's loss
    DIR/trash/               volumes being deleted (renamed here first: atomic disappearance;
                             made at start, so that a delete needs no free space)
    DIR/meta.json            this node's copy of the cluster metadata (marsfs.node.meta)

Rules that hold here:

* One daemon per state directory (the ``lock`` file), and a state directory belongs to the node
  name it was created with forever.
* The node decides; faces (FUSE, control socket) translate. Every user-caused refusal is a
  :class:`~marsfs.errors.MarsError` whose message says what to do.
* A volume directory without ``volume.json`` is an aborted ``create`` that never returned; it is
  removed on start.
* What the node holds about a volume name is one :class:`VolumeEntry` (role, history window,
  open handles, fences, split brains, failover loss, why it failed to open, a copy to resume
  or redo); only the open :class:`Volume` objects of the served volumes are apart, in
  :attr:`Node.volumes`. The dicts :attr:`Node.opens`, :attr:`Node.failed`,
  :attr:`Node.resuming` and :attr:`Node.rejoin` are copies made from the entries.
* Roles (:class:`~marsfs.node.state.RoleRecord`) change only through the methods of
  :class:`Node`, under its lock, and each change is persisted before it is visible.
  ``status`` only reads.
* A volume that cannot be opened at start (a full or failing disk, a damaged log) is not
  served, and the others are: it is listed in :attr:`Node.failed` with a one-line reason, its
  directory stays as it is, and ``status`` shows it as failed until a restart opens it.
* Disk failures of a running volume are its own (``Volume.faults``); :meth:`Node.maintain`
  retries a failed writeback every pass and logs a failure once, not every second.
* History: every volume keeps the node's window (``serve --history``) unless it has its own
  (:meth:`Node.set_history`). :meth:`Node.maintain` writes back only what left the window, so
  every version inside it stays openable; open views pin writeback below that, too.
* Clones (:meth:`Node.clone`, :mod:`marsfs.volume.clone`): a clone pins its source's version
  until it takes its own copy (before a resync of the source switches) or is deleted. On start
  every volume is opened first, then each clone that reads through is attached to its source
  (pinning it again), all inside :meth:`Node.open`, so no :meth:`maintain` can run in between.
  A clone that cannot be attached stays on disk, detached and failed, with the reason in its
  errors, until it is deleted. A volume with clones that read from it is neither deleted nor
  left (:meth:`clones_of` lists those).
  A clone of a split version (``clone VOL@split-...``) pins nothing; that split version is not
  discarded (:meth:`Node.discard_split_version`) while the clone exists.
* Fencing: only the designated primary accepts writes. A fence (:meth:`Node.fence`, by a
  :class:`~marsfs.node.volstate.FenceHolder`: the metadata's ``designation``, the handover's
  ``handover``) makes ``Volume.write`` and new opens for writing fail with EROFS
  (:class:`~marsfs.errors.VolumeReadOnly`); the log stays as it is, tail included. A former
  primary that became a mirror keeps a ``mirror`` fence (the kernel may still know its
  writable inode) until it is primary again; mirrors refuse opens for writing anyway.
* ``create`` claims epoch 1 from LSN 1 in the cluster metadata (:attr:`Node.meta`); a name
  that was used before gets the epoch after the newest claim it had, so old claims lose.
  :meth:`become_mirror` turns a primary whose log is a prefix of the designated primary's
  history into its mirror: flushed first, visible at its head, persisted before it is served.
* A volume's replication mode (``create --mode``, :meth:`Node.set_mode`) is in the cluster
  metadata with its uuid; :attr:`Node.sync` (:mod:`marsfs.node.syncmode`) reads it and is the
  gate every application flush passes.
* Roles change hands (:mod:`marsfs.node.handover` orchestrates): a primary is fenced for a
  handover (holder ``handover``) only while nothing holds it open; a mirror is promoted only
  by :meth:`Node.promote`, which lifts its fences. Split brains found with peers and what a
  forced failover lost are kept in ``splits.json`` until the operator resolves them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from marsfs.aio import describe
from marsfs.errors import (
    DiskFailed,
    InvalidRequest,
    MarsError,
    NodeError,
    NoSpace,
    StateError,
    VolumeBusy,
    VolumeExists,
    VolumeNotFound,
    VolumeReadOnly,
    WrongRole,
)
from marsfs.fsutil import fsync_dir, read_json, write_json
from marsfs.names import RULE as NAME_RULE
from marsfs.names import check_node_name as check_node_name
from marsfs.names import check_volume_name as check_volume_name
from marsfs.names import is_name
from marsfs.node.identity import load_node_id
from marsfs.node.meta import META_FILE, ClusterMeta, primary_key
from marsfs.node.space import LogSpace, LogSpaceSetting, free_bytes
from marsfs.node.state import FailoverLoss, RoleRecord, SplitBrain
from marsfs.node.syncmode import ModeSetting, SyncGates
from marsfs.node.volstate import FenceHolder, Role
from marsfs.units import human_bytes
from marsfs.volume import DEFAULT_HISTORY_BYTES as DEFAULT_HISTORY_BYTES  # re-exported (marsfs.node)
from marsfs.volume import Retention, Volume
from marsfs.volume.splits import SplitInfo, discard_split, parse_split_name

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.json"  #: a volume's own history window, when it has one
SPLITS_FILE = "splits.json"  #: a volume's unresolved split brains and its last forced failover's loss


@dataclass(eq=False)
class VolumeEntry:
    """Everything this node holds about one volume name besides its open :class:`Volume`
    (:attr:`Node.volumes`): one record, made when the name is taken, dropped when it is freed."""

    role: RoleRecord | None = None  #: None while only :attr:`rejoin` remains of it
    history: Retention | None = None  #: its own history window (None: the node's)
    opens: int = 0  #: open handles (a face opened the image)
    fences: dict[FenceHolder, str] = field(default_factory=dict)  #: who refuses its writes, and why
    handover_to: str = ""  #: the node a handover fence (FenceHolder.HANDOVER) is for, while it stands
    splits: dict[str, SplitBrain] = field(default_factory=dict)  #: peer -> an unresolved split brain
    loss: FailoverLoss | None = None  #: what its last forced failover lost
    failed: str = ""  #: why it could not be opened at start (one line; "" : it was)
    #: a first copy (a fast sync) a crash interrupted: opened, not served, until the cluster takes it
    resuming: Volume | None = None
    rejoin: str = ""  #: an image copy a crash interrupted was removed: copy again from this source


class Node:
    """The volumes of one node. Thread-safe; blocking methods are called from worker threads."""

    def __init__(self, state: Path, name: str, *, history: Retention | None = None,
                 log_space: LogSpaceSetting | None = None) -> None:
        self.state = state
        self.name = name
        self.space = LogSpace(state, log_space)  #: the log space limit of all volumes (G8)
        self.history = history or Retention(DEFAULT_HISTORY_BYTES)  #: the node's window; a volume may have its own
        self.volumes: dict[str, Volume] = {}  #: the volumes served here, by name
        self._entries: dict[str, VolumeEntry] = {}  #: what the node holds about each volume name
        self._largest: int | None = None
        self.started = time.time()
        self._lock = threading.RLock()
        self._lock_fd = -1
        self.meta = ClusterMeta(state / META_FILE, name)  #: the cluster metadata as this node knows it
        self.node_id = ""  #: this node's id (``DIR/node-id``, see marsfs.node.identity), read when claimed
        #: the volumes' replication modes and the gate every application flush passes (on the trio thread)
        self.sync = SyncGates(self.meta)

    # ------------------------------------------------------------------ the volume entries

    def _entry(self, name: str) -> VolumeEntry:
        """The entry of ``name``, made empty if there is none (under the lock)."""
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = VolumeEntry()
        return entry

    @property
    def opens(self) -> Counter[str]:
        """Open handles by volume (a copy; 0 for a volume that has none)."""
        with self._lock:
            return Counter({n: e.opens for n, e in self._entries.items() if e.opens})

    def open_count(self, name: str) -> int:
        """Open handles of volume ``name`` (0 if none): what :attr:`opens` holds for it, without
        copying every volume's count."""
        with self._lock:
            entry = self._entries.get(name)
            return entry.opens if entry is not None else 0

    @property
    def failed(self) -> dict[str, str]:
        """Volumes that could not be opened at start -> why (one line); a copy."""
        with self._lock:
            return {n: e.failed for n, e in self._entries.items() if e.failed}

    @property
    def rejoin(self) -> dict[str, str]:
        """Mirrors whose image copy a crash interrupted (removed) -> the source to copy from again."""
        with self._lock:
            return {n: e.rejoin for n, e in self._entries.items() if e.rejoin}

    @property
    def resuming(self) -> dict[str, Volume]:
        """New replicas whose first copy (a fast sync) a crash interrupted: opened, not served,
        until the cluster takes them (:meth:`take_resuming`); a copy."""
        with self._lock:
            return {n: e.resuming for n, e in self._entries.items() if e.resuming is not None}

    def take_resuming(self) -> dict[str, Volume]:
        """The interrupted first copies, handed to the cluster that resumes them (once)."""
        with self._lock:
            taken = self.resuming
            for name in taken:
                self._entries[name].resuming = None
            return taken

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, state: Path, name: str, **kw: Any) -> Node:
        """Claim the state directory for ``name`` and recover every volume in it."""
        if not is_name(name):
            raise NodeError(f"invalid node name {name!r:.80}: use {NAME_RULE}")
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        node = cls(state, name, **kw)
        node._claim()
        try:
            node.node_id = load_node_id(state)
            node.space.check()
            node._recover()
            node.space.adopt(list(node.volumes.values()))
        except BaseException:
            node.close()
            raise
        return node

    def _claim(self) -> None:
        fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = (self.state / "lock").read_text().strip() or "another process"
            raise NodeError(f"state directory {self.state} is in use by a running daemon ({holder}); "
                            "stop it first or use another --state") from None
        self._lock_fd = fd
        meta_path = self.state / "node.json"
        if meta_path.exists():
            owner = read_json(meta_path).get("node")
            if owner != self.name:
                raise NodeError(f"state directory {self.state} belongs to node {owner!r}, not {self.name!r}; "
                                f"start with --node {owner} or use another --state")
        else:
            write_json(meta_path, {"node": self.name, "created_ns": time.time_ns()})
        # Overwrite, then cut: truncating first frees the block, and a full disk may not give it back.
        pid = f"pid {os.getpid()}\n".encode()
        try:
            os.pwrite(fd, pid, 0)
            os.ftruncate(fd, len(pid))
        except OSError as e:  # only says who holds the lock; the flock is what counts
            logger.info("could not write the pid into %s: %s", self.state / "lock", e.strerror)

    def _recover(self) -> None:
        vdir = self.state / "volumes"
        vdir.mkdir(exist_ok=True)
        shutil.rmtree(self.state / "trash", ignore_errors=True)  # deletes a crash interrupted
        try:  # made now, while there may be room: a delete on a full disk renames into it
            (self.state / "trash").mkdir()
        except OSError as e:
            logger.info("cannot make %s: %s (a delete makes it when it can)", self.state / "trash", e.strerror)
        for path in sorted(vdir.iterdir()):
            role = _read_role(path)
            if role.syncing and (path / "volume.json").exists() and self._resume_copy(path, role):
                continue
            if not (path / "volume.json").exists() or role.syncing:
                if role.syncing:  # an image copy a crash interrupted: copy again
                    self._entry(path.name).rejoin = role.source
                logger.warning("removing %s: an aborted create or image copy", path)
                shutil.rmtree(path)
                continue
            t = time.perf_counter()
            try:
                vol = Volume.open(path)
            except (MarsError, OSError) as e:
                entry = self._entry(path.name)
                entry.failed, entry.role = _open_failure(path.name, e), role
                logger.error("%s", entry.failed)
                continue
            rep = vol.log.recovery
            logger.info("volume %s recovered: %d records, %.1f MiB verified in %.2f s%s", vol.name, rep.records,
                     rep.bytes_scanned / 2**20, time.perf_counter() - t,
                     f", cut a torn tail of {rep.torn_bytes} bytes ({rep.torn_reason})" if rep.torn_bytes else "")
            if role.is_mirror:
                vol.replay_limit = (min(role.replayed_lsn, vol.durable_lsn) if role.replay_paused
                                   else vol.durable_lsn)
                vol.replay_limit = max(vol.replay_limit, vol.applied_lsn)
            self.volumes[vol.name] = vol
            entry = self._entry(vol.name)
            entry.role, entry.history = role, _read_history(path)
            try:
                self._read_splits(vol.name)
            except StateError as e:  # the volume is still served; status says what is wrong
                logger.error("%s", e)
                vol.errors.append(str(e))
            if vol.clone_of is not None and not role.is_clone:  # a crash between volume.json and role.json
                self._persist_role(vol.name, RoleRecord(role=Role.CLONE))
        for vol in self.volumes.values():  # sources are all open now: pin what the clones hold
            if vol.clone_of is not None:
                self._attach(vol)

    def _resume_copy(self, path: Path, role: RoleRecord) -> bool:
        """Keep a first copy (a fast sync into a new replica) that a crash interrupted, so that
        it resumes where it was: its volume opens, unserved, into :attr:`resuming`."""
        try:
            vol = Volume.open(path)
        except (MarsError, OSError) as e:
            logger.warning("cannot resume the copy of %s (%s): starting it again", path.name, describe(e))
            return False
        entry = self._entry(vol.name)
        entry.resuming, entry.role = vol, role
        logger.info("the first copy of %s from %s resumes", vol.name, role.source)
        return True

    def _attach(self, clone: Volume) -> None:
        link = clone.clone_of
        assert link is not None
        if link.own:  # it has its own copy of the version: it needs no source
            return
        source = self.volumes.get(link.source)
        try:
            if source is None:
                raise VolumeNotFound(f"clone {clone.name}: its source volume {link.source} is not on this node; "
                                     f"delete the clone: marsfs delete {clone.name}")
            clone.attach_source(source)
        except MarsError as e:
            logger.error("%s", e)
            clone.errors.append(str(e))

    def close(self) -> None:
        """Make every log durable and release the state directory."""
        with self._lock:
            # clones first: each holds a view of its source
            for vol in sorted(self.volumes.values(), key=lambda v: v.clone_of is None):
                try:
                    vol.close()
                except MarsError as e:
                    logger.error("closing volume %s: %s", vol.name, e)
            self.volumes.clear()
            for vol in self.take_resuming().values():
                try:
                    vol.close()
                except MarsError as e:
                    logger.error("closing volume %s: %s", vol.name, e)
            try:
                self.meta.close()
            except OSError as e:
                logger.error("could not write the cluster metadata %s: %s", self.meta.path, e.strerror)
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    # ------------------------------------------------------------------ volumes

    def volume(self, name: str) -> Volume:
        vol = self.volumes.get(name)
        entry = self._entries.get(name)
        if vol is None and entry is not None and entry.failed:
            raise StateError(entry.failed)
        if vol is None and entry is not None and entry.role is not None and entry.role.syncing:
            # its first copy runs (or resumes): the name is taken, the image not served yet
            raise VolumeNotFound(f"volume {name!r} is still being copied to node {self.name} from "
                                 f"{entry.role.source} (its first sync) and is not served yet; wait for it: "
                                 f"marsfs wait {name} --synced")
        if vol is None:
            known = ", ".join(sorted(self.volumes)) or "none"
            raise VolumeNotFound(f"no volume {name!r} on node {self.name} (volumes here: {known}); "
                                 "create it with: marsfs create NAME --size SIZE")
        return vol

    def create(self, name: str, size: int, *, thin: bool = False, mode: ModeSetting | None = None) -> Volume:
        """A new volume with this node as its primary. Refused up front when the size cannot
        work; a create that fails half way leaves nothing behind (name and directory free).
        ``mode``: its replication mode, said in the cluster metadata with the claim (None: async).

        The base image is reserved on disk (fallocate) unless ``thin``: a reserved volume's
        writeback never meets a full disk. A reservation that does not fit is :class:`NoSpace`
        with both sizes."""
        with self._lock:
            path = self.check_new(name)
            limit = self.largest_volume()
            if not 0 < size <= limit or size % 512:
                raise InvalidRequest(f"volume size {size} bytes ({human_bytes(size)}) is not possible here: give a "
                                     f"multiple of 512 bytes up to {human_bytes(limit)}, the largest file the "
                                     f"filesystem of {self.state} holds")
            if not thin:
                self.check_room(name, size)
            # a name used before (deleted, maybe after a handover) may have claims of any epoch:
            # the new volume's claim must be newer than all of them
            before = self.meta.designated(name)
            try:
                vol = Volume.create(path, name, size, reserve=not thin)
                role = RoleRecord(epoch=before.epoch + 1 if before is not None else 1)
                write_json(path / "role.json", role.to_json())
            except BaseException as e:
                shutil.rmtree(path, ignore_errors=True)
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(_no_room(name, size, free_bytes(self.state), self.state, thin=thin)) from None
                raise
            self.volumes[name] = vol
            self._entries[name] = VolumeEntry(role=role)
            self.meta.claim(name, self.name, role.epoch, 1)
            if mode is not None:
                self.meta.set_mode(name, mode.to_json(vol.uuid))
            self.space.adopt(list(self.volumes.values()))
            logger.info("created volume %s of %d bytes%s, primary, replication %s", name, size,
                        " (thin)" if thin else "", (mode or ModeSetting()).describe())
            return vol

    def set_mode(self, name: str, mode: ModeSetting) -> None:
        """Set the replication mode of ``name`` in the cluster metadata (any member may; the
        newest word wins, and the primary acts on it once it has it). Refused on a clone."""
        vol = self.volume(name)
        if vol.clone_of is not None:
            raise InvalidRequest(f"{name} is a clone ({vol.clone_of.describe()}): a local volume, never replicated, "
                                 "so it has no replication mode")
        self.meta.set_mode(name, mode.to_json(vol.uuid))
        logger.info("volume %s: replication mode set to %s", name, mode.describe())

    def clone(self, source: str, version: str, name: str) -> Volume:
        """A new writable clone ``name`` of ``source``'s ``version`` (any name
        :meth:`Volume.find_version` resolves), holding that version of ``source`` until it is
        deleted. A clone that fails half way leaves nothing behind."""
        with self._lock:
            src = self.volume(source)
            path = self.check_new(name)
            split = version if parse_split_name(version) is not None else ""
            lsn = 0 if split else src.find_version(version)
            vol: Volume | None = None
            try:
                vol = Volume.create_clone(path, name, src, lsn, split=split)
                role = RoleRecord(role=Role.CLONE)
                write_json(path / "role.json", role.to_json())
            except BaseException as e:
                if vol is not None:
                    vol.close()
                shutil.rmtree(path, ignore_errors=True)  # check_new made sure it was not there
                self._refuse_no_space(e, f"clone {name!r}", "free space there")
                raise
            self.volumes[name] = vol
            self._entries[name] = VolumeEntry(role=role)
            self.space.adopt(list(self.volumes.values()))
            logger.info("cloned volume %s at %s as %s", source, version if split else f"lsn-{lsn}", name)
            return vol

    def discard_split_version(self, name: str, split: str) -> SplitInfo:
        """Remove split version ``split`` of volume ``name`` for good (``marsfs discard``).
        Refused while a clone reads from it; a reader that has it open keeps reading it until it
        closes."""
        with self._lock:
            vol = self.volume(name)
            if parse_split_name(split) is None:
                raise InvalidRequest(f"{name}@{split} is not a split version: only split versions "
                                     f"(split-NODE-LSN, listed by marsfs versions {name}) are discarded; the other "
                                     "versions go by themselves when the history window passes them")
            clones = [c for c, s in self.split_version_clones(name) if s == split]
            if clones:
                raise VolumeBusy(f"split version {split} of {name} has clones ({', '.join(clones)}) that read "
                                 f"from it; delete them first: marsfs delete {clones[0]}")
            info = discard_split(vol.path, split)
        logger.info("discarded split version %s of volume %s", split, name)
        return info

    def split_version_clones(self, name: str) -> list[tuple[str, str]]:
        """``(clone, split version)`` of every clone of a split version of volume ``name`` here, by name."""
        with self._lock:
            source = self.volumes.get(name)
            return sorted((v.name, v.clone_of.split) for v in self.volumes.values()
                          if v.clone_of is not None and v.clone_of.split and source is not None
                          and (v.clone_of.source, v.clone_of.source_uuid) == (name, source.uuid))

    def resize(self, name: str, size: int) -> int | None:
        """Grow volume ``name`` (this node its primary) to ``size`` bytes: the LSN of its RESIZE
        record, None when it has that size already. The growth is reserved on disk unless the
        volume is thin, and refused (NoSpace, nothing changed) when that does not fit."""
        with self._lock:
            vol = self.volume(name)
            role = self.role(name)
            if role.is_mirror:
                designation = self.meta.designated(name)
                primary = (f"its primary {designation.node}" if designation is not None and designation.node != self.name
                           else "its primary")
                raise WrongRole(f"volume {name!r} is a mirror on node {self.name} (it fetches from {role.source}); "
                                f"grow it on {primary} with marsfs resize {name} SIZE: this mirror grows when "
                                "it replays that")
            if vol.clone_of is not None:
                raise InvalidRequest(f"{name} is a clone ({vol.clone_of.describe()}) and keeps the size of that "
                                     "version")
            if vol.fence:  # not the designated primary: a resize is a write
                raise VolumeReadOnly(f"cannot resize {name}: {vol.fence}")
            limit = self.largest_volume()
            if size > limit:
                raise InvalidRequest(f"volume size {size} bytes ({human_bytes(size)}) is not possible here: the "
                                     f"filesystem of {self.state} holds files up to {human_bytes(limit)}")
            grow = size - vol.size
            free = free_bytes(self.state)
            if not vol.thin and grow > free:
                raise NoSpace(_no_grow(name, grow, free, self.state))
            try:
                lsn = vol.resize(size, reserve=not vol.thin)
            except NoSpace:
                raise NoSpace(_no_grow(name, grow, free_bytes(self.state), self.state)) from None
        if lsn is not None:
            logger.info("resized volume %s to %d bytes at lsn-%d", name, size, lsn)
        return lsn

    def check_room(self, name: str, size: int, *, join: str = "") -> None:
        """Refuse (NoSpace, both numbers) a reservation of ``size`` bytes for the base image of
        volume ``name`` that does not fit the free space now; ``join``: the source of a join
        (the message then says how to join it thin)."""
        free = free_bytes(self.state)
        if size > free:
            raise NoSpace(_no_room(name, size, free, self.state, join=join))

    def _refuse_no_space(self, e: BaseException, what: str, hint: str) -> None:
        """Raise NoSpace when ``e`` says the state directory's filesystem is full."""
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space to create {what} in {self.state}: {e.strerror}; {hint}") from None

    def clones_of(self, name: str) -> list[tuple[str, int]]:
        """``(clone, lsn)`` of every clone of a version of volume ``name`` here that reads from it
        (that volume, not another one of the same name; a clone with its own copy reads from
        nothing), by name; clones of its split versions are :meth:`split_version_clones`."""
        with self._lock:
            source = self.volumes.get(name)
            return sorted((v.name, v.clone_of.lsn) for v in self.volumes.values()
                          if v.clone_of is not None and not v.clone_of.split and not v.clone_of.own
                          and source is not None
                          and (v.clone_of.source, v.clone_of.source_uuid) == (name, source.uuid))

    def largest_volume(self) -> int:
        """The largest file the state directory's filesystem holds (probed once, with sparse
        truncates of a scratch file: ext4 with 4 KiB blocks stops just below 16 TiB)."""
        if self._largest is None:
            self._largest = _largest_file(self.state)
        return self._largest

    def check_new(self, name: str) -> Path:
        """The directory for a new volume ``name``; refuses names in use."""
        check_volume_name(name)
        path = self.state / "volumes" / name
        entry = self._entries.get(name)
        if name in self.volumes or (entry is not None and entry.role is not None) or path.exists():
            copying = (f" (being copied from {entry.role.source}: marsfs wait {name} --synced)"
                       if name not in self.volumes and entry is not None and entry.role is not None
                       and entry.role.syncing else "")
            advice = copying or f"; pick another name, or remove it first: marsfs delete {name}"
            raise VolumeExists(f"volume {name!r} already exists on node {self.name}{advice}")
        return path

    def role(self, name: str) -> RoleRecord:
        """The role record of a volume on this node (of a volume being copied, too)."""
        with self._lock:
            entry = self._entries.get(name)
            role = entry.role if entry is not None else None
        if role is None:
            self.volume(name)  # raises the usual unknown-volume error
            raise AssertionError(f"volume {name} has no role record")
        return role

    def set_role(self, name: str, **changes: Any) -> RoleRecord:
        """Change and persist a volume's role record (fields of RoleRecord)."""
        with self._lock:
            role = self.role(name).changed(**changes)
            self._persist_role(name, role)
            return role

    def _persist_role(self, name: str, role: RoleRecord) -> None:
        write_json(self.state / "volumes" / name / "role.json", role.to_json())
        entry = self._entry(name)
        entry.role, entry.rejoin = role, ""

    def begin_mirror(self, name: str, source: str, epoch: int) -> Path:
        """Start an image copy of ``name`` from ``source``: the role record comes first, so a
        crash during the copy makes the next start copy again. Returns the volume directory."""
        with self._lock:
            path = self.check_new(name)
            path.mkdir(parents=True)
            self._persist_role(name, RoleRecord(role=Role.MIRROR, epoch=epoch, source=source, syncing=True))
            return path

    def abort_mirror(self, name: str) -> None:
        """An image copy failed: forget the volume and remove what it left (not yet served)."""
        with self._lock:
            assert name not in self.volumes, f"{name} is served; abort_mirror is for unfinished copies"
            self._entries.pop(name, None)
            shutil.rmtree(self.state / "volumes" / name, ignore_errors=True)

    def finish_mirror(self, vol: Volume) -> None:
        """Serve a mirror whose image copy finished (durably) and start counting replay."""
        with self._lock:
            assert vol.name not in self.volumes
            self._persist_role(vol.name, self.role(vol.name).changed(syncing=False, resync_whole=False,
                                                                     replayed_lsn=vol.replayed_lsn))
            self.volumes[vol.name] = vol
            self.space.adopt(list(self.volumes.values()))

    def is_mirror(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and entry.role is not None and entry.role.is_mirror

    def check_delete(self, name: str, *, force: bool = False, mirrors: list[str] | None = None) -> None:
        """Raise what :meth:`delete` would refuse with, changing nothing (callers that must stop
        other work first ask before they stop it)."""
        with self._lock:
            if name not in self.failed:  # a failed volume is only its directory: nothing refuses
                self.volume(name)
            clones = [c for c, _ in self.clones_of(name)] + [c for c, _ in self.split_version_clones(name)]
            if clones:  # even with --force: a clone reads through to this volume
                raise VolumeBusy(f"volume {name!r} has clones ({', '.join(sorted(clones))}) that read from it; "
                                 f"delete them first: marsfs delete {sorted(clones)[0]}")
            opens = self._entry(name).opens
            if opens and not force:
                # a mirror leaves (leave has no --force for it); a primary's delete may force
                then = (f"then run marsfs leave {name} again" if self.role(name).is_mirror
                        else "or use marsfs delete --force")
                raise VolumeBusy(f"volume {name!r} is open ({opens} handle(s), e.g. a loop device); "
                                 f"detach it first (umount, losetup -d), {then}")
            if not self.role(name).is_mirror and mirrors and not force:
                raise VolumeBusy(f"volume {name!r} is primary with mirrors ({', '.join(mirrors)}); "
                                 "let them leave first or use --force")

    def delete(self, name: str, *, force: bool = False, mirrors: list[str] | None = None) -> None:
        """Remove a volume from this node. ``mirrors``: the nodes known to fetch it from here
        (the cluster layer knows them); a primary with mirrors is kept unless ``force``.

        Needs no free space, so that it works on a full disk and frees it: the directory is
        renamed into the ``trash`` made at start (a rename takes no new blocks), then removed.
        A crash after the rename leaves it in the trash, which the next start empties; before
        it, the volume is whole. A volume that could not be opened at start (a full disk, say)
        is deleted the same way."""
        with self._lock:
            entry = self._entries.get(name)
            if name not in self.volumes and entry is not None and entry.failed:
                self._entries.pop(name, None)
                self._discard(self.state / "volumes" / name)
                self._withdraw(name)
                logger.info("deleted volume %s (it was not served: %s)", name, entry.failed)
                return
            self.check_delete(name, force=force, mirrors=mirrors)
            vol = self.volume(name)
            del self.volumes[name]
            self._entries.pop(name, None)
            self.space.adopt(list(self.volumes.values()))
        try:
            vol.close()
        except MarsError as e:  # the log could not be made durable: it is being removed anyway
            logger.info("closing volume %s for its deletion: %s", name, e)
        self._discard(vol.path)
        self._withdraw(name)
        logger.info("deleted volume %s", name)

    def discard_failed(self, name: str) -> Path:
        """Take a volume that could not be opened at start out of this node: its directory moves
        to the trash (which the next start empties), its name is free. Returns where it is now,
        for the caller to read (a seed) and remove."""
        with self._lock:
            entry = self._entries.get(name)
            if name in self.volumes or entry is None or not entry.failed:
                raise StateError(f"volume {name!r} on node {self.name} is not a failed volume")
            trash = self.state / "trash"
            trash.mkdir(exist_ok=True)
            target = trash / f"{name}.{time.time_ns()}"
            path = self.state / "volumes" / name
            os.rename(path, target)
            fsync_dir(path.parent)
            del self._entries[name]
            return target

    def _withdraw(self, name: str) -> None:
        """Tell the cluster this node holds no copy of ``name`` any more (members and positions
        elsewhere forget it). The volume is gone either way: a metadata file that cannot be
        written now (a full disk) is said, and the withdrawal is gossiped once it can be."""
        try:
            self.meta.withdraw(name)
        except MarsError as e:
            logger.warning("deleted volume %s, but could not record it in the cluster metadata yet: %s", name, e)

    def _discard(self, path: Path) -> None:
        """Remove a volume directory without needing free space (see :meth:`delete`)."""
        trash = self.state / "trash"
        target = trash / f"{path.name}.{time.time_ns()}"
        try:
            trash.mkdir(exist_ok=True)  # made at start: a full disk may not give the block for it now
            os.rename(path, target)
            fsync_dir(path.parent)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # no trash and no block for one: drop volume.json first, which makes what is left
            # an aborted create that the next start removes
            (path / "volume.json").unlink(missing_ok=True)
            fsync_dir(path)
            target = path
        shutil.rmtree(target)

    def acquire(self, name: str, *, write: bool = False) -> Volume:
        """Count an open handle (a face opened the image); ``write``: it opens for writing,
        refused with EROFS on a fenced volume."""
        with self._lock:
            vol = self.volume(name)
            if write and vol.fence:
                raise VolumeReadOnly(vol.fence)
            if write and self.is_mirror(name):
                raise VolumeReadOnly(f"volume {name} is a mirror here: write on its primary")
            self._entry(name).opens += 1
            return vol

    # ------------------------------------------------------------------ fencing and roles

    def fence(self, name: str, why: str, *, holder: FenceHolder = FenceHolder.DESIGNATION) -> None:
        """Refuse writes to ``name`` (EROFS, message ``why``) until ``holder`` lifts its fence."""
        with self._lock:
            vol = self.volume(name)
            fences = self._entry(name).fences
            if fences.get(holder) != why:
                fences[holder] = why
                vol.fence = "; ".join(fences.values())
                logger.info("volume %s refuses writes: %s", name, why)

    def unfence(self, name: str, *, holder: FenceHolder = FenceHolder.DESIGNATION) -> None:
        with self._lock:
            entry = self._entries.get(name)
            fences = entry.fences if entry is not None else {}
            if fences.pop(holder, None) is None:
                return
            vol = self.volumes.get(name)
            if vol is not None:
                vol.fence = "; ".join(fences.values())
                if not vol.fence:
                    logger.info("volume %s takes writes again", name)

    def fenced(self, name: str) -> dict[FenceHolder, str]:
        """Who fences ``name`` and why (empty: not fenced)."""
        with self._lock:
            entry = self._entries.get(name)
            return dict(entry.fences) if entry is not None else {}

    def become_mirror(self, name: str, source: str, epoch: int) -> None:
        """Turn this primary of ``name`` into a mirror of ``source`` at ``epoch``: its log is
        a prefix of ``source``'s history (the caller checked LSNs; the fetch checks chains).
        Flushed first; visible at its head; writes refused from here on. Refused while open."""
        with self._lock:
            vol = self.volume(name)
            role = self.role(name)
            assert role.role == Role.PRIMARY, f"{name} is {role.role} here"
            entry = self._entry(name)
            if entry.opens:
                raise VolumeBusy(f"volume {name!r} is open ({entry.opens} handle(s)); it becomes a mirror of "
                                 f"{source} once it is closed (losetup -d)")
            vol.flush()
            vol.replay_limit = vol.durable_lsn
            self._persist_role(name, RoleRecord(role=Role.MIRROR, epoch=epoch, source=source,
                                                replayed_lsn=vol.durable_lsn))
            entry.fences = {FenceHolder.MIRROR: f"volume {name} is a mirror of {source} here: write on {source}"}
            vol.fence = entry.fences[FenceHolder.MIRROR]
        logger.info("volume %s is now a mirror of %s (epoch %d) from LSN %d", name, source, epoch, vol.durable_lsn)

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.opens > 0:
                entry.opens -= 1

    def mark(self, name: str, mark: str) -> int:
        """Name the current LSN. Only the primary writes history: a mark written on a mirror
        would fork its log from its source's (split brain on the next record)."""
        vol = self.volume(name)
        role = self.role(name)
        if role.is_mirror:
            raise WrongRole(f"volume {name!r} is a mirror on node {self.name}: marks are written on the primary "
                            f"and replicated; run marsfs mark {name} {mark} on its primary (this mirror fetches "
                            f"from {role.source})")
        return vol.mark(mark)

    # ------------------------------------------------------------------ roles: handover, failover, split brain

    def fence_for_handover(self, name: str, peer: str) -> None:
        """Fence primary ``name`` (holder :attr:`FenceHolder.HANDOVER`) while ``peer`` takes it over.
        Refused (and nothing changes) while the image is open at all: a handover needs a closed
        image, so that no write can come after the head the new primary fetches, and so that
        this node can become its mirror; and while the volume is being handed over to another
        node: one claimant at a time, so that two handovers at once cannot both claim."""
        with self._lock:
            vol = self.volume(name)
            role = self.role(name)
            if role.role != Role.PRIMARY or vol.clone_of is not None:
                raise WrongRole(f"volume {name!r} is not primary on node {self.name}; ask its primary")
            opens = self._entry(name).opens
            if opens:
                raise VolumeBusy(f"volume {name!r} is open on its primary {self.name} ({opens} "
                                 f"holder(s), e.g. a loop device or a mount); close it there first (umount, "
                                 f"losetup -d), then run marsfs primary {name} again")
            entry = self._entry(name)
            other = entry.handover_to if FenceHolder.HANDOVER in entry.fences else ""
            if other and other != peer:  # one claimant at a time: the first one's handover goes on
                raise VolumeBusy(f"volume {name!r} is being handed over to {other} already: {other} becomes its "
                                 f"primary, not {peer}; see marsfs status {name}, and hand over from {other} "
                                 f"once it is primary if {peer} is to be")
            entry.handover_to = peer
            self.fence(name, f"volume {name} is being handed over to {peer}: write on {peer} once marsfs "
                             f"status {name} there shows it primary", holder=FenceHolder.HANDOVER)

    def unfence_handover(self, name: str) -> None:
        """The handover ended without a claim: writes again."""
        if name in self.volumes:
            self.unfence(name, holder=FenceHolder.HANDOVER)

    def promote(self, name: str, epoch: int) -> None:
        """Make this node's mirror of ``name`` its primary for ``epoch``: writable, its log
        continues after what it holds (the caller stopped the fetch and claimed the epoch).
        Persisted before it is visible."""
        with self._lock:
            vol = self.volume(name)
            role = self.role(name)
            if not role.is_mirror:
                raise WrongRole(f"volume {name!r} is already primary on node {self.name}: nothing to do")
            self._persist_role(name, RoleRecord(role=Role.PRIMARY, epoch=epoch))
            vol.replay_limit = None
            for holder in (FenceHolder.MIRROR, FenceHolder.DESIGNATION):  # the caller claimed the epoch
                self.unfence(name, holder=holder)
        logger.info("volume %s is primary here from LSN %d, epoch %d", name, vol.head_lsn + 1, epoch)

    def splits(self, name: str) -> list[SplitBrain]:
        """The unresolved split brains of ``name`` here, by peer, with their figures as they
        are now: this node's tail from its log, the peer's from its newer published position,
        and on each side how much of it that side wrote as primary (:meth:`written_after`)."""
        with self._lock:
            entry = self._entries.get(name)
            splits = entry.splits if entry is not None else {}
            found = [splits[p] for p in sorted(splits)]
            vol = self.volumes.get(name)
            role = entry.role if entry is not None else None
        if vol is None or role is None:
            return found
        return [self._split_now(name, vol, role, s) for s in found]

    def _split_now(self, name: str, vol: Volume, role: RoleRecord, s: SplitBrain) -> SplitBrain:
        fork, head = s.fork_lsn, vol.head_lsn
        own_records = max(0, head - fork)
        own_bytes = (s.own_bytes if own_records == s.own_records
                     else vol.log.bytes_between(max(fork, vol.log.first_lsn - 1), head))
        p = self.meta.position(s.peer, name)
        peer_head = p.head_lsn if p is not None and p.updated > s.found else fork + s.peer_records
        peer_written = (self.written_after(name, s.peer, p.role, p.epoch, fork, peer_head) if p is not None
                        else None)
        return replace(s, own_records=own_records, own_bytes=own_bytes,
                       own_written=self.written_after(name, self.name, role.role, role.epoch, fork, head),
                       peer_records=max(0, peer_head - fork), peer_written=peer_written,
                       peer_bytes_at_least=peer_head - fork > s.peer_records)

    def written_after(self, name: str, owner: str, role: str, epoch: int, fork: int, head: int) -> int:
        """How many of ``owner``'s records ``(fork, head]`` of ``name`` it wrote itself as primary:
        those from the start of the epoch it claimed last, if it is primary in that epoch (a
        mirror's records after a fork were fetched: it turns mirror only with a prefix)."""
        if role != Role.PRIMARY:
            return 0
        claim = self.meta.get(owner, primary_key(name))
        start = claim.get("start_lsn") if isinstance(claim, dict) and claim.get("epoch") == epoch else None
        if type(start) is not int:
            return 0
        return max(0, head - max(fork, start - 1))

    def record_split(self, name: str, split: SplitBrain) -> None:
        """Remember (persistently) a split brain with ``split.peer``; it stays until cleared."""
        with self._lock:
            self.volume(name)
            self._entry(name).splits[split.peer] = split
            self._write_splits(name)

    def clear_splits(self, name: str, peer: str | None = None) -> None:
        """The split brains of ``name`` (with ``peer``, or all) are resolved: this node was
        invalidated, or the peer it split from follows our history again."""
        with self._lock:
            entry = self._entry(name)
            if peer is None:
                entry.splits.clear()
            else:
                entry.splits.pop(peer, None)
            self._write_splits(name)

    def failover_loss(self, name: str) -> FailoverLoss | None:
        """What the forced failover that made this node primary may have lost, while that is
        news of now: this node is primary in the epoch the failover started and no later epoch
        started anywhere (the record stays, but a handover on, a later failover or turning
        mirror ends what it describes). None otherwise."""
        with self._lock:
            entry = self._entries.get(name)
            loss = entry.loss if entry is not None else None
            role = entry.role if entry is not None else None
        if loss is None or role is None or role.role != Role.PRIMARY or role.epoch != loss.epoch:
            return None
        d = self.meta.designated(name)
        return loss if d is None or d.epoch <= loss.epoch else None

    def record_failover(self, name: str, loss: FailoverLoss) -> None:
        with self._lock:
            self._entry(name).loss = loss
            self._write_splits(name)

    def _write_splits(self, name: str) -> None:
        path = self.state / "volumes" / name / SPLITS_FILE
        entry = self._entry(name)
        splits = [s.to_json() for _, s in sorted(entry.splits.items())]
        loss = entry.loss
        if not splits and loss is None:
            path.unlink(missing_ok=True)
            return
        write_json(path, {"splits": splits, "failover_loss": loss.to_json() if loss is not None else None})

    def _read_splits(self, name: str) -> None:
        path = self.state / "volumes" / name / SPLITS_FILE
        try:
            d = read_json(path)
            splits = [SplitBrain.from_json(x) for x in d.get("splits", [])]
            loss = FailoverLoss.from_json(d["failover_loss"]) if d.get("failover_loss") else None
        except FileNotFoundError:
            return
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{path}: unreadable ({e}); restore it or remove it (the split brains and the "
                             "failover loss it records are then forgotten)") from None
        entry = self._entry(name)
        entry.splits, entry.loss = {x.peer: x for x in splits}, loss

    # ------------------------------------------------------------------ policies

    def history_of(self, name: str) -> Retention:
        """The history window of a volume: its own, else the node's."""
        entry = self._entries.get(name)
        own = entry.history if entry is not None else None
        return own if own is not None else self.history

    def own_history(self, name: str) -> Retention | None:
        """The window set for this volume alone (None: it follows the node's)."""
        self.volume(name)
        with self._lock:
            return self._entry(name).history

    def set_history(self, name: str, history: Retention | None) -> None:
        """Give a volume its own history window (None: back to the node's); persisted. A
        shorter window takes effect at the next :meth:`maintain`; a longer one cannot bring
        back what was written back already."""
        with self._lock:
            self.volume(name)
            path = self.state / "volumes" / name / HISTORY_FILE
            if history is None:
                path.unlink(missing_ok=True)
            else:
                write_json(path, history.to_json())
            self._entry(name).history = history

    def enforce_space(self, now_ns: int | None = None) -> int:
        """Keep the logs inside the node's log space limit (:mod:`marsfs.node.space`); returns
        the bytes freed. The daemon runs it whenever a log grew by a quarter segment. A disk
        fault met on the way is the volume's (it stands in its status); the next pass retries."""
        try:
            return self.space.enforce(dict(self.volumes), self.history_of, now_ns)
        except MarsError as e:
            logger.info("log space enforcement: %s", e)
            return 0

    def maintain(self, now_ns: int | None = None) -> None:
        """Periodic work: write back what falls out of the history window (``now_ns``: the
        time the window ends, default now; tests move it instead of sleeping), keep the log
        space limit, persist the mirrors' positions (at most once a pass: the rate limit)."""
        now = time.time_ns() if now_ns is None else now_ns
        self.enforce_space(now)
        for vol in list(self.volumes.values()):
            try:
                vol.persist_holds()
            except MarsError as e:
                logger.info("%s", e)
            before_fault = vol.fault("writeback")
            try:
                target = history_floor(vol, self.history_of(vol.name), now)
                while vol.applied_lsn < target:  # batch by batch: writers get the lock in between
                    before = vol.applied_lsn
                    if vol.writeback(target) == before:
                        break  # pinned by an open view
            except MarsError as e:  # the volume's fault (Volume.faults); retried next pass
                if before_fault is None or str(before_fault) != str(e):
                    logger.error("writeback of %s: %s", vol.name, e)
                continue
            if before_fault is not None and vol.fault("writeback") is None:
                logger.info("writeback of %s works again", vol.name)

    def failed_role(self, name: str) -> RoleRecord:
        """The role record of a volume that could not be opened at start (a primary's if it had none)."""
        with self._lock:
            entry = self._entries.get(name)
            return entry.role if entry is not None and entry.role is not None else RoleRecord()


def _open_failure(name: str, e: MarsError | OSError) -> str:
    """One line: why volume ``name`` did not open at start, and what to do."""
    if isinstance(e, MarsError):
        what = str(e)
        todo = "restart the daemon" if isinstance(e, (NoSpace, DiskFailed)) else ""
    else:
        what = f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
        todo = ("free space on the state directory's filesystem, then restart the daemon"
                if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the disk (dmesg), then restart the daemon")
    return f"volume {name} is not served: it could not be opened: {what}" + (f"; then {todo}" if todo else "")


def _no_room(name: str, size: int, free: int, state: Path, *, thin: bool = False, join: str = "") -> str:
    """One line: the base image of ``name`` does not fit (``join``: the source of a join)."""
    what = "its log and metadata" if thin else f"the reservation of its {human_bytes(size)} base image"
    if join:
        todo = (f"free space there, or join it --thin (marsfs join {name} --from {join} --thin: its writeback "
                "then fails with ENOSPC when the disk fills)")
    else:
        todo = "free space there, pick a smaller size" + ("" if thin else ", or create it --thin (its writes then "
                                                          "fail with ENOSPC when the disk fills)")
    return f"no room for volume {name!r}: {what} does not fit the {human_bytes(free)} free on the filesystem of {state}; {todo}"


def _no_grow(name: str, grow: int, free: int, state: Path) -> str:
    return (f"no room to grow volume {name!r}: reserving {human_bytes(grow)} more does not fit the "
            f"{human_bytes(free)} free on the filesystem of {state}; free space there or give a smaller size "
            "(the volume is unchanged)")


def _largest_file(directory: Path) -> int:
    """Binary search, at 4 KiB, for the largest size a sparse file in ``directory`` can have."""
    probe = directory / ".size-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        def fits(n: int) -> bool:
            try:
                os.ftruncate(fd, n)
                return True
            except (OSError, OverflowError):
                return False
        lo, hi = 4096, 1 << 62  # fits(lo); the answer is below hi
        if fits(hi):
            return hi
        while hi - lo > 4096:
            mid = (lo + hi) // 2 // 4096 * 4096
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo
    finally:
        os.close(fd)
        probe.unlink()


def history_floor(vol: Volume, history: Retention, now_ns: int) -> int:
    """The newest LSN to write back so that every version inside ``history`` stays."""
    return min(vol.durable_lsn, max(vol.applied_lsn, history.floor(vol.log, now_ns)))


def _read_history(path: Path) -> Retention | None:
    try:
        d = read_json(path / HISTORY_FILE)
    except FileNotFoundError:
        return None
    return Retention(d.get("keep_bytes"), d.get("keep_seconds"))


def _read_role(path: Path) -> RoleRecord:
    try:
        return RoleRecord.from_json(read_json(path / "role.json"), str(path / "role.json"))
    except FileNotFoundError:
        return RoleRecord()
