"""``marsfs resize`` through the command table and the FUSE adapter in-process: what grows
where, what a mirror and a version show, the refusals, and the command line's output."""

from __future__ import annotations

import os
from pathlib import Path

import pyfuse3
import pytest
import trio

from marsfs.errors import InvalidRequest, NoSpace, VolumeReadOnly, WrongRole
from marsfs.faces.commands import Context, dispatch
from marsfs.faces.fuse import Operations
from marsfs.node import Node
from marsfs.node.cluster import Cluster
from marsfs.testing.checks import make_mirror, setattr_fields
from marsfs.testing.fakedaemon import FakeDaemon, cli_run

MiB = 1 << 20


def with_context(node: Node, body: object) -> None:
    async def main() -> None:
        ctx = Context(node, Cluster(node, listen=None, peers={}), Path("/mnt/marsfs"), lambda name: None)
        await body(ctx)  # type: ignore[operator]

    trio.run(main)


def test_resize_grows_the_primary_and_status_shows_it(node: Node) -> None:
    node.create("v", MiB)
    node.create("thin", MiB, thin=True)

    async def body(ctx: Context) -> None:
        r = await dispatch(ctx, "resize", {"volume": "v", "size": "3M"})
        assert r == {"volume": "v", "size": 3 * MiB, "lsn": node.volume("v").head_lsn, "image": "/mnt/marsfs/v.img"}
        assert (await dispatch(ctx, "status", {"volume": "v"}))[0]["size"] == 3 * MiB
        assert (await dispatch(ctx, "resize", {"volume": "v", "size": 3 * MiB}))["lsn"] is None  # no-op
        with pytest.raises(InvalidRequest, match="shrinking it to 1048576 is not supported"):
            await dispatch(ctx, "resize", {"volume": "v", "size": "1M"})
        with pytest.raises(NoSpace, match="no room to grow volume 'v': reserving .* \\(the volume is unchanged\\)"):
            await dispatch(ctx, "resize", {"volume": "v", "size": node.largest_volume() // 2 // 512 * 512})
        assert node.volume("v").size == 3 * MiB
        thin = node.volume("thin")
        await dispatch(ctx, "resize", {"volume": "thin", "size": 64 * MiB})  # thin: not reserved
        assert os.stat(thin.path / "base.img").st_blocks * 512 < MiB
        node.clone("v", "lsn-1", "c")
        with pytest.raises(InvalidRequest, match="c is a clone .* keeps the size of that version"):
            await dispatch(ctx, "resize", {"volume": "c", "size": "8M"})

    with_context(node, body)


def test_resize_on_a_mirror_is_refused_naming_its_source(node: Node) -> None:
    node.create("m", MiB)
    make_mirror(node, "m", source="n0")

    async def body(ctx: Context) -> None:
        with pytest.raises(WrongRole, match="'m' is a mirror on node n1 \\(it fetches from n0\\); grow it on its "
                                            "primary with marsfs resize m SIZE"):
            await dispatch(ctx, "resize", {"volume": "m", "size": "2M"})

    with_context(node, body)


def test_the_kernel_is_told_the_new_size(node: Node) -> None:
    node.create("v", MiB)
    node.create("m", MiB)
    make_mirror(node, "m")
    ops = Operations(node)
    size_only = setattr_fields(size=True)

    async def main() -> None:
        v = await ops.lookup(pyfuse3.ROOT_INODE, b"v.img", None)
        assert v.st_size == MiB
        node.resize("v", 2 * MiB)
        assert (await ops.getattr(v.st_ino, None)).st_size == 2 * MiB
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 2 * MiB  # the truncate the resize command sends through the mount
        assert (await ops.setattr(v.st_ino, attr, size_only, None, None)).st_size == 2 * MiB
        # a mirror's image is its replayed version: the size of that LSN
        m = node.volume("m")
        before = m.replayed_lsn
        m.append_raw(_resize_record(node, "m"))
        assert (await ops.lookup(pyfuse3.ROOT_INODE, b"m.img", None)).st_size == MiB  # not replayed yet
        m.replay_limit = m.head_lsn
        assert (await ops.lookup(pyfuse3.ROOT_INODE, b"m.img", None)).st_size == 4 * MiB
        versions = await ops.lookup(pyfuse3.ROOT_INODE, b".versions", None)
        vdir = await ops.lookup(versions.st_ino, b"m", None)
        old = await ops.lookup(vdir.st_ino, f"lsn-{before}.img".encode(), None)
        assert old.st_size == MiB

    trio.run(main)


def _resize_record(node: Node, name: str) -> bytes:
    """A RESIZE record to 4 MiB that continues volume ``name``'s log, as its primary would send it."""
    from marsfs.log import RecordType
    from marsfs.log.record import encode_header, encode_payload

    vol = node.volume(name)
    head, _ = encode_header(RecordType.RESIZE, vol.head_lsn + 1, 4 * MiB, encode_payload(b""), 1, vol.log.last_chain)
    return head


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    d = FakeDaemon({"resize": {"volume": "v", "size": 2 * MiB, "lsn": 7, "image": "/mnt/marsfs/v.img"}})
    assert cli_run(["resize", "v", "2M"], d) == 0
    assert d.asked == [("resize", {"volume": "v", "size": 2 * MiB})]
    assert capsys.readouterr().out == ("resized v to 2.0 MiB (2097152 bytes) at lsn-7; a loop device on "
                                       "/mnt/marsfs/v.img sees it after: losetup -c DEVICE\n")
    d = FakeDaemon({"resize": {"volume": "v", "size": 2 * MiB, "lsn": None, "image": "/mnt/marsfs/v.img"}})
    assert cli_run(["resize", "v", "2097152"], d) == 0
    assert capsys.readouterr().out == "v is 2.0 MiB already: nothing to do\n"


def test_resize_of_a_fenced_primary_is_refused(node: Node) -> None:
    node.create("v", MiB)
    node.fence("v", "node n2 is the designated primary of v")
    with pytest.raises(VolumeReadOnly, match="cannot resize v: node n2 is the designated primary of v"):
        node.resize("v", 2 * MiB)
    assert node.volume("v").size == MiB
