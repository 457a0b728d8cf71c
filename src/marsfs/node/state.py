"""Typed node state: a volume's role record, its status, and the one rule for mirror states.

Rules that hold here:

* Everything the node persists about a volume's role (``role.json``) is a :class:`RoleRecord`;
  everything ``status`` shows is a :class:`VolumeStatus` with :class:`PeerStatus` rows. Their
  JSON keys are their fields, the one schema of ``status --json``; nothing else builds status dicts.
* A mirror's state is derived by :func:`mirror_state` from plain facts, and a mirror as its
  primary sees it by :func:`peer_state`; both return :class:`VolumeState` members. No other
  code decides which state a mirror is in, and nothing here reads a clock or does I/O.

State diagram of a volume on one node (docs/architecture.md draws it)::

    create ──> up (primary) ──error──> failed
               up ──a newer epoch names another primary──> fenced ──log is a prefix──> (mirror)
               up/fenced ──chains differ from a peer's (found by compare)──> split-brain
    (mirror) ──marsfs primary [--force]──> up (primary, next epoch)
    join ──> syncing ──copy done──> catching-up <──> synced
                                      │  ^               │
                 fetch-paused <───────┤  └── replay-paused
                 disconnected/stalled <┘  (link trouble; back on reconnect)
                 resyncing (fast sync: invalidate, join onto an image, or the source
                 dropped the log we needed) ──switched──> catching-up
                 split-brain, needs-resync (refused by the source, or its volume was
                 deleted or replaced: operator action)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from marsfs.errors import StateError
from marsfs.replication.session import STALL_AFTER, Stop, refusal_stop
from marsfs.units import human_bytes


class Role(StrEnum):
    PRIMARY = "primary"
    MIRROR = "mirror"
    CLONE = "clone"  #: a local writable clone of a version (marsfs.volume.clone); its own primary


class VolumeState(StrEnum):
    """What ``status`` says a volume is doing on this node (the ``state`` field)."""

    UP = "up"  #: a primary serving writes
    FAILED = "failed"  #: the volume reported an error it cannot get past by itself
    NO_SPACE = "no-space"  #: the state filesystem is full: writes fail (ENOSPC) until there is room again
    SYNCING = "syncing"  #: a mirror copying the image; not readable yet
    CATCHING_UP = "catching-up"  #: a mirror behind its source, or not sure it is not
    SYNCED = "synced"  #: a mirror with no lag, on the word of a fresh heartbeat
    REPLAY_PAUSED = "replay-paused"
    FETCH_PAUSED = "fetch-paused"
    DISCONNECTED = "disconnected"  #: no connection to the source right now
    STALLED = "stalled"  #: no progress for a while although there is something to do
    SPLIT_BRAIN = "split-brain"  #: the source refused: our histories diverged
    #: the source no longer holds the log we need, or the volume we copied at all (deleted
    #: there, maybe created anew: another uuid)
    NEEDS_RESYNC = "needs-resync"
    #: a primary that is not the designated primary (newest epoch) any more: refuses writes
    #: (EROFS) and keeps its log; it follows the designated primary once its log is a prefix
    FENCED = "fenced"
    #: a mirror bringing its image to its source's by fast sync (only blocks that differ);
    #: it keeps serving its last version until it switches
    RESYNCING = "resyncing"


#: The state a mirror whose fetch stopped for good is in, by what the refusal meant (the
#: session's REFUSALS table); any other stop (fatal) is failed. A log-trimmed refusal that a
#: resync could not get past needs one by the operator.
STOP_STATES = {Stop.SPLIT_BRAIN: VolumeState.SPLIT_BRAIN, Stop.NEEDS_RESYNC: VolumeState.NEEDS_RESYNC,
               Stop.RESYNC: VolumeState.NEEDS_RESYNC}

FRESH = 1.5  #: a mirror is synced only on the word of a heartbeat at most this old (one per 0.5 s)


@dataclass(frozen=True, slots=True)
class RoleRecord:
    """What this node persists about its role for one volume (``role.json``)."""

    role: Role = Role.PRIMARY
    epoch: int = 1
    source: str = ""  #: a mirror's source node
    syncing: bool = False  #: a mirror whose image copy has not finished (a crash restarts it)
    fetch_paused: bool = False
    replay_paused: bool = False
    replayed_lsn: int = 0  #: a mirror's replay position as last persisted
    #: a resync that compares the whole image is due or running (invalidate, a seeded join):
    #: a restart must not narrow it to what changed
    resync_whole: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))  # "mirror" from a caller becomes Role.MIRROR

    @property
    def is_mirror(self) -> bool:
        return self.role == Role.MIRROR

    @property
    def is_clone(self) -> bool:
        return self.role == Role.CLONE

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role.value, "epoch": self.epoch}
        if self.is_mirror:
            d.update(source=self.source, state="syncing" if self.syncing else "mirror",
                     fetch_paused=self.fetch_paused, replay_paused=self.replay_paused,
                     replayed_lsn=self.replayed_lsn)
            if self.resync_whole:
                d["resync_whole"] = True
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> RoleRecord:
        try:
            rec = cls(role=Role(d.get("role", "primary")), epoch=int(d.get("epoch", 1)),
                      source=str(d.get("source", "")), syncing=d.get("state") == "syncing",
                      fetch_paused=bool(d.get("fetch_paused", False)),
                      replay_paused=bool(d.get("replay_paused", False)),
                      replayed_lsn=int(d.get("replayed_lsn", 0)),
                      resync_whole=bool(d.get("resync_whole", False)))
        except (ValueError, TypeError) as e:
            raise StateError(f"{where}: unreadable role record ({e}); restore it or resync the volume") from None
        if rec.is_mirror and not rec.source:
            raise StateError(f"{where}: a mirror's role record names no source; resync the volume")
        return rec

    def changed(self, **changes: Any) -> RoleRecord:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class MirrorFacts:
    """What a mirror knows about its fetch and replay at one instant (inputs of mirror_state)."""

    source: str
    fetching: bool  #: a fetcher runs for this volume
    fatal: str  #: a refusal code that stopped fetching ("" if none)
    error: str  #: the last fetch error, in words ("" if none)
    fetch_paused: bool
    replay_paused: bool
    connected: bool
    since_progress: float  #: seconds since the fetch last brought records (or connected)
    missing_records: int  #: records the source has durable that we have not fetched
    lag_records: int  #: missing_records plus fetched records not yet replayed
    heartbeat_age: float | None  #: how old the source's newest word is at most; None: no word yet
    resyncing: bool = False  #: a fast sync runs (or is staged and waits for the source)


def mirror_state(f: MirrorFacts) -> tuple[VolumeState, list[str]]:
    """The state of a mirror, and the error lines that explain it (empty when all is well)."""
    errors = [f"fetch from {f.source}: {f.error}"] if f.error else []
    if not f.fetching:
        return VolumeState.FAILED, errors or [f"no fetch runs for this mirror of {f.source}; restart the daemon"]
    if f.fatal:
        return STOP_STATES.get(refusal_stop(f.fatal), VolumeState.FAILED), errors
    if f.resyncing:
        return VolumeState.RESYNCING, errors
    if f.fetch_paused:
        return VolumeState.FETCH_PAUSED, errors
    if not f.connected:
        if f.since_progress > STALL_AFTER:
            errors.append(f"stalled: no connection to {f.source} for {f.since_progress:.0f} s")
            return VolumeState.STALLED, errors
        return VolumeState.DISCONNECTED, errors
    if f.missing_records and f.since_progress > STALL_AFTER:
        errors.append(f"stalled: no records from {f.source} for {f.since_progress:.0f} s "
                      f"while {f.missing_records} are missing")
        return VolumeState.STALLED, errors
    if f.replay_paused:
        return VolumeState.REPLAY_PAUSED, errors
    if f.lag_records or f.heartbeat_age is None or f.heartbeat_age > FRESH:
        return VolumeState.CATCHING_UP, errors  # behind, or not sure it is not
    return VolumeState.SYNCED, errors


def peer_state(*, connected: bool, fetch_paused: bool, replay_paused: bool, lag_records: int) -> VolumeState:
    """A mirror's state as its source sees it (from the mirror's ACKs and our log)."""
    if fetch_paused:
        return VolumeState.FETCH_PAUSED
    if not connected:
        return VolumeState.DISCONNECTED
    if lag_records:
        return VolumeState.CATCHING_UP
    return VolumeState.REPLAY_PAUSED if replay_paused else VolumeState.SYNCED


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One mirror of a volume, as the node it fetches from sees it (a row of ``peers``)."""

    node: str
    state: VolumeState
    connected: bool
    fetched_lsn: int
    replayed_lsn: int
    fetch_paused: bool
    replay_paused: bool
    lag_bytes: int
    lag_records: int
    lag_seconds: float
    last_seen: float  #: wall-clock time of its last ACK
    role: Role = Role.MIRROR
    #: bytes of changed extents it will copy when it returns (its log was dropped: G8)
    dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True, slots=True)
