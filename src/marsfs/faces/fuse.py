"""The pyfuse3 adapter: kernel requests in, namespace and node/volume calls, pyfuse3 types out.

It decides nothing about the tree: names, inodes, lookup counts and attributes are
:mod:`marsfs.faces.namespace`'s; volumes, roles and open counts are the node's. What it adds
is the kernel's side of the contract (measured on Linux 6.x with libfuse 3.14):

* Every handler is wrapped (:func:`translated`): a :class:`MarsError` reaches the kernel as its
  class's ``errno`` and is logged as a warning; any other exception is logged with its
  traceback and becomes EIO. An exception escaping into pyfuse3 would kill the mount and every
  loop device on it.
* ``fsync`` is always implemented (ENOSYS would make the kernel report success for every later
  fsync) and is the node's flush gate (:meth:`marsfs.node.syncmode.SyncGates.flush`: the
  volume's flush, and on a sync volume the wait for its mirrors); a flush with nothing new on an
  async volume costs no thread hop. A sync volume that refuses to run degraded fails it with EIO.
* Blocking work (large lz4, large reads, an fdatasync that cannot go as AIO) runs in worker
  threads; an fsync's fdatasync is a kernel AIO request this thread awaits; small reads and
  writes run inline because a thread hop costs more than the page-cache I/O they do; a small
  write that would start a new log segment (an fdatasync: milliseconds) goes to a worker
  thread, and the rotation does not hold the volume lock that reads take. (Writes up to 1 MiB
  inline while no lz4 is due cost 18 % less CPU but, measured on the loaded 2-core VM, 25 %
  less throughput: the pwritev of one write no longer overlaps the next request.)
* The image behaves like a disk: reads at or past the end return nothing, writes past the end
  fail with ENOSPC, a write that does not fit writes nothing (a short reply would become EIO
  in the kernel), and the size cannot change (EPERM) except to what ``marsfs resize`` made
  it; the writeback cache's mtime-only SETATTRs are accepted.
* With the writeback cache the kernel owns a cached inode's size and takes none from
  getattr, so after a resize the daemon truncates the image through the mount to its new
  size (:func:`marsfs.faces.daemon` does, in a worker thread: this trio thread answers that
  SETATTR, which is then accepted). A version is a new inode, which the kernel asks for its
  size: a mirror's image shows the new size from the version that replayed the record on. A version (a mirror's image, anything under ``.versions``) is
  read-only (EROFS); opening one pins it (:meth:`Volume.view`), so it keeps its bytes while
  writeback and replay go on, and opens of the same version share one index.
* Directories other than the root get a handle holding a snapshot of their listing
  (:meth:`Namespace.directory`), released at releasedir.
* While the daemon stops (``closing``: it waits for open volumes to close, see
  :mod:`marsfs.faces.daemon`) new opens are refused with EBUSY; open handles keep working.
* The calls that need a live FUSE session (``readdir_reply``, ``invalidate_entry_async``) sit
  in one small method each, so that in-process tests can replace them.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from marsfs.errors import MarsError, NodeStopping, SyncRefused
from marsfs.faces.namespace import ROOT_INODE, SUFFIX, Attributes, Entry, EntryKind, Namespace
from marsfs.node import Node
from marsfs.volume import Volume, VolumeView
from marsfs.volume.splits import SplitView

logger = logging.getLogger(__name__)

assert ROOT_INODE == pyfuse3.ROOT_INODE
INLINE_MAX = 128 * 1024  #: requests up to this size run on the trio thread
DIR_HANDLES = 1 << 40  #: directory handles start here (the root's is its inode)

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
            logger.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            logger.exception("unexpected error in FUSE handler %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def entry_attributes(a: Attributes) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = a.inode
    out.entry_timeout = a.entry_timeout
    out.attr_timeout = a.attr_timeout
    out.st_mode = a.mode
    out.st_nlink = a.nlink
    out.st_uid = a.uid
    out.st_gid = a.gid
    out.st_size = a.size
    out.st_blksize = a.blksize
    out.st_blocks = a.blocks
    out.st_mtime_ns = out.st_ctime_ns = out.st_atime_ns = a.mtime_ns
    return out


class _Handle:
    __slots__ = ("volume", "name", "view")

    def __init__(self, volume: Volume, name: str, view: VolumeView | SplitView | None) -> None:
        self.volume = volume
        self.name = name
        self.view = view  #: a pinned version or a split version; None = the live primary image


class Operations(pyfuse3.Operations):
    """The marsfs mount. One instance per process (pyfuse3 has one session per process)."""

    enable_writeback_cache = True

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node
        self.namespace = Namespace(node)
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._dirs: dict[int, list[tuple[str, Entry]]] = {}  # open directories (not the root): listings
        self._next_dir = DIR_HANDLES
        self.closing = False  #: the daemon is stopping: refuse new opens

    # ------------------------------------------------------------------ session calls (replaceable in tests)

    def _readdir_reply(self, token: Any, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        return bool(pyfuse3.readdir_reply(token, name, attrs, next_id))

    def _invalidate_entry(self, name: bytes, parent: int = pyfuse3.ROOT_INODE) -> None:
        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)

    # ------------------------------------------------------------------ names and inodes

    def _entry(self, inode: int) -> Entry:
        entry = self.namespace.entry(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = self.namespace.attributes(inode)
        if a is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry_attributes(a)

    def forget_volume(self, name: str) -> None:
        """A volume was deleted: drop its inodes and tell the kernel the name is gone."""
        self._invalidate_entry(os.fsencode(self.namespace.forget_volume(name)))
        versions = self.namespace.versions_inode()
        if versions is not None:
            self._invalidate_entry(os.fsencode(name), versions)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.namespace.forget(inode_list)

    # ------------------------------------------------------------------ metadata

    @translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        a = self.namespace.lookup(parent_inode, os.fsdecode(name))
        if a is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry_attributes(a)

    @translated
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    @translated
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        entry = self._entry(inode)
        if not entry.writable and (fields.update_size or fields.update_mtime):
            raise pyfuse3.FUSEError(errno.EROFS)
        if fields.update_size and attr.st_size != self.node.volumes[entry.volume].size:
            logger.warning("refused to change the size of %s%s to %d: a volume grows with marsfs resize",
                           entry.volume, SUFFIX, attr.st_size)
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mtime:  # the writeback cache sends these; accept them
            self.namespace.touch(entry.volume, attr.st_mtime_ns)
        return self._attrs(inode)

    @translated
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode == pyfuse3.ROOT_INODE:
            return inode
        entry = self._entry(inode)
        if entry.kind is EntryKind.VERSION_DIR:  # scans the log's tables: off the trio thread (it only reads)
            listing = await trio.to_thread.run_sync(self.namespace.directory, inode)
        else:
            listing = self.namespace.directory(inode)
        if listing is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = listing
        return fh

    @translated
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = None if fh == pyfuse3.ROOT_INODE else self._dirs.get(fh)
        if listing is None and fh != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EBADF)
        for d in self.namespace.readdir(start_id, listing):
            if not self._readdir_reply(token, os.fsencode(d.name), entry_attributes(d.attrs), d.next_id):
                break
            self.namespace.counted(d.attrs.inode)  # readdirplus counts as a lookup

    @translated
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

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
        entry = self._entry(inode)
        if entry.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if self.closing:
            raise NodeStopping(f"refused to open {entry.volume}{SUFFIX}: node {self.node.name} is stopping "
                               "and waits for its open volumes to close")
        if flags & os.O_TRUNC:
            logger.warning("refused O_TRUNC open of %s%s: a volume image cannot be truncated", entry.volume, SUFFIX)
            raise pyfuse3.FUSEError(errno.EPERM)
        if flags & os.O_ACCMODE != os.O_RDONLY and not entry.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        vol = self.node.acquire(entry.volume, write=flags & os.O_ACCMODE != os.O_RDONLY)
        try:
            view: VolumeView | SplitView | None = None
            if entry.kind is EntryKind.SPLIT:
                view = vol.split_view(entry.split)
            elif entry.version is not None:
                view = await trio.to_thread.run_sync(vol.view, entry.version)
        except BaseException:
            self.node.release(entry.volume)
            raise
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(vol, entry.volume, view)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    @translated
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        image: Volume | VolumeView | SplitView = h.view if h.view is not None else h.volume
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
        if len(buf) <= INLINE_MAX and not vol.write_blocks(len(buf)):
            vol.write(off, buf)
        else:
            await trio.to_thread.run_sync(vol.write, off, buf)
        self.namespace.touch(h.name, time.time_ns())
        return len(buf)

    @translated
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        if h.view is None:
            try:
                await self.node.sync.flush(h.volume)
            except SyncRefused:  # said once in the log when the volume degraded, not at every flush
                raise pyfuse3.FUSEError(errno.EIO) from None

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
        filename = os.fsdecode(name)
        logger.warning("refused to unlink %s: %s", filename, self.namespace.removal_hint(parent_inode, filename))
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
