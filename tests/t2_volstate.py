"""A mirror's state on a running cluster counts what its node knows, not only its fetch.

What holds:

* a mirror whose state filesystem is full (its writeback fails with ENOSPC) is ``no-space``,
  not what its fetch alone says (disconnected), and is back to that once there is room again;
* a mirror that log space stopped (its paused replay keeps its log while the logs are full)
  is ``no-space`` with an error line that names log space and what to do, not
  ``catching-up`` or ``stalled``; it is back to its fetch's state once replay lets log go.

The mirror's source is unreachable here (the fetch is disconnected, then stalled), so the only
thing that changes the state is what the test does to the node.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from marsfs.faces.commands import status_table
from marsfs.node import Node
from marsfs.node import meta as meta_module
from marsfs.node.cluster import Cluster
from marsfs.node.meta import primary_key
from marsfs.node.space import LogSpaceSetting
from marsfs.node.status import cluster_side, verdict
from marsfs.node.volstate import VolumeState
from marsfs.replication.fetch import Connect
from marsfs.replication.session import STALL_AFTER
from marsfs.testing.checks import make_mirror
from marsfs.testing.runner import run, wait_for
from marsfs.volume import Retention, Volume

KiB = 1024
MiB = 1 << 20


class Unreachable:
    """A :class:`marsfs.node.peers.Peers` whose every peer refuses connections."""

    def connector(self, peer: str) -> Connect:
        async def connect() -> trio.abc.Stream:
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        return connect

    def where(self, peer: str) -> str:
        return f"nowhere ({peer})"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node.open(tmp_path / "state", "n1", log_space=LogSpaceSetting(size=16 * MiB))
    try:
        yield n
    finally:
        n.close()


def fill(vol: Volume, nbytes: int) -> None:
    """Records as a fetch would append them (written here: the source is unreachable)."""
    rng = random.Random(7)
    for _ in range(nbytes // (4 * KiB)):
        vol.write(rng.randrange(vol.size // (4 * KiB)) * 4 * KiB, rng.randbytes(4 * KiB))
    vol.flush()


def mirror_of_x(node: Node, name: str) -> None:
    """Make ``name`` a mirror of the unreachable node x, which the metadata names its primary
    (else this node, its creator, would take it back as the designated primary)."""
    make_mirror(node, name)
    node.set_role(name, epoch=2)
    node.meta.claim(name, "x", 2, node.volume(name).head_lsn + 1)


def in_cluster(node: Node, body: Any) -> None:
    cluster = Cluster(node, listen=None, peers={"x": "127.0.0.1:9"}, connections=Unreachable())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run)
            await body(cluster)
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.allow_log("writeback of m")
def test_a_mirror_whose_state_filesystem_is_full_shows_no_space(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = node.create("m", 4 * MiB, thin=True)
    node.set_history("m", Retention(0))
    fill(vol, 64 * KiB)
    mirror_of_x(node, "m")  # replayed up to its head: writeback has work to do
    real = os.pwrite

    def full(fd: int, data: bytes, offset: int) -> int:
        if fd == vol._base_fd:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    async def body(cluster: Cluster) -> None:
        await wait_for(lambda: cluster.statuses("m")[0].state == VolumeState.DISCONNECTED, "the fetch to fail")
        with monkeypatch.context() as m:
            m.setattr(os, "pwrite", full)
            await trio.to_thread.run_sync(node.maintain)
        st = cluster.statuses("m")[0]
        assert st.role == "mirror" and st.state == VolumeState.NO_SPACE, st
        assert any("No space left on device" in e and "free space" in e for e in st.errors), st.errors
        assert any("fetch from x" in e for e in st.errors), "the fetch's trouble is still said"
        assert cluster.status("m")[0]["state"] == "no-space"
        await trio.to_thread.run_sync(node.maintain)  # room again: the writeback works
        st = cluster.statuses("m")[0]
        assert st.state == VolumeState.DISCONNECTED and not any("No space" in e for e in st.errors), st

    in_cluster(node, body)


def test_a_mirror_stopped_by_log_space_says_so(node: Node) -> None:
    vol = node.create("m", 64 * MiB, thin=True)
    mirror_of_x(node, "m")
    node.set_role("m", replay_paused=True, replayed_lsn=vol.replayed_lsn)

    async def body(cluster: Cluster) -> None:
        await trio.to_thread.run_sync(fill, vol, 13 * MiB)  # fetched, not replayed: the log cannot go
        await trio.to_thread.run_sync(node.enforce_space)
        assert "m" in node.space.fetch_stopped
        await trio.sleep(STALL_AFTER + 1)  # long enough for a stall
        st = cluster.statuses("m")[0]
        assert st.state == VolumeState.NO_SPACE, st
        [line] = [e for e in st.errors if "log space" in e]
        assert "stopped fetching" in line and "marsfs resume-replay m" in line and "--log-space" in line
        v = verdict(node, "m", cluster_side(cluster, "m"))
        assert v.state == VolumeState.NO_SPACE and v.next == "marsfs resume-replay m"
        assert st.next == v.next and cluster.status("m")[0]["next"] == "marsfs resume-replay m"
        assert "m: next: marsfs resume-replay m" in status_table(cluster.status("m")).splitlines()
        assert v.conditions[:3] == (VolumeState.NO_SPACE, VolumeState.REPLAY_PAUSED, VolumeState.STALLED), v
        cluster.set_paused("m", "replay", False)  # replay goes on: its log may go
        await wait_for(lambda: vol.replayed_lsn == vol.durable_lsn, "replay")
        await trio.to_thread.run_sync(node.enforce_space)
        assert "m" not in node.space.fetch_stopped
        st = cluster.statuses("m")[0]
        assert st.state == VolumeState.STALLED and not any("log space is full" in e for e in st.errors), st
        assert st.next == "" and "next:" not in status_table(cluster.status("m")), "nothing to run: no line"

    in_cluster(node, body)


@pytest.mark.allow_log("cannot write the cluster metadata")
def test_a_claim_the_full_disk_cannot_take_at_start_does_not_end_the_node(node: Node,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A primary whose volume has no claim yet claims it when the cluster starts; a state disk
    that cannot take the claim is said in status and the claim is made once it can (G11),
    instead of the start failing and the daemon ending."""
    node.create("v", 4 * MiB)
    node.meta._unset(node.name, primary_key("v"))  # a volume from before the metadata (map and indexes)
    assert node.meta.designated("v") is None
    real = meta_module.write_json  # type: ignore[attr-defined]

    def full(*a: Any, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(meta_module, "write_json", full)

    async def body(cluster: Cluster) -> None:
        st = cluster.statuses("v")[0]
        assert any("claiming v in the cluster metadata" in e and "free space" in e for e in st.errors), st.errors
        monkeypatch.setattr(meta_module, "write_json", real)
        cluster.gossip_now()
        await wait_for(lambda: node.meta.designated("v") is not None, "the claim once there is room")
        assert not any("claiming" in e for e in cluster.statuses("v")[0].errors)

    in_cluster(node, body)
