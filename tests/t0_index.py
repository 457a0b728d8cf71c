"""ExtentIndex against an independent reference: a per-byte list of LSNs over a small space.

The reference knows nothing about extents: ``ref[p]`` is the LSN of the newest record that
wrote byte ``p`` and is not yet written back (0: the byte reads from the base). Discards are
issued exactly the way ``Volume.writeback`` issues them: after "applying" every record with
LSN <= A, ``discard(rec.offset, rec.length, A, rec.lsn)`` for each record applied in that step
(or without ``rec.lsn``: the scan that the named record's fast path falls back to).
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sortedcontainers import SortedList

from marsfs.volume.index import MAX_EXTENT, MAX_LSN, ExtentIndex

SPACE = 4096


def _rebuild(index: ExtentIndex, space: int = SPACE) -> list[int]:
    """The index as a per-byte LSN list; asserts the extents are sorted and disjoint."""
    out = [0] * space
    prev_end = 0
    for start, length, lsn in index:
        assert length > 0 and lsn > 0, (start, length, lsn)
        assert start >= prev_end, f"extent at {start} overlaps or is out of order (previous ends at {prev_end})"
        assert start + length <= space, (start, length)
        out[start : start + length] = [lsn] * length
        prev_end = start + length
    return out


def _check_lookup(index: ExtentIndex, ref: list[int], start: int, length: int) -> None:
    pieces = index.lookup(start, length)
    assert pieces, "lookup returned nothing"
    pos = start
    for p, n, lsn in pieces:
        assert p == pos, f"pieces not contiguous: expected {pos}, got {p} in {pieces}"
        assert n > 0, pieces
        assert all(ref[b] == lsn for b in range(p, p + n)), (
            f"piece {(p, n, lsn)} disagrees with reference {sorted(set(ref[p:p + n]))}")
        pos += n
    assert pos == start + length, f"pieces cover up to {pos}, want {start + length}"
    # Adjacent pieces with the same LSN are allowed (two extents of one record), but pieces of
    # LSN 0 are maximal gaps: two base pieces in a row would mean a lost extent boundary.
    for a, b in zip(pieces, pieces[1:]):
        assert not (a[2] == 0 and b[2] == 0), pieces


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.index = ExtentIndex()
        self.ref = [0] * SPACE
        self.records: dict[int, tuple[int, int]] = {}  # lsn -> (offset, length), not yet applied
        self.head = 0
        self.applied = 0

    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, SPACE - 1), label="start")
        length = data.draw(st.one_of(st.integers(1, 16), st.integers(1, SPACE - start)), label="length")
        length = min(length, SPACE - start)
        self.head += data.draw(st.sampled_from([1, 1, 1, 2, 7]), label="lsn step")  # gaps: FLUSH/MARK records
        lsn = self.head
        self.index.insert(start, length, lsn)
        self.ref[start : start + length] = [lsn] * length
        self.records[lsn] = (start, length)

    @precondition(lambda self: self.head > self.applied)
    @rule(data=st.data())
    def writeback(self, data: st.DataObject) -> None:
        target = data.draw(st.integers(self.applied, self.head), label="applied")
        before = list(self.ref)
        by_record = data.draw(st.booleans(), label="discard names the record")  # as writeback does
        for lsn in sorted(r for r in self.records if r <= target):
            off, n = self.records.pop(lsn)
            self.index.discard(off, n, target, lsn if by_record else 0)
        self.applied = target
        self.ref = [0 if v <= target else v for v in self.ref]
        rebuilt = _rebuild(self.index)
        assert all(v == 0 or v > target for v in rebuilt), "an extent with lsn <= applied survived"
        assert all(rebuilt[p] == before[p] for p in range(SPACE) if before[p] > target), \
            "discard touched an extent newer than the applied LSN"

    @rule(data=st.data())
    def lookup(self, data: st.DataObject) -> None:
        for _ in range(4):
            start = data.draw(st.integers(0, SPACE - 1), label="lookup start")
            length = data.draw(st.integers(1, SPACE - start), label="lookup length")
            _check_lookup(self.index, self.ref, start, length)

    @rule()
    def copy_is_independent(self) -> None:
        clone = self.index.copy()
        snapshot = list(self.index)
        clone.insert(0, SPACE, self.head + 1)
        clone.discard(0, SPACE, MAX_LSN)
        assert list(self.index) == snapshot, "mutating a copy changed the original"
        assert len(clone) == 0

    @invariant()
    def matches_reference(self) -> None:
        assert _rebuild(self.index) == self.ref
        for start, length, lsn in self.index:
            off, n = self.records[lsn]  # every extent belongs to a record not yet applied
            assert off <= start and start + length <= off + n, "extent outside its record's range"
            assert self.applied < lsn <= self.head
        # One extent per maximal run of equal LSN: a record is never split more than the newer
        # records that cut it require, and no cut is left behind when they are written back.
        runs = sum(1 for p in range(SPACE) if self.ref[p] and (p == 0 or self.ref[p - 1] != self.ref[p]))
        assert len(self.index) == runs
        _check_lookup(self.index, self.ref, 0, SPACE)


TestIndexModel = IndexMachine.TestCase
TestIndexModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


class SmallSublistsMachine(IndexMachine):
    """The same model over a SortedList cut into sublists of 4 to 8 values (its default is 1,000
    to 2,000, which these small runs never reach): the index reads SortedList's sublists, and
    its lookups must cross from one to the next and find a predecessor in the one before."""

    def __init__(self) -> None:
        super().__init__()
        entries = SortedList()
        entries._reset(4)
        self.index = ExtentIndex(entries)


TestIndexModelSmallSublists = SmallSublistsMachine.TestCase
TestIndexModelSmallSublists.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow])


@given(st.lists(st.tuples(st.integers(0, SPACE - 1), st.integers(1, 512)), min_size=1, max_size=30),
       st.data())
@settings(max_examples=100, deadline=None)
def test_copy_is_independent(writes: list[tuple[int, int]], data: st.DataObject) -> None:
    index = ExtentIndex()
    for lsn, (start, length) in enumerate(writes, 1):
        index.insert(start, min(length, SPACE - start), lsn)
    original = list(index)
    clone = index.copy()
    assert list(clone) == original and len(clone) == len(index)

    # Mutate the original: the clone keeps the old state.
    lsn = len(writes) + 1
    start = data.draw(st.integers(0, SPACE - 1))
    index.insert(start, SPACE - start, lsn)
    assert list(clone) == original
    # Mutate the clone: the original keeps its state.
    after = list(index)
    clone.discard(0, SPACE, lsn)
    clone.insert(0, 1, lsn + 1)
    assert list(index) == after
    assert list(clone) == [(0, 1, lsn + 1)]


def test_empty_lookup_is_base() -> None:
    index = ExtentIndex()
    assert index.lookup(10, 100) == [(10, 100, 0)]
    assert len(index) == 0 and list(index) == []


def test_packing_limits() -> None:
    """Offsets far beyond 2**32, the largest extent and the largest LSN survive packing."""
    index = ExtentIndex()
    big = 1 << 45
    index.insert(big, MAX_EXTENT, 1)
    index.insert(big + 10, 5, MAX_LSN)
    assert list(index) == [(big, 10, 1), (big + 10, 5, MAX_LSN), (big + 15, MAX_EXTENT - 15, 1)]
    assert index.lookup(big - 1, 20) == [(big - 1, 1, 0), (big, 10, 1), (big + 10, 5, MAX_LSN),
                                         (big + 15, 4, 1)]
    index.discard(big + 12, 1, MAX_LSN - 1)  # the only overlapping extent is newer: nothing goes
    assert list(index) == [(big, 10, 1), (big + 10, 5, MAX_LSN), (big + 15, MAX_EXTENT - 15, 1)]
    index.discard(big, MAX_EXTENT, MAX_LSN)
    assert list(index) == []
