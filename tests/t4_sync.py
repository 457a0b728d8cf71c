"""Fast sync with real node processes; the mirror ``b`` reaches ``a`` through a fault proxy,
which counts every byte of the conversation (both directions: data down, sums up).

What must hold (fast sync, and the resync after a forced failover):

* Fast sync of a 2 GiB image of which 1 % of 4 KiB blocks differ (``join --seed`` with such a
  copy) transfers under 3 % of the image, and the images are equal at the end.
* A first copy killed half way (SIGKILL of the mirror's daemon) resumes after the restart and
  sends under 60 % of the image after it (what was staged is not sent again).
* A mirror's old version stays readable and consistent while it resyncs (``invalidate``); an
  image opened before keeps its version across the switch; at the end SHA-256 equals the
  primary's.
* Catch-up: a mirror whose primary dropped the log it needs (log space) resyncs by itself,
  moving at most 1.2x the changed bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

from marsfs.testing.checks import proxied_pair, sha, status, wait_for, wait_synced
from marsfs.testing.faultproxy import ProxyProcess
from marsfs.testing.harness import Harness

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4096


def fill(image: Path, regions: list[tuple[int, int]], seed: int) -> None:
    """Random bytes into ``regions`` of a volume image (through the mount), fsync'd."""
    rng = random.Random(seed)
    fd = os.open(image, os.O_RDWR)
    try:
        for off, n in regions:
            for pos in range(off, off + n, 4 * MiB):
                os.pwrite(fd, rng.randbytes(min(4 * MiB, off + n - pos)), pos)
        os.fsync(fd)
    finally:
        os.close(fd)


def moved(proxy: ProxyProcess) -> int:
    st = proxy.stats()
    return int(st["bytes_down"] + st["bytes_up"])


