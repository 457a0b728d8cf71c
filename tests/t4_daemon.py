"""The daemon through real processes, faces side: start failures leave no mount, SIGTERM
with volumes open, the primary's table, ``wait --synced`` and ``status --watch | head``,
planned commands and config keys on the real command line."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marsfs.testing.checks import fsck_clean, sha, status, wait_for, wait_synced
from marsfs.testing.harness import Harness, NodeProcess, is_mounted, run

MiB = 1 << 20


def log_has(node: NodeProcess, text: str) -> bool:
    return text in node.logfile.read_text(errors="replace")


def refused_start(node: NodeProcess, match: str) -> None:
    """The start fails with one line naming ``match`` and leaves the mount point free."""
    with pytest.raises(RuntimeError, match="exited") as e:
        node.start(timeout=30)
    assert not is_mounted(node.mount), f"a failed start left a mount at {node.mount}: {e.value}"
    assert match in str(e.value), str(e.value)
    assert "Traceback" not in str(e.value)


def test_bad_listen_and_failed_starts_leave_no_mount(harness: Harness, tmp_path: Path) -> None:
    node = harness.node("n1", start=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        for listen, match in [(f"127.0.0.1:{port}", "something else listens there"),
                              ("nonsense", "give HOST:PORT"),
                              ("127.0.0.1:99999", "give HOST:PORT"),
                              ("192.0.2.1:7600", "not an address of this machine")]:
            node.extra = ["--listen", listen]
            refused_start(node, match)
    conf = tmp_path / "marsfs.toml"
    conf.write_text('lisen = "127.0.0.1:7600"\n')
    node.extra = ["--config", os.fspath(conf)]
    refused_start(node, "unknown key 'lisen'")
    # a failure after the mount (here: the control socket cannot be created) unmounts again
    long_state = node.dir / ("s" * 100) / "state"
    good_state = node.state
    node.state, node.extra = long_state, []
    refused_start(node, "cannot create the control socket")
    node.state = good_state
    node.extra = ["--listen", f"127.0.0.1:{port}"]  # free again: its listener closed
    node.start()
    node.cli("create", "vm", "--size", "1M")
    assert node.stop() == 0


def test_sigterm_keeps_serving_until_open_volumes_close(harness: Harness, tmp_path: Path) -> None:
    node = harness.node("n1")
    node.cli("create", "vm", "--size", "64M")
    dev = harness.attach(node.image("vm"))
    run(["mkfs.ext4", "-q", dev])
    ext = harness.mount_fs(dev, tmp_path / "ext")
    (ext / "before").write_bytes(b"b" * 65536)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: log_has(node, "volume vm is open (1 handle(s)"), what="the log to name the open volume")
    time.sleep(1.0)
    assert node.proc.poll() is None, "the daemon pulled the disk from under a mounted ext4"
    assert log_has(node, "still serving until every volume is closed")
    # still serving: the filesystem on it works, status answers, new opens are refused
    (ext / "after").write_bytes(b"a" * 65536)
    run(["sync", "-f", os.fspath(ext / "after")])
    assert status(node, "vm")["open_handles"] == 1
    with pytest.raises(OSError) as e:
        os.open(node.image("vm"), os.O_RDONLY)
    assert e.value.errno == errno.EBUSY
    harness.umount_fs(ext)
    harness.detach(dev)
    assert node.proc.wait(timeout=30) == 0
    assert log_has(node, "every volume is closed") and log_has(node, "stopped cleanly")
    assert not is_mounted(node.mount)
    node.start()
    fsck_clean(node.image("vm"))
    dev = harness.attach(node.image("vm"))
    ext = harness.mount_fs(dev, tmp_path / "ext")
    assert (ext / "before").read_bytes() == b"b" * 65536 and (ext / "after").read_bytes() == b"a" * 65536


def test_a_second_sigterm_or_the_stop_timeout_forces_the_stop(harness: Harness) -> None:
    node = harness.node("n1", extra=["--stop-timeout", "1"])
    node.cli("create", "vm", "--size", "8M")
    assert node.proc is not None
    # the timeout expires
    dev = harness.attach(node.image("vm"))
    start = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=30) == 1
    assert time.monotonic() - start >= 1.0
    assert log_has(node, "stop forced by the stop timeout of 1 s with volumes open: vm (1 handle(s))")
    assert log_has(node, "node n1 stopped by force")
    assert not is_mounted(node.mount)
    harness.detach(dev)
    # a second signal, with no timeout
    node.extra = ["--stop-timeout", "inf"]
    node.start()
    dev = harness.attach(node.image("vm"))
    node.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: log_has(node, "a second SIGTERM forces the stop"), what="the first SIGTERM to be logged")
    time.sleep(0.5)
    assert node.proc.poll() is None
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=30) == 1
    assert log_has(node, "stop forced by a second SIGTERM with volumes open: vm (1 handle(s))")
    harness.detach(dev)
    node.start()  # the mount point is free for the next start


def test_wait_synced_and_the_primarys_table(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "8M")
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    r = b.cli("wait", "vm", "--synced", "--timeout", "0", check=False)
    assert r.returncode == 0, r.stderr
    assert a.cli("wait", "vm", "--synced", "--timeout", "30", check=False).returncode == 0
    assert "  mirror b: synced, lag 0 B/0.0s (0 records)" in a.cli("status").stdout
    # a mirror that does not fetch: the primary's wait and table say so
    b.cli("pause-fetch", "vm")
    fd = os.open(a.image("vm"), os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(MiB), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    wait_for(lambda: "  mirror b: fetch-paused, lag 1.0 MiB" in a.cli("status").stdout,
             what="the primary's table to show the paused mirror's lag")
    r = a.cli("wait", "vm", "--synced", "--timeout", "1", check=False)
    assert r.returncode == 1 and "vm not synced after 1 s: mirror b is fetch-paused" in r.stderr, r.stderr
    b.cli("resume-fetch", "vm")
    r = a.cli("wait", "vm", "--synced", "--timeout", "60", check=False)
    assert r.returncode == 0, r.stderr
    assert sha(a.image("vm")) == sha(b.image("vm"))  # the primary's wait covers replay too
    a.cli("create", "solo", "--size", "1M")
    r = a.cli("wait", "solo", "--synced", check=False)
    assert r.returncode == 1 and "solo is primary on node a and has no mirrors to wait for" in r.stderr


def test_status_watch_into_head_and_one_line_refusals(harness: Harness) -> None:
    node = harness.node("n1")
    node.cli("create", "vm", "--size", "1M")
    watch = subprocess.Popen([sys.executable, "-m", "marsfs", "--state", os.fspath(node.state), "status",
                              "--watch", "--interval", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert watch.stdout is not None and watch.stderr is not None
    for _ in range(5):
        watch.stdout.readline()
    watch.stdout.close()  # what head does after its lines
    assert watch.wait(timeout=30) == 141
    assert watch.stderr.read() == b""
    r = node.cli("primary", "vm", "--force", check=False)  # a primary cannot fail over to itself: one line
    assert r.returncode == 1 and r.stderr == "marsfs: error: volume 'vm' is already primary on node n1: nothing to do\n"
    r = node.cli("mark", "vm", "head", check=False)
    assert r.returncode == 1 and "mark name 'head' is invalid: 1-200 bytes; not head" in r.stderr
