"""The pyfuse3 Operations called in-process on a real Node: no kernel, no mount, no root.

What the kernel would send is called directly (``await ops.lookup(...)``); the two calls that
need a live FUSE session (readdir_reply, invalidate_entry_async) are replaced per test.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

import pyfuse3
import pytest

from marsfs.errors import LogFailed, NoSpace
from marsfs.faces.fuse import INLINE_MAX, Operations
from marsfs.node import Node
from marsfs.node.state import ReplicationMode, SyncState
from marsfs.node.syncmode import ModeSetting
from marsfs.testing.checks import make_mirror, setattr_fields
from marsfs.testing.runner import run

MiB = 1 << 20

#: the shared in-process node (conftest) has a volume ``v``
pytestmark = pytest.mark.volumes(v=MiB)


def fuse_errno(excinfo: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return int(excinfo.value.errno)


async def lookup(ops: Operations, name: str = "v.img") -> int:
    return int((await ops.lookup(pyfuse3.ROOT_INODE, name.encode(), None)).st_ino)


def test_a_small_write_that_would_rotate_the_log_runs_in_a_worker_thread(node: Node,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The trio thread serves every request: it must not wait for the fdatasync of a rotation."""
    import threading

    ops = Operations(node)
    vol = node.volume("v")
    threads: list[bool] = []
    real = vol.write

    def write(offset: int, data: bytes) -> int:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(offset, data)

    async def main() -> None:
        fi = await ops.open(await lookup(ops), os.O_RDWR, None)
        try:
            monkeypatch.setattr(vol, "write", write)
            await ops.write(fi.fh, 0, b"x" * 4096)
            monkeypatch.setattr(vol, "write_blocks", lambda n: True)
            await ops.write(fi.fh, 4096, b"y" * 4096)
        finally:
            await ops.release(fi.fh)

    run(main)
    assert threads == [True, False]
    assert vol.read(0, 8192) == b"x" * 4096 + b"y" * 4096


def test_read_write_fsync_release(node: Node) -> None:
    ops = Operations(node)

    async def main() -> None:
        ino = await lookup(ops)
        attrs = await ops.getattr(ino, None)
        assert attrs.st_size == MiB and stat.S_ISREG(attrs.st_mode) and attrs.st_mode & 0o777 == 0o600
        fi = await ops.open(ino, os.O_RDWR, None)
        assert node.opens["v"] == 1
        assert await ops.write(fi.fh, 4096, b"a" * 4096) == 4096
        big = os.urandom(INLINE_MAX + 4096)  # through a worker thread
        assert await ops.write(fi.fh, 65536, big) == len(big)
        assert await ops.read(fi.fh, 4096, 4096) == b"a" * 4096
        assert await ops.read(fi.fh, 65536, len(big)) == big
        assert await ops.read(fi.fh, 0, 4096) == bytes(4096)
        assert await ops.read(fi.fh, MiB, 4096) == b""  # at the end: EOF
        assert await ops.read(fi.fh, MiB - 512, 4096) == bytes(512)  # across the end: short
        vol = node.volume("v")
        assert vol.needs_flush
        await ops.fsync(fi.fh, False)
        assert not vol.needs_flush and vol.durable_lsn == vol.head_lsn
        await ops.fsync(fi.fh, True)  # nothing new: nothing to do
        await ops.flush(fi.fh)
        await ops.release(fi.fh)
        assert node.opens["v"] == 0
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.read(fi.fh, 0, 512)
        assert fuse_errno(e) == errno.EBADF

    run(main, autojump=None)


def test_writes_past_the_end_are_refused_whole(node: Node) -> None:
    ops = Operations(node)

    async def main() -> None:
        fi = await ops.open(await lookup(ops), os.O_WRONLY, None)
        for off in (MiB, MiB - 2048):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.write(fi.fh, off, b"x" * 4096)
            assert fuse_errno(e) == errno.ENOSPC
        assert node.volume("v").read(MiB - 4096, 4096) == bytes(4096)
        await ops.release(fi.fh)

    run(main, autojump=None)


