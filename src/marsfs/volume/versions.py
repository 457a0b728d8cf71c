"""Names of a volume's retained versions: listing them and resolving a name to an LSN.

Rules that hold here:

* A version is the image after one LSN in ``[oldest, newest]``; ``oldest`` is the volume's
  oldest servable version (the applied LSN, or a writeback's target) and ``newest`` what
  readers may see (head on a primary, the replay position on a mirror), both passed in by the
  volume.
* Names: ``lsn-N``, a mark name (MARK records), or an
  ISO-8601 time (``2026-11-23T10:00:00Z``, fractional seconds down to nanoseconds), which means
  the newest retained FLUSH record at or before it (UTC unless the time says otherwise).
  :func:`resolve_version` maps a name to an LSN without judging ``lsn-N`` (any N);
  :func:`find_version` also refuses what lies outside ``[oldest, newest]``, naming the oldest.
* Every name is stable: an LSN, a mark and a record's timestamp never change, so a name means
  the same version across restarts and log rotation for as long as it is retained.
* The listing (:func:`listing`) is bounded whatever the log holds: every mark, the newest
  ``RECENT`` flush points, and before them one flush point per ``SPACING_NS`` (the newest of
  each hour).
* A mark name never shadows another name (:func:`check_mark_name`): it is unique per volume,
  1 to ``MAX_MARK`` bytes, not a word of the ``versions`` listing (``head``, ``oldest``,
  ``flush``, ``mark``, in any case), not starting with ``lsn-`` or ``.``, not an ISO-8601
  time, without ``/`` or control characters, so that every name is also a file name in the
  versions directory and means one version only.
* Pure functions over what the log reports (:attr:`Log.marks`, :meth:`Log.flush_points`):
  no locks, no I/O of their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from marsfs.errors import InvalidRequest, VersionNotFound
from marsfs.log import Log

MAX_MARK = 200  #: bytes of a mark name (UTF-8)
RECENT = 100  #: flush points a listing shows in full
SPACING_NS = 3600 * 10**9  #: before those, one flush point per hour
_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:[.,](\d{1,9}))?(Z|[+-]\d\d:?\d\d)?", re.IGNORECASE)
#: Words of the ``versions`` listing (its kinds) a mark may not be named, in any case.
RESERVED_MARKS = frozenset({"head", "oldest", "flush", "mark"})
MARK_RULES = (f"1-{MAX_MARK} bytes; not head, oldest, flush or mark; not starting with 'lsn-' or '.'; "
              "not an ISO-8601 time; no '/' and no control characters")


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """A named point in a volume's retained history."""

    lsn: int
    kind: str  #: "flush", "mark", "oldest" or "head"
    name: str
    timestamp_ns: int


def list_versions(log: Log, oldest: int, head: int) -> list[VersionInfo]:
    """Oldest retained version, flush points, marks and head, in LSN order."""
    out = [VersionInfo(oldest, "oldest", f"lsn-{oldest}", 0)]
    for lsn, ts in log.flush_points():
        if oldest <= lsn <= head:
            out.append(VersionInfo(lsn, "flush", f"lsn-{lsn}", ts))
    for lsn, name in log.marks.items():
        if oldest <= lsn <= head:
            out.append(VersionInfo(lsn, "mark", name, log.info(lsn).timestamp_ns))
    out.append(VersionInfo(head, "head", f"lsn-{head}", 0))
    return sorted(out, key=lambda v: (v.lsn, v.kind))


