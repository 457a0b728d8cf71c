"""The extent index: which log record holds the newest bytes of each volume range.

Rules that hold here:

* Extents never overlap; each maps ``[start, start+length)`` to the LSN of the record whose
  data it is. Inserting a newer record cuts whatever it overlaps.
* An extent always lies inside the range of its record, so the byte at volume offset ``p``
  of an extent with LSN ``n`` is byte ``p - record(n).offset`` of that record's payload.
* Ranges without an extent read from the base image (reported with LSN 0).

Memory matters: a volume may hold millions of extents. Each one is a single Python int in a
``SortedList``, ``start << 72 | length << 48 | lsn``, which sorts by ``start`` and costs about
60 bytes (the benchmark measures it), against 250+ for a tuple in a ``SortedDict``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from sortedcontainers import SortedList

_LSN_BITS = 48
_LEN_BITS = 24
_START_SHIFT = _LSN_BITS + _LEN_BITS
_LSN_MASK = (1 << _LSN_BITS) - 1
_LEN_MASK = (1 << _LEN_BITS) - 1
MAX_EXTENT = _LEN_MASK
MAX_LSN = _LSN_MASK


def _pack(start: int, length: int, lsn: int) -> int:
    return start << _START_SHIFT | length << _LSN_BITS | lsn


def _unpack(e: int) -> tuple[int, int, int]:
    return e >> _START_SHIFT, (e >> _LSN_BITS) & _LEN_MASK, e & _LSN_MASK


class ExtentIndex:
    """Non-overlapping extents ``start -> (length, lsn)`` of a volume, newest data wins."""

    __slots__ = ("_list",)

    def __init__(self, entries: SortedList | None = None) -> None:
        self._list: SortedList = entries if entries is not None else SortedList()

    def __len__(self) -> int:
        return len(self._list)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """(start, length, lsn) of every extent in volume order."""
        for e in self._list:
            yield _unpack(e)

    def copy(self) -> ExtentIndex:
        return ExtentIndex(self._list.copy())

    def _overlapping(self, start: int, end: int) -> list[int]:
        """Packed extents that overlap ``[start, end)``, in volume order.

        Reads SortedList's sublists (``_lists``, ``_maxes``: its layout since 1.x) with two
        bisects, not ``irange``: the two generators ``irange`` sets up cost more than the rest
        of an insert (measured, 200,000 extents: insert 5.1-5.7 -> 2.3-2.4 µs, lookup 5.1-5.6
        -> 2.1-2.2 µs). Positional access (``sl[i]``) is avoided too: it would make SortedList
        build its positional index, which every later add/remove must then keep up to date.
        The model tests in t0_index check this against a per-byte reference, also over
        sublists of 4 to 8 values."""
        sl = self._list
        maxes: list[int] = sl._maxes
        if not maxes:
            return []
        lists: list[list[int]] = sl._lists
        key = start << _START_SHIFT
        pos = bisect_left(maxes, key)  # the first sublist holding a value >= key
        out: list[int] = []
        if pos == len(maxes):  # every extent starts before ``start``: only the last may reach in
            prev = maxes[-1]
            if (prev >> _START_SHIFT) + ((prev >> _LSN_BITS) & _LEN_MASK) > start:
                out.append(prev)
            return out
        lst = lists[pos]
        i = bisect_left(lst, key)
        prev = lst[i - 1] if i else lists[pos - 1][-1] if pos else -1
        if prev >= 0 and (prev >> _START_SHIFT) + ((prev >> _LSN_BITS) & _LEN_MASK) > start:
            out.append(prev)
        stop = end << _START_SHIFT
        while True:
            n = len(lst)
            while i < n:  # by index: a slice would copy the rest of the sublist (up to 2,000)
                e = lst[i]
                if e >= stop:
                    return out
                out.append(e)
                i += 1
            pos += 1
            if pos == len(lists):
                return out
            lst, i = lists[pos], 0

    def insert(self, start: int, length: int, lsn: int) -> None:
        """Record that ``[start, start+length)`` now holds data of record ``lsn``."""
        assert 0 < length <= MAX_EXTENT and 0 < lsn <= MAX_LSN and start >= 0, (start, length, lsn)
        end = start + length
        sl = self._list
        for e in self._overlapping(start, end):
            s, n, old = _unpack(e)
            assert old < lsn, "records are indexed in LSN order"
            sl.remove(e)
            if s < start:
                sl.add(_pack(s, start - s, old))
            if s + n > end:
                sl.add(_pack(end, s + n - end, old))
        sl.add(_pack(start, length, lsn))

    def discard(self, start: int, length: int, upto_lsn: int, lsn: int = 0) -> None:
        """Forget extents inside ``[start, start+length)`` whose LSN is at most ``upto_lsn``.

        Writeback calls this for each record it applied: those bytes now live in the base.
        ``lsn`` (at most ``upto_lsn``): the record whose range this is. While no later record
        cut it, its one extent covers the range and nothing else lies in it, so removing that
        extent is all there is to do: one lookup instead of a scan (measured: about a third of
        writeback's CPU per 4 KiB record went to the scan).
        """
        if lsn:
            assert lsn <= upto_lsn, (lsn, upto_lsn)
            try:
                self._list.remove(_pack(start, length, lsn))
                return
            except ValueError:
                pass  # cut by later records (or written back already): scan
        end = start + length
        for e in self._overlapping(start, end):
            s, n, lsn = _unpack(e)
            if lsn <= upto_lsn:
                self._list.remove(e)

    def lookup(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """Cover ``[start, start+length)`` with pieces ``(pos, length, lsn)``; LSN 0 = base."""
        end = start + length
        out: list[tuple[int, int, int]] = []
        pos = start
        for e in self._overlapping(start, end):
            s, n, lsn = _unpack(e)
            s0, e0 = max(s, start), min(s + n, end)
            if s0 > pos:
                out.append((pos, s0 - pos, 0))
            out.append((s0, e0 - s0, lsn))
            pos = e0
        if pos < end:
            out.append((pos, end - pos, 0))
        return out
