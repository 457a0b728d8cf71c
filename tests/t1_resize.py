"""Growing a volume: the RESIZE record, the size of each version, recovery, replicas, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from marsfs.errors import InvalidRequest, OutOfRange, RecordRefused
from marsfs.log import RecordType
from marsfs.volume import Volume

KiB = 1 << 10
MiB = 1 << 20


def _volume(tmp_path: Path, size: int = MiB, **kw: object) -> Volume:
    return Volume.create(tmp_path / "v", "v", size, sync_interval=None, **kw)  # type: ignore[arg-type]


def test_a_version_has_the_size_of_its_lsn(tmp_path: Path) -> None:
    with _volume(tmp_path) as vol:
        vol.write(0, b"a" * 4096)
        before = vol.flush()
        with pytest.raises(OutOfRange, match="outside volume v of 1048576 bytes"):
            vol.write(MiB, b"b" * 4096)  # past the old end: refused until resized
        lsn = vol.resize(2 * MiB, reserve=False)
        assert lsn == before + 1 and vol.log.info(lsn).type == RecordType.RESIZE and vol.log.info(lsn).offset == 2 * MiB
        assert vol.durable_lsn == lsn  # durable when resize returns
        assert vol.size == vol.current_size == 2 * MiB
        assert os.stat(vol.path / "base.img").st_size == 2 * MiB
        assert vol.read(MiB, 4096) == bytes(4096)  # zeros after the record
        vol.write(MiB, b"b" * 4096)
        vol.flush()
        assert vol.read(MiB, 4096) == b"b" * 4096
        with vol.view(before) as old:  # below the record: the old size, reads past it refused
            assert old.size == MiB and vol.size_at(before) == MiB
            assert old.read(0, 4096) == b"a" * 4096
            with pytest.raises(OutOfRange, match=r"outside version lsn-\d+ of volume v \(1048576 bytes\)"):
                old.read(MiB, 4096)
        with vol.view(lsn) as new:
            assert new.size == 2 * MiB and new.read(MiB, 4096) == bytes(4096)
        assert vol.resize(2 * MiB, reserve=False) is None  # same size: nothing happens
        assert vol.head_lsn == lsn + 2


def test_shrinking_and_odd_sizes_are_refused(tmp_path: Path) -> None:
    with _volume(tmp_path) as vol:
        head = vol.head_lsn
        with pytest.raises(InvalidRequest, match="shrinking it to 524288 is not supported"):
            vol.resize(MiB // 2, reserve=False)
        with pytest.raises(InvalidRequest, match="not a positive multiple of 512"):
            vol.resize(MiB + 100, reserve=False)
        assert vol.head_lsn == head and vol.size == MiB


def test_resize_survives_recovery_and_log_trimming(tmp_path: Path) -> None:
    vol = _volume(tmp_path, segment_bytes=64 * KiB)
    vol.write(0, b"a" * 4096)
    before = vol.flush()
    lsn = vol.resize(3 * MiB, reserve=True)
    assert lsn is not None  # the size changes: a RESIZE record
    assert os.stat(vol.path / "base.img").st_blocks * 512 >= 2 * MiB  # the new part is reserved
    vol.write(2 * MiB, b"c" * 4096)
    vol.flush()
    vol.close()
    vol = Volume.open(tmp_path / "v", sync_interval=None)
    assert vol.size == 3 * MiB and vol.size_at(before) == MiB and vol.size_at(lsn) == 3 * MiB
    assert vol.read(2 * MiB, 4096) == b"c" * 4096
    for i in range(40):  # enough to rotate segments, then write back and trim past the RESIZE record
        vol.write(i * 8 * KiB, os.urandom(8 * KiB))
        vol.flush()
    vol.writeback(max_bytes=None)
    assert vol.log.first_lsn > lsn
    vol.close()
    vol = Volume.open(tmp_path / "v", sync_interval=None)
    assert vol.size == 3 * MiB and vol.read(2 * MiB, 4096) == b"c" * 4096  # volume.json remembers it
    vol.close()


def test_an_entry_of_a_record_lost_in_a_crash_goes_with_it(tmp_path: Path) -> None:
    with _volume(tmp_path) as vol:
        head = vol.head_lsn
    meta = json.loads((tmp_path / "v" / "volume.json").read_text())
    meta["resizes"] = [[head + 1, 4 * MiB]]  # written, then the record was lost (not durable)
    (tmp_path / "v" / "volume.json").write_text(json.dumps(meta))
    with Volume.open(tmp_path / "v", sync_interval=None) as vol:
        assert vol.size == MiB
    assert json.loads((tmp_path / "v" / "volume.json").read_text())["resizes"] == []


def test_a_replica_grows_when_it_appends_the_record(tmp_path: Path) -> None:
    with _volume(tmp_path) as src:
        first = src.head_lsn
        src.write(0, b"a" * 4096)
        src.flush()
        src.resize(2 * MiB, reserve=False)
        src.write(MiB, b"b" * 4096)
        src.flush()
        with Volume.create_replica(tmp_path / "m", "v", MiB, src.uuid, first, src.log.chain_at(first)) as rep:
            for n in range(first + 1, src.head_lsn + 1):
                rep.append_raw(src.log.read_raw(n))
            assert rep.size == 2 * MiB and rep.head_lsn == src.head_lsn
            assert rep.current_size == MiB  # it shows the new size when it replays the record
            rep.replay_limit = rep.head_lsn
            assert rep.current_size == 2 * MiB and rep.read(MiB, 4096) == b"b" * 4096
            assert os.stat(rep.path / "base.img").st_size == 2 * MiB


def test_a_replicated_resize_that_shrinks_is_refused(tmp_path: Path) -> None:
    with _volume(tmp_path, 2 * MiB) as src:
        first = src.head_lsn
        src.resize(4 * MiB, reserve=False)
        with Volume.create_replica(tmp_path / "m", "v", 8 * MiB, src.uuid, first, src.log.chain_at(first)) as rep:
            with pytest.raises(RecordRefused, match="volumes only grow"):
                rep.append_raw(src.log.read_raw(first + 1))
            assert rep.head_lsn == first and rep.size == 8 * MiB


def test_a_clone_of_an_older_version_keeps_its_size(tmp_path: Path) -> None:
    with _volume(tmp_path) as vol:
        before = vol.flush()
        vol.resize(2 * MiB, reserve=False)
        with Volume.create_clone(tmp_path / "c", "c", vol, before, sync_interval=None) as clone:
            assert clone.size == MiB


def test_a_resync_switch_replaces_the_size_history(tmp_path: Path) -> None:
    """After a resync's switch to a version of another size, the sizes of the versions before
    it are gone: the target's size holds, also after a restart."""
    with _volume(tmp_path) as src:
        first = src.head_lsn
        src.resize(2 * MiB, reserve=False)
        dst = Volume.create_replica(tmp_path / "m", "v", MiB, src.uuid, first, src.log.chain_at(first))
        dst.append_raw(src.log.read_raw(first + 1))
        dst.replay_limit = dst.head_lsn
        assert json.loads((dst.path / "volume.json").read_text())["resizes"] == [[first + 1, 2 * MiB]]
        r = dst.begin_resync(first + 50, b"c" * 16, 4 * MiB, src.uuid)
        r.write(3 * MiB, b"x" * 4096)
        r.sync()
        assert dst.finish_resync()
        assert dst.size == dst.current_size == dst.size_at(first + 50) == 4 * MiB
        dst.close()
        meta = json.loads((tmp_path / "m" / "volume.json").read_text())
        assert (meta["size"], meta["resizes"]) == (4 * MiB, [])
        with Volume.open(tmp_path / "m", sync_interval=None) as dst:
            assert dst.size == 4 * MiB and dst.read(3 * MiB, 4096) == b"x" * 4096
