"""Clones of a volume's version (marsfs.volume.clone): reads fall through to the source at L,
the source's writeback is pinned at L, refusals, and a clone's own history."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from marsfs.errors import InvalidRequest, StateError, VersionNotFound
from marsfs.volume import Volume

KiB = 1 << 10
SIZE = 256 * KiB


def _source(tmp_path: Path) -> Volume:
    return Volume.create(tmp_path / "src", "src", SIZE, sync_interval=None)


def _scribble(vol: Volume, model: bytearray, rng: random.Random, count: int) -> None:
    """Random writes (some across record chunks and each other), mirrored into ``model``."""
    for _ in range(count):
        n = rng.choice([1, 512, 4 * KiB, 9000, 70 * KiB])
        off = rng.randrange(0, SIZE - n)
        data = rng.randbytes(n)
        vol.write(off, data)
        model[off : off + n] = data
        if rng.random() < 0.2:
            vol.flush()


@pytest.mark.parametrize("seed", range(6))
def test_model_clone_reads_source_at_l_overlaid_with_its_own_writes(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    src = _source(tmp_path)
    source_model = bytearray(SIZE)
    _scribble(src, source_model, rng, 30)
    src.flush()
    if seed % 2:  # part of the history already in the base: the view reads both
        src.writeback(src.durable_lsn // 2)
    lsn = src.head_lsn
    at_l = bytes(source_model)
    clone = Volume.create_clone(tmp_path / "c", "c", src, lsn, sync_interval=None)
    try:
        clone_model = bytearray(at_l)
        for _ in range(4):
            _scribble(src, source_model, rng, 15)  # the source moves on after L ...
            src.flush()
            assert src.writeback() <= lsn  # ... but its base never passes L
            _scribble(clone, clone_model, rng, 10)
            assert clone.read(0, SIZE) == clone_model
            for _ in range(20):
                n = rng.randrange(1, 20 * KiB)
                off = rng.randrange(0, SIZE - n)
                assert clone.read(off, n) == clone_model[off : off + n]
        assert src.read(0, SIZE) == source_model
        with src.view(lsn) as v:
            assert v.read(0, SIZE) == at_l
        clone.flush()
        assert clone.writeback() == 0, "a clone never writes back"
        assert clone.log.first_lsn == 1  # its own log, from LSN 1
    finally:
        clone.close()
    assert src.writeback() == src.durable_lsn  # the pin went with the clone
    assert src.read(0, SIZE) == source_model
    src.close()


def test_clone_has_its_own_identity_history_and_marks(tmp_path: Path) -> None:
    with _source(tmp_path) as src:
        src.write(0, b"a" * 4096)
        first = src.flush()
        with Volume.create_clone(tmp_path / "c", "c", src, first, sync_interval=None) as clone:
            assert clone.uuid != src.uuid and clone.clone_of is not None
            assert clone.clone_of.describe() == f"src@lsn-{first}"
            assert clone.head_lsn == 0
            clone.write(4096, b"b" * 4096)
            m = clone.mark("mine")
            clone.write(0, b"c" * 4096)
            with clone.view(clone.find_version("mine")) as v:  # the clone's own versions read through too
                assert v.read(0, 8192) == b"a" * 4096 + b"b" * 4096
            assert clone.read(0, 8192) == b"c" * 4096 + b"b" * 4096
            assert m == clone.find_version("mine")


def test_clone_survives_reopen_once_attached_again(tmp_path: Path) -> None:
    src = _source(tmp_path)
    src.write(0, b"x" * 8192)
    lsn = src.flush()
    src.write(0, b"y" * 8192)
    src.flush()
    clone = Volume.create_clone(tmp_path / "c", "c", src, lsn, sync_interval=None)
    clone.write(4096, b"z" * 4096)
    clone.flush()
    clone.close()
    src.close()
    src = Volume.open(tmp_path / "src", sync_interval=None)
    clone = Volume.open(tmp_path / "c", sync_interval=None)
    with pytest.raises(StateError, match="detached"):  # nothing reads before the source is pinned again
        clone.read(0, 1)
    with pytest.raises(StateError, match="detached"):
        clone.write(0, b"w")
    clone.attach_source(src)
    assert clone.read(0, 8192) == b"x" * 4096 + b"z" * 4096
    assert src.writeback() == lsn
    clone.close()
    src.close()


def test_attach_refuses_another_volume_or_a_lost_version(tmp_path: Path) -> None:
    src = _source(tmp_path)
    src.write(0, b"x" * 512)
    lsn = src.flush()
    Volume.create_clone(tmp_path / "c", "c", src, lsn, sync_interval=None).close()
    src.write(0, b"y" * 512)
    src.flush()
    assert src.writeback() > lsn  # no clone is attached: the version leaves
    clone = Volume.open(tmp_path / "c", sync_interval=None)
    with pytest.raises(VersionNotFound, match=rf"no longer retains lsn-{lsn} \(oldest is lsn-\d+\); delete"):
        clone.attach_source(src)
    other = Volume.create(tmp_path / "o", "src", SIZE, sync_interval=None)
    with pytest.raises(StateError, match="not the volume it was cloned from"):
        clone.attach_source(other)
    for v in (clone, other, src):
        v.close()


def test_refusals(tmp_path: Path) -> None:
    with _source(tmp_path) as src:
        src.write(0, b"x" * 512)
        lsn = src.flush()
        with pytest.raises(VersionNotFound):
            Volume.create_clone(tmp_path / "c", "c", src, lsn + 5, sync_interval=None)
        assert not (tmp_path / "c").exists() and not src.open_versions
        with Volume.create_clone(tmp_path / "c", "c", src, lsn, sync_interval=None) as clone:
            with pytest.raises(InvalidRequest, match="clone of a clone"):
                Volume.create_clone(tmp_path / "cc", "cc", clone, 0, sync_interval=None)
            with pytest.raises(FileExistsError):
                Volume.create_clone(tmp_path / "c", "c", src, lsn, sync_interval=None)
            assert src.open_versions.views(lsn) == 1  # the failed create let its pin go


def test_clone_of_a_mirror_stops_only_its_writeback(tmp_path: Path) -> None:
    """A mirror's source-side view: L <= what it replayed; the pin stops writeback, not replay."""
    with _source(tmp_path) as src:
        for i in range(4):
            src.write(i * 4096, bytes([i + 1]) * 4096)
            src.flush()
        src.replay_limit = 4  # a mirror that has replayed up to LSN 4 of the records it fetched
        with pytest.raises(VersionNotFound):
            Volume.create_clone(tmp_path / "c", "c", src, src.find_version("lsn-6"), sync_interval=None)
        with Volume.create_clone(tmp_path / "c", "c", src, src.find_version("lsn-3"), sync_interval=None) as clone:
            src.replay_limit = src.durable_lsn  # replay moves on
            assert src.writeback() == 3
            want = bytes([1]) * 4096 + bytes([2]) * 4096 + bytes(8192)
            assert clone.read(0, 4 * 4096) == want
            assert os.path.getsize(tmp_path / "c" / "base.img") == SIZE  # sparse, never read
