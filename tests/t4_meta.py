"""Cluster metadata through three real daemons (metadata, fencing, following).

* The metadata converges: every node's ``status`` names the designated primary, the members
  and the other nodes' published positions.
* When another node claims a newer epoch, a mirror switches its source to it by itself, and
  the old primary, whose log is a prefix, becomes its mirror by itself.
* A primary that learns of a newer epoch after it wrote past the fork is fenced: writes and
  new opens for writing fail with EROFS through FUSE, its log (the divergent tail) stays.
* ``leave VOL --node NAME --force`` on the primary forgets a dead mirror everywhere.

The newer claim is made the way a test can without the handover command: the claiming node
is stopped, its role and a claim are written into its state directory, and it is started
again (``claim_offline``).
"""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from marsfs.fsutil import read_json, write_json
from marsfs.node.meta import ClusterMeta
from marsfs.node.state import RoleRecord
from marsfs.testing.checks import sha, status, wait_for, wait_synced, write_synced
from marsfs.testing.harness import Harness, NodeProcess

MiB = 1 << 20


def three(harness: Harness) -> dict[str, NodeProcess]:
    nodes = harness.cluster(["a", "b", "c"])
    nodes["a"].cli("create", "v", "--size", "4M")
    write_synced(nodes["a"].image("v"), 0, b"a" * 65536)
    for m in "bc":
        nodes[m].cli("join", "v", "--from", "a")
    for m in "bc":
        wait_synced(nodes[m], "v")
    return nodes


def claim_offline(node: NodeProcess, epoch: int) -> int:
    """Make the stopped ``node`` the primary of v at ``epoch`` from its head + 1 (as a forced
    failover would), then start it. Returns the claim's start LSN."""
    node.stop()
    vdir = node.state / "volumes" / "v"
    role = RoleRecord.from_json(read_json(vdir / "role.json"), "role.json")
    head = max(role.replayed_lsn, status_head(node))
    write_json(vdir / "role.json", RoleRecord(epoch=epoch).to_json())
    ClusterMeta(node.state / "meta.json", node.name).claim("v", node.name, epoch, head + 1)
    node.start()
    return head + 1


def status_head(node: NodeProcess) -> int:
    """The head LSN a stopped node had, from what it last published about itself."""
    pos = ClusterMeta(node.state / "meta.json", node.name).position(node.name, "v")
    return pos.head_lsn if pos is not None else 0


def test_metadata_converges_and_everyone_follows_a_new_primary(harness: Harness) -> None:
    nodes = three(harness)
    for n in nodes.values():
        wait_for(lambda n=n: status(n, "v")["members"] == ["a", "b", "c"]
                 and {p["node"] for p in status(n, "v")["positions"]} == set("abc") - {n.name},
                 what=f"metadata on {n.name}")
        st = status(n, "v")
        assert st["designated_primary"] == "a" and st["epoch"] == 1
        assert all(p["last_heard"] for p in st["positions"])
    text = nodes["c"].cli("status", "v").stdout
    assert "designated primary a, members a, b, c" in text and "node b: mirror of a" in text
    # b takes over (a handover: a wrote nothing since b synced)
    wait_synced(nodes["b"], "v")
    claim_offline(nodes["b"], 2)
    wait_for(lambda: status(nodes["c"], "v")["source"] == "b", what="c fetches from b")
    wait_for(lambda: status(nodes["a"], "v")["role"] == "mirror", what="a becomes b's mirror")
    st = status(nodes["a"], "v")
    assert st["source"] == "b" and st["epoch"] == 2 and st["designated_primary"] == "b"
    with pytest.raises(OSError) as e:
        os.open(nodes["a"].image("v"), os.O_RDWR)
    assert e.value.errno == errno.EROFS
    write_synced(nodes["b"].image("v"), 4096, b"b" * 65536)
    for m in "ac":
        wait_synced(nodes[m], "v")
    assert sha(nodes["a"].image("v")) == sha(nodes["b"].image("v")) == sha(nodes["c"].image("v"))


@pytest.mark.allow_log("split brain with")
def test_fenced_primary_refuses_writes_and_keeps_its_tail(harness: Harness) -> None:
    nodes = three(harness)
    nodes["c"].stop()
    nodes["b"].stop()
    a = nodes["a"]
    fd = os.open(a.image("v"), os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    buf.write(b"t" * 4096)
    try:
        for i in range(3):  # the tail b never saw
            assert os.pwrite(fd, buf, (10 + i) * 4096) == 4096
        os.fsync(fd)
        head = status(a, "v")["head_lsn"]
        claim_offline(nodes["b"], 2)
        # fenced, then split-brain once a compared its chains with b (marsfs.node.handover)
        wait_for(lambda: status(a, "v")["state"] in ("fenced", "split-brain"), what="a fenced")
        with pytest.raises(OSError) as e:
            os.pwrite(fd, buf, 0)
        assert e.value.errno == errno.EROFS
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        os.open(a.image("v"), os.O_WRONLY)
    assert e.value.errno == errno.EROFS
    st = status(a, "v")
    assert st["role"] == "primary" and st["head_lsn"] == head and st["designated_primary"] == "b"
    assert any("designated primary" in x and "write on b" in x for x in st["errors"])
    assert any("split brain" in x for x in st["errors"])
    with open(a.image("v"), "rb") as f:  # still readable, tail included
        f.seek(10 * 4096)
        assert f.read(4096) == b"t" * 4096
    wait_for(lambda: status(a, "v")["state"] == "split-brain", what="a to find the split brain")
    assert "split-brain" in a.cli("status", "v").stdout and status(a, "v")["fork_lsn"] < head


def test_leave_node_force_forgets_a_dead_mirror(harness: Harness) -> None:
    nodes = three(harness)
    a = nodes["a"]
    wait_for(lambda: {p["node"] for p in status(a, "v")["peers"]} == {"b", "c"}, what="a knows both mirrors")
    nodes["c"].kill()
    nodes["c"].abort()
    nodes["c"].unmount()
    r = a.cli("leave", "v", "--node", "c", check=False)
    assert r.returncode == 1 and "add --force if c is dead" in r.stderr
    r = a.cli("leave", "v", "--node", "a", "--force", check=False)
    assert r.returncode == 1 and "this node" in r.stderr
    r = nodes["b"].cli("leave", "v", "--node", "a", "--force", check=False)
    assert r.returncode == 1 and "designated primary" in r.stderr
    # a is alive: the way on is a handover, --force only for a dead primary
    assert "make another node primary first: marsfs primary v there (a handover; only if a is dead" in r.stderr
    r = a.cli("leave", "v", "--node", "c", "--force")
    assert "removed node c from v" in r.stdout and "members now: a, b" in r.stdout
    st = status(a, "v")
    assert [p["node"] for p in st["peers"]] == ["b"] and st["members"] == ["a", "b"]
    wait_for(lambda: status(nodes["b"], "v")["members"] == ["a", "b"], what="b learns the removal")
