"""G8 through real daemons: the log stays inside the log space limit whatever the history window
or a stopped mirror would keep, and writes never notice.

* A state directory on a small loop-mounted ext4, a reserved volume that fits it, rewritten
  three times the filesystem's size over with random writes and fsyncs, default log space and
  the default 256 MiB history (more than the disk): no write fails, the daemon stays up, the
  log (status ``log_bytes`` and the segment files, sampled all along) never passes the limit,
  status warns that the history window was cut, and every fsynced block is intact after a
  SIGKILL and a restart.
* A mirror SIGKILLed; its primary (``--log-space 64M``) takes 4x that in random writes into a
  1 GiB thin volume, each write fsynced: no write error, no write+fsync takes a second, the
  log never passes the limit, status shows the mirror's ``dropped`` bytes and a warning, and
  the extents the primary remembers for the mirror (``Volume.changed_ranges`` from its
  persisted position, read after a clean stop) are exactly the extents written.
* Its catch-up half (mirror restarted behind a fault proxy: it copies at most 1.2x the
  distinct changed bytes and ends byte-identical) is the catch-up sync.

Cleanup order matters for the small filesystem: the test stops its daemon itself.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

from marsfs.testing.checks import sha, status, wait_for, wait_synced
from marsfs.testing.faultproxy import ProxyProcess
from marsfs.testing.harness import Harness, NodeProcess, run
from marsfs.volume import Volume

KiB = 1024
MiB = 1 << 20
BLOCK = 4 * KiB
FS_SIZE = 128 * MiB
VOL_SIZE = 32 * MiB
LIMIT = 64 * MiB
SIZES = [4 * KiB, 16 * KiB, 64 * KiB]


class LogSampler:
    """Samples, in a thread, the segment files' total size (every 20 ms) and status's
    ``log_bytes`` and ``log_space_limit`` (every 0.3 s) of one node's volume."""

    def __init__(self, node: NodeProcess, vol: str) -> None:
        self.node, self.vol = node, vol
        self.files_max = 0
        self.status: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def segment_bytes(self) -> int:
        total = 0
        for seg in (self.node.state / "volumes").glob("*/log/*.seg"):
            try:
                total += seg.stat().st_size
            except FileNotFoundError:
                pass  # trimmed between glob and stat
        return total

    def _run(self) -> None:
        next_status = 0.0
        while not self._stop.is_set():
            self.files_max = max(self.files_max, self.segment_bytes())
            if time.monotonic() >= next_status:
                r = self.node.cli("status", self.vol, "--json", check=False, timeout=30)
                if r.returncode == 0:
                    self.status.append(json.loads(r.stdout))
                next_status = time.monotonic() + 0.3
            self._stop.wait(0.02)

    def __enter__(self) -> LogSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def check(self, limit: int | None = None) -> None:
        """The log never passed the limit (``limit``, or the smallest status reported)."""
        assert self.status, "no status samples"
        assert all(s["log_bytes"] <= s["log_space_limit"] for s in self.status), \
            max((s["log_bytes"], s["log_space_limit"]) for s in self.status)
        bound = limit if limit is not None else min(s["log_space_limit"] for s in self.status)
        assert self.files_max <= bound, f"segment files reached {self.files_max} bytes, limit {bound}"


