"""``serve --metrics`` on real daemons: scraped over HTTP, parsed by prometheus_client's parser,
checked by ``promtool check metrics``, and following a mirror's lag while its fetch is paused.
A bad ``--metrics`` is a usage error before anything starts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from marsfs.testing.checks import wait_for, wait_synced
from marsfs.testing.harness import Harness, NodeProcess, free_port, is_mounted

MiB = 1 << 20


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body: bytes = r.read()
        return body.decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def promtool_check(text: str) -> None:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (scripts/_bootstrap does)")
    r = subprocess.run([tool, "check", "metrics"], input=text, text=True, capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr


def write_synced(node: NodeProcess, data: bytes, offset: int = 0) -> None:
    fd = os.open(node.image("vm"), os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_mirrors_lag_rises_while_its_fetch_is_paused_and_returns_to_0(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b"], start=False)
    a, b = nodes["a"], nodes["b"]
    ports = {"a": free_port(), "b": free_port()}
    for name, n in nodes.items():
        n.extra += ["--metrics", f"127.0.0.1:{ports[name]}"]
        n.start()
    a.cli("create", "vm", "--size", "8M")
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    for port in ports.values():
        text = scrape(port)
        promtool_check(text)
    text = scrape(ports["b"])
    assert metric(text, "marsfs_volume_role", volume="vm", role="mirror") == 1
    assert metric(text, "marsfs_volume_lag_bytes", volume="vm") == 0
    assert metric(scrape(ports["a"]), "marsfs_peer_state", volume="vm", peer="b", state="synced") == 1

    b.cli("pause-fetch", "vm")
    write_synced(a, os.urandom(MiB))
    wait_for(lambda: (metric(scrape(ports["b"]), "marsfs_volume_lag_bytes", volume="vm") or 0) >= MiB,
             what="the paused mirror's lag_bytes to rise past the 1 MiB written")
    text = scrape(ports["b"])
    assert metric(text, "marsfs_volume_state", volume="vm", state="fetch-paused") == 1
    assert metric(text, "marsfs_volume_fetch_paused", volume="vm") == 1
    assert (metric(text, "marsfs_volume_lag_seconds", volume="vm") or 0) > 0
    wait_for(lambda: (metric(scrape(ports["a"]), "marsfs_peer_lag_bytes", volume="vm", peer="b") or 0) >= MiB,
             what="the primary to see its mirror lag")
    promtool_check(text)
    fetched = metric(text, "marsfs_volume_fetched_bytes_total", volume="vm") or 0

    b.cli("resume-fetch", "vm")
    wait_for(lambda: metric(scrape(ports["b"]), "marsfs_volume_lag_bytes", volume="vm") == 0,
             what="the mirror's lag_bytes to return to 0")
    wait_synced(b, "vm")
    text = scrape(ports["b"])
    assert metric(text, "marsfs_volume_state", volume="vm", state="synced") == 1
    assert (metric(text, "marsfs_volume_fetched_bytes_total", volume="vm") or 0) >= fetched + MiB
    assert (metric(text, "marsfs_volume_replayed_bytes_total", volume="vm") or 0) >= MiB
    text = scrape(ports["a"])
    assert (metric(text, "marsfs_volume_fsync_duration_seconds_count", volume="vm") or 0) >= 1
    assert metric(text, "marsfs_volume_head_lsn", volume="vm") == metric(scrape(ports["b"]), "marsfs_volume_head_lsn",
                                                                         volume="vm")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{ports['a']}/", timeout=10)
    assert e.value.code == 404


def test_a_bad_or_busy_metrics_address_refuses_the_start(harness: Harness) -> None:
    n = harness.node("n1", start=False)
    for bad in ("nonsense", "127.0.0.1:0"):
        r = subprocess.run([sys.executable, "-m", "marsfs", "serve", "--node", "n1", "--state", os.fspath(n.state),
                            "--mount", os.fspath(n.mount), "--metrics", bad], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last == f"marsfs: error: --metrics: address {bad!r}: give HOST:PORT, like 127.0.0.1:7600", r.stderr
        assert "Traceback" not in r.stderr and not is_mounted(n.mount)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        n.extra = ["--metrics", f"127.0.0.1:{port}"]
        with pytest.raises(RuntimeError, match="exited") as e:
            n.start()
    assert f"cannot listen for metrics scrapes on 127.0.0.1:{port}: " in str(e.value)
    assert "something else listens there" in str(e.value) and "Traceback" not in str(e.value)
    assert not is_mounted(n.mount)
