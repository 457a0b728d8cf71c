"""Node identity with real daemons: one node per name, only listed peers, no hold after leave.

What must hold:

* A second daemon started with the name of a running node (its own state directory and port,
  ``--peer`` pointing at the cluster) is refused: its ``join`` fails with the reason, the real
  node keeps its connection and its mirror line and goes on fetching, and the primary says so
  in its log once (not once per retry).
* A node that is in no peer list is refused: its ``join`` fails with the reason and it gets no
  copy.
* A mirror that leaves during its first copy leaves no hold (and no mirror line) behind on its
  source.
"""

from __future__ import annotations

import os
import stat

import pytest

from marsfs.fsutil import read_json
from marsfs.testing.checks import status, wait_for, wait_synced, write_synced
from marsfs.testing.harness import Harness, NodeProcess, free_port

MiB = 1 << 20


def outsider(harness: Harness, where: str, name: str) -> NodeProcess:
    """A daemon named ``name`` in its own directory and port that knows node a (and no node
    knows it)."""
    n = NodeProcess(harness.root / where, name, extra=["--listen", f"127.0.0.1:{free_port()}",
                                                        "--peer", f"a=127.0.0.1:{harness.ports['a']}"],
                    ca_root=harness.root)  # a certificate of the cluster's CA: the name is all it lies about
    harness.nodes.append(n)  # stopped and unmounted with the others
    n.start()
    return n


@pytest.mark.allow_log("refused a connection from")
def test_a_second_node_of_one_name_and_an_unlisted_node_are_refused(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b", "c"])
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    a.cli("create", "v", "--size", "16M")
    write_synced(a.image("v"), 0, os.urandom(2 * MiB))
    b.cli("join", "v", "--from", "a")
    wait_synced(b, "v")
    assert stat.S_IMODE(os.stat(b.state / "node-id").st_mode) == 0o600

    impostor = outsider(harness, "impostor", "b")
    r = impostor.cli("join", "v", "--from", "a", check=False)
    assert r.returncode == 1 and "node b (id " in r.stderr and "runs already" in r.stderr, r.stderr
    write_synced(a.image("v"), 2 * MiB, b"n" * 65536)  # b still fetches: its connection was not replaced
    wait_synced(b, "v")
    [row] = status(a, "v")["peers"]
    assert row["node"] == "b" and row["connected"] and row["fetched_lsn"] == status(a, "v")["head_lsn"]
    impostor.stop()

    stranger = outsider(harness, "stranger", "d")
    r = stranger.cli("join", "v", "--from", "a", check=False)
    assert r.returncode == 1 and "node d is in no peer list" in r.stderr, r.stderr
    assert stranger.cli("status", "--json").stdout.strip() == "[]"
    stranger.stop()
    log = a.logfile.read_text()
    assert log.count("refused a connection from") == 2, log  # once each, though both retried gossip

    # a first copy left half way (it takes 8 s at this rate): the source holds nothing for it afterwards
    c.cli("join", "v", "--from", "a", "--rate", "256K")
    wait_for(lambda: "c" in {p["node"] for p in status(a, "v")["peers"]}, what="a serves c's first copy")
    c.cli("leave", "v")
    wait_for(lambda: [p["node"] for p in status(a, "v")["peers"]] == ["b"], what="a forgets c")
    wait_for(lambda: "mirror:c" not in read_json(a.state / "volumes" / "v" / "holds.json"),
             what="a's hold for c released")