def listing(flushes: list[tuple[int, int]], marks: dict[int, str], oldest: int, newest: int, *,
            recent: int = RECENT, spacing_ns: int = SPACING_NS) -> list[VersionInfo]:
    """What a versions directory lists: every mark and a bounded set of flush points.

    ``flushes`` are ``(lsn, timestamp_ns)`` oldest first, ``marks`` LSN -> name (listed with
    timestamp 0: the caller looks a time up when it needs one). Only versions in ``[oldest,
    newest]``: the newest ``recent`` flush points, and before those the newest flush point of
    each ``spacing_ns`` bucket of time. Sorted by LSN; flush points are named ``lsn-N`` (unique
    and exact, unlike a time, which two flushes may share)."""
    inside = [(lsn, ts) for lsn, ts in flushes if oldest <= lsn <= newest]
    shown = inside[-recent:] if recent else []
    older = inside[: len(inside) - len(shown)]
    hourly: dict[int, tuple[int, int]] = {}
    for lsn, ts in older:
        hourly[ts // spacing_ns] = (lsn, ts)  # oldest first: the newest of each bucket stays
    out = [VersionInfo(lsn, "flush", f"lsn-{lsn}", ts) for lsn, ts in [*hourly.values(), *shown]]
    out += [VersionInfo(lsn, "mark", name, 0) for lsn, name in marks.items() if oldest <= lsn <= newest]
    return sorted(out, key=lambda v: (v.lsn, v.kind))


def parse_time_ns(spec: str) -> int | None:
    """Nanoseconds since the epoch of an ISO-8601 time (UTC unless it says otherwise), or None
    when ``spec`` is not one. Fractions keep all nine digits (datetime stops at six)."""
    m = _TIME.fullmatch(spec)
    if m is None:
        return None
    zone = m.group(3) or "Z"
    try:
        when = datetime.fromisoformat(m.group(1) + ("+00:00" if zone.upper() == "Z" else zone))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    frac = m.group(2) or ""
    return int(when.timestamp()) * 10**9 + int(frac.ljust(9, "0") or 0)


def format_time_ns(ns: int) -> str:
    """The ISO-8601 UTC name of an instant, to the nanosecond (``parse_time_ns`` reads it back)."""
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}Z"


def resolve_version(log: Log, spec: str, oldest: int, volume: str, newest: int | None = None) -> int:
    """LSN named by ``lsn-N``, a mark name, or an ISO-8601 UTC time (newest flush at or before,
    in ``[oldest, newest]``). ``lsn-N`` is not judged here: see :func:`find_version`."""
    if spec.startswith("lsn-") and spec[4:].isdigit():
        return int(spec[4:])
    for lsn, name in log.marks.items():
        if name == spec:
            return lsn
    limit = parse_time_ns(spec)
    if limit is None:
        raise VersionNotFound(f"no version {spec!r} of volume {volume}: give lsn-N, a mark name "
                              "or an ISO-8601 UTC time like 2026-11-23T22:00:00Z")
    best = None
    for lsn, ts in log.flush_points():
        if ts <= limit and lsn >= oldest and (newest is None or lsn <= newest):
            best = lsn
    if best is None:
        raise VersionNotFound(f"no flush point of volume {volume} at or before {spec} is retained; "
                              f"the oldest version is lsn-{oldest} (marsfs versions lists them)")
    return best


def find_version(log: Log, spec: str, oldest: int, newest: int, volume: str, head: int | None = None) -> int:
    """Like :func:`resolve_version`, but only a version in ``[oldest, newest]``; otherwise
    VersionNotFound naming the oldest available version. ``head``: the newest LSN in the log
    when readers see less (a mirror's replay position is ``newest``): a version between the
    two is in the log but not replayed yet, and the error says so (it is not lost)."""
    lsn = resolve_version(log, spec, oldest, volume, newest)
    if head is not None and newest < lsn <= head:
        raise VersionNotFound(f"version {spec} (lsn-{lsn}) of volume {volume} is not replayed yet on this node "
                              f"(replayed up to lsn-{newest}; its log reaches lsn-{head}); wait for the replay "
                              f"(marsfs resume-replay {volume} if it is paused), or use it on the primary")
    if not oldest <= lsn <= newest:
        raise VersionNotFound(f"version {spec} (lsn-{lsn}) of volume {volume} is not retained; "
                              f"available: lsn-{oldest} to lsn-{newest} (marsfs versions lists them)")
    return lsn


def _is_time(spec: str) -> bool:
    try:
        datetime.fromisoformat(spec.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def check_mark_name(name: str, existing: Iterable[str], volume: str) -> bytes:
    """The UTF-8 payload of a new mark ``name``; raises InvalidRequest for a bad or taken name."""
    raw = name.encode()
    if (not name or len(raw) > MAX_MARK or "/" in name or name.startswith((".", "lsn-"))
            or name.lower() in RESERVED_MARKS or any(ord(c) < 32 or ord(c) == 127 for c in name)
            or _is_time(name)):
        raise InvalidRequest(f"mark name {name!r} is invalid: {MARK_RULES}")
    if name in existing:
        raise InvalidRequest(f"mark {name!r} already exists on volume {volume}; pick another name")
    return raw
