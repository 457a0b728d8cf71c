"""A sync volume between real node processes over mutual TLS, the mirror behind the fault proxy.

* An fsync on the primary's image returns only once the mirror's log holds it (its durable LSN
  is there when the fsync returned).
* The link stalls: the first fsync completes after the timeout and the volume runs degraded
  (status, and the daemon's log say so); further fsyncs complete without any more timeouts
  (``degradations`` stays 1); the link heals, the volume is in sync again by itself, and
  fsyncs wait for the mirror again.
* With ``--refuse`` fsyncs fail with EIO while degraded and work again once in sync.
* ``mode`` changes it online and both nodes show it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from marsfs.testing.checks import proxied_pair, status, wait_for, wait_synced
from marsfs.testing.faultproxy import ProxyProcess
from marsfs.testing.harness import Harness, NodeProcess


def fsync_write(image: Path, i: int) -> None:
    """4 KiB at block ``i`` of the image, then fsync (what an application's commit does)."""
    fd = os.open(image, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([i % 251 + 1]) * 4096, (i % 1024) * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_of(node: NodeProcess) -> dict[str, Any]:
    row = status(node, "vm")
    assert row["mode"] == "sync" and row["sync_mode"] is not None, row
    out: dict[str, Any] = row["sync_mode"]
    return out


def test_a_sync_volume_over_a_stalled_link(harness: Harness, tmp_path: Path) -> None:
    with ProxyProcess() as proxy:
        a, b = proxied_pair(harness, proxy)
        a.cli("create", "vm", "--size", "16M", "--mode", "sync", "--timeout", "1")
        b.cli("join", "vm", "--from", "a")
        wait_synced(b, "vm")
        wait_for(lambda: status(b, "vm")["mode"] == "sync", what="b to learn the mode")
        image = a.image("vm")
        for i in range(20):
            fsync_write(image, i)
            assert status(b, "vm")["durable_lsn"] >= status(a, "vm")["durable_lsn"], i  # b held it first
        assert sync_of(a)["state"] == "in-sync" and sync_of(a)["holding"] == ["b"]

        proxy.set(stall=True)
        fsync_write(image, 100)  # waits the timeout, once
        st = sync_of(a)
        assert st["state"] == "degraded" and st["since"] and st["degradations"] == 1, st
        assert any(w.startswith("sync degraded to async since") for w in status(a, "vm")["warnings"])
        assert "sync degraded to async since" in a.logfile.read_text()
        for i in range(20):  # degraded: no further timeouts
            fsync_write(image, 101 + i)
        st = sync_of(a)
        assert st["state"] == "degraded" and st["degradations"] == 1 and st["behind_records"] > 20, st

        proxy.clear()  # healed: in sync again by itself
        wait_for(lambda: sync_of(a)["state"] == "in-sync", timeout=60, what="sync again")
        assert "in sync again" in a.logfile.read_text()
        for i in range(5):
            fsync_write(image, 200 + i)
            assert status(b, "vm")["durable_lsn"] >= status(a, "vm")["durable_lsn"], i
        assert sync_of(a)["degradations"] == 1


def test_refuse_fails_fsync_while_degraded(harness: Harness, tmp_path: Path) -> None:
    with ProxyProcess() as proxy:
        a, b = proxied_pair(harness, proxy)
        a.cli("create", "vm", "--size", "16M")
        b.cli("join", "vm", "--from", "a")
        wait_synced(b, "vm")
        out = a.cli("mode", "vm", "sync", "--timeout", "1", "--refuse").stdout
        assert out.startswith("vm: replication mode sync (1 mirror, timeout 1 s, refuse") and "at once" in out
        wait_for(lambda: status(b, "vm")["mode"] == "sync", what="b to learn the mode")
        image = a.image("vm")
        fsync_write(image, 1)
        proxy.set(stall=True)
        for i in range(3):
            with pytest.raises(OSError) as e:
                fsync_write(image, 2 + i)
            assert e.value.errno == errno.EIO
        assert sync_of(a)["degradations"] == 1
        proxy.clear()
        wait_for(lambda: sync_of(a)["state"] == "in-sync", timeout=60, what="sync again")
        fsync_write(image, 10)
        assert status(b, "vm")["durable_lsn"] >= status(a, "vm")["durable_lsn"]
        out = a.cli("mode", "vm", "async").stdout
        assert out.startswith("vm: replication mode async")
        assert status(a, "vm")["sync_mode"] is None
