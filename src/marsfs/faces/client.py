"""The client side of the control socket: one request, one answer (see :mod:`marsfs.faces.control`).

Apart from the server so that a command-line process imports only this (sockets and JSON, no
trio): ``marsfs create`` in a loop of a hundred pays its start-up a hundred times.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from marsfs.errors import DaemonNotRunning, DaemonRefused, DaemonRejectedUsage, DaemonWentAway, MarsError


def socket_path(state: Path) -> Path:
    return state / "control.sock"


def call(state: Path, cmd: str, timeout: float | None = 60.0, **args: Any) -> Any:
    """Send one command to the daemon of ``state`` (blocking); the result, or the daemon's
    refusal raised as :class:`DaemonRefused` (exit status 1) or :class:`DaemonRejectedUsage` (2)."""
    path = socket_path(state)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"no marsfs daemon is running for state directory {state}; start one with: "
                f"marsfs serve --node NAME --state {state} --mount DIR") from None
        except PermissionError:
            raise MarsError(f"permission denied on {path}: the control socket is root-only; run as root") from None
        buf = b""
        try:
            s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        if not buf.endswith(b"\n"):
            raise DaemonWentAway("the daemon closed the control connection without answering; see its log")
    except TimeoutError:
        raise MarsError(f"the daemon did not answer {cmd!r} within {timeout:.0f} s; see its log") from None
    finally:
        s.close()
    resp = json.loads(buf)
    if resp.get("ok"):
        return resp.get("result")
    raise _refusal(resp.get("exit"))(resp.get("error", "unknown error"))


def _refusal(exit_code: Any) -> type[DaemonRefused]:
    """The class a refusal comes back as: the exit status the daemon sent is its class data."""
    return DaemonRejectedUsage if exit_code == DaemonRejectedUsage.exit_code else DaemonRefused
