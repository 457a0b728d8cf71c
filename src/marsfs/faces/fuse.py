"""The pyfuse3 face: translates kernel requests into node and volume calls. It decides nothing.

What the filesystem looks like::

    /<vol>.img      one regular file per volume, size = volume size

On a volume's primary ``<vol>.img`` is one read-write inode. On a mirror it is read-only and
every lookup resolves to an inode of the newest replayed version (entry timeout 0): an open
file keeps its inode, hence its version, while replay goes on, and because each version has
its own inode the kernel's page cache never mixes versions. A mirror whose image copy is not
finished is not listed.

Rules that hold here (see ../shared/FUSE-NOTES.md for the measured facts behind them):

* Every handler is wrapped: a :class:`MarsError` becomes its errno (EIO by default) and is
  logged; any other exception is logged with its traceback and becomes EIO. An exception
  escaping into pyfuse3 would kill the mount and every loop device on it.
* ``fsync`` is always implemented (ENOSYS would make the kernel report success for every later
  fsync) and reaches :meth:`Volume.flush`; a flush with nothing new costs no thread hop.
* Blocking work (fdatasync, large lz4, large reads) runs in worker threads; small reads and
  writes run inline because a thread hop costs more than the page-cache I/O they do.
* The image behaves like a disk: reads at or past the end return nothing, writes past the end
  fail with ENOSPC, a write that does not fit writes nothing (a short reply would become
  EIO in the kernel), and the size cannot change.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from marsfs.errors import MarsError
from marsfs.node import Node
from marsfs.volume import Volume, VolumeView

logger = logging.getLogger(__name__)

SUFFIX = ".img"
INLINE_MAX = 128 * 1024  #: requests up to this size run on the trio thread
_TIMEOUT = 1.0

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def translated(fn: F) -> F:
    """Turn every failure of a handler into a FUSEError; never let one escape to pyfuse3."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except MarsError as e:
            code = getattr(e, "errno", errno.EIO)
            logger.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            logger.exception("unexpected error in FUSE handler %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class _Handle:
    __slots__ = ("volume", "name", "view")

    def __init__(self, volume: Volume, name: str, view: VolumeView | None) -> None:
        self.volume = volume
        self.name = name
        self.view = view  #: a mirror's pinned version; None = the live primary image


class Operations(pyfuse3.Operations):
    """The marsfs mount. One instance per process (pyfuse3 has one session per process)."""

    enable_writeback_cache = True

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node
        self._inodes: dict[tuple[str, int | None], int] = {}  # (volume, version or None) -> inode
        self._entries: dict[int, tuple[str, int | None]] = {}
        self._lookups: Counter[int] = Counter()  # the kernel's lookup count per inode
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._mtime: dict[str, int] = {}
        self._started_ns = time.time_ns()

    # ------------------------------------------------------------------ names and inodes

    def _inode_of(self, name: str) -> int:
        """The inode ``<name>.img`` resolves to now (a mirror: its current version's)."""
        key = (name, self.node.volumes[name].current_lsn if self.node.is_mirror(name) else None)
        ino = self._inodes.get(key)
        if ino is None:
            ino = self._inodes[key] = self._next_inode
            self._entries[ino] = key
            self._next_inode += 1
        return ino

    def _entry(self, inode: int) -> tuple[str, int | None]:
        entry = self._entries.get(inode)
        if entry is None or entry[0] not in self.node.volumes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def forget_volume(self, name: str) -> None:
        """A volume was deleted: drop its inodes and tell the kernel the name is gone."""
        for key in [k for k in self._inodes if k[0] == name]:
            self._entries.pop(self._inodes.pop(key), None)
        pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, (name + SUFFIX).encode(), ignore_enoent=True)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """The kernel dropped references: a version inode nobody references any more can go.

        FORGETs are asynchronous: the kernel may have looked the same inode up again before
        this one arrives, so only a lookup count of zero frees it (the FUSE contract)."""
        for ino, nlookup in inode_list:
            left = self._lookups[ino] - nlookup
            if left > 0:
                self._lookups[ino] = left
                continue
            self._lookups.pop(ino, None)
            entry = self._entries.get(ino)
            if entry is not None and entry[1] is not None:
                del self._entries[ino]
                self._inodes.pop(entry, None)

    def _listed(self) -> list[str]:
        return sorted(self.node.volumes)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.entry_timeout = _TIMEOUT
        a.attr_timeout = _TIMEOUT
        a.st_uid = a.st_gid = 0
        a.st_blksize = 4096
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
            a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = self._started_ns
            return a
        name, version = self._entry(inode)
        vol = self.node.volumes[name]
        if version is not None:
            a.entry_timeout = 0  # every open looks up the newest replayed version again
        a.st_mode = stat.S_IFREG | (0o600 if version is None else 0o400)
        a.st_nlink = 1
        a.st_size = vol.size
        a.st_blocks = vol.size // 512
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = self._mtime.get(name, self._started_ns)
        return a

    # ------------------------------------------------------------------ metadata

    @translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        text = os.fsdecode(name)
        if text in (".", ".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        if not text.endswith(SUFFIX) or text[: -len(SUFFIX)] not in self._listed():
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs = self._attrs(self._inode_of(text[: -len(SUFFIX)]))
        self._lookups[attrs.st_ino] += 1
        return attrs

    @translated
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    @translated
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        name, version = self._entry(inode)
        vol = self.node.volumes[name]
        if version is not None and (fields.update_size or fields.update_mtime):
            raise pyfuse3.FUSEError(errno.EROFS)
        if fields.update_size and attr.st_size != vol.size:
            logger.warning("refused to change the size of %s%s to %d (volumes keep their size; "
                        "use marsfs resize to grow)", name, SUFFIX, attr.st_size)
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mtime:  # the writeback cache sends these; accept them
            self._mtime[name] = attr.st_mtime_ns
        return self._attrs(inode)

    @translated
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @translated
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        names = self._listed()
        for i in range(start_id, len(names)):
            attrs = self._attrs(self._inode_of(names[i]))
            if not pyfuse3.readdir_reply(token, (names[i] + SUFFIX).encode(), attrs, i + 1):
                break
            self._lookups[attrs.st_ino] += 1  # readdirplus counts as a lookup

    @translated
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.node.state)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(st, field))
        return out

    # ------------------------------------------------------------------ data

    @translated
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        name, version = self._entry(inode)
        if flags & os.O_TRUNC:
            logger.warning("refused O_TRUNC open of %s%s: a volume image cannot be truncated", name, SUFFIX)
            raise pyfuse3.FUSEError(errno.EPERM)
        if flags & os.O_ACCMODE != os.O_RDONLY and version is not None:
            raise pyfuse3.FUSEError(errno.EROFS)
        vol = self.node.acquire(name)
        try:
            view = None if version is None else await trio.to_thread.run_sync(vol.view, version)
        except BaseException:
            self.node.release(name)
            raise
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(vol, name, view)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    @translated
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        image: Volume | VolumeView = h.view if h.view is not None else h.volume
        if off >= image.size:
            return b""
        size = min(size, image.size - off)
        if size <= INLINE_MAX:
            return image.read(off, size)
        return await trio.to_thread.run_sync(image.read, off, size)

    @translated
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        vol = h.volume
        if h.view is not None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if off + len(buf) > vol.size:  # the kernel turns a short write into EIO: refuse it whole
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if len(buf) <= INLINE_MAX:
            vol.write(off, buf)
        else:
            await trio.to_thread.run_sync(vol.write, off, buf)
        self._mtime[h.name] = time.time_ns()
        return len(buf)

    @translated
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        vol = h.volume
        if h.view is None and vol.needs_flush:
            await trio.to_thread.run_sync(vol.flush)

    @translated
    async def flush(self, fh: int) -> None:
        """Called on every close(); not a durability point (fsync is)."""

    @translated
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            if h.view is not None:
                h.view.close()
            self.node.release(h.name)

    # ------------------------------------------------------------------ refusals

    @translated
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        logger.warning("refused to unlink %s: delete volumes with marsfs delete", os.fsdecode(name))
        raise pyfuse3.FUSEError(errno.EPERM)

    @translated
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    @translated
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    @translated
    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)
