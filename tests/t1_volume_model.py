"""Volume against a model image: every read and every retained version, after every step.

The model keeps the image at the applied LSN (``base``) and every record after it
(``records``: lsn -> (offset, data), ``None`` for FLUSH and MARK records). The image at any
LSN in ``[applied, head]`` is rebuilt from those on demand; ``current`` is the image at head.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from marsfs.log import MAX_PAYLOAD
from marsfs.log.segment import segment_name
from marsfs.volume import Volume
from marsfs.volume.views import VolumeView
from marsfs.volume.volume import RECORD_CHUNK

MiB = 1024 * 1024
# Whole-volume writes (up to 1 MiB) are split into RECORD_CHUNK records.
SIZE = MAX_PAYLOAD + 64 * 1024
SEGMENT_BYTES = 256 * 1024
MAX_VIEWS_CHECKED = 15


def _data(kind: str, seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(n)
    if kind == "zeros":
        return bytes(n)
    pattern = rng.randbytes(rng.randint(1, 64))  # compressible: lz4 stores it much smaller
    return (pattern * (n // len(pattern) + 1))[:n]


@st.composite
def _writes(draw: st.DrawFn) -> tuple[int, bytes]:
    which = draw(st.integers(0, 15), label="length class")
    if which == 0:
        length = SIZE  # whole volume, more than one record
    elif which <= 5:
        length = draw(st.integers(1, 600), label="length")
    elif which <= 10:
        length = draw(st.integers(1, 64 * 1024), label="length")
    else:
        length = draw(st.integers(1, MiB), label="length")
    offset = draw(st.integers(0, SIZE - length), label="offset")
    kind = draw(st.sampled_from(["random", "random", "compressible", "zeros"]), label="data kind")
    seed = draw(st.integers(0, 2**32 - 1), label="data seed")
    return offset, _data(kind, seed, length)


class VolumeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="marsfs-test-model-"))
        self.path = self.dir / "vol"
        self.volume = Volume.create(self.path, "m", SIZE, segment_bytes=SEGMENT_BYTES, sync_interval=None)
        self.base = bytearray(SIZE)  # the image at self.applied
        self.current = bytearray(SIZE)  # the image at self.head
        self.records: dict[int, tuple[int, bytes] | None] = {}  # lsn -> write, for (applied, head]
        self.applied = 0
        self.head = 0
        self.dirty = False  # written since the last FLUSH record
        self.marks: dict[int, str] = {}  # retained marks, lsn -> name
        self.mark_count = 0
        self.views: list[VolumeView] = []  # open (pinned) views, kept across steps
        self.rng = random.Random(0)

    def teardown(self) -> None:
        try:
            for v in self.views:
                v.close()
            self.volume.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ model

    def model_at(self, lsns: list[int]) -> Iterator[tuple[int, bytearray]]:
        """The image at each of ``lsns`` (ascending), rebuilt from the base: one buffer, brought
        forward from one LSN to the next (compare it before asking for the next; copying a
        1 MiB image per LSN was most of this test's time)."""
        img = bytearray(self.base)
        pending = sorted(r for r in self.records if r <= lsns[-1])
        i = 0
        for lsn in lsns:
            while i < len(pending) and pending[i] <= lsn:
                rec = self.records[pending[i]]
                if rec is not None:
                    off, data = rec
                    img[off : off + len(data)] = data
                i += 1
            yield lsn, img

    # ------------------------------------------------------------------ rules

    @rule(w=_writes())
    def write(self, w: tuple[int, bytes]) -> None:
        offset, data = w
        lsn = self.volume.write(offset, data)
        for at in range(0, len(data), RECORD_CHUNK):
            self.head += 1
            self.records[self.head] = (offset + at, data[at : at + RECORD_CHUNK])
        assert lsn == self.head == self.volume.head_lsn
        self.current[offset : offset + len(data)] = data
        self.dirty = True

    def _expect_flush(self) -> None:
        if self.dirty:
            self.head += 1
            self.records[self.head] = None
            self.dirty = False

    @rule()
    def flush(self) -> None:
        durable = self.volume.flush()
        self._expect_flush()
        assert durable == self.head == self.volume.head_lsn == self.volume.durable_lsn

    @rule()
    def mark(self) -> None:
        self.mark_count += 1
        name = f"m{self.mark_count}"
        lsn = self.volume.mark(name)
        self._expect_flush()
        self.head += 1
        self.records[self.head] = None
        self.marks[lsn] = name
        assert lsn == self.head == self.volume.head_lsn == self.volume.durable_lsn
        assert self.volume.log.marks.get(lsn) == name
        assert self.volume.resolve_version(name) == lsn

    @rule()
    def rotate(self) -> None:
        self.volume.log.rotate()
        assert self.volume.head_lsn == self.head
        # The newest segment is now empty, and the one before it was made durable first.
        newest = max(p.name for p in (self.path / "log").glob("*.seg"))
        assert newest == segment_name(self.head + 1)
        assert self.volume.durable_lsn == self.head

    @rule(data=st.data())
    def writeback(self, data: st.DataObject) -> None:
        upto = data.draw(st.one_of(st.none(), st.integers(self.applied, self.head)), label="upto")
        durable = self.volume.durable_lsn
        expect = durable if upto is None else min(upto, durable)
        if self.views:
            expect = min(expect, min(v.lsn for v in self.views))
        expect = max(expect, self.applied)
        batch = data.draw(st.sampled_from([None, 64 * 1024, 1024 * 1024]), label="max_bytes")
        got = self.volume.writeback(upto, max_bytes=batch)
        while got < expect:  # batched writeback: each call must make progress
            again = self.volume.writeback(upto, max_bytes=batch)
            assert again > got, (again, got, expect)
            got = again
        assert got == expect == self.volume.applied_lsn, (got, expect, upto, durable)
        for lsn in sorted(r for r in self.records if r <= got):
            rec = self.records.pop(lsn)
            if rec is not None:
                off, d = rec
                self.base[off : off + len(d)] = d
        self.applied = got
        for lsn in [m for m in self.marks if m <= got]:
            del self.marks[lsn]  # may still be in the log until its segment is trimmed

    @precondition(lambda self: len(self.views) < 2)
    @rule(data=st.data())
    def open_view(self, data: st.DataObject) -> None:
        lsn = data.draw(st.integers(self.applied, self.head), label="pinned view lsn")
        self.views.append(self.volume.view(lsn))

    @precondition(lambda self: self.views)
    @rule(data=st.data())
    def close_view(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.views) - 1), label="view to close")
        self.views.pop(i).close()

    @rule()
    def restart(self) -> None:
        for v in self.views:
            v.close()
        self.views.clear()
        self.volume.close()
        self.volume = Volume.open(self.path, sync_interval=None)
        assert self.volume.head_lsn == self.volume.durable_lsn == self.head
        assert self.volume.applied_lsn == self.applied
        assert self.volume.log.recovery.torn_bytes == 0
        for lsn, name in self.marks.items():
            assert self.volume.log.marks.get(lsn) == name
        # Writes without a FLUSH record after them still get one at the next flush (self.dirty
        # is kept). Only when writeback trimmed every record can the volume not tell whether
        # the last one was a FLUSH: then it flushes conservatively.
        if self.volume.log.first_lsn > self.head > 0:
            self.dirty = True

    # ------------------------------------------------------------------ checks

    @invariant()
    def positions(self) -> None:
        v = self.volume
        assert v.applied_lsn == self.applied
        assert v.head_lsn == self.head
        assert v.applied_lsn <= v.durable_lsn <= v.head_lsn
        assert v.log.first_lsn <= v.applied_lsn + 1, "the log lost records that are not written back"
        for _, _, lsn in v.index:
            assert v.applied_lsn < lsn <= v.head_lsn
        versions = v.versions()
        assert versions[0].lsn == self.applied and versions[-1].lsn == self.head

    @invariant()
    def current_image(self) -> None:
        assert self.volume.read(0, SIZE) == self.current, "read(0, size) differs from the model"
        # A few unaligned partial reads, which cut extents in the middle.
        for _ in range(3):
            off = self.rng.randrange(SIZE)
            n = self.rng.randint(0, min(SIZE - off, 70000))
            assert self.volume.read(off, n) == self.current[off : off + n]

    @invariant()
    def retained_versions(self) -> None:
        lo, hi = self.applied, self.head
        lsns = list(range(lo, hi + 1))
        if len(lsns) > MAX_VIEWS_CHECKED:
            lsns = sorted({lo, hi, *self.rng.sample(lsns, MAX_VIEWS_CHECKED - 2)})
        pinned = sorted({v.lsn for v in self.views})
        checked = set(lsns)
        for lsn, image in self.model_at(sorted(checked | set(pinned))):
            if lsn == hi:
                assert image == self.current
            if lsn in checked:
                with self.volume.view(lsn) as view:
                    assert view.read(0, SIZE) == image, f"view at lsn {lsn} differs (applied {lo}, head {hi})"
            for view in self.views:  # pinned before later writes and writebacks: still the same
                if view.lsn == lsn:
                    assert view.read(0, SIZE) == image, f"pinned view at lsn {view.lsn} changed"


