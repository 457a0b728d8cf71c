"""Views: read-only images of a volume at a fixed LSN, and the extent indexes they share.

Theory of operation
-------------------
The image after LSN *n* is the base (the image after the applied LSN *A*) with the WRITE
records ``(A, n]`` laid over it. A view needs an extent index of exactly those records; the
volume's live index holds newer ones too, so a view builds its own: one pass over the
records' rows in the log's in-memory tables (no data is read), inserting each WRITE. That is
the cost of opening a version (docs/architecture.md measures it), so it is paid once per
version, not per open:

* :class:`VersionIndexes` holds one index per open version LSN with a count of the views
  using it. The first open builds it, later opens of the same LSN share it, the last close
  frees it. The count is also the version's pin: writeback never passes the smallest pinned
  LSN, so the base never holds bytes newer than an open view.
* A shared index stays correct while writeback goes on below its pin: once writeback has
  applied records up to *A' <= n*, the extents of those records read from the base, which
  holds exactly their bytes (the volume's ``_piece`` decides by LSN against the applied LSN).
* An index is never changed after it is published, so views read it under the volume lock
  only because the volume's read path takes that lock anyway.

A view remembers the volume's resync *generation* when it opened: after a resync's switch the
log it was built from is gone, and the volume reads an older generation's view from the base
alone, which holds its version until the switch's merge (see :mod:`marsfs.volume.resync`).

Two threads that open the same new version at once may both build it; the second one's is
dropped and both use the first (counted in :attr:`VersionIndexes.builds`). All methods run
under the volume lock (the caller's).

A :class:`VolumeView` reads through :class:`VersionSource`, the few public methods of the
volume it needs (the volume implements it), so views never reach into the volume's internals.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from marsfs.errors import OutOfRange
from marsfs.log import RecordInfo, RecordType
from marsfs.volume.index import ExtentIndex


class VersionSource(Protocol):
    """What a view reads from: a volume (:class:`marsfs.volume.Volume` is one)."""

    @property
    def name(self) -> str: ...

    def size_at(self, lsn: int) -> int:
        """The size of version ``lsn``."""
        ...

    def read_indexed(self, index: ExtentIndex, offset: int, length: int, generation: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of the image ``index`` describes, as a reader opened
        in resync ``generation`` sees them."""
        ...

    def unpin(self, lsn: int, generation: int) -> None:
        """A view of ``lsn`` opened in ``generation`` closed: writeback may pass it."""
        ...


def build_index(records: Iterable[RecordInfo]) -> ExtentIndex:
    """An extent index of the WRITE ``records`` (in LSN order)."""
    index = ExtentIndex()
    for rec in records:
        if rec.type == RecordType.WRITE and rec.length:
            index.insert(rec.offset, rec.length, rec.lsn)
    return index


class VersionIndexes:
    """Open versions: LSN -> (views using it, its shared index once built). Caller locks."""

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._index: dict[int, ExtentIndex] = {}
        self._since: dict[int, float] = {}  #: LSN -> when (epoch seconds) it was first pinned
        self.builds = 0  #: indexes built (for tests and statistics)

    def pin(self, lsn: int, now: float = 0.0) -> ExtentIndex | None:
        """Count a new view of ``lsn`` (opened at ``now``, epoch seconds); its index if one is
        built already."""
        self._count[lsn] = self._count.get(lsn, 0) + 1
        self._since.setdefault(lsn, now)
        return self._index.get(lsn)

    def publish(self, lsn: int, index: ExtentIndex) -> ExtentIndex:
        """Share a freshly built index of pinned ``lsn``; returns the one every view uses."""
        assert lsn in self._count, "publish only a pinned version's index"
        self.builds += 1
        return self._index.setdefault(lsn, index)

    def unpin(self, lsn: int) -> None:
        """A view of ``lsn`` closed; the last one frees the index."""
        left = self._count[lsn] - 1
        if left:
            self._count[lsn] = left
        else:
            del self._count[lsn]
            self._index.pop(lsn, None)
            self._since.pop(lsn, None)

    def oldest(self) -> int | None:
        """The smallest pinned LSN (writeback stops there), or None."""
        return min(self._count) if self._count else None

    def views(self, lsn: int) -> int:
        return self._count.get(lsn, 0)

    def total(self) -> int:
        """Open views of every version."""
        return sum(self._count.values())

    def pinned(self) -> list[int]:
        """The pinned LSNs, ascending."""
        return sorted(self._count)

    def since(self, lsn: int) -> float:
        """When pinned ``lsn`` was opened (epoch seconds; the oldest of its open views)."""
        return self._since.get(lsn, 0.0)

    def unshare(self) -> None:
        """Stop sharing the built indexes with views opened from now on (a resync's switch: the
        same LSN now names another history). Open views keep theirs; counts stay."""
        self._index.clear()

    def shared(self) -> dict[int, int]:
        """LSN -> extents of every built index (what open versions cost in memory)."""
        return {lsn: len(ix) for lsn, ix in self._index.items()}

    def __bool__(self) -> bool:
        return bool(self._count)


class VolumeView:
    """A read-only image of a volume after a fixed LSN. Pins writeback until closed."""

    def __init__(self, volume: VersionSource, lsn: int, index: ExtentIndex, generation: int) -> None:
        self.volume = volume
        self.lsn = lsn
        self.size = volume.size_at(lsn)  #: a version keeps the size of its LSN (resize)
        self.generation = generation  #: the volume's resync generation when the view opened
        self._index = index
        self._closed = False

    def read(self, offset: int, length: int) -> bytes:
        assert not self._closed, "read from a closed view"
        if offset + length > self.size:  # the volume may have grown since (resize, a resync's switch)
            raise OutOfRange(f"range {offset}+{length} lies outside version lsn-{self.lsn} of volume "
                             f"{self.volume.name} ({self.size} bytes)")
        return self.volume.read_indexed(self._index, offset, length, self.generation)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.volume.unpin(self.lsn, self.generation)

    def __enter__(self) -> VolumeView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
