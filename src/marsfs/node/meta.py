"""Cluster metadata without a central service, as MARS keeps it: owned keys, Lamport stamps.

Every node keeps a copy of the cluster's metadata: a map ``(owner, key) -> Entry``. The
model (docs/architecture.md, "Cluster metadata", draws it):

* Each key is owned by one node, and only its owner writes it (:meth:`ClusterMeta.put`
  writes this node's keys only). What other nodes said arrives by gossip
  (:meth:`ClusterMeta.merge`) and is kept as they said it.
* Every entry carries a Lamport stamp ``(clock, node)``. A put stamps with a clock above
  every clock this node has seen, so a node's later word on a key is always newer than its
  earlier word, and newer than everything it had heard when it spoke.
* Merging keeps, per ``(owner, key)``, the entry with the greatest ``(stamp, value)``
  (the value only breaks ties that a correct owner never makes). Merge is therefore
  commutative, associative and idempotent: whatever order entries arrive in, duplicated or
  not, every node that saw the same entries holds the same map (t0_meta proves it with
  hypothesis). During a partition each side keeps its view; on reunion newest wins.
* The map and the clock are persisted atomically (``STATE/meta.json``) before a put returns
  or a merge reports a change; the clock never goes back, also across restarts (it is at
  least the greatest stamp in the file). Positions are the exception: they change every
  second and are soft state (republished, and resent by peers), so a change of positions
  only is written at most every :data:`SAVE_POSITIONS_EVERY` seconds (and at :meth:`close`).
  A node that crashed learns its own newest stamps back from its peers before it publishes
  (the first gossip round merges first), so its clock passes them.
* A full or failing state disk (G11) fails only an own claim or removal (the command says
  so, and nothing changed); positions and merged entries stay in memory until a later write
  succeeds (logged once, and once when it works again).
* Deleting is writing ``None`` (a tombstone that wins like any newer value).

Keys (values are JSON):

* ``volume/<vol>/primary`` = ``{"node", "epoch", "start_lsn"}``: a node's claim that ``node``
  is the volume's primary from ``epoch`` on, whose history forks from older epochs'
  at ``start_lsn`` (the first LSN written in that epoch). The designated primary is the
  claim with the greatest ``(epoch, stamp)`` over all owners (:meth:`designated`).
* ``volume/<vol>/position`` = :class:`Position`: what the owner holds of the volume.
* ``volume/<vol>/removed/<node>`` = ``true``: the owner removed a dead ``node`` from the
  volume (``leave --node --force``); it holds until that node speaks of the volume again
  (a newer position).
* ``volume/<vol>/mode`` = ``{"uuid", "mode", "mirrors", "timeout", "refuse"}``: the volume's
  replication mode as the owner last set it (``create --mode``, ``marsfs mode``). The mode of
  a volume is the newest entry (greatest stamp, over all owners) that names its uuid
  (:meth:`mode_of`), so any member may set it, the newest word wins, and a volume created
  anew under an old name starts without the old one's mode.

Nothing here does network I/O; the cluster layer gossips :meth:`entries` and calls
:meth:`merge`. Thread-safe (one lock): the daemon reads from the trio thread and writes from
worker threads. The entries are indexed by key and the removals by volume, so what the node
asks about one volume every second costs the same with 1 volume or 100.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeAlias

from marsfs.errors import DiskFailed, MarsError, NoSpace, StateError
from marsfs.fsutil import read_json, write_json
from marsfs.names import is_name
from marsfs.replication.protocol import MAX_META_CLOCK, MAX_META_KEY, MAX_META_VALUE

logger = logging.getLogger(__name__)

JSON: TypeAlias = Any  #: a JSON value (None, bool, int, float, str, list, dict)

META_FILE = "meta.json"
FORMAT = 1
REFRESH = 10.0  #: seconds after which an unchanged position is published (and gossiped) again
SAVE_POSITIONS_EVERY = 5.0  #: seconds between writes of the file for position changes alone
#: how far past this node's clock one exchange may bring it: far more than an honest peer is
#: ahead (a node that counted for centuries, met by a new one), and 2^13 exchanges short of
#: the clock's end (MAX_META_CLOCK), where a forged entry would stop every later write here
CLOCK_STEP = 2**40


@dataclass(frozen=True, slots=True, order=True)
class Stamp:
    """A Lamport stamp: ordered by clock, then by node name (total order, no ties between nodes)."""

    clock: int
    node: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One key of one owner, as the owner last wrote it. ``stamp.node`` is always ``owner``."""

    owner: str
    key: str
    value: JSON
    stamp: Stamp

    def __post_init__(self) -> None:
        assert self.stamp.node == self.owner, f"entry {self.key} of {self.owner} stamped by {self.stamp.node}"

    def sort_key(self) -> tuple[Stamp, str]:
        """What decides between two entries of one key: newest stamp, then the value's text."""
        return self.stamp, canonical(self.value)

    def to_wire(self) -> tuple[str, str, int, JSON]:
        return self.owner, self.key, self.stamp.clock, self.value

    @classmethod
    def from_wire(cls, t: tuple[str, str, int, JSON]) -> Entry:
        owner, key, clock, value = t
        return cls(owner, key, value, Stamp(clock, owner))


