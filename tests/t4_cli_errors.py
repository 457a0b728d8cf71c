"""The command line's mistakes that need real daemons, as ``python -m marsfs`` shows them:
exactly one line on stderr, no traceback, the exit status of docs/user-guide.md ("Errors").

* Nodes the daemon does not know, or cannot reach, or that do not hold the volume.
* A daemon stopped cleanly (its control socket is gone) and one killed (SIGKILL: the socket
  stays behind): every verb says that no daemon runs and how to start one.

(Every verb's malformed names, unknown volumes, sizes and usage mistakes in-process:
tests/t2_cli_errors.py.)
"""

from __future__ import annotations

import re
import subprocess

from marsfs.testing.harness import Harness, NodeProcess

REFUSED = 1


def refused(node: NodeProcess, *args: str, match: str) -> None:
    """``marsfs ARGS`` on ``node`` fails with one line matching ``match``, exit status 1."""
    r: subprocess.CompletedProcess[str] = node.cli(*args, check=False)
    assert "Traceback" not in r.stderr, (args, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("marsfs: error: "), (args, r.stderr)
    assert re.search(match, r.stderr), (args, match, r.stderr)
    assert r.returncode == REFUSED and r.stdout == "", (args, r)


def test_nodes_it_does_not_know_or_cannot_reach(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "4M")
    refused(b, "join", "vm", "--from", "zed",
            match=r"unknown peer 'zed' \(known: a\); start the daemon with --peer zed=HOST:PORT")
    refused(b, "join", "vm", "--from", "no/de", match=r"invalid node name 'no/de': use 1-64 letters")
    refused(b, "join", "nope", "--from", "a", match=r"a refused: node a has no volume 'nope'; give a node that holds "
                                                    r"nope \(marsfs status on a lists its volumes\)$")
    refused(a, "verify", "vm", "--peer", "zed", match=r"unknown peer 'zed' \(known: b\)")
    refused(a, "leave", "vm", "--node", "zed", "--force",
            match=r"node zed does not hold volume vm as far as this node knows \(members: a\); give one of")
    refused(a, "wait", "vm", "--synced", "--timeout", "0", match=r"vm is primary on node a and has no mirrors")
    assert b.stop() == 0
    refused(a, "verify", "vm", "--peer", "b", match=r"cannot reach peer b to verify vm: .*is its daemon running")
    refused(a, "join", "other", "--from", "b", match=r"cannot reach peer b at 127\.0\.0\.1:\d+")
    refused(b, "status", match=rf"no marsfs daemon is running for state directory {b.state}; start one with: "
                               rf"marsfs serve --node NAME --state {b.state} --mount DIR$")


def test_a_killed_daemon_leaves_its_socket_and_every_verb_says_so(harness: Harness) -> None:
    a = harness.node("a")
    a.cli("create", "vm", "--size", "4M")
    a.kill()
    assert (a.state / "control.sock").exists()  # what a SIGKILL leaves
    for args in (["status"], ["status", "vm", "--json"], ["create", "v2", "--size", "1M"], ["delete", "vm"],
                 ["mark", "vm", "m1"], ["join", "v3", "--from", "b"], ["primary", "vm"], ["resize", "vm", "8M"],
                 ["verify", "vm"], ["wait", "vm", "--synced"], ["clone", "vm@lsn-0", "c1"], ["versions", "vm"]):
        refused(a, *args, match=rf"no marsfs daemon is running for state directory {a.state} \({a.state}/control"
                                r"\.sock is left from one that is gone\); start one with: marsfs serve --node NAME")
    refused(a, "status", "bad/name", match=r"invalid volume name 'bad/name'")  # checked before the daemon is asked
