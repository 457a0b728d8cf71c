"""Resync against a model: a source volume and a mirror that follows it by log shipping and by
resyncs (random staged subsets that cover the difference), with crashes at random points
(also inside the switch) and views held across switches. After every step the mirror's
image, every open view and the staged image equal the model.

The model: the source's image after each LSN the mirror may show (``snap``: LSN -> image,
taken after every source operation) and the mirror's own (``mine``: what it replicated, or
wrote itself after it diverged like a split-brain loser), padded with zeros to the mirror's
size (a resync target may be larger than the source: the volume grows at the switch).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from marsfs.errors import VolumeBusy
from marsfs.log import genesis_chain
from marsfs.volume import Volume, VolumeView
from marsfs.volume import resync as rs
from marsfs.volume.blocksums import BLOCK, block_ranges, block_sums, differing_blocks

KiB = 1024
SIZE = 128 * KiB
SEG = 32 * KiB
STEPS = ["written-back", "switch-intent", "log-restarted", "grown", "applied", "merge-intent", "merged"]


class Crash(Exception):
    pass


def _pad(image: bytes, size: int) -> bytes:
    return image + bytes(size - len(image))


class ResyncMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="marsfs-test-resync-"))
        self.src = Volume.create(self.dir / "src", "vol", SIZE, segment_bytes=SEG, sync_interval=None)
        self.image = bytearray(SIZE)
        self.snap: dict[int, bytes] = {0: bytes(SIZE)}
        self.dst_path = self.dir / "dst"
        self.dst = Volume.create_replica(self.dst_path, "vol", SIZE, self.src.uuid, 0, genesis_chain(self.src.uuid),
                                         segment_bytes=SEG)
        self.mine: dict[int, bytes] = {0: bytes(SIZE)}
        self.diverged = False
        self.views: list[tuple[VolumeView, bytes]] = []
        self.target: bytes | None = None  # the running resync's target image
        self.crashes = 0

    def teardown(self) -> None:
        try:
            for v, _ in self.views:
                v.close()
            self.src.close()
            self.dst.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def expected(self, lsn: int) -> bytes:
        return _pad(self.mine[lsn], self.dst.size)

    # ------------------------------------------------------------------ the source

    @rule(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 4), flush=st.booleans())
    def write_source(self, seed: int, count: int, flush: bool) -> None:
        rng = random.Random(seed)
        for _ in range(count):
            n = rng.choice([1, 700, BLOCK, 3 * BLOCK + 5, 70 * KiB])
            off = rng.randrange(0, SIZE - n)
            data = rng.randbytes(n)
            self.src.write(off, data)
            self.image[off : off + n] = data
            self.snap[self.src.head_lsn] = bytes(self.image)
        if flush:
            self.src.flush()
            self.snap[self.src.head_lsn] = bytes(self.image)

    # ------------------------------------------------------------------ the mirror

    @precondition(lambda self: self.target is None and not self.diverged)
    @rule(pick=st.integers(0, 10**6))
    def replicate(self, pick: int) -> None:
        """Ship records up to some LSN the model knows (only while no resync runs)."""
        later = sorted(lsn for lsn in self.snap if lsn > self.dst.head_lsn)
        if not later:
            return
        upto = later[pick % len(later)]
        for lsn in range(self.dst.head_lsn + 1, upto + 1):
            self.dst.append_raw(self.src.log.read_raw(lsn))
            if lsn in self.snap:
                self.mine[lsn] = self.snap[lsn]
        self.dst.log.sync()
        self.dst.replay_limit = upto

    @precondition(lambda self: self.target is None)
    @rule(seed=st.integers(0, 2**32 - 1))
    def diverge(self, seed: int) -> None:
        """The mirror writes on its own (a former primary that lost a split brain)."""
        rng = random.Random(seed)
        self.diverged = True
        self.dst.replay_limit = None
        image = bytearray(self.expected(self.dst.head_lsn))
        for _ in range(rng.randint(1, 6)):
            n = rng.choice([BLOCK, 70 * KiB])
            off = rng.randrange(0, SIZE - n)
            data = rng.randbytes(n)
            self.dst.write(off, data)
            image[off : off + n] = data
        self.dst.flush()
        self.mine[self.dst.head_lsn] = bytes(image)

    @rule()
    def writeback(self) -> None:
        self.dst.writeback(max_bytes=SEG)

    @rule(pick=st.integers(0, 10**6))
    def open_view(self, pick: int) -> None:
        if len(self.views) >= 4 or (self.dst.resync is not None and self.dst.resync.direct):
            return
        lsns = [lsn for lsn in self.mine if self.dst.oldest_version_lsn <= lsn <= self.dst.replayed_lsn]
        if not lsns:
            return
        lsn = sorted(lsns)[pick % len(lsns)]
        self.views.append((self.dst.view(lsn), self.expected(lsn)))

    @precondition(lambda self: self.views)
    @rule(pick=st.integers(0, 10**6))
    def close_view(self, pick: int) -> None:
        v, _ = self.views.pop(pick % len(self.views))
        v.close()

    @precondition(lambda self: self.target is None)
    @rule(grow=st.sampled_from([0, 0, 0, 8 * KiB]), direct=st.booleans())
    def begin(self, grow: int, direct: bool) -> None:
        lsn = max(self.snap)
        if lsn != self.src.head_lsn:
            return
        direct = direct and self.dst.applied_lsn == self.dst.head_lsn and not self.views
        size = self.dst.size + grow
        self.dst.begin_resync(lsn, self.src.log.last_chain, size, self.src.uuid, direct=direct)
        self.target = _pad(self.snap[lsn], size)
        event("began")

    @precondition(lambda self: self.target is not None)
    @rule(seed=st.integers(0, 2**32 - 1), part=st.sampled_from([0.3, 1.0]), sync=st.booleans())
    def stage(self, seed: int, part: float, sync: bool) -> None:
        """Stage (part of) the blocks that differ, plus some that do not."""
        r = self.dst.resync
        assert r is not None and self.target is not None
        target = self.target
        rng = random.Random(seed)
        diff = list(differing_blocks(block_sums(r.read, 0, r.size), block_sums(lambda o, n: target[o : o + n], 0, r.size)))
        blocks = [b for b in diff if rng.random() < part]
        blocks += rng.sample(range(r.size // BLOCK), 3)
        for off, n in block_ranges(sorted(set(blocks)), 0, r.size):
            r.write(off, target[off : off + n])
        if sync:
            r.sync()

    @precondition(lambda self: self.target is not None)
    @rule(step=st.one_of(st.none(), st.none(), st.none(), st.sampled_from(STEPS)), close_old=st.booleans())
    def finish(self, step: str | None, close_old: bool) -> None:
        r = self.dst.resync
        assert r is not None and self.target is not None
        target = self.target
        for off, n in block_ranges(list(differing_blocks(block_sums(r.read, 0, r.size),
                                                         block_sums(lambda o, k: target[o : o + k], 0, r.size))),
                                   0, r.size):
            r.write(off, target[off : off + n])
        def blocks(v: VolumeView) -> bool:
            return v.lsn < r.base_lsn or v.generation < self.dst.generation

        if close_old:
            for v, _ in [x for x in self.views if blocks(x[0])]:
                v.close()
            self.views = [x for x in self.views if not blocks(x[0])]
        if step is not None:
            self._crash_in_finish(step)
            return
        if not self.dst.finish_resync():
            event("finish waits for old views")
            assert r.waiting_for and any(blocks(v) for v, _ in self.views)
            return
        event("switched" + (" with old views open" if self.views else "")
              + (" from a divergent tail" if self.diverged else ""))
        self._switched()

    def _switched(self) -> None:
        """The mirror is the source's version L now, and follows it again."""
        L = self.dst.head_lsn
        self.mine = {L: self.snap[L]}
        self.diverged = False
        self.dst.replay_limit = L
        self.target = None

    def _crash_in_finish(self, step: str) -> None:
        crashed = self.dir / f"crash-{self.crashes}"
        self.crashes += 1

        def crash(at: str) -> None:
            if at == step:
                shutil.copytree(self.dst_path, crashed)
                raise Crash(at)

        real = rs.checkpoint
        rs.checkpoint = crash  # type: ignore[assignment]
        try:
            done = self.dst.finish_resync()
        except Crash:
            done = None
        finally:
            rs.checkpoint = real
        event(f"crash in finish: {'waits' if done is False else 'no crash' if done else step}")
        if done is False:
            return  # waiting for old views: nothing was switched
        if done:  # the step did not come (merge waits for old views, or direct mode)
            self._switched()
            return
        self._reopen(crashed)

    @rule()
    def crash(self) -> None:
        """Power loss: what is on disk now (staged data synced or not) is what the next open finds."""
        crashed = self.dir / f"crash-{self.crashes}"
        self.crashes += 1
        shutil.copytree(self.dst_path, crashed)
        self._reopen(crashed)

    def _reopen(self, path: Path) -> None:
        for v, _ in self.views:
            v.close()
        self.views = []
        self.dst.close()
        self.dst = Volume.open(path, sync_interval=None)
        self.dst_path = path
        self.dst.replay_limit = self.dst.head_lsn
        if self.dst.resync is None and self.target is not None:
            self._switched()
        assert self.dst.replayed_lsn in self.mine

    # ------------------------------------------------------------------ checks

    @invariant()
    def images_equal_the_model(self) -> None:
        if self.dst.resync is not None and self.dst.resync.direct:
            assert self.dst.resync.read(0, self.dst.resync.size) is not None
        else:
            assert self.dst.read(0, self.dst.size) == self.expected(self.dst.replayed_lsn)
        for v, want in self.views:
            assert v.read(0, v.size) == want
        r = self.dst.resync
        if r is not None and not r.direct:
            old = self.expected(r.base_lsn)
            staged = bytearray(_pad(old, r.size))
            assert self.target is not None
            for off, n in r.extents:
                staged[off : off + n] = self.target[off : off + n]
            assert r.read(0, r.size) == staged

    @invariant()
    def writes_refused_while_resyncing(self) -> None:
        if self.dst.resync is not None and self.src.head_lsn:
            try:
                self.dst.append_raw(self.src.log.read_raw(self.src.head_lsn))
            except VolumeBusy:
                pass
            else:
                raise AssertionError("a resyncing volume took a record")


TestResyncModel = ResyncMachine.TestCase
TestResyncModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
