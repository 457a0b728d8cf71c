"""Split versions: the state a split brain's losing side had, kept readable after it resyncs.

When an operator resolves a split brain (``marsfs invalidate VOL`` on the losing node), the
loser's divergent writes must not vanish (G7): before its image is brought to the survivor's
history, the image at its own head is saved as a split version, which ``.versions/<vol>/``
shows as ``split-<node>-<lsn>.img`` (``node``: the loser, ``lsn``: the fork, the last LSN the
two histories share).

Rules that hold here:

* A split version is a standalone sparse file under the volume directory
  (``splits/split-<node>-<lsn>.img``) with a JSON description beside it (``.json``: node, fork
  LSN, the loser's head LSN and its chain there, size, when it was saved). It depends on no
  log record and no base image, so nothing the volume does later (writeback, trimming,
  resync, resize) can change it; it costs the disk space of the loser's data (holes stay
  holes: all-zero blocks are not written).
* Saving is atomic: data and description are written under ``.tmp`` names, made durable,
  then renamed (the image first, the description last). A split version exists exactly when
  its description does; a crash leaves at most ``.tmp`` files or an image without its
  description, which :func:`list_splits` ignores and the next save removes.
* Saving the same split again (same name) replaces it: the losing node's state at the fork
  is the same history, so the last save is as good as the first.
* Split versions are read-only. One stays until it is discarded (:func:`discard_split`,
  ``marsfs discard VOL@split-...``) or the volume is deleted (its directory goes). Discarding
  removes the description first, so a crash half way leaves an image without one, which
  :func:`list_splits` does not show and the next save removes; a reader that has
  the image open keeps reading it until it closes (its space is freed then).
* What one costs on disk is :func:`disk_bytes`: the blocks its image holds (holes are free).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from marsfs.errors import VersionNotFound
from marsfs.fsutil import fsync_dir, read_json, write_all, write_json

SPLITS_DIR = "splits"
COPY_CHUNK = 1 << 20
_NAME = re.compile(r"split-(?P<node>[A-Za-z0-9][A-Za-z0-9_.-]*)-(?P<lsn>\d+)")


@dataclass(frozen=True)
class SplitInfo:
    """What one split version holds."""

    name: str  #: ``split-<node>-<fork lsn>``
    node: str  #: the losing node whose state this is
    fork_lsn: int  #: the last LSN both histories share
    head_lsn: int  #: the loser's head: the version saved
    head_chain: str  #: the loser's chain hash at its head (hex)
    size: int
    saved: float  #: wall time of the save


def split_name(node: str, fork_lsn: int) -> str:
    return f"split-{node}-{fork_lsn}"


def parse_split_name(name: str) -> tuple[str, int] | None:
    """(node, fork LSN) of a ``split-<node>-<lsn>`` name, or None."""
    m = _NAME.fullmatch(name)
    return (m["node"], int(m["lsn"])) if m else None


def save_split(volume_dir: Path, node: str, fork_lsn: int, head_lsn: int, head_chain: bytes, size: int,
               read: Callable[[int, int], bytes], progress: Callable[[int], None] | None = None) -> SplitInfo:
    """Copy the image ``read`` returns (the loser's version at ``head_lsn``) into a split
    version; durable on return. ``progress(bytes)`` after each chunk."""
    where = volume_dir / SPLITS_DIR
    where.mkdir(exist_ok=True)
    _remove_orphans(where)
    info = SplitInfo(name=split_name(node, fork_lsn), node=node, fork_lsn=fork_lsn, head_lsn=head_lsn,
                     head_chain=head_chain.hex(), size=size, saved=time.time())
    image, tmp = where / f"{info.name}.img", where / f"{info.name}.img.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        zero = bytes(COPY_CHUNK)
        for off in range(0, size, COPY_CHUNK):
            n = min(COPY_CHUNK, size - off)
            data = read(off, n)
            assert len(data) == n, f"short read of the version at {off}"
            if data != zero[:n]:  # a hole stays a hole
                write_all(fd, data, off)
            if progress is not None:
                progress(off + n)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, image)
    write_json(where / f"{info.name}.json", asdict(info))  # atomic; the split exists from here on
    fsync_dir(where)
    return info


def disk_bytes(volume_dir: Path, name: str) -> int:
    """The bytes split version ``name``'s image takes on disk (0 if it is gone)."""
    try:
        return (volume_dir / SPLITS_DIR / f"{name}.img").stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def discard_split(volume_dir: Path, name: str) -> SplitInfo:
    """Remove split version ``name`` for good (durable on return); VersionNotFound if there is
    none. An image a crash left behind without its description goes at the next save."""
    info, image = split_image(volume_dir, name)
    where = image.parent
    (where / f"{name}.json").unlink()  # the split ends here
    fsync_dir(where)
    image.unlink(missing_ok=True)
    fsync_dir(where)
    return info


def list_splits(volume_dir: Path) -> list[SplitInfo]:
    """The split versions of a volume, oldest fork first."""
    where = volume_dir / SPLITS_DIR
    if not where.is_dir():
        return []
    out = []
    for desc in where.glob("split-*.json"):
        if (where / f"{desc.stem}.img").exists():
            out.append(SplitInfo(**read_json(desc)))
    return sorted(out, key=lambda s: (s.fork_lsn, s.node))


def split_image(volume_dir: Path, name: str) -> tuple[SplitInfo, Path]:
    """The description and image file of split version ``name``; VersionNotFound if none."""
    for info in list_splits(volume_dir):
        if info.name == name:
            return info, volume_dir / SPLITS_DIR / f"{name}.img"
    raise VersionNotFound(f"no split version {name} of volume {volume_dir.name} on this node; "
                          f"list them with: marsfs versions {volume_dir.name}")


def _remove_tmp(where: Path) -> None:
    for tmp in where.glob("*.tmp"):
        tmp.unlink(missing_ok=True)


def _remove_orphans(where: Path) -> None:
    """Remove images without a description (a discard a crash interrupted) and ``.tmp`` files."""
    _remove_tmp(where)
    for image in where.glob("split-*.img"):
        if not (where / f"{image.stem}.json").exists():
            image.unlink(missing_ok=True)


class SplitView:
    """A split version opened for reading (what ``.versions/<vol>/split-*.img`` serves)."""

    def __init__(self, info: SplitInfo, path: Path) -> None:
        self.info = info
        self.size = info.size
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        assert len(data) == length or offset + len(data) == self.size, "split image shorter than its size"
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