@dataclass(frozen=True, slots=True)
class Designation:
    """The designated primary of a volume: the newest claim (greatest ``(epoch, stamp)``)."""

    node: str
    epoch: int
    stamp: Stamp
    start_lsn: int  #: the first LSN of this epoch: older histories fork from it at ``start_lsn - 1``


@dataclass(frozen=True, slots=True)
class Position:
    """What a node published about its copy of a volume (key ``volume/<vol>/position``)."""

    role: str
    state: str
    epoch: int
    head_lsn: int
    durable_lsn: int
    chain_at_head: str  #: hex
    replayed_lsn: int
    open_handles: int
    source: str
    updated: float  #: wall time when the owner published it

    # Every field is a plain value, so these need no deep copies (asdict): each volume's
    # position is compared every second.

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _POSITION_FIELDS}

    @classmethod
    def from_json(cls, d: JSON) -> Position | None:
        """The position in ``d``, or None when it is not one (a newer node's richer value
        keeps working: unknown keys are ignored)."""
        if not isinstance(d, dict):
            return None
        try:
            return cls(**{name: d[name] for name in _POSITION_FIELDS})
        except (KeyError, TypeError):
            return None

    def same_as(self, other: Position | None) -> bool:
        """Equal but for ``updated`` (nothing worth telling the cluster again)."""
        return other is not None and all(getattr(self, n) == getattr(other, n)
                                         for n in _POSITION_FIELDS if n != "updated")


_POSITION_FIELDS = tuple(f.name for f in fields(Position))


def canonical(value: JSON) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def primary_key(volume: str) -> str:
    return f"volume/{volume}/primary"


POSITION_SUFFIX = "/position"


def position_key(volume: str) -> str:
    return f"volume/{volume}{POSITION_SUFFIX}"


def removed_key(volume: str, node: str) -> str:
    return f"volume/{volume}/removed/{node}"


def mode_key(volume: str) -> str:
    return f"volume/{volume}/mode"


def check_entry(owner: str, key: str, clock: int, value: JSON, *, ceiling: int = MAX_META_CLOCK) -> str | None:
    """Why an entry from a peer is not acceptable, or None. Bounds keep a peer from growing
    our state without limit by one entry, from moving our clock further than ``ceiling``
    (:data:`CLOCK_STEP` past it, in an exchange), and from naming nodes or volumes that
    break the one rule for names (:mod:`marsfs.names`) in a key or value this node reads."""
    if not is_name(owner):
        return f"owner {owner[:80]!r} is not a node name"
    if not key or len(key) > MAX_META_KEY:
        return f"key of {len(key)} characters (at most {MAX_META_KEY})"
    if not 1 <= clock <= min(ceiling, MAX_META_CLOCK):
        return f"clock {clock} is not from 1 to {min(ceiling, MAX_META_CLOCK)}"
    try:
        text = canonical(value)
    except (TypeError, ValueError):
        return "value is not JSON"
    if len(text) > MAX_META_VALUE:
        return f"value of {len(text)} bytes (at most {MAX_META_VALUE})"
    return _names_in(key, value)