@pytest.mark.allow_log("refused O_TRUNC open", "refused to change the size")
def test_size_cannot_change(node: Node) -> None:
    ops = Operations(node)

    async def main() -> None:
        ino = await lookup(ops)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(ino, os.O_RDWR | os.O_TRUNC, None)
        assert fuse_errno(e) == errno.EPERM and node.opens["v"] == 0
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 4096
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.setattr(ino, attr, setattr_fields(size=True), None, None)
        assert fuse_errno(e) == errno.EPERM
        attr.st_size = MiB  # the same size: nothing changes
        assert (await ops.setattr(ino, attr, setattr_fields(size=True), None, None)).st_size == MiB
        for what in ("mode", "uid", "gid"):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.setattr(ino, attr, setattr_fields(**{what: True}), None, None)
            assert fuse_errno(e) == errno.EPERM
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.setattr(pyfuse3.ROOT_INODE, attr, setattr_fields(mtime=True), None, None)
        assert fuse_errno(e) == errno.EPERM
        attr.st_mtime_ns = 123_000_000_000  # mtime-only SETATTR from the writeback cache: accepted
        assert (await ops.setattr(ino, attr, setattr_fields(mtime=True), None, None)).st_mtime_ns == 123_000_000_000
        assert (await ops.getattr(ino, None)).st_mtime_ns == 123_000_000_000

    run(main, autojump=None)


def test_mirror_image_is_read_only_and_pinned(node: Node) -> None:
    vol = node.volume("v")
    vol.write(0, b"1" * 512)
    vol.flush()
    make_mirror(node, "v")
    ops = Operations(node)

    async def main() -> None:
        ino = await lookup(ops)
        attrs = await ops.getattr(ino, None)
        assert attrs.st_mode & 0o777 == 0o400 and attrs.entry_timeout == 0
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.open(ino, flags, None)
            assert fuse_errno(e) == errno.EROFS
        attr = pyfuse3.EntryAttributes()
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.setattr(ino, attr, setattr_fields(mtime=True), None, None)
        assert fuse_errno(e) == errno.EROFS
        fi = await ops.open(ino, os.O_RDONLY, None)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.write(fi.fh, 0, b"x" * 512)
        assert fuse_errno(e) == errno.EBADF
        # replay goes on: the open file keeps its version, a new lookup sees the new one
        vol.write(0, b"2" * 512)
        vol.flush()
        vol.replay_limit = vol.head_lsn
        assert await ops.read(fi.fh, 0, 512) == b"1" * 512
        ino2 = await lookup(ops)
        assert ino2 != ino
        fi2 = await ops.open(ino2, os.O_RDONLY, None)
        assert await ops.read(fi2.fh, 0, 512) == b"2" * 512
        await ops.fsync(fi2.fh, False)  # fsync of a version: nothing to do
        await ops.release(fi.fh)
        await ops.release(fi2.fh)
        assert node.opens["v"] == 0
        await ops.forget([(ino, 1)])
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getattr(ino, None)
        assert fuse_errno(e) == errno.ENOENT
        assert (await ops.getattr(ino2, None)).st_ino == ino2

    run(main, autojump=None)


