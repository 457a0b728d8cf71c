"""Names of a volume's retained versions: listing them and resolving a name to an LSN.

Rules that hold here:

* A version is the image after one LSN in ``[oldest, head]``; ``oldest`` is the volume's
  oldest servable version (the applied LSN, or a writeback's target), passed in by the volume.
* Names: ``lsn-N`` (any N; whether it is retained is checked when a view opens), a mark name
  (MARK records), or an ISO-8601 time, which means the newest retained FLUSH record at or
  before it (UTC unless the time says otherwise).
* A mark name never shadows another name (:func:`check_mark_name`): it is unique per volume,
  1 to ``MAX_MARK`` bytes, not a word of the ``versions`` listing (``head``, ``oldest``,
  ``flush``, ``mark``, in any case), not starting with ``lsn-`` or ``.``, not an ISO-8601
  time, without ``/`` or control characters, so that every name is also a file name in the
  versions directory and means one version only.
* Pure functions over what the log reports (:meth:`Log.marks`, :meth:`Log.flush_points`):
  no locks, no I/O of their own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from marsfs.errors import InvalidRequest, VersionNotFound
from marsfs.log import Log

MAX_MARK = 200  #: bytes of a mark name (UTF-8)
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
        if lsn > oldest:
            out.append(VersionInfo(lsn, "flush", f"lsn-{lsn}", ts))
    for lsn, name in log.marks.items():
        if lsn > oldest:
            out.append(VersionInfo(lsn, "mark", name, log.info(lsn).timestamp_ns))
    out.append(VersionInfo(head, "head", f"lsn-{head}", 0))
    return sorted(out, key=lambda v: (v.lsn, v.kind))


def resolve_version(log: Log, spec: str, oldest: int, volume: str) -> int:
    """LSN named by ``lsn-N``, a mark name, or an ISO-8601 UTC time (newest flush at or before)."""
    if spec.startswith("lsn-") and spec[4:].isdigit():
        return int(spec[4:])
    for lsn, name in log.marks.items():
        if name == spec:
            return lsn
    try:
        when = datetime.fromisoformat(spec.replace("Z", "+00:00"))
    except ValueError:
        raise VersionNotFound(f"no version {spec!r} of volume {volume}: give lsn-N, a mark name "
                              "or an ISO-8601 UTC time like 2026-11-23T22:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    limit = int(when.timestamp() * 1e9)
    best = None
    for lsn, ts in log.flush_points():
        if ts <= limit and lsn >= oldest:
            best = lsn
    if best is None:
        raise VersionNotFound(f"no flush point of volume {volume} at or before {spec} is retained; "
                              f"the oldest version is lsn-{oldest} (marsfs versions lists them)")
    return best


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
