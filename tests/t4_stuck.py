"""Through real daemons: a mirror never gets stuck in a state no command leads out of.

* A mirror whose log is damaged (a flipped byte in a segment, found at start) is ``failed``
  and says what to run: ``invalidate`` discards the damaged copy and copies it anew from its
  source (seeded with its own base image), and it is synced and equal to the primary again;
  ``join --from`` another node is refused for it as well, and ``leave`` removes it (``delete``
  too: tests/t2_isolation.py, in-process).
* ``join --from`` another node, on a node that mirrors the volume already, is refused with
  the reason (mirrors follow the designated primary) and changes nothing: the mirror keeps
  its history and stays synced.
* A clone on a mirror does not hold up the mirror's resync (``invalidate``): it takes its own
  copy of its version and keeps its bytes, also after the mirror's copy left and restarts.
"""

from __future__ import annotations

import os
import random

from marsfs.testing.checks import sha, status, wait_synced, write_synced
from marsfs.testing.harness import Harness, NodeProcess

MiB = 1 << 20
VOL = "v"


def _write(a: NodeProcess, seed: int) -> None:
    """32 fsync'd writes of 64 KiB of random bytes on the primary: as many records in every log."""
    rng = random.Random(seed)
    for i in range(32):
        write_synced(a.image(VOL), i * 65536, rng.randbytes(65536))


def _damage_log(node: NodeProcess) -> None:
    """Stop ``node`` and flip a byte in the middle of its first log segment of VOL (records
    follow it: damage, not a torn tail), then start it again."""
    node.stop()
    log = node.state / "volumes" / VOL / "log"
    first = min((p for p in log.iterdir() if p.is_file() and p.stat().st_size > MiB), key=lambda p: p.name)
    with open(first, "r+b") as f:
        f.seek(first.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    node.start()


def _failed(b: NodeProcess) -> None:
    st = status(b, VOL)
    errors = "; ".join(st["errors"])
    assert st["state"] == "failed" and "log damaged" in errors and "marsfs invalidate" in errors, st
    assert st["next"] == f"marsfs invalidate {VOL}", st


def test_no_stuck_mirror_damaged_log_and_join_from_another_mirror(harness: Harness) -> None:
    # c is a peer that never runs: a join from it is refused before it is asked
    nodes = harness.cluster(["a", "b", "c"], start=False)
    a, b = nodes["a"], nodes["b"]
    a.start()
    b.start()
    a.cli("create", VOL, "--size", "16M")
    b.cli("join", VOL, "--from", "a")
    wait_synced(b, VOL)
    _write(a, 1)
    wait_synced(b, VOL)

    # join --from another node than the primary: refused, saying why, and nothing changes
    before = status(b, VOL)
    r = b.cli("join", VOL, "--from", "c", check=False)
    assert r.returncode == 1, r
    assert "mirrors follow the designated primary a" in r.stderr and f"marsfs invalidate {VOL}" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    after = status(b, VOL)
    assert (after["state"], after["source"], after["oldest_version_lsn"]) == (
        "synced", "a", before["oldest_version_lsn"]), after
    assert sha(b.image(VOL)) == sha(a.image(VOL))

    # a clone on the mirror does not hold up a resync: it takes its own copy, and it outlives
    # its source's copy here (leave below, restarts)
    b.cli("clone", f"{VOL}@lsn-{after['replayed_lsn']}", "c")
    clone_sum = sha(b.image("c"))
    _write(a, 4)
    wait_synced(b, VOL)
    b.cli("invalidate", VOL)
    wait_synced(b, VOL, timeout=20)
    st = status(b, VOL)
    assert (st["state"], st["errors"], st["clones"]) == ("synced", [], []), st
    assert sha(b.image(VOL)) == sha(a.image(VOL)) and sha(b.image("c")) == clone_sum

    # a damaged log: invalidate copies it anew
    _write(a, 5)
    wait_synced(b, VOL)
    _damage_log(b)
    _failed(b)
    r = b.cli("invalidate", VOL, check=False)
    assert r.returncode == 0, r.stderr
    wait_synced(b, VOL)
    assert sha(b.image(VOL)) == sha(a.image(VOL))
    assert status(b, VOL)["errors"] == []

    # leave removes it
    _write(a, 2)
    wait_synced(b, VOL)
    _damage_log(b)
    _failed(b)
    r = b.cli("join", VOL, "--from", "c", check=False)  # a failed copy, too, follows the primary
    assert r.returncode == 1 and "mirrors follow the designated primary a" in r.stderr, r.stderr
    r = b.cli("join", VOL, "--from", "b", check=False)
    assert r.returncode == 1 and "b is this node" in r.stderr, r.stderr
    r = b.cli("leave", VOL, check=False)
    assert r.returncode == 0, r.stderr
    assert not (b.state / "volumes" / VOL).exists()
    assert b.cli("status", VOL, check=False).returncode != 0
    assert status(b, "c")["state"] == "up" and sha(b.image("c")) == clone_sum
    assert status(a, VOL)["state"] == "up"  # the primary goes on as before