def test_names_readdir_and_deleted_volumes(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    node.create("w", 2 * MiB)
    ops = Operations(node)
    replies: list[tuple[bytes, int, int]] = []
    invalidated: list[bytes] = []

    def reply(token: Any, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if len(replies) >= token:
            return False  # the kernel's buffer is full
        replies.append((name, attrs.st_ino, next_id))
        return True

    monkeypatch.setattr(ops, "_readdir_reply", reply)
    monkeypatch.setattr(ops, "_invalidate_entry", invalidated.append)

    async def main() -> None:
        for name in (b"nope.img", b"v", b"v.img/x"):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.lookup(pyfuse3.ROOT_INODE, name, None)
            assert fuse_errno(e) == errno.ENOENT
        assert (await ops.lookup(pyfuse3.ROOT_INODE, b"..", None)).st_ino == pyfuse3.ROOT_INODE
        assert await ops.opendir(pyfuse3.ROOT_INODE, None) == pyfuse3.ROOT_INODE
        await ops.readdir(pyfuse3.ROOT_INODE, 0, 1)  # room for one entry
        await ops.readdir(pyfuse3.ROOT_INODE, replies[-1][2], 5)
        assert [(n, i) for n, _, i in replies] == [(b"v.img", 1), (b"w.img", 2)]
        v_ino = replies[0][1]
        assert ops.namespace.lookups(v_ino) == 1  # readdirplus counts as a lookup
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.opendir(v_ino, None)
        assert fuse_errno(e) == errno.ENOTDIR
        node.delete("w")
        ops.forget_volume("w")
        assert invalidated == [b"w.img"]
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getattr(replies[1][1], None)
        assert fuse_errno(e) == errno.ENOENT
        root = await ops.getattr(pyfuse3.ROOT_INODE, None)
        assert stat.S_ISDIR(root.st_mode)
        st = await ops.statfs(None)
        assert st.f_blocks == os.statvfs(node.state).f_blocks

    run(main, autojump=None)


@pytest.mark.allow_log("refused to unlink")
def test_the_tree_cannot_change(node: Node) -> None:
    ops = Operations(node)

    async def main() -> None:
        calls = [ops.unlink(pyfuse3.ROOT_INODE, b"v.img", None),
                 ops.create(pyfuse3.ROOT_INODE, b"new.img", 0o600, os.O_RDWR, None),
                 ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o755, None),
                 ops.rename(pyfuse3.ROOT_INODE, b"v.img", pyfuse3.ROOT_INODE, b"x.img", 0, None)]
        for call in calls:
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call
            assert fuse_errno(e) == errno.EPERM

    run(main, autojump=None)


@pytest.mark.allow_log(r"write: the disk is full", r"fsync: log failed", r"unexpected error in FUSE handler read")
def test_errors_reach_the_kernel_as_their_errno(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = Operations(node)
    vol = node.volume("v")

    def full(*args: Any) -> Any:
        raise NoSpace("the disk is full")

    def failed(*args: Any) -> Any:
        raise LogFailed("log failed")

    def bug(*args: Any) -> Any:
        raise RuntimeError("a bug")

    async def main() -> None:
        fi = await ops.open(await lookup(ops), os.O_RDWR, None)
        monkeypatch.setattr(vol, "write", full)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.write(fi.fh, 0, b"x" * 512)
        assert fuse_errno(e) == errno.ENOSPC  # NoSpace's errno
        monkeypatch.undo()
        await ops.write(fi.fh, 0, b"x" * 512)
        monkeypatch.setattr(vol, "flush_lead", failed)  # what an fsync calls first (Volume.flush_lead)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.fsync(fi.fh, False)
        assert fuse_errno(e) == errno.EIO  # LogFailed keeps MarsError's EIO
        monkeypatch.setattr(vol, "read", bug)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.read(fi.fh, 0, 512)
        assert fuse_errno(e) == errno.EIO  # anything else: EIO, logged with its traceback
        monkeypatch.undo()
        await ops.release(fi.fh)

    run(main, autojump=None)


@pytest.mark.allow_log(r"syncmode WARNING: volume [sr]: sync degraded to async since")
def test_fsync_of_a_sync_volume_without_mirrors_degrades_once_or_refuses(node: Node) -> None:
    """No mirror acknowledges: the first fsync waits the timeout and the volume degrades, later
    ones do not wait; with --refuse each fails with EIO, said once in the log (at the
    degradation), not as a warning per fsync."""
    node.create("s", MiB, mode=ModeSetting(ReplicationMode.SYNC, timeout=0.5))
    node.create("r", MiB, mode=ModeSetting(ReplicationMode.SYNC, timeout=0.5, refuse=True))
    ops = Operations(node)

    async def main() -> None:
        for name in ("s", "r"):
            fi = await ops.open(await lookup(ops, f"{name}.img"), os.O_RDWR, None)
            for i in range(3):
                await ops.write(fi.fh, i * 4096, b"x" * 4096)
                if name == "s":
                    await ops.fsync(fi.fh, False)
                else:
                    with pytest.raises(pyfuse3.FUSEError) as e:
                        await ops.fsync(fi.fh, False)
                    assert fuse_errno(e) == errno.EIO
            sync = node.sync.status(node.volume(name))
            assert sync is not None and sync.state is SyncState.DEGRADED and sync.degradations == 1
            await ops.release(fi.fh)

    run(main, autojump=None)