class VolumeStatus:
    """One row of ``marsfs status``. Its fields are the keys of ``status --json``; mirror and sync
    details are ``None`` where they do not apply."""

    volume: str
    node: str
    role: Role
    state: VolumeState
    epoch: int
    size: int
    head_lsn: int
    durable_lsn: int
    fetched_lsn: int
    replayed_lsn: int
    applied_lsn: int
    lag_bytes: int
    lag_records: int
    lag_seconds: float
    oldest_version_lsn: int
    log_bytes: int
    open_handles: int
    peers: list[PeerStatus] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # a mirror's (or an image copy's) details
    source: str | None = None
    connected: bool | None = None
    fetch_paused: bool | None = None
    replay_paused: bool | None = None
    heartbeat_age: float | None = None
    primary_durable_lsn: int | None = None
    fetch_rate: float | None = None
    replay_rate: float | None = None
    eta_seconds: float | None = None
    progress: float | None = None
    # history (issue 9): when the oldest version was written, and the window that keeps it
    oldest_version_ns: int | None = None
    history: str | None = None
    # clones (issue 9): on a source, its clones here (``name``, ``lsn``: the version each holds);
    # on a clone, what it is a clone of (``VOL@lsn-L``)
    clones: list[dict[str, Any]] = field(default_factory=list)
    clone_of: str | None = None
    # cluster metadata (issue 10): the designated primary, the volume's members, and what each
    # other node published about its copy (``node``, ``role``, ``state``, ``epoch``,
    # ``head_lsn``, ``replayed_lsn``, ``source``, ``updated``: when it published it (wall time),
    # ``last_heard``: our last metadata exchange with it (wall time, None: never))
    designated_primary: str | None = None
    members: list[str] = field(default_factory=list)
    positions: list[dict[str, Any]] = field(default_factory=list)
    # log space (issue 11, G8): the node's limit for all logs, the oldest LSN the log still
    # holds, what log space did (history cut, mirrors dropped, versions pinning), and per mirror
    # whose log was dropped the bytes of changed extents it will copy
    log_space_limit: int | None = None
    oldest_retained_lsn: int | None = None
    warnings: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    # roles (issue 10): a split brain's fork LSN (the lowest, if with several peers) and each
    # one's figures (SplitBrain.to_json); what the last forced failover may have lost
    # (FailoverLoss.to_json); a handover in progress: {"from", "to_fetch", "phase"}
    fork_lsn: int | None = None
    split_brain: list[dict[str, Any]] = field(default_factory=list)
    failover_loss: dict[str, Any] | None = None
    handover: dict[str, Any] | None = None
    # fast sync (issue 11): a first copy (syncing) or a resync. ``progress`` is the compared
    # fraction, ``fetch_rate`` the compare rate, ``eta_seconds`` from it
    sync_target_lsn: int | None = None  #: the source's version the sync brings this image to
    sync_bytes: int | None = None  #: bytes of the image to compare
    sync_left_bytes: int | None = None  #: bytes still to compare (at most this much is still sent)
    sync_received_bytes: int | None = None  #: data bytes received so far (blocks that differed)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["peers"] = [p.to_json() for p in self.peers]
        d["errors"] = list(self.errors)
        d["clones"] = [dict(c) for c in self.clones]
        d["warnings"] = list(self.warnings)
        d["dropped"] = dict(self.dropped)
        d["split_brain"] = [dict(x) for x in self.split_brain]
        return _jsonable(d)

    def changed(self, **changes: Any) -> VolumeStatus:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class SplitBrain:
    """A split brain with ``peer`` found from chain hashes: the histories share everything up to
    ``fork_lsn`` (``exact``) or at most up to it (the logs no longer hold the fork), and each
    side wrote ``records``/``bytes`` after it. Persisted until the operator resolves it."""

    peer: str
    fork_lsn: int
    exact: bool
    own_records: int
    own_bytes: int
    peer_records: int
    peer_bytes: int
    found: float  #: wall time

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SplitBrain:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def describe(self, volume: str) -> str:
        at = f"LSN {self.fork_lsn}" if self.exact else f"LSN {self.fork_lsn} or before"
        return (f"split brain with {self.peer}: the histories fork after {at}; this node wrote "
                f"{self.own_records} records ({human_bytes(self.own_bytes)}) after it, {self.peer} "
                f"{self.peer_records} ({human_bytes(self.peer_bytes)}); replication between them stopped. Keep one "
                f"side: on the node whose writes are to be discarded, close the image and run marsfs "
                f"invalidate {volume}")


