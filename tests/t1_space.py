"""G8 in the core: the rules of log deletion, persisted mirror holds, dropped log and change sets.

What holds:

* a :class:`ChangeSet` is exactly the union of the ranges added (hypothesis, against a set of
  blocks), merged and ascending, and survives its JSON form;
* a mirror's hold is persisted by ``persist_holds`` and loaded on open: after a restart the
  log a disconnected mirror still needs is not trimmed;
* ``free_log(drop=False)`` cuts history up to the oldest hold and never past it;
  ``free_log(drop=True)`` drops it: the mirror's set holds exactly the extents of the records
  it missed, persisted before the log went, and the log is trimmed;
* ``changed_ranges`` = the set plus the extents after the drop point (or only the log's
  extents when the position is retained), None for a position nothing covers;
* a hold that passes the drop point clears the set (memory, then file at the next persist);
  ``release`` forgets hold and set;
* an open version stops ``free_log`` at its LSN;
* the log space setting: sizes, percentages, refusals, segment sizes from the limit.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marsfs.errors import InvalidRequest
from marsfs.node.space import (
    MIN_LOG_SPACE,
    MIN_SEGMENT_BYTES,
    LogSpaceSetting,
    limit_for,
    segment_bytes_for,
)
from marsfs.volume import Volume
from marsfs.volume.changes import ChangeSet, changes_path, merge

KiB = 1024
MiB = 1 << 20
SIZE = 8 * MiB
SEG = 256 * KiB


def make(tmp_path: Path) -> Volume:
    return Volume.create(tmp_path / "v", "v", SIZE, segment_bytes=SEG, sync_interval=None)


def write_random(vol: Volume, n: int, rng: random.Random) -> set[int]:
    """``n`` random 4 KiB writes (incompressible), flushed; returns the blocks written."""
    blocks = set()
    for _ in range(n):
        b = rng.randrange(SIZE // (4 * KiB))
        vol.write(b * 4 * KiB, rng.randbytes(4 * KiB))
        blocks.add(b)
    vol.flush()
    return blocks


def blocks_of(ranges: list[tuple[int, int]]) -> set[int]:
    """The 4 KiB blocks ``(offset, length)`` ranges cover."""
    return {b for o, n in ranges for b in range(o // (4 * KiB), (o + n) // (4 * KiB))}


# ---------------------------------------------------------------------------- the interval set

ranges_st = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ranges_st, ranges_st)
def test_change_set_is_the_union_of_its_ranges(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    s = ChangeSet(3, 7)
    model: set[int] = set()
    for offset, n in a + b:
        s.add(offset, n)
        model |= set(range(offset, offset + n))
    got = s.ranges()
    assert {x for o, n in got for x in range(o, o + n)} == model
    assert s.bytes == len(model) and len(s) == len(got)
    assert all(n > 0 for _, n in got)
    assert all(got[i][0] + got[i][1] < got[i + 1][0] for i in range(len(got) - 1)), "merged: no touching ranges"
    back = ChangeSet.from_json(s.to_json(), "test")
    assert (back.ranges(), back.since, back.upto) == (got, 3, 7)
    assert merge(a, b) == got


# ---------------------------------------------------------------------------- holds

def test_holds_persist_across_reopen_and_keep_the_log(tmp_path: Path) -> None:
    rng = random.Random(1)
    vol = make(tmp_path)
    write_random(vol, 10, rng)
    vol.hold("mirror:b", 5)
    vol.persist_holds()
    write_random(vol, 300, rng)  # several segments
    vol.close()
    vol = Volume.open(tmp_path / "v", sync_interval=None)
    try:
        assert vol.holds == {"mirror:b": 5}
        while vol.writeback() < vol.durable_lsn:
            pass
        assert vol.log.first_lsn <= 6, "the log a disconnected mirror needs survived the restart"
        vol.release("mirror:b")
        vol.persist_holds()
        vol.free_log(vol.durable_lsn, drop=False)  # nothing left to write back: it only trims
        assert vol.log.first_lsn > 6
    finally:
        vol.close()
    vol = Volume.open(tmp_path / "v", sync_interval=None)
    assert vol.holds == {}
    vol.close()


def test_history_cut_stops_at_a_hold_and_drop_records_what_the_mirror_misses(tmp_path: Path) -> None:
    rng = random.Random(2)
    vol = make(tmp_path)
    write_random(vol, 20, rng)
    vol.hold("mirror:b", vol.durable_lsn)
    at = vol.durable_lsn
    missed = write_random(vol, 400, rng)
    head = vol.durable_lsn
    assert vol.free_log(head, drop=False) == head  # history: written back ...
    assert vol.log.first_lsn <= at + 1  # ... but the log stays for the mirror
    assert vol.dropped() == {}
    before = vol.log.end_bytes
    assert vol.free_log(head, drop=True) == head
    assert vol.log.end_bytes < before and vol.log.first_lsn > at + 1
    cs = vol.dropped()["mirror:b"]
    assert (cs.since, cs.upto) == (at, head)
    assert blocks_of(cs.ranges()) == missed, "the set covers exactly the extents written"
    assert vol.hold_floor() == head
    # it comes back at its old position: the set, plus what was written after the drop point
    more = write_random(vol, 5, rng)
    assert blocks_of(vol.changed_ranges("b", at) or []) == missed | more
    assert vol.changed_ranges("b", at - 1) is None, "before the set's start: unknown, full sync"
    assert vol.changed_ranges("c", at) is None
    assert blocks_of(vol.changed_ranges("b", head) or []) == more  # retained: the log alone
    vol.close()
    vol = Volume.open(tmp_path / "v", sync_interval=None)
    assert blocks_of(vol.dropped()["mirror:b"].ranges()) == missed, "persisted"
    assert vol.holds == {"mirror:b": at}
    # caught up: its position passes the drop point; the set goes (file at the next persist)
    vol.hold("mirror:b", head)
    assert vol.dropped() == {}
    assert changes_path(vol.path, "mirror:b").exists()
    vol.persist_holds()
    assert not changes_path(vol.path, "mirror:b").exists()
    vol.close()


def test_a_second_drop_extends_the_set_and_release_forgets_it(tmp_path: Path) -> None:
    rng = random.Random(3)
    vol = make(tmp_path)
    vol.hold("mirror:b", 0)
    first = write_random(vol, 200, rng)
    vol.free_log(vol.durable_lsn, drop=True)
    second = write_random(vol, 200, rng)
    vol.free_log(vol.durable_lsn, drop=True)
    cs = vol.dropped()["mirror:b"]
    assert (cs.since, cs.upto) == (0, vol.durable_lsn)
    assert blocks_of(cs.ranges()) == first | second
    vol.release("mirror:b")
    vol.persist_holds()
    assert vol.dropped() == {} and not changes_path(vol.path, "mirror:b").exists()
    vol.close()


def test_an_open_version_stops_the_cut(tmp_path: Path) -> None:
    rng = random.Random(4)
    vol = make(tmp_path)
    write_random(vol, 50, rng)
    pin = vol.durable_lsn
    view = vol.view(pin)
    write_random(vol, 300, rng)
    assert vol.free_log(vol.durable_lsn, drop=True) == pin
    view.close()
    assert vol.free_log(vol.durable_lsn, drop=True) == vol.durable_lsn
    vol.close()


# ---------------------------------------------------------------------------- the setting

def test_log_space_setting_parses_sizes_and_percentages() -> None:
    assert LogSpaceSetting.parse("20G").size == 20 << 30
    assert LogSpaceSetting.parse(64 * MiB).size == 64 * MiB
    assert LogSpaceSetting.parse("10%").percent == 10.0
    assert LogSpaceSetting.parse(None) == LogSpaceSetting()
    for bad, why in [("1M", "too small"), ("0%", "above 0"), ("150%", "at most 100"), ("lots", "cannot read")]:
        with pytest.raises(InvalidRequest, match=why):
            LogSpaceSetting.parse(bad)


def test_limits_and_segment_sizes(tmp_path: Path) -> None:
    assert limit_for(LogSpaceSetting(size=64 * MiB), tmp_path, 0) == 64 * MiB
    default = limit_for(LogSpaceSetting(), tmp_path, 0)
    assert default >= MIN_LOG_SPACE
    assert limit_for(LogSpaceSetting(), tmp_path, 1 << 40) >= 1 << 39, "half of free space plus the logs"
    assert segment_bytes_for(64 * MiB, 1) == 4 * MiB
    assert segment_bytes_for(MIN_LOG_SPACE, 3) == MIN_SEGMENT_BYTES
    assert segment_bytes_for(1 << 40, 1) == 64 * MiB


def test_a_drop_persists_the_hold_it_depends_on(tmp_path: Path) -> None:
    rng = random.Random(5)
    vol = make(tmp_path)
    vol.hold("mirror:b", 0)  # not yet persisted (that is rate-limited) ...
    missed = write_random(vol, 200, rng)
    vol.free_log(vol.durable_lsn, drop=True)  # ... but a drop writes it before its set
    vol.close()
    vol = Volume.open(tmp_path / "v", sync_interval=None)
    assert vol.holds == {"mirror:b": 0}
    assert blocks_of(vol.changed_ranges("b", 0) or []) == missed
    vol.close()
