"""Typed node state: a volume's role record and its status rows.

Rules that hold here:

* Everything the node persists about a volume's role (``role.json``) is a :class:`RoleRecord`;
  everything ``status`` shows is a :class:`VolumeStatus` with :class:`PeerStatus` rows. Their
  JSON keys are their fields, the one schema of ``status --json``; nothing else builds status dicts.
* The states (:class:`VolumeState`) and the one rule that names them live in
  :mod:`marsfs.node.volstate`; nothing here reads a clock or does I/O.
* Every field of a status row is a plain value or a record of this module (no free-form
  dicts): what ``status --json`` shows is exactly these records' fields.

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
from dataclasses import MISSING, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from marsfs.errors import StateError
from marsfs.node.volstate import Role, VolumeState
from marsfs.units import human_bytes


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


class ReplicationMode(StrEnum):
    """A volume's replication mode: ``async`` (a flush waits for this node's disk only) or
    ``sync`` (a flush also waits until N mirrors hold it durably, unless degraded)."""

    ASYNC = "async"
    SYNC = "sync"


class SyncState(StrEnum):
    """Where a ``sync`` volume stands on its primary (:mod:`marsfs.node.syncmode` keeps it)."""

    IN_SYNC = "in-sync"  #: N mirrors hold every write a completed flush acknowledged
    #: not degraded, but fewer than N mirrors hold everything acknowledged so far (after a
    #: start or a switch to sync): the next flush waits for them, up to the timeout
    CATCHING_UP = "catching-up"
    DEGRADED = "degraded"  #: the timeout passed: flushes do not wait (or fail: refuse) until N catch up


@dataclass(frozen=True, slots=True)
class SyncModeStatus:
    """A ``sync`` volume's figures on its primary (the row's ``sync_mode``)."""

    mirrors: int  #: the mirrors that must hold a flush before it completes
    timeout: float  #: seconds a flush waits for them before the volume degrades
    refuse: bool  #: while degraded a flush fails with EIO instead of completing
    state: SyncState
    since: float | None  #: wall time it degraded (None: it is not degraded)
    acked_lsn: int  #: the newest LSN a completed flush acknowledged to an application
    #: how far the N-th most advanced mirror is behind this node's durable LSN
    behind_records: int
    behind_bytes: int
    behind_seconds: float
    holding: list[str] = field(default_factory=list)  #: the mirrors that hold everything acknowledged
    #: how often it degraded since the daemon started: each time one flush (with those that
    #: waited beside it) paid the timeout; a stalled link counts once, not once per flush
    degradations: int = 0

    def to_json(self) -> dict[str, Any]:
        return _record_json(self)

    def describe(self, volume: str) -> str:
        """The status line of a degraded volume (also what the log says)."""
        then = "fail with EIO (--refuse)" if self.refuse else "complete without waiting for mirrors"
        return (f"sync degraded to async since {_utc(self.since or 0.0)}, behind by {self.behind_records} records "
                f"({human_bytes(self.behind_bytes)}, {self.behind_seconds:.1f} s): fewer than {self.mirrors} "
                f"mirror(s) acknowledged a flush within {self.timeout:g} s; flushes of {volume} {then} until "
                f"{self.mirrors} mirror(s) hold every acknowledged write (LSN {self.acked_lsn}), then it is in sync "
                "again by itself")


#: the version of the ``status --json`` schema (docs/status.md). Within a version keys are only
#: added; a key removed or renamed, or one whose type or meaning changes, raises it.
STATUS_SCHEMA_VERSION = 1


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
        return _record_json(self)


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
    next: str = ""  #: the operator's next command for this state ("" when there is nothing to do)
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
    # history: when the oldest version was written, and the window that keeps it
    oldest_version_ns: int | None = None
    history: str | None = None
    # clones: on a source, its clones here (the version each holds); on a clone, what it is a
    # clone of (``VOL@lsn-L``)
    clones: list[CloneStatus] = field(default_factory=list)
    clone_of: str | None = None
    # cluster metadata: the designated primary, the volume's members, and what each other
    # node published about its copy
    designated_primary: str | None = None
    members: list[str] = field(default_factory=list)
    positions: list[PositionStatus] = field(default_factory=list)
    # log space (G8): the node's limit for all logs, the oldest LSN the log still holds, what
    # log space did (history cut, mirrors dropped, versions pinning), and per mirror whose log
    # was dropped the bytes of changed extents it will copy
    log_space_limit: int | None = None
    oldest_retained_lsn: int | None = None
    warnings: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    # roles: a split brain's fork LSN (the lowest, if with several peers) and each one's
    # figures; what the last forced failover may have lost; a handover in progress
    fork_lsn: int | None = None
    split_brain: list[SplitBrain] = field(default_factory=list)
    # the split versions resolved split brains left here (each a full image, sparse), and the
    # disk space they take together
    split_versions: list[SplitVersionStatus] = field(default_factory=list)
    split_versions_bytes: int = 0
    failover_loss: FailoverLoss | None = None
    handover: HandoverStatus | None = None
    # fast sync: a first copy (syncing) or a resync. ``progress`` is the compared
    # fraction, ``fetch_rate`` the compare rate, ``eta_seconds`` from it
    sync_target_lsn: int | None = None  #: the source's version the sync brings this image to
    sync_bytes: int | None = None  #: bytes of the image to compare
    sync_left_bytes: int | None = None  #: bytes still to compare (at most this much is still sent)
    sync_received_bytes: int | None = None  #: data bytes received so far (blocks that differed)
    #: the replication mode (``async``, ``sync``; :class:`ReplicationMode`), and on the primary of a
    #: ``sync`` volume where it stands (None otherwise)
    mode: ReplicationMode = ReplicationMode.ASYNC
    sync_mode: SyncModeStatus | None = None
    #: the node's connections to its peers: ``{"mode": "mutual-tls", "certificate_expires": ...}``
    #: or ``{"mode": "insecure"}`` (the same on every row; None: no peers, no node port)
    tls: dict[str, Any] | None = None
    #: the newest record writeback goes to now: the history window's floor, at most durable (a
    #: mirror: at most replayed); caught up when ``applied_lsn`` reaches it. None: a clone, which
    #: never writes back, or a volume not open here
    writeback_target_lsn: int | None = None
    #: why this volume's log fdatasyncs in threads instead of the kernel's AIO (each fsync costs
    #: a thread hand-off); None while AIO is used or not tried yet, or the volume is not open here
    fsync_aio_refused: str | None = None
    #: :data:`STATUS_SCHEMA_VERSION`; first in the JSON, so a reader can check it before the rest
    schema_version: int = STATUS_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        d = _record_json(self)
        return {"schema_version": d.pop("schema_version"), **d}

    def changed(self, **changes: Any) -> VolumeStatus:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class CloneStatus:
    """A clone of a volume on this node, and the version of it that the clone holds."""

    name: str
    lsn: int

    def to_json(self) -> dict[str, Any]:
        return _record_json(self)


@dataclass(frozen=True, slots=True)
class SplitVersionStatus:
    """A split version of a volume on this node (``.versions/VOL/NAME.img``): whose state it is,
    where the histories forked, what it takes on disk, and the clones that read from it."""

    name: str  #: ``split-<node>-<fork lsn>``
    node: str  #: the losing node whose divergent state it holds
    fork_lsn: int
    head_lsn: int  #: the loser's head when it was saved
    size: int
    disk_bytes: int  #: the space its image takes (holes are free)
    saved: float  #: wall time of the save
    clones: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return _record_json(self)


@dataclass(frozen=True, slots=True)
class PositionStatus:
    """What another node published about its copy of a volume (a row of ``positions``)."""

    node: str
    role: str
    state: str
    epoch: int
    head_lsn: int
    replayed_lsn: int
    source: str
    updated: float  #: when it published it (wall time)
    last_heard: float | None  #: our last metadata exchange with it (wall time; None: never)
    #: why this word no longer says what the node is ("" when it does): it is from before the
    #: designated primary's epoch (the node did not follow it yet, and may be unreachable)
    stale: str = ""

    def to_json(self) -> dict[str, Any]:
        return _record_json(self)


@dataclass(frozen=True, slots=True)
class HandoverStatus:
    """A handover of a volume to this node in progress (its JSON key for ``source`` is ``from``)."""

    source: str  #: the primary it is handed over from
    phase: str  #: preparing, fetching, claiming; failover for a forced one
    to_fetch: int | None  #: records still to fetch before the claim (None: not known yet)

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "phase": self.phase, "to_fetch": self.to_fetch}


@dataclass(frozen=True, slots=True)
class SplitBrain:
    """A split brain with ``peer`` found from chain hashes: the histories share everything up to
    ``fork_lsn`` (``exact``) or at most up to it (the logs no longer hold the fork), and each
    side holds ``records``/``bytes`` after it, of which ``written`` it wrote itself as primary
    (the rest it fetched from the primary it mirrored; None: not known). Persisted until the
    operator resolves it, with the figures as the comparison found them; status shows them as
    they are now (:meth:`marsfs.node.Node.splits`)."""

    peer: str
    fork_lsn: int
    exact: bool
    own_records: int
    own_bytes: int
    peer_records: int
    peer_bytes: int
    found: float  #: wall time
    own_written: int | None = None
    peer_written: int | None = None
    #: the peer holds more after the fork than when compared: ``peer_bytes`` is a lower bound
    peer_bytes_at_least: bool = False

    def to_json(self) -> dict[str, Any]:
        return _record_json(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SplitBrain:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d or f.default is MISSING})

    def describe(self, volume: str) -> str:
        at = f"LSN {self.fork_lsn}" if self.exact else f"LSN {self.fork_lsn} or before"
        bound = "" if self.exact else "at least "  # a fork further back means longer tails
        peer_bytes = f"{'at least ' if self.peer_bytes_at_least else bound}{human_bytes(self.peer_bytes)}"
        return (f"split brain with {self.peer}: the histories fork after {at}; after it this node holds "
                f"{bound}{self.own_records} records ({bound}{human_bytes(self.own_bytes)})"
                f"{_written(self.own_records, self.own_written, 'here')}, {self.peer} {bound}{self.peer_records} "
                f"({peer_bytes}){_written(self.peer_records, self.peer_written, 'there')}; replication between them "
                f"stopped. Keep one side: on the node whose writes are to be discarded, close the image and run "
                f"marsfs invalidate {volume}")


def _written(records: int, written: int | None, where: str) -> str:
    """How many of a side's records after the fork it wrote as primary, in words."""
    if written is None or not records:
        return ""
    if written >= records:
        return f", all written {where} as primary"
    if not written:
        return f", none written {where} as primary (all fetched)"
    return f", {written} written {where} as primary and {records - written} fetched"