@dataclass(frozen=True, slots=True)
class FailoverLoss:
    """What a forced failover may have lost: the records of ``source`` this node had not
    fetched, as far as its last word told (``at_least``: the source may have written more
    after it). ``newest``: wall time of the newest record known lost (0: none known)."""

    source: str
    epoch: int  #: the epoch the failover started
    start_lsn: int  #: the first LSN of that epoch
    records: int
    bytes: int
    oldest: float  #: wall time of the oldest record known lost (0: none known)
    newest: float  #: the newest known lost record was written at or before this wall time
    at_least: bool
    as_of: float  #: wall time of the knowledge (the source's last heartbeat or position)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FailoverLoss:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def describe(self) -> str:
        bound = "at least " if self.at_least else ""
        later = (f"; {self.source} may have written more after {_utc(self.as_of)}, which this node never heard "
                 "of") if self.at_least else ""
        if not self.records:
            return (f"forced failover from {self.source} (epoch {self.epoch} from LSN {self.start_lsn}): no "
                    f"record known lost (its last word, {_utc(self.as_of)}, showed none this node lacked){later}")
        return (f"forced failover from {self.source} (epoch {self.epoch} from LSN {self.start_lsn}) lost "
                f"{bound}{self.records} records ({bound}{human_bytes(self.bytes)}) written between {_utc(self.oldest)} "
                f"and {_utc(self.newest)}{later}")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "an unknown time"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, StrEnum) else v) for k, v in d.items()}
