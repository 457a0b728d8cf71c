"""The ``sd_notify`` client speaks the protocol: a datagram of ``KEY=VALUE`` lines to a path or
an abstract name (``@``), READY=1 and STOPPING=1 once each, nothing without ``NOTIFY_SOCKET``,
and no error when nobody listens."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from marsfs.faces.sdnotify import Notifier


def _bound(name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(name)
    s.settimeout(5)
    return s


def test_notifier_sends_to_a_path(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with _bound(os.fspath(path)) as s:
        n = Notifier({"NOTIFY_SOCKET": os.fspath(path)})
        n.status("recovering")
        n.ready("serving 1 volume(s)")
        n.ready("serving 2 volume(s)")  # READY=1 only once
        n.stopping("SIGTERM")
        assert [s.recv(4096).decode() for _ in range(4)] == [
            "STATUS=recovering", "READY=1\nSTATUS=serving 1 volume(s)", "STATUS=serving 2 volume(s)",
            "STOPPING=1\nSTATUS=SIGTERM"]


def test_notifier_abstract_name() -> None:
    name = f"marsfs-test-{uuid.uuid4().hex}"
    with _bound("\0" + name) as s:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert s.recv(4096) == b"READY=1\nSTATUS=up"


def test_notifier_without_socket_or_listener(tmp_path: Path) -> None:
    """No NOTIFY_SOCKET: nothing; a socket nobody listens on: dropped, the caller goes on."""
    assert Notifier({}).address == ""
    Notifier({}).ready("up")
    Notifier({"NOTIFY_SOCKET": os.fspath(tmp_path / "gone")}).ready("up")
