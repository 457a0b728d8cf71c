"""``marsfs verify`` between real node processes:

* it reports exactly the blocks corrupted directly in a mirror's base image (written back
  there: the mirror keeps no history), from the mirror and from the primary;
* it reports nothing on identical images while the primary keeps writing.
"""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

from marsfs.testing.checks import status, wait_for, wait_synced, write_random
from marsfs.testing.harness import Harness

MiB = 1 << 20
BLOCK = 4096


def test_verify_reports_exactly_the_corrupted_blocks(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b"], start=False)
    a, b = nodes["a"], nodes["b"]
    b.extra += ["--history", "0s"]  # the mirror writes back all it replays: its base is its image
    a.start()
    b.start()
    size = 32 * MiB
    a.cli("create", "vm", "--size", "32M")
    write_random(a.image("vm"), seed=1, count=200, size=size)
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")

    def written_back() -> bool:
        st = status(b, "vm")
        return bool(st["applied_lsn"] == st["replayed_lsn"] == status(a, "vm")["durable_lsn"])

    wait_for(written_back, timeout=30, what="the mirror to write everything back")
    rng = random.Random(11)
    blocks = sorted(rng.sample(range(0, size // BLOCK, 2), 4))  # even blocks: never adjacent
    base = b.state / "volumes" / "vm" / "base.img"
    fd = os.open(base, os.O_WRONLY)
    try:
        for blk in blocks:
            os.pwrite(fd, rng.randbytes(BLOCK), blk * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    want = [{"offset": blk * BLOCK, "length": BLOCK} for blk in blocks]
    for node, peer in ((b, "a"), (a, "b")):
        r = node.cli("verify", "vm", "--json", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        (result,) = json.loads(r.stdout)
        assert result["peer"] == peer and not result["identical"]
        assert result["differences"] == want
        assert result["compared_bytes"] == size
    r = b.cli("verify", "vm", check=False)
    assert r.returncode == 1 and r.stdout.startswith("vm on b and a: 4 differing range(s), 16384 bytes")
    assert f"  offset {blocks[0] * BLOCK} length 4096" in r.stdout


def test_verify_finds_identical_images_while_the_primary_writes(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    size = 32 * MiB
    a.cli("create", "vm", "--size", "32M")
    write_random(a.image("vm"), seed=2, count=100, size=size)
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    stop = threading.Event()

    def writer() -> None:
        seed = 100
        while not stop.is_set():
            write_random(a.image("vm"), seed=seed, count=20, size=size, fsync_every=3)
            seed += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        lsns = set()
        for node in (b, a, b, a, b):
            r = node.cli("verify", "vm", "--json", check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            (result,) = json.loads(r.stdout)
            assert result["identical"] and result["differences"] == [] and result["compared_bytes"] == size
            lsns.add(result["lsn"])
        assert len(lsns) > 1  # the versions compared moved on with the writes
    finally:
        stop.set()
        t.join()
    r = b.cli("verify", "vm")
    assert r.stdout.startswith("vm on b and a: identical at lsn-") and r.stdout.endswith(
        f"({size} bytes compared)\n")


def test_verify_refusals_in_one_line(harness: Harness, tmp_path: Path) -> None:
    a = harness.node("a")
    a.cli("create", "vm", "--size", "1M")
    r = a.cli("verify", "vm", check=False)
    assert r.returncode == 1 and r.stderr == ("marsfs: error: vm is primary on node a and has no mirrors to compare "
                                              "with; give one: marsfs verify vm --peer NODE\n")
    r = a.cli("verify", "vm", "--peer", "zz", check=False)
    assert r.returncode == 1 and "unknown peer 'zz'" in r.stderr and r.stderr.count("\n") == 1
