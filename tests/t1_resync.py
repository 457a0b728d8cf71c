"""Resync of a volume to another node's version (marsfs.volume.resync): staging is invisible,
the switch is atomic for new readers and leaves old views byte-exact, the log continues after
the target, growth, abort, refusals, retarget, direct mode, crash points, extents_between."""

from __future__ import annotations

import errno
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from marsfs.errors import DiskFailed, InvalidRequest, StateError, VersionNotFound, VolumeBusy
from marsfs.log import genesis_chain
from marsfs.volume import Volume
from marsfs.volume import resync as rs
from marsfs.volume.blocksums import block_ranges, block_sums, differing_blocks
from marsfs.volume.resync import Extents, Resync

KiB = 1 << 10
SIZE = 256 * KiB
SEG = 64 * KiB  # small segments: the log rotates and trims during the tests


class Pair:
    """A source volume and a mirror of it with the same uuid (built by resync from empty)."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.src = Volume.create(root / "src", "vol", SIZE, segment_bytes=SEG, sync_interval=None)
        self.model = bytearray(SIZE)
        self.dst = Volume.create_replica(root / "dst", "vol", SIZE, self.src.uuid, 0, genesis_chain(self.src.uuid),
                                         segment_bytes=SEG)

    def scribble(self, vol: Volume, model: bytearray, count: int) -> None:
        for _ in range(count):
            n = self.rng.choice([1, 512, 4 * KiB, 9000, 70 * KiB])
            off = self.rng.randrange(0, len(model) - n)
            data = self.rng.randbytes(n)
            vol.write(off, data)
            model[off : off + n] = data
            if self.rng.random() < 0.3:
                vol.flush()
        vol.flush()

    def replicate(self, upto: int | None = None) -> None:
        """Ship the source's records after the mirror's head (as the fetch loop does)."""
        last = self.src.head_lsn if upto is None else upto
        for lsn in range(self.dst.head_lsn + 1, last + 1):
            self.dst.append_raw(self.src.log.read_raw(lsn))
        self.dst.log.sync()
        self.dst.replay_limit = self.dst.head_lsn

    def begin(self, **kw: bool) -> Resync:
        return self.dst.begin_resync(self.src.head_lsn, self.src.log.last_chain, self.src.size, self.src.uuid, **kw)


def stage_diff(r: Resync, target: bytes) -> int:
    """Stage every block where the staged image differs from ``target`` (as fast sync does by
    sums); returns bytes staged."""
    ranges = block_ranges(differing_blocks(block_sums(r.read, 0, r.size), block_sums(lambda o, n: target[o : o + n],
                                                                                          0, r.size)), 0, r.size)
    for off, n in ranges:
        r.write(off, target[off : off + n])
    r.sync()
    return sum(n for _, n in ranges)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path, random.Random(1))
    yield p
    p.src.close()
    p.dst.close()


def test_first_copy_then_fast_sync_then_log_continues(pair: Pair) -> None:
    pair.scribble(pair.src, pair.model, 20)
    r = pair.begin()
    assert stage_diff(r, bytes(pair.model)) > 0
    assert r.read(0, SIZE) == pair.model
    assert pair.dst.read(0, SIZE) == bytes(SIZE)  # staged blocks are invisible
    with pair.dst.view(0) as v:
        assert v.read(0, SIZE) == bytes(SIZE)
    assert pair.dst.finish_resync()
    assert pair.dst.resync is None
    L = pair.src.head_lsn
    assert pair.dst.head_lsn == pair.dst.applied_lsn == pair.dst.oldest_version_lsn == L
    assert pair.dst.replay_limit == L
    assert pair.dst.read(0, SIZE) == pair.model
    with pair.dst.view(L) as v:
        assert v.read(0, SIZE) == pair.model
    pair.scribble(pair.src, pair.model, 10)
    pair.replicate()  # append_raw of L+1 verifies against the target chain
    assert pair.dst.read(0, SIZE) == pair.model
    pair.dst.writeback(max_bytes=None)
    assert pair.dst.read(0, SIZE) == pair.model
    assert not (pair.dst.path / "resync").exists()


def test_old_view_byte_exact_across_switch_and_merge(pair: Pair) -> None:
    pair.scribble(pair.src, pair.model, 20)
    pair.replicate()
    old_lsn = pair.dst.head_lsn
    old = bytes(pair.model)
    pair.scribble(pair.src, pair.model, 20)  # the mirror misses this history: resync instead
    view = pair.dst.view(old_lsn)
    r = pair.begin()
    staged = stage_diff(r, bytes(pair.model))
    assert 0 < staged < SIZE
    assert pair.dst.finish_resync()
    L = pair.src.head_lsn
    with pytest.raises(VersionNotFound):
        pair.dst.view(old_lsn)  # below L: no longer retained for new opens
    assert view.read(0, SIZE) == old
    assert pair.dst.read(0, SIZE) == pair.model
    with pair.dst.view(L) as v:
        assert v.read(0, SIZE) == pair.model
    pair.scribble(pair.src, pair.model, 5)
    pair.replicate()
    assert pair.dst.writeback(max_bytes=None) == L  # the overlay waits for the old view
    assert (pair.dst.path / "merge").exists() and not (pair.dst.path / "resync").exists()
    assert view.read(0, SIZE) == old
    assert pair.dst.read(0, SIZE) == pair.model
    view.close()
    assert pair.dst.writeback(max_bytes=None) == pair.dst.head_lsn
    assert not (pair.dst.path / "merge").exists()
    assert pair.dst.read(0, SIZE) == pair.model


def test_views_below_base_make_finish_wait(pair: Pair) -> None:
    pair.scribble(pair.src, pair.model, 10)
    pair.replicate()
    first = pair.dst.head_lsn
    first_image = bytes(pair.model)
    pair.scribble(pair.src, pair.model, 10)
    pair.replicate()
    view = pair.dst.view(first)
    pair.scribble(pair.src, pair.model, 10)
    r = pair.begin()
    stage_diff(r, bytes(pair.model))
    assert not pair.dst.finish_resync()
    assert f"lsn-{first}" in r.waiting_for
    assert view.read(0, SIZE) == first_image
    view.close()
    assert pair.dst.finish_resync()
    assert pair.dst.read(0, SIZE) == pair.model


def test_growth_at_switch(pair: Pair, tmp_path: Path) -> None:
    pair.scribble(pair.src, pair.model, 10)
    pair.replicate()
    view = pair.dst.view(pair.dst.head_lsn)
    old = bytes(pair.model)
    target = bytearray(pair.model) + bytearray(SIZE)
    target[SIZE + 100 : SIZE + 200] = b"x" * 100
    r = pair.dst.begin_resync(pair.src.head_lsn + 7, b"c" * 16, 2 * SIZE, pair.src.uuid)
    stage_diff(r, bytes(target))
    assert pair.dst.finish_resync()
    assert pair.dst.size == 2 * SIZE
    assert pair.dst.read(0, 2 * SIZE) == target
    assert view.size == SIZE and view.read(0, SIZE) == old
    view.close()
    pair.dst.close()
    dst = Volume.open(tmp_path / "dst", sync_interval=None)
    assert dst.size == 2 * SIZE and dst.read(0, 2 * SIZE) == target and dst.head_lsn == pair.src.head_lsn + 7
    pair.dst = dst


def test_abort_leaves_volume_as_before(pair: Pair) -> None:
    pair.scribble(pair.src, pair.model, 10)
    pair.replicate()
    before = (pair.dst.head_lsn, pair.dst.applied_lsn, pair.dst.read(0, SIZE))
    r = pair.dst.begin_resync(pair.dst.head_lsn + 5, b"z" * 16, SIZE, pair.src.uuid)
    r.write(0, b"q" * 8192)
    r.sync()
    with pytest.raises(VolumeBusy):
        pair.dst.append_raw(pair.src.log.read_raw(1))
    pair.dst.abort_resync()
    assert pair.dst.resync is None
    assert (pair.dst.head_lsn, pair.dst.applied_lsn, pair.dst.read(0, SIZE)) == before
    assert not (pair.dst.path / "resync").exists()
    pair.scribble(pair.src, pair.model, 3)
    pair.replicate()  # the log goes on as before
    assert pair.dst.read(0, SIZE) == pair.model


def test_refusals(pair: Pair, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="another volume"):
        pair.dst.begin_resync(1, b"c" * 16, SIZE, "not-the-uuid")
    with pytest.raises(InvalidRequest, match="never shrink"):
        pair.dst.begin_resync(1, b"c" * 16, SIZE // 2, pair.src.uuid)
    r = pair.begin()
    with pytest.raises(VolumeBusy):
        pair.begin()
    with pytest.raises(InvalidRequest, match="never shrink"):
        r.retarget(2, b"c" * 16, SIZE // 2)
    with pytest.raises(VolumeBusy):
        pair.dst.write(0, b"x")
    with pytest.raises(VolumeBusy):
        pair.dst.mark("m")
    head = pair.dst.head_lsn
    pair.dst.flush()  # the log does not grow while a resync runs
    assert pair.dst.head_lsn == head


def test_flush_appends_no_record_during_resync(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v", "v", SIZE, sync_interval=None)
    try:
        vol.write(0, b"x" * 10)  # no FLUSH record yet
        head = vol.head_lsn
        r = vol.begin_resync(head + 1, b"c" * 16, SIZE, vol.uuid)
        assert r.base_lsn == head
        vol.flush()
        assert vol.head_lsn == head
    finally:
        vol.close()


def test_resume_after_restart_and_retarget(pair: Pair, tmp_path: Path) -> None:
    pair.scribble(pair.src, pair.model, 20)
    r = pair.begin()
    target = bytes(pair.model)
    half = SIZE // 2
    r.write(0, target[:half])
    r.sync()
    r.write(half, target[half:])  # not synced: not trusted after the restart
    pair.dst.close()
    pair.dst = Volume.open(tmp_path / "dst", sync_interval=None)
    r2 = pair.dst.resync
    assert r2 is not None and r2.staged_bytes == half and r2.target_lsn == pair.src.head_lsn
    assert r2.read(0, half) == target[:half]
    assert r2.read(half, half) == bytes(half)  # the image at F
    pair.scribble(pair.src, pair.model, 5)  # the source moved on: aim at its newer version
    r2.retarget(pair.src.head_lsn, pair.src.log.last_chain, SIZE)
    staged = stage_diff(r2, bytes(pair.model))
    assert staged <= half + 6 * 70 * KiB  # what was staged before and did not change is not resent
    assert pair.dst.finish_resync()
    assert pair.dst.read(0, SIZE) == pair.model
    pair.scribble(pair.src, pair.model, 3)
    pair.replicate()
    assert pair.dst.read(0, SIZE) == pair.model


def test_direct_mode(pair: Pair, tmp_path: Path) -> None:
    pair.scribble(pair.src, pair.model, 20)
    r = pair.begin(direct=True)
    with pytest.raises(VolumeBusy, match="being copied"):
        pair.dst.view(0)
    for off in range(0, SIZE, 64 * KiB):  # a first copy writes each byte once, into the base
        r.write(off, bytes(pair.model[off : off + 64 * KiB]))
    r.sync()
    assert not (pair.dst.path / "resync" / "staged.img").exists()
    assert r.read(0, SIZE) == pair.model
    assert pair.dst.finish_resync()
    assert not (pair.dst.path / "resync").exists()
    assert pair.dst.read(0, SIZE) == pair.model
    pair.scribble(pair.src, pair.model, 3)
    pair.replicate()
    assert pair.dst.read(0, SIZE) == pair.model
    pair.dst.close()
    pair.dst = Volume.open(tmp_path / "dst", sync_interval=None)
    assert pair.dst.read(0, SIZE) == pair.model


def test_direct_mode_needs_everything_applied_and_no_views(pair: Pair) -> None:
    with pair.dst.view(0):
        with pytest.raises(VolumeBusy, match="open version"):
            pair.begin(direct=True)
    pair.scribble(pair.src, pair.model, 3)
    pair.replicate()
    with pytest.raises(StateError, match="direct resync needs none"):
        pair.begin(direct=True)


def test_split_brain_loser_ahead_of_target(pair: Pair) -> None:
    """The target LSN lies below the mirror's own head (a divergent tail): the log restarts
    below it, and old views of the tail stay readable."""
    pair.scribble(pair.src, pair.model, 10)
    pair.replicate()
    fork = pair.dst.head_lsn
    mine = bytearray(pair.model)
    pair.dst.replay_limit = None  # the loser was a primary
    pair.scribble(pair.dst, mine, 30)  # a long divergent tail
    pair.scribble(pair.src, pair.model, 2)
    assert pair.src.head_lsn < pair.dst.head_lsn
    tail_view = pair.dst.view(pair.dst.head_lsn)
    mine_tail = pair.dst.extents_between(fork, pair.dst.head_lsn)
    their_tail = pair.src.extents_between(fork, pair.src.head_lsn)
    assert mine_tail is not None and their_tail is not None
    touched = mine_tail + their_tail
    r = pair.begin()
    for off, n in touched:  # the extents either tail touched
        r.write(off, bytes(pair.model[off : off + n]))
    r.sync()
    assert r.read(0, SIZE) == pair.model
    assert pair.dst.finish_resync()
    assert pair.dst.read(0, SIZE) == pair.model
    assert tail_view.read(0, SIZE) == mine
    tail = tail_view.lsn
    while pair.src.head_lsn < tail:  # the survivor's history passes the loser's old head
        pair.scribble(pair.src, pair.model, 1)
    pair.replicate(tail)
    with pair.src.view(tail) as v:
        theirs = v.read(0, SIZE)
    with pair.dst.view(tail) as v:  # same LSN as the old view, another generation: its own index
        assert v.read(0, SIZE) == theirs
    assert tail_view.read(0, SIZE) == mine
    tail_view.close()
    pair.dst.replay_limit = pair.dst.head_lsn
    pair.scribble(pair.src, pair.model, 3)
    pair.replicate()
    pair.dst.writeback(max_bytes=None)
    assert pair.dst.read(0, SIZE) == pair.model


def test_extents_between(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v", "v", SIZE, segment_bytes=SEG, sync_interval=None)
    try:
        assert vol.extents_between(0, 0) == []
        vol.write(0, b"a" * 100)
        vol.write(50, b"b" * 100)
        vol.flush()
        a = vol.head_lsn
        vol.write(4096, b"c" * 4096)
        vol.write(8192, b"d" * 10)
        vol.flush()
        assert vol.extents_between(0, vol.head_lsn) == [(0, 150), (4096, 4106)]
        assert vol.extents_between(a, vol.head_lsn) == [(4096, 4106)]
        assert vol.extents_between(0, vol.head_lsn + 1) is None
        for _ in range(20):  # rotate and trim: older records are gone
            vol.write(0, random.randbytes(60 * KiB))
            vol.flush()
        vol.writeback(max_bytes=None)
        assert vol.log.first_lsn > 1
        assert vol.extents_between(0, vol.head_lsn) is None
        assert vol.extents_between(vol.log.first_lsn - 1, vol.head_lsn) == [(0, 60 * KiB)]
    finally:
        vol.close()


def test_extents_set() -> None:
    e = Extents()
    e.add(10, 10)
    e.add(30, 10)
    e.add(20, 10)  # touches both: one range
    assert list(e) == [(10, 30)] and e.total == 30
    e.add(0, 5)
    e.add(100, 1)
    e.add(3, 200)
    assert list(e) == [(0, 203)] and e.total == 203
    e2 = Extents()
    e2.add(10, 10)
    e2.add(40, 10)
    assert e2.pieces(0, 60) == [(0, 10, False), (10, 10, True), (20, 20, False), (40, 10, True), (50, 10, False)]
    assert e2.pieces(12, 3) == [(12, 3, True)]
    assert e2.pieces(25, 5) == [(25, 5, False)]
    assert list(Extents.from_bytes(e2.to_bytes())) == list(e2)


# ---------------------------------------------------------------- crash points

SWITCH_STEPS = ["written-back", "switch-intent", "log-restarted", "grown", "applied", "merge-intent", "merged"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", SWITCH_STEPS)
@pytest.mark.parametrize("direct", [False, True])
def test_crash_at_each_step_of_finish(tmp_path: Path, step: str, direct: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if direct and step in ("merge-intent", "merged"):
        step = "removed"
    pair = Pair(tmp_path, random.Random(7))
    pair.scribble(pair.src, pair.model, 15)
    if not direct:
        pair.replicate()
    old = pair.dst.read(0, SIZE)
    pair.scribble(pair.src, pair.model, 15)
    L = pair.src.head_lsn
    target = bytes(pair.model) + bytes(SIZE)  # the target also grew
    r = pair.dst.begin_resync(L, pair.src.log.last_chain, 2 * SIZE, pair.src.uuid, direct=direct)
    stage_diff(r, target)

    def crash(at: str) -> None:
        if at == step:
            shutil.copytree(tmp_path / "dst", tmp_path / "crashed")  # what the disk holds now
            raise Crash(at)

    monkeypatch.setattr(rs, "checkpoint", crash)
    with pytest.raises(Crash):
        pair.dst.finish_resync()
    monkeypatch.undo()
    if step not in ("written-back", "merged"):  # a switch that failed half way
        assert pair.dst.needs_restart and "restart the daemon" in pair.dst.fault_lines()[0]
        with pytest.raises(VolumeBusy):
            pair.dst.write(0, b"x")
    pair.dst.close()
    pair.dst = Volume.open(tmp_path / "crashed", sync_interval=None)
    if pair.dst.resync is not None:  # before the switch intent: the old volume, resumable
        assert direct or pair.dst.read(0, SIZE) == old  # direct: the base is the staged image
        assert pair.dst.size == SIZE
        assert pair.dst.resync.read(0, 2 * SIZE) == target
        assert pair.dst.finish_resync()
    assert pair.dst.size == 2 * SIZE and pair.dst.read(0, 2 * SIZE) == target
    assert pair.dst.head_lsn == L and not (tmp_path / "crashed" / "resync").exists()
    assert not (tmp_path / "crashed" / "merge").exists()
    pair.scribble(pair.src, pair.model, 3)
    pair.replicate()
    assert pair.dst.read(0, SIZE) == pair.model
    pair.src.close()
    pair.dst.close()


def test_crash_inside_log_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the restart marker, with some old segments deleted: recovery finishes it."""
    from marsfs.log import Log, recovery
    from marsfs.log.segment import Segment

    log = Log.create(tmp_path / "log", b"g" * 16, segment_bytes=4096)
    from marsfs.log import RecordType, encode_payload
    for _ in range(10):
        log.append(RecordType.WRITE, 0, encode_payload(random.randbytes(1000)))
    log.sync()
    log.close()
    calls = []
    real = Segment.create

    def boom(*a: object, **k: object) -> object:
        calls.append(a)
        raise OSError(5, "crash")

    monkeypatch.setattr(Segment, "create", boom)
    with pytest.raises(OSError):
        recovery.finish_restart(tmp_path / "log", 41, b"n" * 16)
    monkeypatch.setattr(Segment, "create", real)
    assert (tmp_path / "log" / recovery.RESTART_FILE).exists()
    log = Log.open(tmp_path / "log")
    assert (log.first_lsn, log.last_lsn, log.last_chain) == (42, 41, b"n" * 16)
    log.close()