@dataclass(frozen=True, slots=True)
class FailoverLoss:
    """What a forced failover may have lost: the records of ``source`` this node had not
    fetched, as far as its last word told (``at_least``: the source may have written more
    after it; not so when that word was its goodbye at a clean stop, which says exactly how
    far its log goes). ``newest``: wall time of the newest record known lost (0: none known).
    ``heard_before``: how long before the failover this node last heard from ``source``: no
    heartbeat interval bounds what a primary wrote after its last word, so a loss that is not
    exact always says it.

    When a reachable member held more (the operator accepted losing it), ``held_by`` names the
    one that held most and ``held_records``/``held_bytes`` are what it held beyond this node,
    exactly: the loss is measured from its position, and only the rest (what the source's last
    word showed beyond it) is "at least". ``fork_lsn`` (not -1): the failover chose this node's
    side of a split brain with ``source``; the loss is ``source``'s tail after that fork, which
    it keeps as a split version when invalidated."""

    source: str
    epoch: int  #: the epoch the failover started
    start_lsn: int  #: the first LSN of that epoch
    records: int
    bytes: int
    oldest: float  #: wall time of the oldest record known lost (0: none known)
    newest: float  #: the newest known lost record was written at or before this wall time
    at_least: bool
    as_of: float  #: wall time of the knowledge (the source's last heartbeat or position)
    #: seconds from this node's receipt of that knowledge to the failover, by this node's clock
    #: (-1: never heard, or a record from before this field)
    heard_before: float = -1.0
    held_by: str = ""
    held_records: int = 0
    held_bytes: int = 0
    fork_lsn: int = -1
    #: what ``source`` had acknowledged to applications, as its last heartbeat said: its
    #: replication mode then ("" : not known), with N ``mirrors`` and ``refuse`` in sync mode,
    #: since when it ran degraded (0: it did not), the newest LSN a flush acknowledged, and how
    #: many of those acknowledged records this node lacks (known lost)
    mode: str = ""
    mirrors: int = 0
    refuse: bool = False
    degraded_since: float = 0.0
    acked_lsn: int = 0
    acked_lost: int = 0
    #: provably no acknowledged write lost: ``source`` was in sync mode with ``refuse`` (it never
    #: acknowledges a flush fewer than N mirrors hold), not degraded, fewer than N of its mirrors
    #: left unasked, and none that answered holds more than this node
    nothing_acked_lost: bool = False

    def to_json(self) -> dict[str, Any]:
        return _record_json(self)

    def acknowledged(self) -> str:
        """What the loss means for writes ``source`` acknowledged (a flush completed), in words
        ("" when its mode is not known: a record from before modes, or no heartbeat heard)."""
        src, at = self.source, _utc(self.as_of)
        if not self.mode:
            return ""
        if self.nothing_acked_lost:
            return (f"nothing acknowledged lost: {src} was in sync mode with --refuse at its last word ({at}), so "
                    f"every write it acknowledged is in the log of at least {self.mirrors} mirror(s), and none of "
                    "its mirrors that answered holds more than this node")
        known = (f"{self.acked_lost} of the lost records were acknowledged by a completed flush (up to LSN "
                 f"{self.acked_lsn})") if self.acked_lost else ""
        if self.mode == "sync" and self.degraded_since:
            return (f"{src} ran degraded (async) since {_utc(self.degraded_since)}: writes it acknowledged since then "
                    f"may be lost{'; at least ' + known if known else ''}")
        if self.mode == "sync":
            if known:
                return f"at least {known}: another mirror acknowledged them and none that answered holds them"
            if self.refuse:
                return (f"nothing acknowledged known lost: {src} was in sync mode with --refuse at its last word ({at}), "
                        f"so every write it acknowledged is in the log of at least {self.mirrors} mirror(s); not proven "
                        "that this node holds them all: not every mirror of it was asked, or one holds more")
            return (f"nothing acknowledged known lost: {src} was in sync at its last word ({at}) and this node holds "
                    f"every write it had acknowledged (up to LSN {self.acked_lsn}); not proven beyond that: had {src} "
                    "gone on running cut off from its mirrors, it degraded to async after its timeout and may have "
                    "acknowledged writes no node here holds (sync --refuse rules that out)")
        if known:
            return f"{src} ran in async mode: at least {known}"
        return (f"{src} ran in async mode: no write it had acknowledged by its last word ({at}) is missing here, but "
                "async mode does not wait for mirrors, so writes it acknowledged after that may be lost")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FailoverLoss:
        """Also a record written before the fields with defaults existed."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def describe(self) -> str:
        what, acked = self._describe(), self.acknowledged()
        return f"{what}; {acked}" if acked else what

    def _describe(self) -> str:
        head = f"forced failover from {self.source} (epoch {self.epoch} from LSN {self.start_lsn})"
        if self.fork_lsn >= 0:
            return (f"{head} kept this node's side of the split brain: {self.source}'s {self.records} records "
                    f"({human_bytes(self.bytes)}) after the fork at LSN {self.fork_lsn}, written between "
                    f"{_utc(self.oldest)} and {_utc(self.newest)}, are not in its history; marsfs invalidate on "
                    f"{self.source} keeps them there as a split version")
        bound = "at least " if self.at_least else ""
        later = (f"; {self.source} may have written more after {_utc(self.as_of)}, which "
                 f"{'no reachable node holds' if self.held_by else 'this node never heard of'}") if self.at_least else ""
        heard = (f"last heard from {self.source} {self.heard_before:.1f} s before this failover"
                 if self.heard_before >= 0 else "")
        if self.held_by:
            only = self.records - self.held_records
            rest = (f", and {bound}{only} more ({bound}{human_bytes(max(0, self.bytes - self.held_bytes))}) "
                    f"that only {self.source} had") if only > 0 else ""
            return (f"{head} lost {self.held_records} records ({human_bytes(self.held_bytes)}) written between "
                    f"{_utc(self.oldest)} and {_utc(self.newest)}, measured from {self.held_by}'s position "
                    f"({self.held_by} holds them; accepted with --accept-loss){rest}{later}")
        if not self.at_least:  # its goodbye said how far its log goes
            stopped = (f"{self.source} stopped cleanly at {_utc(self.as_of)} with its log durable up to LSN "
                       f"{self.start_lsn - 1 + self.records}")
            if not self.records:
                return f"{head}: nothing lost: {stopped}, all of which this node holds"
            return (f"{head} lost {self.records} records ({human_bytes(self.bytes)}) written between "
                    f"{_utc(self.oldest)} and {_utc(self.newest)}: {stopped}")
        if not self.as_of:
            return f"{head}: what is lost is not known: this node never heard from {self.source}"
        if not self.records:
            return (f"{head}: no loss known{'; ' + heard if heard else ''} (its last word, {_utc(self.as_of)}, "
                    f"showed no record this node lacked){later}")
        return (f"{head} lost {bound}{self.records} records ({bound}{human_bytes(self.bytes)}) written between "
                f"{_utc(self.oldest)} and {_utc(self.newest)}{'; ' + heard if heard else ''}{later}")

    def describe_risk(self) -> str:
        """What a failover from ``source`` now would lose, before any happened (no epoch yet)."""
        if not self.as_of:
            return f"this node's fetch has no word from {self.source} to tell how much it lacks, so that is not known"
        if not self.at_least:
            return (f"{self.records} records ({human_bytes(self.bytes)}): {self.source} stopped cleanly at "
                    f"{_utc(self.as_of)} with its log durable up to LSN {self.start_lsn - 1 + self.records}")
        if not self.records:
            return (f"as of {self.source}'s last word ({_utc(self.as_of)}) this node lacked no record, but "
                    f"{self.source} may have written more since")
        return (f"at least {self.records} records ({human_bytes(self.bytes)}) written between {_utc(self.oldest)} "
                f"and {_utc(self.newest)}, and whatever {self.source} wrote after {_utc(self.as_of)}")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "an unknown time"


def _record_json(record: Any) -> dict[str, Any]:
    """A status record as JSON: its fields by name, nested records by their own ``to_json``."""
    return {f.name: _json_value(getattr(record, f.name)) for f in fields(record)}


def _json_value(v: Any) -> Any:
    if isinstance(v, StrEnum):
        return v.value
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if hasattr(v, "to_json"):
        return v.to_json()
    return v
