"""Crash rounds on ext4-on-loop over marsfs: SIGKILL the daemon under write+fsync load.

One round: mount ext4 from the volume through a loop device, run
:mod:`marsfs.testing.writer` (write + fsync in a loop), SIGKILL the daemon at a random moment,
abort the dead FUSE connection, kill the writer, unmount, detach, unmount FUSE, restart the
daemon, replay the ext4 journal (``e2fsck -E journal_only -y``), check with ``e2fsck -fn``,
and verify that every file whose fsync returned is whole (G1, G2 through a real filesystem).
Used by tests/test_serve_crash.py (3 rounds) and scripts/soak-crash (50 by default).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from marsfs.testing.harness import Harness, run


def fsck_after_crash(image: Path) -> str:
    """Replay the journal, then check read-only; raise with e2fsck's output on any problem."""
    r = run(["e2fsck", "-E", "journal_only", "-y", os.fspath(image)], check=False)
    if r.returncode not in (0, 1):
        raise AssertionError(f"e2fsck -E journal_only exited {r.returncode}:\n{r.stdout}{r.stderr}")
    r = run(["e2fsck", "-fn", os.fspath(image)], check=False)
    if r.returncode != 0:
        raise AssertionError(f"e2fsck -fn found problems (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def crash_rounds(h: Harness, rounds: int, seed: int, say: Callable[[str], None] = lambda s: None) -> dict[str, int]:
    rng = random.Random(seed)
    node = h.node("crash")
    node.cli("create", "vm", "--size", "512M")
    image = node.image("vm")
    ext = h.root / "ext"
    manifest = h.root / "manifest"
    dev = h.attach(image)
    run(["mkfs.ext4", "-q", dev])
    h.detach(dev)
    totals = {"rounds": 0, "files_verified": 0}
    for rnd in range(rounds):
        dev = h.attach(image)
        h.mount_fs(dev, ext)
        writer = subprocess.Popen([sys.executable, "-m", "marsfs.testing.writer", os.fspath(ext),
                                   os.fspath(manifest), str(seed), f"r{rnd}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(rng.uniform(0.5, 2.5))
            node.kill()
            node.abort()
        finally:
            writer.kill()
            writer.wait()
        h.umount_fs(ext)
        h.detach(dev)
        node.unmount()
        node.start()
        fsck_after_crash(image)
        dev = h.attach(image)
        h.mount_fs(dev, ext)
        lines = manifest.read_text().split("\n")
        entries = [ln.split() for ln in lines if ln.count(" ") == 1]
        for name, digest in entries:
            got = hashlib.sha256((ext / name).read_bytes()).hexdigest()
            assert got == digest, f"round {rnd}: {name} was fsync'd but its content differs after the crash"
        for name, _ in entries:  # keep the filesystem from filling up over many rounds
            (ext / name).unlink()
        manifest.write_text("")
        h.umount_fs(ext)
        h.detach(dev)
        totals["rounds"] += 1
        totals["files_verified"] += len(entries)
        say(f"round {rnd + 1}/{rounds}: {len(entries)} fsync'd files intact, e2fsck clean")
    return totals
