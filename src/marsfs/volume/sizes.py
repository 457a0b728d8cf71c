"""Sizes: a volume's size history, the size every version has.

A volume grows at points in history, each a RESIZE record whose offset is the new size
(``Volume.resize``). Every version has the size of its LSN: the last entry at or below it.

Rules that hold here:

* The history is a list of ``(lsn, size)`` pairs, ascending in both: its first entry is
  ``(0, first size)``, and sizes never shrink (asserted at each :meth:`SizeHistory.grow`).
* Persistence is ``volume.json``: ``size`` (the first version's) and ``resizes`` (the later
  pairs), written right after each RESIZE record is appended. At open the RESIZE records still
  in the log are the truth for their LSNs (a record lost in a crash takes its entry along); the
  entries below the log's first LSN (trimmed, hence durable) are trusted.
* A resync's switch replaces the history by the target's one size (the versions before it are
  gone; the switch rewrote ``volume.json``).
* The caller locks (the volume lock); nothing here takes one.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

from marsfs.errors import DiskFailed
from marsfs.fsutil import read_json, write_json
from marsfs.log import Log, RecordType, io_error

_INF = float("inf")


class SizeHistory:
    """``(lsn, size)`` pairs: from that LSN on the volume has that size."""

    def __init__(self, entries: list[tuple[int, int]]) -> None:
        assert entries and entries[0][0] == 0, entries
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(entries, entries[1:], strict=False)), entries
        self._entries = entries

    @classmethod
    def load(cls, meta: dict[str, Any], log: Log) -> SizeHistory:
        """A volume's history: its first size, the trusted ``resizes`` of volume.json below the
        log's first LSN, and the RESIZE records in the log."""
        sizes = [(0, int(meta["size"]))]
        sizes += [(int(lsn), int(size)) for lsn, size in meta.get("resizes", []) if lsn < log.first_lsn]
        sizes += [(rec.lsn, rec.offset) for rec in log.records(log.first_lsn) if rec.type == RecordType.RESIZE]
        return cls(sizes)

    @property
    def head(self) -> int:
        """The newest size (what writes may reach)."""
        return self._entries[-1][1]

    def at(self, lsn: int) -> int:
        """The size of version ``lsn`` (the last entry at or before it decides)."""
        i = bisect.bisect_right(self._entries, (lsn, _INF)) - 1
        return self._entries[max(i, 0)][1]

    def grow(self, lsn: int, size: int) -> None:
        """The volume has ``size`` from ``lsn`` on (a RESIZE record)."""
        assert size >= self.head, "a volume never shrinks"
        assert lsn >= self._entries[-1][0], (lsn, self._entries[-1])
        self._entries.append((lsn, size))

    def reset(self, size: int) -> None:
        """Only ``size`` is left (a resync's switch: the versions before its target are gone)."""
        self._entries = [(0, size)]

    def resizes(self) -> list[list[int]]:
        """The entries after the first, as ``volume.json``'s ``resizes`` holds them."""
        return [list(e) for e in self._entries[1:]]

    def persist(self, volume_dir: Path) -> None:
        """Write :meth:`resizes` into ``volume.json``; DiskFailed when that fails."""
        meta = read_json(volume_dir / "volume.json")
        meta["resizes"] = self.resizes()
        try:
            write_json(volume_dir / "volume.json", meta)
        except OSError as e:
            raise io_error(f"cannot write {volume_dir / 'volume.json'}", e, DiskFailed) from e
