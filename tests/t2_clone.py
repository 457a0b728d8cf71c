"""Clones through the node, the command table and the FUSE operations, in-process: status,
refusals, the pin across maintenance and restarts, a clone with its own copy (it pins nothing
and outlives its source), a detached clone, the read-write image; a clone of a split version
and ``discard``."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from marsfs import cli
from marsfs.errors import InvalidRequest, StateError, UsageError, VersionNotFound, VolumeBusy, VolumeExists, WrongRole
from marsfs.faces.commands import COMMANDS, Context, dispatch, run, status_table
from marsfs.faces.fuse import Operations
from marsfs.node import Node
from marsfs.node.cluster import Cluster
from marsfs.node.status import node_rows
from marsfs.testing.checks import make_mirror
from marsfs.units import human_bytes
from marsfs.volume import Retention
from marsfs.volume.splits import SplitInfo, save_split

KiB = 1 << 10
MiB = 1 << 20
ROOT = pyfuse3.ROOT_INODE


@pytest.fixture
def node(node: Node) -> Node:
    """The shared in-process node (conftest), with a volume ``v``."""
    node.create("v", MiB)
    return node


def _history(node: Node, blocks: int = 3) -> list[int]:
    """``blocks`` rounds of a 4 KiB block of byte i+1 at block i, each flushed and marked ``m<i>``."""
    vol = node.volume("v")
    marks = []
    for i in range(blocks):
        vol.write(i * 4 * KiB, bytes([i + 1]) * 4 * KiB)
        marks.append(node.mark("v", f"m{i}"))
    return marks


def _blocks(i: int) -> bytes:
    """What blocks 0..3 hold at mark m<i>."""
    return b"".join(bytes([k + 1 if k <= i else 0]) * 4 * KiB for k in range(4))


def with_daemon(node: Node, body: Any) -> None:
    async def main() -> None:
        cluster = Cluster(node, listen=None, peers={})
        ctx = Context(node, cluster, Path("/mnt/marsfs"), lambda name: None)
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run)
            await body(ctx, cluster)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_clone_command_status_and_delete(node: Node) -> None:
    marks = _history(node)

    async def body(ctx: Context, cluster: Cluster) -> None:
        row = await dispatch(ctx, "clone", {"version": "v@m1", "volume": "c"})
        assert (row["volume"], row["role"], row["state"], row["clone_of"]) == ("c", "clone", "up", f"v@lsn-{marks[1]}")
        assert row["image"] == "/mnt/marsfs/c.img" and row["clones"] == []
        json.dumps(row)
        await dispatch(ctx, "clone", {"version": f"v@lsn-{marks[0]}", "volume": "b"})
        src = (await dispatch(ctx, "status", {"volume": "v"}))[0]
        assert src["clones"] == [{"name": "b", "lsn": marks[0]}, {"name": "c", "lsn": marks[1]}]
        assert src["clone_of"] is None and src["role"] == "primary"
        assert node.volume("c").read(0, 16 * KiB) == _blocks(1)
        assert node.volume("b").read(0, 16 * KiB) == _blocks(0)
        for force in (False, True):
            with pytest.raises(VolumeBusy, match=r"has clones \(b, c\) that read from it; delete them first"):
                await dispatch(ctx, "delete", {"volume": "v", "force": force})
        await dispatch(ctx, "mark", {"volume": "c", "name": "mine"})  # a clone is its own primary
        assert await dispatch(ctx, "delete", {"volume": "c"}) == {"deleted": "c"}
        assert await dispatch(ctx, "delete", {"volume": "b"}) == {"deleted": "b"}
        assert not node.volume("v").open_versions
        assert await dispatch(ctx, "delete", {"volume": "v"}) == {"deleted": "v"}

    with_daemon(node, body)


@pytest.mark.parametrize("version,name,exc,match", [
    ("v@m1", "v", VolumeExists, "already exists"),
    ("v@m1", "e", VolumeExists, "already exists"),
    ("v@nope", "c", VersionNotFound, "no version 'nope'"),
    ("v@lsn-999", "c", VersionNotFound, r"not retained; available: lsn-\d+ to lsn-\d+"),
    ("nope@m1", "c", Exception, "no volume 'nope'"),
    ("v", "c", UsageError, "give VOL@VERSION"),
    ("v@", "c", UsageError, "give VOL@VERSION"),
    ("v@m1", "../c", InvalidRequest, "invalid volume name"),
    ("../v@m1", "c", InvalidRequest, "invalid volume name"),
])
def test_refusals(node: Node, version: str, name: str, exc: type[Exception], match: str) -> None:
    _history(node)
    node.create("e", MiB)

    async def body(ctx: Context, cluster: Cluster) -> None:
        with pytest.raises(exc, match=match):
            await dispatch(ctx, "clone", {"version": version, "volume": name})
        assert sorted(node.volumes) == ["e", "v"] and not node.volume("v").open_versions

    with_daemon(node, body)


def test_outside_the_window_names_the_oldest(node: Node) -> None:
    marks = _history(node)
    node.history = Retention(keep_bytes=0)
    node.maintain()
    vol = node.volume("v")
    with pytest.raises(VersionNotFound, match=f"available: lsn-{vol.oldest_version_lsn} to"):
        node.clone("v", "m0", "c")
    assert vol.oldest_version_lsn == marks[-1]


def test_clone_of_a_clone_and_join_and_leave_are_refused(node: Node) -> None:
    _history(node)
    node.create("m", MiB)
    node.volume("m").write(0, b"m" * 512)
    node.volume("m").flush()
    make_mirror(node, "m")
    node.clone("v", "m1", "c")

    async def body(ctx: Context, cluster: Cluster) -> None:
        with pytest.raises(InvalidRequest, match="a clone of a clone is not supported yet"):
            await dispatch(ctx, "clone", {"version": "c@lsn-0", "volume": "cc"})
        assert cluster.servable("c") is None  # peers cannot join a clone: clones are local
        assert cluster.servable("v") is node.volume("v")
        await dispatch(ctx, "clone", {"version": "m@lsn-2", "volume": "mc"})  # a mirror's version
        with pytest.raises(VolumeBusy, match=r"has clones \(mc\)"):
            await dispatch(ctx, "leave", {"volume": "m"})
        assert node.is_mirror("m") and "m" in node.volumes
        with pytest.raises(WrongRole, match="not a mirror"):
            await dispatch(ctx, "leave", {"volume": "c"})

    with_daemon(node, body)


def test_the_pin_holds_through_maintenance_and_restarts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node = Node.open(state, "n1")
    node.create("v", MiB)
    marks = _history(node, 4)
    node.clone("v", "m1", "c")
    node.volume("c").write(12 * KiB, b"c" * 4 * KiB)
    node.history = Retention(keep_bytes=0)  # the window wants everything written back
    node.maintain()
    assert node.volume("v").applied_lsn == marks[1]
    node.close()
    for _ in range(2):  # the pin comes back before anything could write back
        node = Node.open(state, "n1", history=Retention(keep_bytes=0))
        try:
            assert node.volume("v").open_versions.views(marks[1]) == 1
            node.maintain()
            assert node.volume("v").applied_lsn == marks[1]
            assert node.role("c").is_clone and not node.volume("c").errors
            assert node.volume("c").read(512, 16 * KiB - 512) == _blocks(1)[512 : 12 * KiB] + b"c" * 4 * KiB
            node.volume("c").write(0, b"w" * 512)  # still writable
            assert node.volume("c").read(0, 513) == b"w" * 512 + b"\x01"
            node.volume("c").flush()
        finally:
            node.close()
    node = Node.open(state, "n1", history=Retention(keep_bytes=0))
    try:
        node.delete("c")
        node.maintain()
        assert node.volume("v").applied_lsn == node.volume("v").durable_lsn
    finally:
        node.close()


def test_a_clone_with_its_own_copy_holds_nothing_and_outlives_its_source(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node = Node.open(state, "n1", history=Retention(keep_bytes=0))
    node.create("v", MiB)
    marks = _history(node, 4)
    node.clone("v", "m1", "c")
    node.volume("c").write(12 * KiB, b"c" * 4 * KiB)
    want = node.volume("c").read(0, MiB)
    node.volume("c").own_copy()  # what a resync of v has every clone do before it switches
    try:
        assert node.clones_of("v") == [] and node.volume("v").open_versions.views(marks[1]) == 0
        node.maintain()
        assert node.volume("v").applied_lsn == node.volume("v").durable_lsn  # nothing pins v
        assert node.volume("c").read(0, MiB) == want
        node.delete("v")  # no clone reads from it
    finally:
        node.close()
    node = Node.open(state, "n1")
    try:
        row = {r["volume"]: r for r in node_rows(node)}["c"]
        assert (row["state"], row["errors"], row["clone_of"]) == ("up", [], f"v@lsn-{marks[1]}")
        assert node.volume("c").read(0, MiB) == want
        node.volume("c").write(0, b"w" * 512)
        assert node.volume("c").read(0, 513) == b"w" * 512 + want[512:513]
    finally:
        node.close()


@pytest.mark.allow_log("clone c: volume v on this node is not the volume it was cloned from",
                       "clone [cd]: its source volume (v|gone) is not on this node")
def test_a_clone_whose_source_changed_starts_detached_and_can_be_deleted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node = Node.open(state, "n1")
    node.create("v", MiB)
    node.create("gone", MiB)
    _history(node)
    node.clone("v", "m1", "c")
    node.clone("gone", "lsn-0", "d")
    node.close()
    shutil.rmtree(state / "volumes" / "gone")
    shutil.rmtree(state / "volumes" / "v")  # another volume v takes the name
    node = Node.open(state, "n1")
    try:
        node.create("v", MiB)
        node.close()
        node = Node.open(state, "n1")
        rows = {r["volume"]: r for r in node_rows(node)}
        assert rows["c"]["state"] == "failed" and rows["d"]["state"] == "failed"
        assert rows["c"]["errors"] == [f"clone c: volume v on this node is not the volume it was cloned from "
                                       f"(uuid {node.volume('v').uuid}, not {node.volume('c').clone_of.source_uuid}); "  # type: ignore[union-attr]
                                       "delete the clone: marsfs delete c"]
        assert rows["v"]["clones"] == []  # another volume of that name holds nothing for c
        node.delete("v")
        node.create("v", MiB)
        with pytest.raises(StateError, match="detached"):
            node.volume("c").read(0, 512)
        node.delete("c")
        node.delete("d")
    finally:
        node.close()


def test_a_crash_between_volume_and_role_record_still_makes_a_clone(node: Node, tmp_path: Path) -> None:
    _history(node)
    node.clone("v", "m0", "c")
    (tmp_path / "state" / "volumes" / "c" / "role.json").unlink()
    node.close()
    node2 = Node.open(tmp_path / "state", "n1")
    try:
        assert node2.role("c").is_clone and node2.volume("c").read(0, 8 * KiB) == _blocks(0)[: 8 * KiB]
    finally:
        node2.close()


def test_fuse_shows_the_clone_read_write(node: Node) -> None:
    _history(node)
    node.clone("v", "m1", "c")
    ops = Operations(node)

    async def main() -> None:
        ino = (await ops.lookup(ROOT, b"c.img")).st_ino
        attrs = await ops.getattr(ino)
        assert attrs.st_mode & 0o777 == 0o600 and attrs.st_size == MiB
        fh = (await ops.open(ino, os.O_RDWR, None)).fh
        assert await ops.read(fh, 0, 8 * KiB) == _blocks(1)[: 8 * KiB]
        assert await ops.write(fh, 2 * KiB, b"x" * 4 * KiB) == 4 * KiB
        await ops.fsync(fh, True)
        assert await ops.read(fh, 0, 8 * KiB) == bytes([1]) * 2 * KiB + b"x" * 4 * KiB + bytes([2]) * 2 * KiB
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.write(fh, MiB - 1, b"xx")
        assert e.value.errno == errno.ENOSPC
        await ops.release(fh)
        assert node.volume("v").read(0, 8 * KiB) == _blocks(2)[: 8 * KiB]  # the source did not change

    trio.run(main)


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    got = vars(cli.build_parser().parse_args(["clone", "v@2026-11-23T10:00:00Z", "c", "--json"]))
    assert got == {"command": "clone", "version": "v@2026-11-23T10:00:00Z", "volume": "c", "json": True}
    asked: list[tuple[str, dict[str, Any]]] = []
    row = {"volume": "c", "clone_of": "v@lsn-7", "image": "/mnt/c.img"}

    def daemon(cmd: str, args: dict[str, Any]) -> Any:
        asked.append((cmd, args))
        return row

    args = cli.build_parser().parse_args(["clone", "v@before@upgrade", "c"])
    assert run(COMMANDS["clone"], args, daemon) == 0
    assert asked == [("clone", {"version": "v@before@upgrade", "volume": "c"})]  # marks may hold '@'
    assert capsys.readouterr().out == ("cloned v@lsn-7 as c: writable at /mnt/c.img; it holds that version of v "
                                       "until: marsfs delete c\n")
    assert run(COMMANDS["clone"], cli.build_parser().parse_args(["clone", "v@m", "c", "--json"]), daemon) == 0
    assert json.loads(capsys.readouterr().out) == row
    for bad in (["clone", "v", "c"], ["clone", "bad/v@m", "c"], ["clone", "v@m", ".c"]):
        with pytest.raises((UsageError, InvalidRequest)):
            run(COMMANDS["clone"], cli.build_parser().parse_args(bad), daemon)
    assert len(asked) == 2  # checked before asking


def _save_split(node: Node, name: str = "v") -> tuple[SplitInfo, bytes]:
    """A split version of ``name`` (as a resolved split brain leaves it) and the image it holds."""
    vol = node.volume(name)
    image = bytearray(vol.size)
    image[8 * KiB : 12 * KiB] = b"s" * 4 * KiB
    image[-512:] = b"e" * 512
    return save_split(vol.path, "x", 2, 9, bytes(16), vol.size, lambda off, n: bytes(image[off : off + n])), bytes(image)


def test_a_split_version_clones_pinning_nothing_across_restarts_and_is_discarded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node = Node.open(state, "n1", history=Retention(keep_bytes=0))
    node.create("v", 4 * MiB)
    _history(node)
    split, image = _save_split(node)
    node.clone("v", split.name, "c")
    node.volume("c").write(0, b"c" * 512)
    node.volume("c").flush()
    node.close()
    node = Node.open(state, "n1", history=Retention(keep_bytes=0))
    try:
        c = node.volume("c")
        assert not c.errors and c.clone_of is not None and c.clone_of.describe() == "v@split-x-2"
        assert c.read(0, 4 * MiB) == b"c" * 512 + image[512:]
        node.volume("v").write(0, b"v" * 512)
        node.volume("v").flush()
        node.maintain()  # the clone pins nothing of v: writeback goes on to the head
        assert node.volume("v").applied_lsn == node.volume("v").durable_lsn
        rows = {r["volume"]: r for r in node_rows(node)}
        assert rows["c"]["clone_of"] == "v@split-x-2" and rows["v"]["clones"] == []
        [kept] = rows["v"]["split_versions"]
        assert (kept["name"], kept["node"], kept["fork_lsn"], kept["head_lsn"], kept["clones"]) == (
            "split-x-2", "x", 2, 9, ["c"])
        assert 0 < kept["disk_bytes"] == rows["v"]["split_versions_bytes"] < 4 * MiB  # holes stay holes
        text = status_table([rows["v"]])
        assert (f"v: split version split-x-2 (x's writes after lsn-2): {human_bytes(kept['disk_bytes'])} on disk, "
                "read by clone(s) c; "
                "inspect: marsfs clone v@split-x-2 NEWVOL; discard: marsfs discard v@split-x-2") in text, text

        async def body(ctx: Context, cluster: Cluster) -> None:
            with pytest.raises(VolumeBusy, match=r"split version split-x-2 of v has clones \(c\)"):
                await dispatch(ctx, "discard", {"version": "v@split-x-2"})
            with pytest.raises(VolumeBusy, match=r"has clones \(c\)"):
                await dispatch(ctx, "delete", {"volume": "v", "force": True})
            versions = await dispatch(ctx, "versions", {"volume": "v"})
            assert [x["name"] for x in versions["split_versions"]] == ["split-x-2"]
            await dispatch(ctx, "delete", {"volume": "c"})
            r = await dispatch(ctx, "discard", {"version": "v@split-x-2"})
            assert r == {"volume": "v", "discarded": "split-x-2", "freed_bytes": kept["disk_bytes"]}
            assert node.volume("v").splits() == [] and not any((node.volume("v").path / "splits").iterdir())
            with pytest.raises(VersionNotFound, match="no split version split-x-2 of volume v"):
                await dispatch(ctx, "discard", {"version": "v@split-x-2"})
            with pytest.raises(InvalidRequest, match="v@m1 is not a split version"):
                await dispatch(ctx, "discard", {"version": "v@m1"})
            with pytest.raises(UsageError, match="give VOL@VERSION, like vm@split-node2-4711"):
                await dispatch(ctx, "discard", {"version": "v"})
            with pytest.raises(VersionNotFound, match="no split version split-x-3"):
                await dispatch(ctx, "clone", {"version": "v@split-x-3", "volume": "d"})
            assert "d" not in node.volumes

        with_daemon(node, body)
    finally:
        node.close()


@pytest.mark.allow_log("refused to unlink")
def test_removing_through_the_mount_names_the_command(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    _save_split(node)
    ops = Operations(node)

    async def main() -> None:
        vdir = (await ops.lookup((await ops.lookup(ROOT, b".versions")).st_ino, b"v")).st_ino
        for parent, name, hint in ((vdir, b"split-x-2.img", "marsfs discard v@split-x-2"),
                                   (ROOT, b"v.img", "marsfs delete v"),
                                   (vdir, b"lsn-0.img", "history window")):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.unlink(parent, name, None)
            assert e.value.errno == errno.EPERM
            assert hint in caplog.records[-1].getMessage()

    trio.run(main)


def test_discard_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    asked: list[tuple[str, dict[str, Any]]] = []

    def daemon(cmd: str, args: dict[str, Any]) -> Any:
        asked.append((cmd, args))
        return {"volume": "v", "discarded": "split-b-7", "freed_bytes": 3 * MiB}

    assert run(COMMANDS["discard"], cli.build_parser().parse_args(["discard", "v@split-b-7"]), daemon) == 0
    assert asked == [("discard", {"version": "v@split-b-7"})]
    assert capsys.readouterr().out == "discarded split version split-b-7 of v: 3.0 MiB freed (once no reader has it open)\n"
    with pytest.raises(UsageError):
        run(COMMANDS["discard"], cli.build_parser().parse_args(["discard", "v"]), daemon)
    assert len(asked) == 1


def test_a_version_a_mirror_has_not_replayed_is_not_called_lost(node: Node) -> None:
    """On a mirror whose replay is behind, a version in its log but not replayed yet is named
    so (wait, or use the primary), not "not retained" as if the history had moved past it."""
    marks = _history(node)
    make_mirror(node, "v")
    vol = node.volume("v")
    vol.replay_limit = marks[0]
    for spec in (f"lsn-{marks[2]}", "m2"):
        with pytest.raises(VersionNotFound, match=rf"v@?.*lsn-{marks[2]}.*not replayed yet on this node "
                                                  rf"\(replayed up to lsn-{marks[0]}") as e:
            node.clone("v", spec, "c")
        assert "not retained" not in str(e.value) and "resume-replay v" in str(e.value)
    assert node.clone("v", "m0", "c").name == "c"  # what it replayed clones as ever
