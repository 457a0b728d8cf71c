"""The node and cluster layers in-process (no mount, no root): refusals change nothing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from marsfs.errors import InvalidRequest, NoSpace, VolumeNotFound, WrongRole
from marsfs.node import Node
from marsfs.node.cluster import Cluster
from marsfs.node.status import node_rows
from marsfs.testing.runner import run
from marsfs.volume import Volume

MiB = 1 << 20


def test_mark_on_a_mirror_is_refused_and_changes_nothing(node: Node) -> None:
    vol = node.create("v", MiB)
    vol.write(0, b"x" * 4096)
    node.set_role("v", role="mirror", source="n0")
    head = vol.head_lsn
    with pytest.raises(WrongRole, match="run marsfs mark v m1 on its primary .*n0"):
        node.mark("v", "m1")
    assert vol.head_lsn == head and not vol.log.marks
    node.set_role("v", role="primary")
    assert node.mark("v", "m1") > head


@pytest.mark.parametrize("size", [100 << 40, 9999999 << 40, 0, 1000])
def test_impossible_sizes_are_refused_up_front_and_leave_nothing(node: Node, size: int) -> None:
    with pytest.raises(InvalidRequest, match=r"up to 16\.0 TiB|up to \d"):
        node.create("a9", size)
    assert not (node.state / "volumes" / "a9").exists()
    with pytest.raises(VolumeNotFound):
        node.delete("a9")
    node.create("a9", MiB)  # the name is free
    node.delete("a9")


def test_a_create_that_fails_half_way_leaves_nothing(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Volume.create

    def full_disk(path: Path, *a: object, **kw: object) -> Volume:
        path.mkdir(parents=True)
        (path / "base.img").write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Volume, "create", full_disk)
    with pytest.raises(NoSpace, match="free space"):
        node.create("v", MiB)
    assert not (node.state / "volumes" / "v").exists() and "v" not in node.volumes
    monkeypatch.setattr(Volume, "create", real)
    node.create("v", MiB)


def test_join_from_this_node_says_so(node: Node) -> None:
    cluster = Cluster(node, listen=None, peers={"n2": "127.0.0.1:9"})

    async def main() -> None:
        with pytest.raises(InvalidRequest, match="n1 is this node"):
            await cluster.join("v", "n1")

    run(main, autojump=None)


def test_status_does_not_change_anything(node: Node) -> None:
    node.create("v", MiB)
    cluster = Cluster(node, listen=None, peers={})

    async def main() -> None:
        before = cluster.status()
        assert cluster.status() == before and node_rows(node) == [before[0]]
        assert cluster.mirrors_of("v") == []

    run(main, autojump=None)
