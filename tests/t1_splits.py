"""Split versions: a losing side's image saved whole, readable, atomic, sparse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from marsfs.errors import VersionNotFound
from marsfs.volume.splits import (
    SPLITS_DIR,
    discard_split,
    disk_bytes,
    list_splits,
    parse_split_name,
    save_split,
    split_image,
    split_name,
)

MiB = 1 << 20


def image_of(size: int, blocks: dict[int, bytes]) -> bytes:
    img = bytearray(size)
    for off, data in blocks.items():
        img[off : off + len(data)] = data
    return bytes(img)


def test_saved_split_reads_back_exactly_and_keeps_holes(tmp_path: Path) -> None:
    size = 5 * MiB + 4096
    img = image_of(size, {0: b"a" * 4096, 3 * MiB + 17: os.urandom(9000), size - 4096: b"z" * 4096})
    seen: list[int] = []
    info = save_split(tmp_path, "b", 41, 57, bytes(16), size, lambda off, n: img[off : off + n], seen.append)
    assert info.name == split_name("b", 41) == "split-b-41" and seen[-1] == size
    got, path = split_image(tmp_path, "split-b-41")
    assert got == info and path.read_bytes() == img
    assert path.stat().st_blocks * 512 < 4 * MiB  # the zero MiBs stayed holes
    assert list_splits(tmp_path) == [info]


def test_a_split_exists_only_with_its_description(tmp_path: Path) -> None:
    (tmp_path / SPLITS_DIR).mkdir()
    (tmp_path / SPLITS_DIR / "split-b-3.img").write_bytes(b"x")  # a crash before the description
    (tmp_path / SPLITS_DIR / "split-b-4.img.tmp").write_bytes(b"x")
    assert list_splits(tmp_path) == []
    with pytest.raises(VersionNotFound, match="marsfs versions"):
        split_image(tmp_path, "split-b-3")
    save_split(tmp_path, "b", 4, 5, bytes(16), 4096, lambda off, n: bytes(n))
    assert not list((tmp_path / SPLITS_DIR).glob("*.tmp"))
    assert [s.name for s in list_splits(tmp_path)] == ["split-b-4"]


def test_names_parse() -> None:
    assert parse_split_name("split-node-2-99") == ("node-2", 99)
    assert parse_split_name("split--1") is None and parse_split_name("lsn-5") is None


def test_discard_removes_the_description_first_and_a_save_clears_what_a_crash_left(tmp_path: Path) -> None:
    img = image_of(2 * MiB, {MiB: b"d" * 4096})
    info = save_split(tmp_path, "b", 4, 6, bytes(16), len(img), lambda off, n: img[off : off + n])
    assert disk_bytes(tmp_path, info.name) == (tmp_path / SPLITS_DIR / "split-b-4.img").stat().st_blocks * 512 > 0
    assert discard_split(tmp_path, "split-b-4") == info
    assert list_splits(tmp_path) == [] and not any((tmp_path / SPLITS_DIR).iterdir())
    assert disk_bytes(tmp_path, "split-b-4") == 0
    with pytest.raises(VersionNotFound, match="no split version split-b-4"):
        discard_split(tmp_path, "split-b-4")
    (tmp_path / SPLITS_DIR / "split-b-5.img").write_bytes(b"x")  # a discard a crash cut after the description
    save_split(tmp_path, "b", 7, 8, bytes(16), 4096, lambda off, n: bytes(n))
    assert sorted(p.name for p in (tmp_path / SPLITS_DIR).iterdir()) == ["split-b-7.img", "split-b-7.json"]