def _names_in(key: str, value: JSON) -> str | None:
    """Why the names in a ``volume/...`` key, or in the value of one this node reads, break the
    rule for names (None: they do not; other keys are a newer node's, read by nobody here)."""
    parts = key.split("/")
    if parts[0] != "volume":
        return None
    if len(parts) < 3 or not is_name(parts[1]):
        return f"key {key[:80]!r} names no volume"
    if parts[2] == "removed" and (len(parts) != 4 or not is_name(parts[3])):
        return f"key {key[:80]!r} names no node"
    named = value.get("node" if parts[2] == "primary" else "source") if isinstance(value, dict) else None
    if parts[2] in ("primary", "position") and isinstance(named, str) and named and not is_name(named):
        return f"{parts[2]} of volume {parts[1]} names {named[:80]!r}, which is not a node name"
    return None


class ClusterMeta:
    """This node's copy of the cluster metadata, persisted in ``path``."""

    def __init__(self, path: Path, node: str) -> None:
        self.path = path
        self.node = node
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, str], Entry] = {}
        self._by_key: dict[str, dict[str, Entry]] = {}  #: key -> owner -> entry (the same entries)
        self._removals: dict[str, set[str]] = {}  #: volume -> nodes some owner has a removal key of
        self._clock = 0
        self._version = 0  #: counts changes of the map here (gossip skips peers that have this version)
        self._dirty = False  #: position changes not yet written
        self._save_failed = False  #: the last write failed (full or failing disk): said once
        self._saved = 0.0  #: time.monotonic() of the last write
        self._load()

    # ------------------------------------------------------------------ persistence

    def _load(self) -> None:
        try:
            d = read_json(self.path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise StateError(f"{self.path}: unreadable cluster metadata ({e}); move it away to start "
                             "empty (peers send theirs again)") from None
        try:
            self._clock = int(d["clock"])
            for owner, key, clock, value in d["entries"]:
                entry = Entry(str(owner), str(key), value, Stamp(int(clock), str(owner)))
                self._set(entry)
                self._clock = max(self._clock, entry.stamp.clock)
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{self.path}: unreadable cluster metadata ({e}); move it away to start "
                             "empty (peers send theirs again)") from None

    def _save(self, keys: Iterable[str] = (), *, soft: bool = False) -> None:
        """Write the file now, or only mark it dirty when ``keys`` are all positions and the
        last write is recent (see the module's rules).

        A full or failing state disk (G11) fails only a write that must be durable (an own
        claim or removal: the caller's command fails, nothing changed); soft state (positions,
        what peers sent: they send it again) stays in memory, marked dirty, and is written by
        a later save once there is room."""
        keys = list(keys)
        positions = bool(keys) and all(k.endswith(POSITION_SUFFIX) for k in keys)
        soft = soft or positions
        now = time.monotonic()
        if positions and now - self._saved < SAVE_POSITIONS_EVERY:
            self._dirty = True
            return
        entries = sorted(e.to_wire() for e in self._entries.values())
        try:
            write_json(self.path, {"format": FORMAT, "node": self.node, "clock": self._clock,
                                   "entries": [list(t) for t in entries]})
        except OSError as e:
            self._dirty = True
            if not self._save_failed:
                logger.error("cannot write the cluster metadata %s: %s; it is kept in memory and written "
                             "once the state filesystem has room again", self.path, e.strerror)
            self._save_failed = True
            if soft:
                return
            raise (NoSpace if e.errno == errno.ENOSPC else DiskFailed)(
                f"cannot write the cluster metadata {self.path}: {e.strerror}; free space on (or repair) the "
                "state filesystem and try again") from None
        if self._save_failed:
            logger.info("cluster metadata %s written again", self.path)
        self._save_failed = False
        self._dirty = False
        self._saved = now

    def close(self) -> None:
        """Write what is not written yet (positions)."""
        with self._lock:
            if self._dirty:
                self._save()

    # ------------------------------------------------------------------ the map

    @property
    def clock(self) -> int:
        return self._clock

    @property
    def version(self) -> int:
        """Goes up with every change of the map here (not persisted: a restart counts anew)."""
        return self._version

    def put(self, key: str, value: JSON) -> Stamp:
        """Write one of this node's own keys (persisted on return)."""
        reason = check_entry(self.node, key, 1, value)
        assert reason is None, f"own entry {key}: {reason}"
        with self._lock:
            self._clock += 1
            stamp = Stamp(self._clock, self.node)
            old = self._entries.get((self.node, key))
            self._set(Entry(self.node, key, value, stamp))
            self._version += 1
            try:
                self._save([key])
            except MarsError:  # not durable: not said (the clock may stay ahead; it never goes back)
                if old is None:
                    self._unset(self.node, key)
                else:
                    self._set(old)
                raise
            return stamp

    def get(self, owner: str, key: str) -> JSON | None:
        with self._lock:
            e = self._entries.get((owner, key))
        return None if e is None else e.value

    def entry(self, owner: str, key: str) -> Entry | None:
        with self._lock:
            return self._entries.get((owner, key))

    def entries(self) -> list[Entry]:
        """Every entry, oldest first (what gossip sends)."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.stamp)

    def merge(self, entries: Iterable[Entry]) -> set[tuple[str, str]]:
        """Take what a peer sent; returns the ``(owner, key)`` pairs that changed here
        (persisted before return). The clock moves past every stamp seen."""
        changed: set[tuple[str, str]] = set()
        with self._lock:
            clock = self._clock
            for e in entries:
                clock = max(clock, e.stamp.clock)
                k = (e.owner, e.key)
                old = self._entries.get(k)
                if old is None or e.sort_key() > old.sort_key():
                    self._set(e)
                    changed.add(k)
            # an entry no newer than ours has a stamp at most our clock: only changes move it
            self._clock = clock
            if changed:
                self._version += 1
                self._save((k for _, k in changed), soft=True)  # peers send it again
        return changed

    def snapshot(self) -> dict[tuple[str, str], Entry]:
        with self._lock:
            return dict(self._entries)

    # ------------------------------------------------------------------ what the keys mean

    def _set(self, entry: Entry) -> None:
        """Put ``entry`` into the map and its indexes (under the lock)."""
        self._entries[(entry.owner, entry.key)] = entry
        self._by_key.setdefault(entry.key, {})[entry.owner] = entry
        parts = entry.key.split("/", 3)
        if len(parts) == 4 and parts[0] == "volume" and parts[2] == "removed":
            self._removals.setdefault(parts[1], set()).add(parts[3])

    def _unset(self, owner: str, key: str) -> None:
        """Take the entry of ``(owner, key)`` out of the map and its indexes (under the lock)."""
        del self._entries[(owner, key)]
        owners = self._by_key[key]
        del owners[owner]
        if not owners:
            del self._by_key[key]
            parts = key.split("/", 3)
            if len(parts) == 4 and parts[0] == "volume" and parts[2] == "removed":
                self._removals[parts[1]].discard(parts[3])

    def _with_key(self, key_of: str) -> list[Entry]:
        with self._lock:
            return list(self._by_key.get(key_of, {}).values())

    def designated(self, volume: str) -> Designation | None:
        """The designated primary of ``volume``: the claim with the greatest (epoch, stamp)."""
        best: Designation | None = None
        for e in self._with_key(primary_key(volume)):
            v = e.value
            if not (isinstance(v, dict) and isinstance(v.get("node"), str)
                    and type(v.get("epoch")) is int and type(v.get("start_lsn")) is int):
                continue  # a tombstone, or a claim we cannot read
            d = Designation(v["node"], v["epoch"], e.stamp, v["start_lsn"])
            if best is None or (d.epoch, d.stamp) > (best.epoch, best.stamp):
                best = d
        return best

    def claim(self, volume: str, node: str, epoch: int, start_lsn: int) -> None:
        """Say that ``node`` is the primary of ``volume`` from ``epoch`` on, starting at ``start_lsn``."""
        assert epoch >= 1 and start_lsn >= 1, (epoch, start_lsn)
        self.put(primary_key(volume), {"node": node, "epoch": epoch, "start_lsn": start_lsn})

    def publishes(self, volume: str, position: Position, refresh: float = REFRESH) -> bool:
        """Whether :meth:`publish` would put ``position``: it says something else than the last
        one, or that is ``refresh`` seconds old. No I/O (the trio thread asks it)."""
        old = Position.from_json(self.get(self.node, position_key(volume)))
        return not (position.same_as(old) and old is not None and position.updated - old.updated < refresh)

    def publish(self, volume: str, position: Position, refresh: float = REFRESH) -> bool:
        """Put this node's position for ``volume`` unless it says what the last one said and
        is younger than ``refresh`` seconds (:data:`REFRESH`); returns whether it was put."""
        if not self.publishes(volume, position, refresh):
            return False
        self.put(position_key(volume), position.to_json())
        return True

    def withdraw(self, volume: str) -> None:
        """This node holds ``volume`` no more (it left or deleted it): its position becomes a
        tombstone, so it is no member and shows no position anywhere, until it publishes again."""
        if self.get(self.node, position_key(volume)) is not None:
            self.put(position_key(volume), None)

    def position(self, owner: str, volume: str) -> Position | None:
        return Position.from_json(self.get(owner, position_key(volume)))

    def positions(self, volume: str) -> dict[str, Position]:
        out: dict[str, Position] = {}
        for e in self._with_key(position_key(volume)):
            p = Position.from_json(e.value)
            if p is not None:
                out[e.owner] = p
        return out

    def remove(self, volume: str, node: str) -> None:
        """Record that this node removed ``node`` from ``volume`` (``leave --node --force``)."""
        self.put(removed_key(volume, node), True)

    def set_mode(self, volume: str, value: dict[str, Any]) -> None:
        """Say the replication mode of ``volume`` (a value with its ``uuid``: see the keys)."""
        assert isinstance(value.get("uuid"), str), value
        self.put(mode_key(volume), value)

    def mode_of(self, volume: str, uuid: str) -> JSON | None:
        """The newest mode entry of ``volume`` that names ``uuid`` (None: none does)."""
        best: Entry | None = None
        for e in self._with_key(mode_key(volume)):
            if isinstance(e.value, dict) and e.value.get("uuid") == uuid and (best is None or e.stamp > best.stamp):
                best = e
        return None if best is None else best.value

    def is_removed(self, volume: str, node: str) -> bool:
        """A removal by any node, newer than ``node``'s last word on ``volume``."""
        pos = self.entry(node, position_key(volume))
        for e in self._with_key(removed_key(volume, node)):
            if e.value is True and (pos is None or e.stamp > pos.stamp):
                return True
        return False

    def removed(self, volume: str) -> set[str]:
        """The nodes removed from ``volume`` (and not back since)."""
        with self._lock:
            nodes = set(self._removals.get(volume, ()))
        return {n for n in nodes if self.is_removed(volume, n)}

    def members(self, volume: str) -> set[str]:
        """The nodes holding ``volume`` (they published a position, or are its designated
        primary), minus the ones removed."""
        nodes = {e.owner for e in self._with_key(position_key(volume)) if e.value is not None}
        d = self.designated(volume)
        if d is not None:
            nodes.add(d.node)
        return {n for n in nodes if not self.is_removed(volume, n)}

