"""``.versions/<vol>/`` through the pyfuse3 Operations in-process, and the node's history window.

No kernel and no root: what the kernel would send is called directly; readdir_reply is replaced.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from marsfs.faces.fuse import Operations
from marsfs.faces.namespace import EntryKind
from marsfs.node import Node
from marsfs.node.status import node_rows
from marsfs.testing.checks import make_mirror
from marsfs.testing.runner import run
from marsfs.volume import Retention, Volume
from marsfs.volume.versions import format_time_ns

KiB = 1 << 10
S = 10**9
ROOT = pyfuse3.ROOT_INODE

#: the shared in-process node (conftest) has a volume ``v``
pytestmark = pytest.mark.volumes(v=1 << 20)


def rounds(vol: Volume, n: int, at: int = 0) -> list[tuple[int, int, bytes]]:
    """n rounds of one 4 KiB write at ``at`` + flush: (flush LSN, its timestamp, the block)."""
    out = []
    for _ in range(n):
        data = os.urandom(4 * KiB)
        vol.write(at, data)
        lsn = vol.flush()
        out.append((lsn, vol.log.info(lsn).timestamp_ns, data))
    return out


async def look(ops: Operations, parent: int, name: str) -> pyfuse3.EntryAttributes:
    return await ops.lookup(parent, name.encode(), None)


async def version_dir(ops: Operations, vol: str = "v") -> int:
    versions = await look(ops, ROOT, ".versions")
    assert stat.S_ISDIR(versions.st_mode)
    d = await look(ops, versions.st_ino, vol)
    assert stat.S_ISDIR(d.st_mode) and d.st_mode & 0o222 == 0
    return int(d.st_ino)


def capture_readdir(ops: Operations, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The names readdir replies with, collected instead of sent to a kernel."""
    replies: list[bytes] = []

    def reply(token: Any, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        replies.append(name)
        return True

    monkeypatch.setattr(ops, "_readdir_reply", reply)
    return replies


async def enoent(call: Awaitable[Any]) -> None:
    with pytest.raises(pyfuse3.FUSEError) as e:
        await call
    assert e.value.errno == errno.ENOENT


def test_every_name_form_opens_read_only_and_reads_its_version(node: Node) -> None:
    vol = node.volume("v")
    done = rounds(vol, 5)
    mark = vol.mark("good")
    vol.write(0, b"z" * 4096)  # the live image moves on
    ops = Operations(node)

    async def main() -> None:
        d = await version_dir(ops)
        lsn, ts, data = done[2]
        by_lsn = await look(ops, d, f"lsn-{lsn}.img")
        by_time = await look(ops, d, format_time_ns(ts) + ".img")
        by_second = await look(ops, d, format_time_ns(ts + 1)[:-1] + "+00:00.img")
        assert by_lsn.st_ino == by_time.st_ino == by_second.st_ino  # one inode per (volume, LSN)
        assert by_lsn.entry_timeout > 0 and by_time.entry_timeout == 0  # a time may name a newer flush later
        assert by_lsn.st_mode & 0o777 == 0o400 and by_lsn.st_size == 1 << 20 and by_lsn.st_mtime_ns == ts
        by_mark = await look(ops, d, "good.img")
        assert ops.namespace.entry(by_mark.st_ino) == ops.namespace.entry(by_mark.st_ino)
        entry = ops.namespace.entry(by_mark.st_ino)
        assert entry is not None and entry.kind is EntryKind.VERSION and entry.version == mark
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.open(by_lsn.st_ino, flags, None)
            assert e.value.errno == errno.EROFS
        fi = await ops.open(by_lsn.st_ino, os.O_RDONLY, None)
        assert await ops.read(fi.fh, 0, 4096) == data
        fm = await ops.open(by_mark.st_ino, os.O_RDONLY, None)
        assert await ops.read(fm.fh, 0, 4096) == done[-1][2]
        for name in ("lsn-999.img", "nope.img", "lsn-1", "1999-01-01T00:00:00Z.img", "good"):
            await enoent(look(ops, d, name))
        await enoent(look(ops, ROOT, "x"))
        await ops.release(fi.fh)
        await ops.release(fm.fh)
        assert node.opens["v"] == 0 and not vol.open_versions

    run(main, autojump=None)


def test_versions_root_lists_volumes_and_is_hidden_from_the_root(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    node.create("w", 1 << 20)
    ops = Operations(node)
    replies = capture_readdir(ops, monkeypatch)

    async def main() -> None:
        await ops.readdir(await ops.opendir(ROOT, None), 0, None)
        assert replies == [b"v.img", b"w.img"]  # .versions is looked up, not listed
        versions = await look(ops, ROOT, ".versions")
        fh = await ops.opendir(versions.st_ino, None)
        replies.clear()
        await ops.readdir(fh, 0, None)
        await ops.releasedir(fh)
        assert replies == [b"v", b"w"]
        assert (await look(ops, versions.st_ino, "..")).st_ino == ROOT
        await enoent(look(ops, versions.st_ino, "nope"))
        d = await look(ops, versions.st_ino, "w")
        assert (await look(ops, d.st_ino, "..")).st_ino == versions.st_ino
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(d.st_ino, os.O_RDONLY, None)
        assert e.value.errno == errno.EISDIR
        node.delete("w")
        ops.forget_volume("w")
        await enoent(ops.getattr(d.st_ino, None))

    run(main, autojump=None)


def test_listing_is_a_bounded_snapshot(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = node.volume("v")
    for i in range(150):
        vol.write(0, b"x" * 512)
        vol.flush()
        if i in (3, 140):
            vol.mark(f"m{i}")
    ops = Operations(node)
    replies: list[tuple[bytes, int]] = []

    def reply(token: Any, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if len(replies) >= token:
            return False
        replies.append((name, next_id))
        return True

    monkeypatch.setattr(ops, "_readdir_reply", reply)

    async def main() -> None:
        d = await version_dir(ops)
        fh = await ops.opendir(d, None)
        await ops.readdir(fh, 0, 30)
        vol.write(0, b"y" * 512)  # a new flush point between readdir calls: the listing is a snapshot
        vol.flush()
        await ops.readdir(fh, replies[-1][1], 1000)
        await ops.releasedir(fh)
        names = [n.decode() for n, _ in replies]
        flushes = vol.log.flush_points()[:-1]  # those of the snapshot
        hours = {ts // (3600 * S) for _, ts in flushes[:-100]}  # one, unless the test ran across an hour
        assert len(names) == len(set(names)) == 100 + len(hours) + 2  # the newest 100, one per hour, marks
        assert "m3.img" in names and "m140.img" in names
        flush_lsns = [lsn for lsn, _ in flushes]
        assert f"lsn-{flush_lsns[-1]}.img" in names and f"lsn-{vol.head_lsn}.img" not in names
        assert f"lsn-{flush_lsns[-101]}.img" in names and f"lsn-{flush_lsns[0]}.img" not in names
        n = await look(ops, d, names[0])  # every listed name looks up
        assert n.st_ino

    run(main, autojump=None)


@pytest.mark.allow_log(r"open: version lsn-\d+ of volume v is not retained")
def test_opens_share_one_index_and_writeback_waits_for_them(node: Node) -> None:
    vol = node.volume("v")
    done = rounds(vol, 10)
    ops = Operations(node)

    async def main() -> None:
        d = await version_dir(ops)
        lsn, _, data = done[1]
        ino = (await look(ops, d, f"lsn-{lsn}.img")).st_ino
        a = await ops.open(ino, os.O_RDONLY, None)
        b = await ops.open(ino, os.O_RDONLY, None)
        assert vol.open_versions.builds == 1 and vol.open_versions.views(lsn) == 2
        node.history = Retention(keep_bytes=0)  # the window wants everything written back
        await trio.to_thread.run_sync(node.maintain)
        assert vol.applied_lsn == lsn  # held at the open version
        assert await ops.read(b.fh, 0, 4096) == data
        await ops.release(a.fh)
        assert await ops.read(b.fh, 0, 4096) == data
        await ops.release(b.fh)
        assert vol.open_versions.shared() == {}
        await trio.to_thread.run_sync(node.maintain)
        assert vol.applied_lsn == vol.head_lsn
        await enoent(ops.open(ino, os.O_RDONLY, None))  # fell out of the window while cached
        await enoent(look(ops, d, f"lsn-{lsn}.img"))

    run(main, autojump=None)


def test_mirror_versions_stop_at_replay(node: Node) -> None:
    vol = node.volume("v")
    done = rounds(vol, 4)
    make_mirror(node, "v")
    vol.replay_limit = done[1][0]
    ops = Operations(node)

    async def main() -> None:
        d = await version_dir(ops)
        assert (await look(ops, d, f"lsn-{done[1][0]}.img")).st_ino
        await enoent(look(ops, d, f"lsn-{done[2][0]}.img"))
        got = await look(ops, d, format_time_ns(done[3][1]) + ".img")  # newest flush the mirror replayed
        entry = ops.namespace.entry(got.st_ino)
        assert entry is not None and entry.version == done[1][0]

    run(main, autojump=None)


def test_node_window_by_time_and_bytes_and_per_volume(node: Node, tmp_path: Path) -> None:
    vol = node.volume("v")
    done = rounds(vol, 30)
    node.history = Retention(None, 3600)
    node.maintain(now_ns=done[9][1] + 3600 * S)  # one hour after the tenth flush
    assert vol.applied_lsn == vol.oldest_version_lsn == done[9][0]
    node.history = Retention(vol.log.bytes_between(done[19][0], vol.head_lsn), 3600)
    node.maintain(now_ns=done[9][1] + 3600 * S)
    assert vol.applied_lsn == done[9][0]  # inside the time limit: kept although past the bytes
    node.maintain(now_ns=done[29][1] + 7200 * S)
    assert vol.applied_lsn == done[19][0]  # past the time limit: the bytes limit still keeps these
    row = node_rows(node, "v")[0]
    assert row["oldest_version_lsn"] == done[19][0] and row["oldest_version_ns"] == done[19][1]
    assert row["history"] == f"{row['history'].split(' or ')[0]} or 1h"
    node.set_history("v", Retention(None, 60))
    assert node.history_of("v") == Retention(None, 60)
    node.close()
    again = Node.open(tmp_path / "state", "n1")
    try:
        assert again.history_of("v") == Retention(None, 60)
        assert again.volume("v").oldest_version_timestamp_ns == done[19][1]
        again.maintain(now_ns=done[25][1] + 60 * S)
        assert again.volume("v").applied_lsn == done[25][0]
        again.set_history("v", None)
        assert again.history_of("v") == again.history
    finally:
        again.close()


def test_serve_history_flags_and_toml(tmp_path: Path) -> None:
    from marsfs.cli import build_parser
    from marsfs.errors import UsageError
    from marsfs.faces.config import load_config

    base: dict[str, Any] = {"node": "n", "state": "/s", "mount": "/m", "listen": None, "peer": [], "cluster": None}
    args = build_parser().parse_args(["serve", "--history", "10G", "--history", "24h"])
    assert load_config(None, {**base, "history": args.history}).history == Retention(10 << 30, 86400)
    assert load_config(None, {**base, "history": ["10G,24h"]}).history == Retention(10 << 30, 86400)
    assert load_config(None, {**base, "history": None}).history == Retention()
    conf = tmp_path / "c.toml"
    conf.write_text('history = ["1h", "2G"]\n')
    assert load_config(conf, {**base, "history": None}).history == Retention(2 << 30, 3600)
    conf.write_text('history = "90min"\n')
    assert load_config(conf, {**base, "history": None}).history == Retention(None, 5400)
    with pytest.raises(UsageError, match="--history: .*two durations"):
        load_config(None, {**base, "history": ["1h", "2h"]})


def test_a_split_version_is_listed_opens_read_only_and_reads_its_file(node: Node,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from marsfs.volume.splits import save_split

    vol = node.volume("v")
    vol.write(0, b"s" * 8192)
    vol.flush()
    image = vol.read(0, vol.size)
    save_split(vol.path, "b", 3, vol.head_lsn, vol.log.last_chain, vol.size, vol.read)
    vol.write(0, b"n" * 4096)  # the volume moves on; the split version does not
    ops = Operations(node)
    replies = capture_readdir(ops, monkeypatch)

    async def main() -> None:
        d = await version_dir(ops)
        fh = await ops.opendir(d, None)
        await ops.readdir(fh, 0, None)
        await ops.releasedir(fh)
        assert b"split-b-3.img" in replies
        a = await look(ops, d, "split-b-3.img")
        assert a.st_size == vol.size and a.st_mode & 0o777 == 0o400
        assert ops.namespace.entry(a.st_ino) == ops.namespace.entry((await look(ops, d, "split-b-3.img")).st_ino)
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.open(a.st_ino, flags, None)
            assert e.value.errno == errno.EROFS
        fi = await ops.open(a.st_ino, os.O_RDONLY, None)
        assert await ops.read(fi.fh, 0, vol.size) == image
        await ops.release(fi.fh)
        for name in ("split-b-4.img", "split-c-3.img"):
            await enoent(look(ops, d, name))
        assert node.opens["v"] == 0

    run(main, autojump=None)


def test_status_says_how_far_writeback_goes(node: Node) -> None:
    vol = node.volume("v")
    done = rounds(vol, 10)
    node.history = Retention(vol.log.bytes_between(done[4][0], vol.head_lsn))
    row = node_rows(node, "v")[0]
    assert row["writeback_target_lsn"] == done[4][0] > row["applied_lsn"]  # not caught up yet
    node.maintain()
    row = node_rows(node, "v")[0]
    assert row["applied_lsn"] == row["writeback_target_lsn"] == done[4][0]  # caught up
    node.history = Retention(keep_bytes=0)
    assert node_rows(node, "v")[0]["writeback_target_lsn"] == vol.durable_lsn == vol.head_lsn


@pytest.mark.allow_log("the kernel refused AIO for fdatasync")
def test_status_says_when_fsync_runs_without_aio(node: Node) -> None:
    vol = node.volume("v")
    assert node_rows(node, "v")[0]["fsync_aio_refused"] is None
    vol.log.no_aio("io_submit: Operation not permitted")
    assert node_rows(node, "v")[0]["fsync_aio_refused"] == "io_submit: Operation not permitted"


def test_a_mirror_writes_back_no_further_than_it_replayed(node: Node) -> None:
    vol = node.volume("v")
    done = rounds(vol, 4)
    make_mirror(node, "v")
    vol.replay_limit = done[1][0]
    node.history = Retention(keep_bytes=0)
    assert node_rows(node, "v")[0]["writeback_target_lsn"] == done[1][0] < vol.durable_lsn
    node.maintain()
    row = node_rows(node, "v")[0]
    assert row["applied_lsn"] == row["writeback_target_lsn"] == done[1][0]
