"""Through real daemons: what a mirror says when its source changes under it.

* ``delete v3 --force`` and ``create v3`` on the primary, then a write there: the
  mirror does not stay synced; it stops in ``needs-resync`` and says the source's volume was
  deleted, ``wait --synced`` fails, and leave + join mirror the new volume.
* after ``pause-fetch`` the mirror keeps learning the primary's
  durable LSN: 8 MiB written on the primary show as lag (records and bytes) in state
  ``fetch-paused``; ``resume-fetch`` converges.
* the first copy of a 2 GiB volume shows progress, a rate and an ETA while it
  runs (behind a slow link, so that it takes seconds). Since fast sync an empty
  volume has nothing to compare and its copy is done at once; 8 MiB in 16 places are.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from marsfs.faces.control import call
from marsfs.testing.checks import converge, proxied_pair, sha, status, wait_for, wait_synced
from marsfs.testing.faultproxy import ProxyProcess
from marsfs.testing.harness import Harness, NodeProcess

MiB = 1 << 20


def write_random(node: NodeProcess, vol: str, offset: int, size: int, seed: int) -> None:
    """Incompressible bytes into the primary's image, fsync'd."""
    fd = os.open(node.image(vol), os.O_RDWR)
    try:
        os.pwrite(fd, random.Random(seed).randbytes(size), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def pair(harness: Harness, vol: str, size: str) -> tuple[NodeProcess, NodeProcess]:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", vol, "--size", size)
    write_random(a, vol, 0, MiB, seed=1)
    b.cli("join", vol, "--from", "a")
    wait_synced(b, vol)
    return a, b


def test_a_mirror_notices_its_source_volume_deleted_and_created_again(harness: Harness) -> None:
    a, b = pair(harness, "v3", "32M")
    old = status(b, "v3")
    assert old["state"] == "synced"
    a.cli("delete", "v3", "--force")
    a.cli("create", "v3", "--size", "32M")
    write_random(a, "v3", 0, 2 * MiB, seed=2)
    wait_for(lambda: status(b, "v3")["state"] != "synced", timeout=15, what="the mirror to stop saying synced")
    wait_for(lambda: status(b, "v3")["state"] == "needs-resync", timeout=15, what="state needs-resync")
    st = status(b, "v3")
    reason = "; ".join(st["errors"])
    assert "fetch from a: a deleted volume v3" in reason and "marsfs leave v3" in reason, st
    assert st["fetched_lsn"] == old["fetched_lsn"], "records of the new volume reached the old copy"
    r = b.cli("wait", "v3", "--synced", "--timeout", "5", check=False)
    assert r.returncode != 0 and "needs-resync" in r.stderr and "deleted volume v3" in r.stderr, r.stderr
    assert sha(a.image("v3")) != sha(b.image("v3"))  # the images differ, and status says why
    time.sleep(1)
    assert status(b, "v3")["state"] == "needs-resync", "the verdict must hold (no retries that forget it)"
    assert status(a, "v3")["peers"] == [], "the new volume has no mirror yet"
    # the way out the reason names
    b.cli("leave", "v3")
    b.cli("join", "v3", "--from", "a")
    wait_synced(b, "v3")
    assert sha(a.image("v3")) == sha(b.image("v3"))


def test_a_paused_mirror_knows_how_far_behind_it_is(harness: Harness) -> None:
    a, b = pair(harness, "vm", "64M")
    b.cli("pause-fetch", "vm")
    wait_for(lambda: status(b, "vm")["state"] == "fetch-paused", what="state fetch-paused")
    before = status(b, "vm")["fetched_lsn"]
    written = 8 * MiB
    write_random(a, "vm", 4 * MiB, written, seed=3)
    wait_for(lambda: (s := status(a, "vm"))["durable_lsn"] == s["head_lsn"], what="the primary's log to be durable")
    durable = status(a, "vm")["durable_lsn"]
    wait_for(lambda: status(b, "vm")["primary_durable_lsn"] >= durable, timeout=10,
             what="the paused mirror to hear of the primary's writes")
    st = status(b, "vm")
    print(f"paused mirror: {st['state']}, lag {st['lag_records']} records, {st['lag_bytes']} bytes, "
          f"{st['lag_seconds']:.1f} s; {written} bytes written")
    assert st["state"] == "fetch-paused" and st["fetched_lsn"] == before, st
    assert st["lag_records"] == st["primary_durable_lsn"] - before >= written // (64 * 1024), st
    assert written <= st["lag_bytes"] <= written * 1.05, st  # records as stored: payload and headers
    assert st["connected"] and not st["errors"], st
    (peer,) = status(a, "vm")["peers"]  # the primary agrees
    assert peer["state"] == "fetch-paused" and peer["lag_records"] == st["lag_records"], peer
    b.cli("resume-fetch", "vm")
    converge(a, b)
    assert sha(a.image("vm")) == sha(b.image("vm"))


def test_a_first_copy_shows_sync_progress_rate_and_eta(harness: Harness) -> None:
    with ProxyProcess() as proxy:
        a, b = proxied_pair(harness, proxy)
        a.cli("create", "v2", "--size", "2G")
        for i in range(16):
            write_random(a, "v2", i * 128 * MiB, 512 * 1024, seed=i)
        # 8 MiB to send at 2 MB/s: the copy's progress reaches the mirror over seconds
        proxy.set(bandwidth=2_000_000, direction="down")
        b.cli("join", "v2", "--from", "a")
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            (row,) = call(b.state, "status", volume="v2")
            seen.append(row)
            if row["state"] != "syncing":
                break
            time.sleep(0.05)
        proxy.clear()
        wait_synced(b, "v2", timeout=60)
        during = [(r["progress"], r["fetch_rate"], r["eta_seconds"]) for r in seen if r["state"] == "syncing"]
        print(f"{len(during)} samples while syncing (progress, rate, eta): {during[::max(1, len(during) // 12)]}")
        moving = [x for x in during if 0 < x[0] < 1]
        assert moving, f"progress never between 0 and 1 while syncing: {during}"
        assert len({x[0] for x in moving}) >= 2, f"progress did not move: {moving}"
        assert all(rate > 0 and isinstance(eta, (int, float)) for _, rate, eta in moving), moving
        assert [x[0] for x in during] == sorted(x[0] for x in during), "progress went backwards"