def rewrite(image: Path, size: int, total: int, rng: random.Random, *, fsync_every: int,
            written: set[int] | None = None, model: dict[int, bytes] | None = None) -> float:
    """Random aligned writes of ``total`` bytes into ``image``, an fsync every ``fsync_every``
    writes; returns the longest write+fsync. ``written`` gets the 4 KiB blocks written,
    ``model`` the newest data of each block (everything is fsynced at the end)."""
    worst = 0.0
    done = 0
    i = 0
    fd = os.open(image, os.O_RDWR)
    try:
        while done < total:
            n = rng.choice(SIZES)
            off = rng.randrange(0, (size - n) // BLOCK) * BLOCK
            data = rng.randbytes(n)
            t = time.monotonic()
            assert os.pwrite(fd, data, off) == n
            i += 1
            if i % fsync_every == 0:
                os.fsync(fd)
            worst = max(worst, time.monotonic() - t)
            done += n
            if written is not None:
                written.update(range(off // BLOCK, (off + n) // BLOCK))
            if model is not None:
                for k in range(0, n, BLOCK):
                    model[(off + k) // BLOCK] = data[k : k + BLOCK]
        os.fsync(fd)
    finally:
        os.close(fd)
    return worst


def test_a_small_state_filesystem_rewritten_many_times_over(harness: Harness) -> None:
    node = harness.node("n1", start=False)
    image = harness.root / "small.ext4"
    with open(image, "wb") as f:
        f.truncate(FS_SIZE)
    run(["mkfs.ext4", "-q", "-m", "0", os.fspath(image)])
    harness.mount_fs(harness.attach(image, direct_io=False), node.state)
    rng = random.Random(5)
    model: dict[int, bytes] = {}
    try:
        node.start()
        node.cli("create", "v", "--size", f"{VOL_SIZE}")
        with LogSampler(node, "v") as sampler:
            rewrite(node.image("v"), VOL_SIZE, 3 * FS_SIZE, rng, fsync_every=8, model=model)
            row = status(node, "v")
        assert node.proc is not None and node.proc.poll() is None, node.log_tail()
        sampler.check()
        assert row["state"] == "up" and row["errors"] == [], row
        assert row["log_space_limit"] < FS_SIZE // 2
        assert any("history window of v" in w for w in row["warnings"]), row["warnings"]
        assert row["oldest_retained_lsn"] > 1
        node.kill()
        node.abort()
        node.unmount()
        node.start()
        with open(node.image("v"), "rb") as f:
            for block, data in sorted(model.items()):
                f.seek(block * BLOCK)
                assert f.read(BLOCK) == data, f"fsynced block {block} differs after SIGKILL and restart"
    finally:
        node.stop()
        node.unmount()


def stopped_mirror(harness: Harness, proxy: ProxyProcess, *, pause: bool = False) -> tuple[NodeProcess, NodeProcess,
                                                                                         set[int], float]:
    """Primary ``a`` (--log-space 64M), mirror ``b`` behind ``proxy``, SIGKILLed once synced;
    then 4x the limit of random writes on ``a``. Returns a, b, the blocks written, the longest
    write+fsync."""
    nodes = harness.cluster(["a", "b"], start=False)
    a, b = nodes["a"], nodes["b"]
    a.extra += ["--log-space", f"{LIMIT}"]
    a.start()
    port = proxy.start(harness.ports["a"])
    i = b.extra.index(f"a=127.0.0.1:{harness.ports['a']}")
    b.extra[i] = f"a=127.0.0.1:{port}"
    b.start()
    a.cli("create", "vm", "--size", "1G", "--thin")
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    if pause:  # the daemon stays, with the fetcher its join started
        b.cli("pause-fetch", "vm")
    else:
        b.kill()
        b.abort()
        b.unmount()
    written: set[int] = set()
    with LogSampler(a, "vm") as sampler:
        worst = rewrite(a.image("vm"), 1 << 30, 4 * LIMIT, random.Random(7), fsync_every=1, written=written)
        wait_for(lambda: bool(status(a, "vm")["dropped"]), timeout=10, what="the mirror's log to be dropped")
    sampler.check(LIMIT)
    return a, b, written, worst


def test_a_stopped_mirror_costs_the_primary_nothing(harness: Harness) -> None:
    with ProxyProcess() as proxy:
        a, _b, written, worst = stopped_mirror(harness, proxy)
        assert worst < 1.0, f"a write+fsync took {worst:.2f} s"
        row = status(a, "vm")
        assert row["state"] == "up" and row["errors"] == [], row
        [peer] = row["peers"]
        assert peer["node"] == "b" and peer["dropped"] == row["dropped"]["b"] > 0
        assert any("mirror b of vm" in w for w in row["warnings"]), row["warnings"]
        assert a.stop() == 0
        vol = Volume.open(a.state / "volumes" / "vm", sync_interval=None)
        try:
            ranges = vol.changed_ranges("b", vol.holds["mirror:b"])
            assert ranges is not None
            assert {k for o, n in ranges for k in range(o // BLOCK, (o + n) // BLOCK)} == written, \
                "the mirror's changed set covers exactly the extents written"
            assert all(o % BLOCK == 0 and n % BLOCK == 0 for o, n in ranges)
        finally:
            vol.close()


def test_a_returning_mirror_copies_only_what_changed(harness: Harness) -> None:
    with ProxyProcess() as proxy:
        a, b, written, _ = stopped_mirror(harness, proxy)
        before = proxy.stats()["bytes_down"]
        b.start()
        sample = random.Random(3).sample(sorted(written), 64)
        with open(b.image("vm"), "rb") as old:  # the version b had when it stopped: nothing written yet
            wait_for(lambda: status(b, "vm")["state"] not in ("needs-resync", "failed"), timeout=5,
                     what="the mirror to accept the catch-up")
            deadline = time.monotonic() + 300
            while status(b, "vm")["state"] != "synced":  # its old version stays readable and unchanged throughout
                assert time.monotonic() < deadline, "the mirror did not catch up within 300 s"
                for blk in sample:
                    old.seek(blk * BLOCK)
                    assert old.read(BLOCK) == bytes(BLOCK), f"the old version changed at block {blk} during catch-up"
            wait_synced(b, "vm", timeout=300)
            old.seek(sample[0] * BLOCK)
            assert old.read(BLOCK) == bytes(BLOCK), "a version open across the switch changed"
        sent = proxy.stats()["bytes_down"] - before
        assert sent <= 1.2 * len(written) * BLOCK, f"catch-up sent {sent} bytes for {len(written) * BLOCK} changed"
        assert sha(a.image("vm")) == sha(b.image("vm"))


def test_a_paused_mirror_catches_up_with_the_fetcher_its_join_started(harness: Harness) -> None:
    """The catch-up runs in the fetcher that made the first copy (no restart between): the first
    copy's completion must not run again at the catch-up's switch."""
    with ProxyProcess() as proxy:
        a, b, written, _ = stopped_mirror(harness, proxy, pause=True)
        before = proxy.stats()["bytes_down"]
        b.cli("resume-fetch", "vm")
        wait_synced(b, "vm", timeout=300)
        sent = proxy.stats()["bytes_down"] - before
        assert sent <= 1.2 * len(written) * BLOCK, f"catch-up sent {sent} bytes for {len(written) * BLOCK} changed"
        assert sha(a.image("vm")) == sha(b.image("vm"))
        assert status(b, "vm")["state"] == "synced"