def test_next_resync_while_previous_is_not_merged(pair: Pair, tmp_path: Path) -> None:
    """A view from before the first switch holds its merge; a second resync stages meanwhile,
    waits to switch, and survives a crash (open merges the first, then resumes the second)."""
    pair.scribble(pair.src, pair.model, 10)
    pair.replicate()
    view = pair.dst.view(pair.dst.head_lsn)
    old = bytes(pair.model)
    pair.scribble(pair.src, pair.model, 10)
    stage_diff(pair.begin(), bytes(pair.model))
    assert pair.dst.finish_resync()
    first = bytes(pair.model)
    pair.scribble(pair.src, pair.model, 10)
    r = pair.begin()
    assert r.read(0, SIZE) == first
    stage_diff(r, bytes(pair.model))
    assert not pair.dst.finish_resync()
    assert "older than the previous resync" in r.waiting_for
    assert f": lsn-{view.lsn} (open since " in r.waiting_for, r.waiting_for  # named, and since when
    assert view.read(0, SIZE) == old and pair.dst.read(0, SIZE) == first
    shutil.copytree(tmp_path / "dst", tmp_path / "crashed")
    view.close()
    pair.dst.close()
    pair.dst = Volume.open(tmp_path / "crashed", sync_interval=None)
    assert pair.dst.read(0, SIZE) == first
    resumed = pair.dst.resync
    assert resumed is not None and resumed.read(0, SIZE) == pair.model
    assert pair.dst.finish_resync()
    assert pair.dst.read(0, SIZE) == pair.model