TestVolumeModel = VolumeMachine.TestCase
TestVolumeModel.settings = settings(max_examples=50, stateful_step_count=30, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------- durability without flush


def test_autosync_makes_the_log_durable_without_flush(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v", "a", MiB)  # default sync_interval: the autosync thread runs
    try:
        for round_ in range(3):
            lsn = vol.write(round_ * 4096, b"x" * 4096)
            assert vol.head_lsn == lsn
            deadline = time.monotonic() + 2.0
            while vol.durable_lsn < lsn and time.monotonic() < deadline:
                time.sleep(0.005)
            assert vol.durable_lsn >= lsn, "autosync did not make the write durable within 2 s"
            assert vol.head_lsn == lsn, "autosync must not append records (no FLUSH without fsync)"
        assert not vol.errors
    finally:
        vol.close()


def _wakeups(thread: threading.Thread) -> int:
    """How often ``thread`` gave up the CPU waiting so far (Linux's count for the task)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))


def test_an_idle_volume_s_autosync_thread_sleeps_until_a_write(tmp_path: Path) -> None:
    """No polling: a node's idle cost must not grow with its volumes. A thread that checked
    the log every 10 ms would wake ~50 times in the half second below."""
    vol = Volume.create(tmp_path / "v", "i", MiB, sync_interval=0.01)
    try:
        assert vol._syncer is not None
        for _ in range(2):  # idle from the start, and again once a write is durable
            deadline = time.monotonic() + 2.0
            while vol.log.dirty and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.05)  # the thread parks again after its last sync
            before = _wakeups(vol._syncer)
            time.sleep(0.5)
            assert _wakeups(vol._syncer) - before <= 2, "the autosync thread woke while the volume was idle"
            lsn = vol.write(0, b"w" * 4096)  # a write wakes it: durable without a flush
            deadline = time.monotonic() + 2.0
            while vol.durable_lsn < lsn and time.monotonic() < deadline:
                time.sleep(0.005)
            assert vol.durable_lsn >= lsn, "autosync did not wake for the write"
    finally:
        vol.close()
    assert not vol._syncer.is_alive()


def test_flush_with_nothing_new_appends_nothing(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v", "f", MiB, sync_interval=None)
    try:
        assert vol.flush() == 0 and vol.head_lsn == 0
        lsn = vol.write(100, b"abc")
        assert vol.durable_lsn < lsn
        durable = vol.flush()
        assert durable == vol.head_lsn == lsn + 1  # the FLUSH record
        for _ in range(3):
            assert vol.flush() == durable
            assert vol.head_lsn == durable
        mark = vol.mark("after")
        assert mark == durable + 1  # nothing written since the flush: no second FLUSH record
        assert vol.flush() == mark == vol.head_lsn
    finally:
        vol.close()


def test_flush_after_restart_writes_the_missing_flush_record(tmp_path: Path) -> None:
    """Writes that no FLUSH record follows get one at the first flush after a restart."""
    vol = Volume.create(tmp_path / "v", "r", MiB, sync_interval=None)
    lsn = vol.write(0, b"unflushed")
    vol.close()
    vol = Volume.open(tmp_path / "v", sync_interval=None)
    try:
        assert vol.head_lsn == lsn
        assert vol.flush() == lsn + 1 == vol.head_lsn
        assert [p for p, _ in vol.log.flush_points()] == [lsn + 1]
    finally:
        vol.close()
    vol = Volume.open(tmp_path / "v", sync_interval=None)  # ends with a FLUSH record: nothing to add
    try:
        assert vol.flush() == lsn + 1 == vol.head_lsn
    finally:
        vol.close()


def test_concurrent_flushes_cover_each_callers_write(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v", "c", 8 * MiB, segment_bytes=64 * 1024, sync_interval=None)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            start.wait()
            for j in range(40):
                lsn = vol.write(i * MiB + j * 1000, bytes([i + 1]) * (1 + (i * 37 + j * 101) % 3000))
                durable = vol.flush()
                assert durable >= lsn, (i, j, lsn, durable)
                assert vol.durable_lsn >= lsn
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert vol.durable_lsn == vol.head_lsn
        for i in range(8):
            for j in range(40):
                assert vol.read(i * MiB + j * 1000, 1) == bytes([i + 1]), (i, j)
    finally:
        vol.close()


def test_no_view_older_than_a_running_writeback_opens(tmp_path: Path) -> None:
    """Writeback chooses its target, then writes the base outside the lock: from that moment a
    view older than the target would read base bytes newer than itself, so it must be refused."""
    import threading

    from marsfs.errors import VolumeError

    vol = Volume.create(tmp_path / "v", "v", 1 << 20, sync_interval=None)
    vol.write(0, b"a" * 4096)
    old = vol.flush()
    vol.write(0, b"b" * 4096)
    vol.flush()
    entered, release = threading.Event(), threading.Event()
    read_data = vol.log.read_data

    def slow_read_data(lsn: int, delta: int, length: int) -> bytes:
        entered.set()
        release.wait(10)
        return read_data(lsn, delta, length)

    vol.log.read_data = slow_read_data  # type: ignore[method-assign]
    t = threading.Thread(target=vol.writeback)
    t.start()
    try:
        assert entered.wait(10)
        with pytest.raises(VolumeError, match="not retained"):
            vol.view(old)
        assert vol.oldest_version_lsn == vol.head_lsn
    finally:
        release.set()
        t.join()
    vol.log.read_data = read_data  # type: ignore[method-assign]
    assert vol.read(0, 4096) == b"b" * 4096
    vol.close()
