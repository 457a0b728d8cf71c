"""What a volume raises, by class: each failure carries the errno a FUSE client should see.

A range outside the volume is OutOfRange (ENOSPC, like a disk), a version that is not retained
or not known is VersionNotFound (ENOENT), a bad or taken mark name and a bad size are
InvalidRequest (EINVAL), and a replicated record that writes past the end is RecordRefused and
never reaches the log.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from marsfs.errors import InvalidRequest, OutOfRange, RecordRefused, VersionNotFound
from marsfs.log import Log, RecordType, encode_payload
from marsfs.volume import Volume

SIZE = 1024 * 1024


def _volume(tmp_path: Path, name: str = "v") -> Volume:
    return Volume.create(tmp_path / name, name, SIZE, sync_interval=None)


def test_ranges_outside_the_volume_are_out_of_range(tmp_path: Path) -> None:
    with _volume(tmp_path) as vol:
        for call in (lambda: vol.write(SIZE - 1, b"xy"), lambda: vol.read(SIZE, 1),
                     lambda: vol.read(-1, 1), lambda: vol.write_base(SIZE, b"x")):
            with pytest.raises(OutOfRange, match="lies outside volume v") as exc:
                call()
            assert exc.value.errno == errno.ENOSPC
        assert vol.head_lsn == 0


def test_unknown_and_unretained_versions_are_version_not_found(tmp_path: Path) -> None:
    with _volume(tmp_path) as vol:
        vol.write(0, b"a" * 4096)
        vol.flush()
        vol.writeback()
        with pytest.raises(VersionNotFound, match="not retained") as exc:
            vol.view(0)
        assert exc.value.errno == errno.ENOENT
        with pytest.raises(VersionNotFound, match="not retained"):
            vol.view(vol.head_lsn + 1)
        with pytest.raises(VersionNotFound, match="give lsn-N"):
            vol.resolve_version("no-such-mark")
        with pytest.raises(VersionNotFound, match="no flush point"):
            vol.resolve_version("2001-01-01T00:00:00Z")
        assert vol.resolve_version("lsn-7") == 7


def test_bad_and_taken_mark_names_are_invalid_requests(tmp_path: Path) -> None:
    with _volume(tmp_path) as vol:
        lsn = vol.mark("before-upgrade")
        assert vol.resolve_version("before-upgrade") == lsn
        for bad in ("", "a/b", ".hidden", "lsn-3", "x" * 201):
            with pytest.raises(InvalidRequest, match="is invalid") as exc:
                vol.mark(bad)
            assert exc.value.errno == errno.EINVAL
        with pytest.raises(InvalidRequest, match="already exists"):
            vol.mark("before-upgrade")
        assert vol.head_lsn == lsn
        assert [v.kind for v in vol.versions()] == ["oldest", "head", "mark"]  # same LSN: by kind


def test_a_size_that_is_not_a_multiple_of_512_is_an_invalid_request(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="multiple of 512"):
        Volume.create(tmp_path / "v", "v", 1000, sync_interval=None)


def test_a_replicated_write_past_the_end_is_refused_before_the_log(tmp_path: Path) -> None:
    with _volume(tmp_path) as primary:
        big = Log.create(tmp_path / "big", primary.log.chain_at(0), segment_bytes=1024 * 1024)
        try:
            big.append(RecordType.WRITE, SIZE - 512, encode_payload(os.urandom(1024)))
            raw = big.read_raw(1)
        finally:
            big.close()
        with pytest.raises(RecordRefused, match="past the end") as exc:
            primary.append_raw(raw)
        assert exc.value.errno == errno.EIO
        assert primary.head_lsn == 0 and primary.log.end_bytes == primary.log.recovery.bytes_scanned
