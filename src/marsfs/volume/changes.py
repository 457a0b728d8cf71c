"""What a mirror whose log was dropped must copy: an interval set of changed byte ranges.

When log space runs out the primary drops the oldest log even though a mirror has not fetched
it (G8). From then on the volume remembers, per mirror, which byte ranges the dropped records
wrote: a :class:`ChangeSet`. When the mirror comes back it copies the current content of those
ranges plus the ranges of the retained records after the dropped point
(:meth:`marsfs.volume.Volume.changed_ranges`), then fetches the log from there on.

Rules that hold here:

* A :class:`ChangeSet` is a set of disjoint, non-adjacent half-open ranges ``[start, end)``
  (adding merges overlapping and touching ranges), kept in a SortedDict start -> end, so
  adding one range costs O(log n + ranges it swallows) and the set never holds more ranges
  than the volume has distinct changed extents.
* A set covers the changes of the records ``(since, upto]``: ``since`` is the mirror's position
  when its first records were dropped, ``upto`` the newest record dropped for it. A mirror at a
  position ``p >= since`` needs the set's ranges plus the extents of the records after ``upto``.
* Persistence is one JSON file per (volume, mirror), ``changes/<mirror>.json`` in the volume
  directory, replaced atomically (:func:`marsfs.fsutil.write_json`): a crash leaves the old or
  the new set, and the caller persists the set before the log it describes is deleted, so the
  file always covers at least what was dropped.
* :func:`write_extents` scans the log itself (the records' table, no payload reads).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sortedcontainers import SortedDict

from marsfs.errors import StateError
from marsfs.fsutil import fsync_dir, read_json, write_json
from marsfs.log import Log, RecordType

CHANGES_DIR = "changes"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class ChangeSet:
    """Merged half-open byte ranges, with the LSN range ``(since, upto]`` they describe."""

    def __init__(self, since: int, upto: int, ranges: Iterable[tuple[int, int]] = ()) -> None:
        assert since <= upto
        self.since = since
        self.upto = upto
        self._ranges: SortedDict = SortedDict()
        self._bytes = 0
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``, merging what it overlaps or touches."""
        if end <= start:
            return
        r = self._ranges
        i = r.bisect_right(start)
        if i:  # the range starting at or before `start` may reach it
            s, e = r.peekitem(i - 1)
            if e >= start:
                if e >= end:
                    return
                start = s
                i -= 1
        while i < len(r):
            s, e = r.peekitem(i)
            if s > end:
                break
            end = max(end, e)
            del r[s]
            self._bytes -= e - s
        r[start] = end
        self._bytes += end - start

    def update(self, ranges: Iterable[tuple[int, int]]) -> None:
        for start, end in ranges:
            self.add(start, end)

    @property
    def bytes(self) -> int:
        """Total bytes the ranges cover."""
        return self._bytes

    def ranges(self) -> list[tuple[int, int]]:
        """The ranges as ``(start, end)``, ascending."""
        return list(self._ranges.items())

    def __len__(self) -> int:
        return len(self._ranges)

    def __contains__(self, offset: object) -> bool:
        if not isinstance(offset, int):
            return False
        i = self._ranges.bisect_right(offset)
        return bool(i) and self._ranges.peekitem(i - 1)[1] > offset

    def to_json(self) -> dict[str, Any]:
        return {"since": self.since, "upto": self.upto, "ranges": [[s, e] for s, e in self._ranges.items()]}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> ChangeSet:
        try:
            return cls(int(d["since"]), int(d["upto"]), [(int(s), int(e)) for s, e in d["ranges"]])
        except (KeyError, TypeError, ValueError, AssertionError) as e:
            raise StateError(f"{where}: unreadable set of changed ranges ({e}); that mirror needs a full "
                             "resync (marsfs invalidate on it)") from None


def merge(a: Iterable[tuple[int, int]], b: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """The union of two lists of half-open ranges, merged and ascending."""
    s = ChangeSet(0, 0, a)
    s.update(b)
    return s.ranges()


def write_extents(log: Log, after: int, upto: int) -> list[tuple[int, int]]:
    """Merged byte ranges the retained WRITE records ``(after, upto]`` wrote. The caller makes
    sure those records are retained (and stay so while this runs)."""
    assert log.first_lsn <= after + 1, f"records after {after} are not all retained (log starts at {log.first_lsn})"
    s = ChangeSet(0, 0)
    for rec in log.records(after + 1, min(upto, log.last_lsn)):
        if rec.type == RecordType.WRITE and rec.length:
            s.add(rec.offset, rec.offset + rec.length)
    return s.ranges()


def changes_path(volume_dir: Path, key: str) -> Path:
    """The file of one mirror's set (``key``: the hold key, e.g. ``mirror:b``)."""
    return volume_dir / CHANGES_DIR / (_SAFE.sub("_", key) + ".json")


def save(volume_dir: Path, key: str, changes: ChangeSet) -> None:
    """Persist one mirror's set atomically (before the log it describes is deleted)."""
    path = changes_path(volume_dir, key)
    if not path.parent.exists():
        path.parent.mkdir()
        fsync_dir(volume_dir)
    write_json(path, {"key": key, **changes.to_json()})


def remove(volume_dir: Path, key: str) -> None:
    path = changes_path(volume_dir, key)
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


def load_all(volume_dir: Path) -> dict[str, ChangeSet]:
    """Every persisted set of a volume, by hold key."""
    out: dict[str, ChangeSet] = {}
    d = volume_dir / CHANGES_DIR
    if not d.is_dir():
        return out
    for path in sorted(d.glob("*.json")):
        data = read_json(path)
        out[str(data.get("key", path.stem))] = ChangeSet.from_json(data, str(path))
    return out
