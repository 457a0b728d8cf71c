"""The Python FUSE ceiling: a minimal pyfuse3 filesystem holding one volume image in memory.

``python -m marsfs.testing.memfs --mount DIR --name vol --size 4G`` shows one file,
``DIR/vol.img``, of a fixed size. Its data lives in a dict of 1 MiB chunks (sparse: a 4 GiB image
costs only what has been written; unwritten ranges read as zeros). It does no work beyond copying
bytes, with the same mount options, writeback cache, task counts and connection tuning as
``marsfs serve``: whatever it reaches through a loop device is the most marsfs can reach on this
machine with pyfuse3 and trio (``scripts/bench fio``, target B).

Run it with ``MALLOC_MMAP_THRESHOLD_=8388608 MALLOC_TRIM_THRESHOLD_=268435456`` in the environment
(the bench harness does). SIGTERM or SIGINT unmounts and exits.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from marsfs.faces.fuse import translated

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
_ZEROS = memoryview(bytes(CHUNK))
FILE_INODE = pyfuse3.ROOT_INODE + 1
_TIMEOUT = 1.0  # entry/attr timeout, as marsfs's FUSE layer
MIN_TASKS, MAX_TASKS = 4, 64  # as marsfs serve
MAX_BACKGROUND = 64  # measured: +35-45 % on 1 MiB I/O over the kernel default of 12
FUSECTL = Path("/sys/fs/fuse/connections")
READY = "memfs ready"

# One wrapper for every handler, the same as marsfs uses: FUSEError passes, anything else
# is logged and becomes EIO (an escaping exception kills the mount).
handler = translated


def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``64K``, ``1T`` (binary units) or plain bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    n = int(float(t) * mult)
    if n <= 0 or n % 512:
        raise ValueError(f"size must be a positive multiple of 512 bytes, not {text!r}")
    return n


class MemFS(pyfuse3.Operations):
    """One fixed-size file in a flat root directory."""

    # pyfuse3 reads these class attributes in its INIT callback, before Operations.init() runs.
    enable_writeback_cache = True

    def __init__(self, name: str, size: int) -> None:
        super().__init__()
        self.fname = f"{name}.img".encode()
        self.size = size
        self.chunks: dict[int, bytearray] = {}
        self.handles: set[int] = set()
        self.next_fh = 1
        now = time.time_ns()
        self.mtime_ns = self.ctime_ns = self.atime_ns = now
        self.initialized = trio.Event()

    def init(self) -> None:
        self.initialized.set()  # INIT is being answered: the kernel applies its limits right after

    # ------------------------------------------------------------------ attributes

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.entry_timeout = _TIMEOUT
        a.attr_timeout = _TIMEOUT
        a.st_uid = a.st_gid = 0
        a.st_blksize = 4096
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = self.atime_ns, self.mtime_ns, self.ctime_ns
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        elif inode == FILE_INODE:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = self.size
            a.st_blocks = len(self.chunks) * (CHUNK // 512)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        if name == self.fname:
            return self._attrs(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @handler
    async def forget(self, inode_list: Any) -> None:
        pass

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    @handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and attr.st_size != self.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # fixed-size image
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        # The writeback cache owns mtime and sends mtime-only SETATTRs: accept them.
        if fields.update_mtime:
            self.mtime_ns = attr.st_mtime_ns
        if fields.update_atime:
            self.atime_ns = attr.st_atime_ns
        self.ctime_ns = attr.st_ctime_ns if fields.update_ctime else time.time_ns()
        return self._attrs(inode)

    # ------------------------------------------------------------------ the file

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)  # fixed-size image
        fh = self.next_fh
        self.next_fh += 1
        self.handles.add(fh)
        return pyfuse3.FileInfo(fh=fh)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:  # memoryview too (pyfuse3 takes any buffer)
        if off >= self.size or size <= 0:
            return b""
        size = min(size, self.size - off)
        idx, o = divmod(off, CHUNK)
        if o + size <= CHUNK:  # the common case: one chunk, no copy (memoryview slices)
            chunk = self.chunks.get(idx)
            return memoryview(chunk)[o:o + size] if chunk is not None else _ZEROS[o:o + size]  # type: ignore[return-value]
        out = bytearray(size)
        pos = 0
        while pos < size:
            idx, o = divmod(off + pos, CHUNK)
            n = min(CHUNK - o, size - pos)
            chunk = self.chunks.get(idx)
            if chunk is not None:
                out[pos:pos + n] = memoryview(chunk)[o:o + n]
            pos += n
        return out  # type: ignore[return-value]

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if off >= self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        total = min(len(buf), self.size - off)
        src = memoryview(buf)
        pos = 0
        while pos < total:
            idx, o = divmod(off + pos, CHUNK)
            n = min(CHUNK - o, total - pos)
            chunk = self.chunks.get(idx)
            if chunk is None:
                if n == CHUNK:
                    self.chunks[idx] = bytearray(src[pos:pos + n])
                    pos += n
                    continue
                chunk = self.chunks[idx] = bytearray(CHUNK)
            chunk[o:o + n] = src[pos:pos + n]
            pos += n
        self.mtime_ns = self.ctime_ns = time.time_ns()
        return total

    @handler
    async def flush(self, fh: int) -> None:
        pass

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        pass  # nothing is durable here; implemented so the kernel does not stop sending fsyncs

    @handler
    async def release(self, fh: int) -> None:
        self.handles.discard(fh)

    # ------------------------------------------------------------------ directory and filesystem

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return 0

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.fname, self._attrs(FILE_INODE), 1)

    @handler
    async def releasedir(self, fh: int) -> None:
        pass

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.size // 4096
        s.f_bfree = s.f_bavail = max(0, self.size - len(self.chunks) * CHUNK) // 4096
        s.f_files = 2
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s


# ---------------------------------------------------------------------- connection tuning


def connection_dir(mountpoint: str | os.PathLike[str]) -> Path | None:
    """``/sys/fs/fuse/connections/<minor>`` of a FUSE mount, from /proc/self/mountinfo.

    Reads mountinfo instead of calling stat() on the mount point: a FUSE daemon that stats its own
    mount from the trio thread waits for itself.
    """
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4].encode().decode("unicode_escape")  # \040 etc.
            if mnt == target:
                found = fields[2]  # the last entry wins: it is the top mount
    if found is None:
        return None
    major, minor = (int(x) for x in found.split(":"))
    return FUSECTL / str(major << 20 | minor)  # the kernel's dev_t encoding; FUSE mounts have major 0


def ensure_fusectl() -> bool:
    """Mount the fusectl filesystem at /sys/fs/fuse/connections if it is not (best effort)."""
    if os.path.ismount(FUSECTL):
        return True
    try:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], check=True,
                       capture_output=True, timeout=10)
        return True
    except (OSError, subprocess.SubprocessError) as e:
        logger.info("fusectl not mounted and mounting it failed: %s", e)
        return False


def tune_connection(mountpoint: str | os.PathLike[str], max_background: int = MAX_BACKGROUND) -> dict[str, int]:
    """Raise max_background and congestion_threshold (3/4 of it). Returns the values now in effect."""
    conn = connection_dir(mountpoint)
    if conn is None:
        raise OSError(errno.ENOENT, "mount not found in /proc/self/mountinfo", str(mountpoint))
    if not conn.is_dir():
        ensure_fusectl()
    (conn / "max_background").write_text(str(max_background))
    (conn / "congestion_threshold").write_text(str(max_background * 3 // 4))
    return {k: int((conn / k).read_text()) for k in ("max_background", "congestion_threshold")}


# ---------------------------------------------------------------------- main


async def _serve(ops: MemFS, mountpoint: str, max_background: int) -> None:
    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logger.info("%s: unmounting", signal.Signals(signum).name)
                pyfuse3.terminate()
                return

    async def tune() -> None:
        await ops.initialized.wait()
        await trio.sleep(0.05)  # let the INIT reply reach the kernel, which sets its own limits then
        if max_background > 0:
            try:
                vals = await trio.to_thread.run_sync(tune_connection, mountpoint, max_background)
                logger.info("connection tuned: %s", vals)
            except OSError as e:
                logger.warning("could not raise FUSE max_background: %s", e)
        logger.info("%s", READY)  # the bench harness waits for this line before measuring

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        nursery.start_soon(tune)
        await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m marsfs.testing.memfs", description=__doc__.splitlines()[0])
    p.add_argument("--mount", required=True, type=Path, metavar="DIR")
    p.add_argument("--name", default="vol", help="the image appears as NAME.img (default vol)")
    p.add_argument("--size", default="4G", help="image size, like 4G or 512M (default 4G)")
    p.add_argument("--max-background", type=int, default=MAX_BACKGROUND,
                   help=f"FUSE max_background after mount (default {MAX_BACKGROUND}; 0 keeps the kernel's)")
    p.add_argument("--no-writeback-cache", action="store_true", help="mount without the writeback cache")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        size = parse_size(args.size)
    except ValueError as e:
        p.error(str(e))
    ops = MemFS(args.name, size)
    if args.no_writeback_cache:
        ops.enable_writeback_cache = False  # instance attribute shadows the class default
    options = set(pyfuse3.default_options) | {"fsname=marsfs-memfs", "subtype=marsfs-memfs"}
    mountpoint = os.fspath(args.mount.resolve())
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as e:
        print(f"memfs: mounting at {mountpoint} failed: {e}", file=sys.stderr)
        return 1
    try:
        logger.info("serving %s (%d bytes) at %s", ops.fname.decode(), size, mountpoint)
        trio.run(_serve, ops, mountpoint, args.max_background)
    finally:
        pyfuse3.close(unmount=True)  # a baseline leaves nothing behind, even after a crash
    logger.info("unmounted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