@pytest.mark.allow_log("merge")
def test_failed_merge_is_a_writeback_fault_that_retries(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    pair.scribble(pair.src, pair.model, 10)
    stage_diff(pair.begin(), bytes(pair.model))
    real = rs.merge_into

    def failing(*a: object) -> None:
        raise DiskFailed("cannot merge the resynced blocks into the base image: Input/output error")

    monkeypatch.setattr(rs, "merge_into", failing)
    assert pair.dst.finish_resync()  # switched all the same
    assert isinstance(pair.dst.fault("writeback"), DiskFailed)
    assert pair.dst.read(0, SIZE) == pair.model  # through the overlay
    pair.scribble(pair.src, pair.model, 3)
    pair.replicate()
    L = pair.dst.applied_lsn
    with pytest.raises(DiskFailed):
        pair.dst.writeback(max_bytes=None)
    assert pair.dst.applied_lsn == L  # nothing written back past the unmerged overlay
    monkeypatch.setattr(rs, "merge_into", real)
    assert pair.dst.writeback(max_bytes=None) == pair.dst.head_lsn
    assert pair.dst.fault("writeback") is None
    assert pair.dst.read(0, SIZE) == pair.model


def test_readers_during_the_switch_see_old_or_new_never_a_mix(pair: Pair) -> None:
    import threading

    pair.scribble(pair.src, pair.model, 20)
    pair.replicate()
    old = bytes(pair.model)
    F = pair.dst.head_lsn
    pair.scribble(pair.src, pair.model, 20)
    new = bytes(pair.model)
    L = pair.src.head_lsn
    r = pair.begin()
    stage_diff(r, new)
    stop = threading.Event()
    seen: dict[str, int] = {"old": 0, "new": 0, "gone": 0}
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                lsn = pair.dst.replayed_lsn
                try:
                    v = pair.dst.view(lsn)
                except VersionNotFound:
                    seen["gone"] += 1  # opened just after the switch: the caller retries
                    continue
                with v:
                    data = v.read(0, SIZE)
                    assert data == (old if lsn == F else new), lsn
                    seen["old" if lsn == F else "new"] += 1
                live = pair.dst.read(0, SIZE)
                assert live in (old, new)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    while not seen["old"] and not errors:
        stop.wait(0.001)
    while not pair.dst.finish_resync():
        assert "older than" in r.waiting_for or "being opened" in r.waiting_for
    while not seen["new"] and not errors:
        stop.wait(0.001)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert pair.dst.replayed_lsn == L
    pair.dst.writeback(max_bytes=None)
    assert pair.dst.read(0, SIZE) == new


@pytest.mark.allow_log("merge")
def test_direct_resync_waits_for_the_previous_merge(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    pair.scribble(pair.src, pair.model, 5)
    stage_diff(pair.begin(), bytes(pair.model))
    real = rs.merge_into

    def failing(*a: object) -> None:
        raise DiskFailed("cannot merge the resynced blocks into the base image: Input/output error")

    monkeypatch.setattr(rs, "merge_into", failing)
    assert pair.dst.finish_resync()
    pair.scribble(pair.src, pair.model, 5)
    with pytest.raises(DiskFailed):  # it tries the merge first, which fails again
        pair.begin(direct=True)
    assert pair.dst.resync is None
    monkeypatch.setattr(rs, "merge_into", real)
    r = pair.begin(direct=True)
    stage_diff(r, bytes(pair.model))
    assert pair.dst.finish_resync()
    assert pair.dst.read(0, SIZE) == pair.model


@pytest.mark.parametrize("direct", [False, True])
def test_retarget_to_a_grown_source(pair: Pair, direct: bool) -> None:
    pair.scribble(pair.src, pair.model, 5)
    r = pair.begin(direct=direct)
    stage_diff(r, bytes(pair.model))
    target = bytes(pair.model) + b"g" * SIZE  # the source grew meanwhile
    r.retarget(pair.src.head_lsn + 3, b"r" * 16, 2 * SIZE)
    assert r.read(SIZE, SIZE) == bytes(SIZE)
    assert stage_diff(r, target) == SIZE
    assert pair.dst.finish_resync()
    assert pair.dst.size == 2 * SIZE and pair.dst.read(0, 2 * SIZE) == target
    assert pair.dst.head_lsn == pair.src.head_lsn + 3 and pair.dst.log.last_chain == b"r" * 16


def test_resumed_direct_resync_syncs_what_an_earlier_process_staged(pair: Pair, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed process may leave staged bytes unsynced in the page cache; direct mode counts
    them (it reads the base whole), so the first sync after a restart must cover them."""
    import os

    pair.scribble(pair.src, pair.model, 5)
    r = pair.begin(direct=True)
    r.write(0, bytes(pair.model[: 64 * KiB]))  # never synced
    pair.dst.close()
    pair.dst = Volume.open(tmp_path / "dst", sync_interval=None)
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    resumed = pair.dst.resync
    assert resumed is not None
    resumed.sync()
    assert pair.dst._base_fd in synced


def test_a_clone_never_holds_up_a_switch_it_takes_its_own_copy(pair: Pair, tmp_path: Path) -> None:
    pair.scribble(pair.src, pair.model, 10)
    pair.replicate()
    lsn = pair.dst.head_lsn
    clone_model = bytearray(pair.model)
    clone = Volume.create_clone(tmp_path / "clone", "c", pair.dst, lsn, sync_interval=None)
    try:
        pair.scribble(clone, clone_model, 5)
        pair.scribble(pair.src, pair.model, 10)
        pair.replicate()
        reader = pair.dst.view(lsn)  # a reader of the same version: only it holds the switch now
        pair.scribble(pair.src, pair.model, 10)
        r = pair.begin()
        stage_diff(r, bytes(pair.model))
        assert not pair.dst.finish_resync()
        assert clone.clone_of is not None and clone.clone_of.own  # the clone let go at once
        assert f"1 open version(s) older than lsn-{r.base_lsn}: lsn-{lsn} (open since " in r.waiting_for, r.waiting_for
        assert "UTC)" in r.waiting_for and "held by" not in r.waiting_for
        assert clone.read(0, SIZE) == clone_model
        reader.close()
        assert pair.dst.finish_resync()
        assert pair.dst.read(0, SIZE) == pair.model
        pair.dst.writeback()  # the merge and writeback run: the clone keeps its bytes
        assert clone.read(0, SIZE) == clone_model
        pair.scribble(clone, clone_model, 3)
        assert clone.read(0, SIZE) == clone_model
    finally:
        clone.close()
    reopened = Volume.open(tmp_path / "clone", sync_interval=None)  # needs no source any more
    try:
        assert reopened.clone_of is not None and reopened.clone_of.own
        assert reopened.read(0, SIZE) == clone_model
    finally:
        reopened.close()


def test_a_clone_whose_own_copy_fails_is_named_by_the_waiting_switch(pair: Pair, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pair.scribble(pair.src, pair.model, 10)
    pair.replicate()
    lsn = pair.dst.head_lsn
    at_l = bytes(pair.model)
    clone = Volume.create_clone(tmp_path / "clone", "c", pair.dst, lsn, sync_interval=None)
    try:
        pair.scribble(pair.src, pair.model, 10)
        pair.replicate()
        r = pair.begin()
        stage_diff(r, bytes(pair.model))

        def full(*a: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with monkeypatch.context() as m:
            m.setattr("marsfs.volume.volume.write_all", full)
            assert not pair.dst.finish_resync()
        assert f"lsn-{lsn} (open since " in r.waiting_for, r.waiting_for
        assert "held by clone c, whose own copy failed (No space left on device): free space, or marsfs " \
               "delete c" in r.waiting_for, r.waiting_for
        assert clone.clone_of is not None and not clone.clone_of.own
        assert clone.read(0, SIZE) == at_l  # it reads through as before
    finally:
        clone.close()  # deleting the clone lets the switch go
    assert pair.dst.finish_resync()
    assert pair.dst.read(0, SIZE) == pair.model
