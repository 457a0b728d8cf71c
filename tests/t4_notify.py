"""``marsfs serve`` under a ``Type=notify`` unit, as systemd sees it: a real daemon, run with the
unit's capability bounding set and NoNewPrivileges (setpriv), reports to a ``NOTIFY_SOCKET``
the test binds. READY=1 arrives once, only when the FUSE mount is up and the control socket
answers; STOPPING=1 arrives when SIGTERM begins the stop, while it still serves an open volume."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from marsfs.testing.harness import Harness, NodeProcess, is_mounted
from t0_packaging import UNIT, unit_keys

MiB = 1 << 20
WAIT = 60.0  #: how long a message may take at most (a failure bound, not a measurement)


@dataclass(frozen=True)
class Heard:
    message: str
    mounted: bool  #: the FUSE mount was there when the message was read
    answers: bool | None  #: the control socket answered `status` then (asked on READY=1 only)


class Listener:
    """The service manager's end: a datagram socket with an abstract name, read by a thread
    that looks at the mount (and, on READY=1, asks the daemon) the moment a message arrives."""

    def __init__(self, node: NodeProcess) -> None:
        self.name = f"marsfs-notify-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.node = node
        self.heard: list[Heard] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            mounted = is_mounted(self.node.mount)
            answers = None
            if "READY=1" in data.splitlines():
                answers = self.node.cli("status", check=False).returncode == 0
            self.heard.append(Heard(data, mounted, answers))

    def wait_for(self, line: str) -> Heard:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for h in list(self.heard):
                if line in h.message.splitlines():
                    return h
            time.sleep(0.05)
        raise AssertionError(f"no {line} within {WAIT} s; heard {self.heard}\n{self.node.log_tail()}")

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()


def unit_restrictions() -> list[str]:
    """setpriv arguments for what the unit restricts that a process can take along: its
    capability bounding set and NoNewPrivileges."""
    service = unit_keys(UNIT.read_text())["Service"]
    caps = [c.removeprefix("CAP_").lower() for c in service["CapabilityBoundingSet"].split()]
    argv = ["setpriv", "--bounding-set=-all," + ",".join("+" + c for c in caps)]
    if service.get("NoNewPrivileges") == "yes":
        argv.append("--no-new-privs")
    return argv


def test_ready_once_mounted_and_stopping_on_sigterm(harness: Harness) -> None:
    node = harness.node("n1")
    node.cli("create", "vm1", "--size", "64M")
    data = os.urandom(MiB)
    fd = os.open(node.image("vm1"), os.O_RDWR)
    try:
        os.pwrite(fd, data, 4 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert node.stop() == 0

    listener = Listener(node)
    try:
        node.env = {"NOTIFY_SOCKET": "@" + listener.name}
        node.prefix = unit_restrictions()
        node.start()  # recovers vm1 (every record verified), mounts, serves
        ready = listener.wait_for("READY=1")
        assert ready.mounted and ready.answers, ready
        assert "STATUS=serving 1 volume(s) at " + os.fspath(node.mount) in ready.message.splitlines()
        first = listener.heard[0]
        assert first.message.startswith("STATUS=recovering") and not first.mounted, listener.heard

        # FUSE works under the unit's restrictions: the data is back, and writes are taken
        fd = os.open(node.image("vm1"), os.O_RDWR)
        try:
            assert os.pread(fd, MiB, 4 * MiB) == data
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            # SIGTERM with vm1 open: the stop begins (STOPPING=1), the daemon keeps serving
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
            stopping = listener.wait_for("STOPPING=1")
            assert stopping.mounted and node.proc.poll() is None, stopping
            assert "STATUS=SIGTERM: waiting for open volumes to close: vm1" in stopping.message.splitlines()
            assert os.pread(fd, MiB, 0) == data
        finally:
            os.close(fd)
        assert node.proc.wait(WAIT) == 0
        assert not is_mounted(node.mount)
        said = [line for h in listener.heard for line in h.message.splitlines()]
        assert said.count("READY=1") == 1 and said.count("STOPPING=1") == 1, said
        assert said.index("READY=1") < said.index("STOPPING=1")
    finally:
        listener.close()
