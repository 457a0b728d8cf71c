"""What a mirror whose log was dropped must copy: an interval set of changed byte ranges.

When log space runs out the primary drops the oldest log even though a mirror has not fetched
it (G8). From then on the volume remembers, per mirror, which byte ranges the dropped records
wrote: a :class:`ChangeSet`. When the mirror comes back it copies the current content of those
ranges plus the ranges of the retained records after the dropped point
(:meth:`marsfs.volume.Volume.changed_ranges`), then fetches the log from there on.

Rules that hold here:

* A :class:`ChangeSet` is a set of disjoint, non-adjacent byte ranges, ``(offset, length)``
  like :meth:`marsfs.volume.Volume.extents_between` (adding merges overlapping and touching
  ranges; the set is the resync's :class:`~marsfs.volume.resync.Extents`, a SortedDict), so
  adding one range costs O(log n + ranges it swallows) and the set never holds more ranges
  than the volume has distinct changed extents.
* A set covers the changes of the records ``(since, upto]``: ``since`` is the mirror's position
  when its first records were dropped, ``upto`` the newest record dropped for it. A mirror at a
  position ``p >= since`` needs the set's ranges plus the extents of the records after ``upto``.
* Persistence is one JSON file per (volume, mirror), ``changes/<mirror>.json`` in the volume
  directory, replaced atomically (:func:`marsfs.fsutil.write_json`): a crash leaves the old or
  the new set, and the caller persists the set before the log it describes is deleted, so the
  file always covers at least what was dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from marsfs.errors import StateError
from marsfs.fsutil import fsync_dir, read_json, write_json
from marsfs.volume.resync import Extents

CHANGES_DIR = "changes"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class ChangeSet:
    """Merged byte ranges (an :class:`~marsfs.volume.resync.Extents`), with the LSN range
    ``(since, upto]`` whose changes they cover."""

    def __init__(self, since: int, upto: int, ranges: Iterable[tuple[int, int]] = ()) -> None:
        assert since <= upto
        self.since = since
        self.upto = upto
        self._extents = Extents()
        self.update(ranges)

    def add(self, offset: int, length: int) -> None:
        """Add ``[offset, offset+length)``, merging what it overlaps or touches."""
        self._extents.add(offset, length)

    def update(self, ranges: Iterable[tuple[int, int]]) -> None:
        for offset, length in ranges:
            self._extents.add(offset, length)

    @property
    def bytes(self) -> int:
        """Total bytes the ranges cover."""
        return self._extents.total

    def ranges(self) -> list[tuple[int, int]]:
        """The ranges as ``(offset, length)``, ascending (the form of ``Volume.extents_between``)."""
        return list(self._extents)

    def __len__(self) -> int:
        return len(self._extents)

    def copy(self) -> ChangeSet:
        return ChangeSet(self.since, self.upto, self.ranges())

    def to_json(self) -> dict[str, Any]:
        return {"since": self.since, "upto": self.upto, "ranges": [[o, n] for o, n in self._extents]}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> ChangeSet:
        try:
            return cls(int(d["since"]), int(d["upto"]), [(int(o), int(n)) for o, n in d["ranges"]])
        except (KeyError, TypeError, ValueError, AssertionError) as e:
            raise StateError(f"{where}: unreadable set of changed ranges ({e}); that mirror needs a full "
                             "resync (marsfs invalidate on it)") from None


def merge(*lists: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of lists of ``(offset, length)`` ranges, merged and ascending."""
    ext = Extents()
    for ranges in lists:
        for offset, length in ranges:
            ext.add(offset, length)
    return list(ext)


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