def test_fast_sync_of_a_seeded_2g_image_moves_under_3_percent(tmp_path: Path) -> None:
    with Harness(tmp_path) as h, ProxyProcess() as proxy:
        a, b = proxied_pair(h, proxy)
        size = 2 * GiB
        a.cli("create", "vm", "--size", "2G", "--thin")
        # 256 MiB of data in 32 places; the rest is zeros (thin volumes keep the disk use small)
        fill(a.image("vm"), [(i * 64 * MiB, 8 * MiB) for i in range(32)], seed=1)
        seed = tmp_path / "seed.img"
        with open(a.image("vm"), "rb") as src, open(seed, "wb") as dst:
            shutil.copyfileobj(src, dst, 4 * MiB)  # zeros are written too: sparse below
        os.truncate(seed, size)
        rng = random.Random(2)
        changed = rng.sample(range(size // BLOCK), size // BLOCK // 100)  # 1 % of the blocks
        with open(seed, "r+b") as f:
            for blk in changed:
                f.seek(blk * BLOCK)
                f.write(rng.randbytes(BLOCK))
        want = sha(a.image("vm"))
        before = moved(proxy)
        r = b.cli("join", "vm", "--from", "a", "--seed", str(seed), "--wait", timeout=600)
        assert "synced to LSN" in r.stderr, r.stderr
        wait_synced(b, "vm", timeout=120)
        total = moved(proxy) - before
        print(f"seeded fast sync of 2 GiB, 1 % of blocks differ: moved {total} bytes ({100 * total / size:.2f} %)")
        assert total < 0.03 * size, f"moved {total} bytes, {100 * total / size:.2f} % of the image"
        # exactly the differing blocks travelled (most are zeros at the source: lz4 shrinks them)
        assert f"{len(changed) * BLOCK} of {size} compared bytes were sent" in b.logfile.read_text()
        assert sha(b.image("vm")) == want


def test_a_first_copy_killed_half_way_resumes_without_resending(tmp_path: Path) -> None:
    with Harness(tmp_path) as h, ProxyProcess() as proxy:
        a, b = proxied_pair(h, proxy)
        size = 256 * MiB
        a.cli("create", "vm", "--size", "256M", "--thin")
        fill(a.image("vm"), [(0, size)], seed=3)  # all of it: every block must travel once
        want = sha(a.image("vm"))
        b.cli("join", "vm", "--from", "a", "--rate", "32M")
        wait_for(lambda: (status(b, "vm").get("progress") or 0.0) >= 0.5, timeout=120, what="half of the copy")
        b.kill()
        b.abort()
        b.unmount()
        first = moved(proxy)
        assert first < 0.8 * size
        b.start()  # (without the --rate of the join: a rate is for one sync)
        wait_synced(b, "vm", timeout=300)
        assert "the first copy of vm from a resumes" in b.logfile.read_text()
        after = moved(proxy) - first
        print(f"first copy of 256 MiB killed half way: {first} bytes before, {after} after the restart")
        assert after < 0.6 * size, f"the resumed copy moved {after} bytes, {100 * after / size:.0f} % of the image"
        assert sha(b.image("vm")) == want


def test_a_resyncing_mirror_serves_its_old_version_until_it_switches(tmp_path: Path) -> None:
    with Harness(tmp_path) as h, ProxyProcess() as proxy:
        a, b = proxied_pair(h, proxy)
        a.cli("create", "vm", "--size", "128M", "--thin")
        fill(a.image("vm"), [(0, 64 * MiB)], seed=4)
        b.cli("join", "vm", "--from", "a")
        wait_synced(b, "vm", timeout=120)
        old = sha(b.image("vm"))
        assert old == sha(a.image("vm"))
        b.cli("pause-fetch", "vm")
        fill(a.image("vm"), [(32 * MiB, 64 * MiB)], seed=5)  # the primary moves on
        new = sha(a.image("vm"))
        held = open(b.image("vm"), "rb")  # held across the switch on purpose
        try:
            b.cli("invalidate", "vm", "--rate", "16M")
            assert status(b, "vm")["state"] == "resyncing"
            reads = 0
            while status(b, "vm")["state"] == "resyncing":
                got = sha(b.image("vm"))  # a new open: the last version until the switch, then the new one
                if got != old:  # the switch came between the status and the open
                    assert got == new, "a new open saw neither the old version nor the new one"
                    break
                reads += 1
            assert reads >= 1
            held.seek(0)
            again = hashlib.sha256()
            while chunk := held.read(4 * MiB):
                again.update(chunk)
            assert again.hexdigest() == old  # opened before the switch: its version, byte-exact
        finally:
            held.close()
        b.cli("resume-fetch", "vm")
        wait_synced(b, "vm", timeout=120)
        assert sha(b.image("vm")) == sha(a.image("vm")) != old


def test_invalidate_is_refused_on_a_primary(tmp_path: Path) -> None:
    with Harness(tmp_path) as h:
        a = h.node("a")
        a.cli("create", "vm", "--size", "16M", "--thin")
        r = a.cli("invalidate", "vm", check=False)
        assert r.returncode == 1 and "is primary on node a: invalidate discards a mirror's copy" in r.stderr


def test_a_mirror_whose_log_was_dropped_resyncs_what_changed(tmp_path: Path) -> None:
    """G8 end to end: the primary drops the log a stopped mirror needs (log space), the mirror
    comes back, is refused as log-trimmed, and resyncs by itself only the changed extents."""
    with Harness(tmp_path) as h, ProxyProcess() as proxy:
        a, b = proxied_pair(h, proxy, extra_a=["--log-space", "32M", "--history", "1M"])
        a.cli("create", "vm", "--size", "256M", "--thin")
        fill(a.image("vm"), [(0, 8 * MiB)], seed=6)
        b.cli("join", "vm", "--from", "a")
        wait_synced(b, "vm", timeout=120)
        b.stop()
        b.unmount()
        changed = 64 * MiB
        fill(a.image("vm"), [(64 * MiB, changed)], seed=7)  # twice the log space: the log goes
        wait_for(lambda: status(a, "vm")["dropped"], timeout=120, what="the primary to drop the mirror's log")
        before = moved(proxy)
        b.start()
        wait_synced(b, "vm", timeout=120)
        after = moved(proxy) - before
        print(f"catch-up after a dropped log: {changed} bytes changed, {after} moved")
        assert sha(b.image("vm")) == sha(a.image("vm"))
        assert "resyncing what changed" in b.logfile.read_text()
        assert after <= 1.2 * changed, f"moved {after} bytes for {changed} changed"
