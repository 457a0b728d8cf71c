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

MAX_SOCKET_PATH = 108  #: bytes of a Unix socket address (sun_path), the final NUL included


def socket_path(state: Path) -> Path:
    return state / "control.sock"


def call(state: Path, cmd: str, timeout: float | None = 60.0, **args: Any) -> Any:
    """Send one command to the daemon of ``state`` (blocking); the result, or the daemon's
    refusal raised as :class:`DaemonRefused` (exit status 1) or :class:`DaemonRejectedUsage` (2)."""
    path = socket_path(state)
    start = f"start one with: marsfs serve --node NAME --state {state} --mount DIR"
    if len(os.fsencode(path)) >= MAX_SOCKET_PATH:  # no daemon could have made it (serve_control says so)
        raise DaemonNotRunning(f"no marsfs daemon can run for state directory {state}: the path of its control "
                               f"socket is longer than a Unix socket address holds ({MAX_SOCKET_PATH - 1} bytes); "
                               "give the --state directory of a running node, or use a shorter path")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(os.fspath(path))
        except FileNotFoundError:
            raise DaemonNotRunning(f"no marsfs daemon is running for state directory {state}; {start}") from None
        except ConnectionRefusedError:  # a socket left by a daemon that died (or a file that is no socket)
            raise DaemonNotRunning(f"no marsfs daemon is running for state directory {state} ({path} is left from "
                                   f"one that is gone); {start}") from None
        except NotADirectoryError:
            raise DaemonNotRunning(f"state directory {state} is not a directory: give the --state directory of a "
                                   "node (or set MARSFS_STATE)") from None
        except PermissionError:
            raise MarsError(f"permission denied on {path}: the control socket is root-only; run as root") from None
        except TimeoutError:
            raise  # below: the daemon did not answer in time
        except OSError as e:
            raise DaemonNotRunning(f"cannot reach the daemon of state directory {state} at {path}: "
                                   f"{e.strerror or e}; {start}") from None
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
    try:
        resp = json.loads(buf)
        if not isinstance(resp, dict):
            raise ValueError("not an object")
    except ValueError:
        raise DaemonRefused(f"the answer on {path} is not a marsfs daemon's; is --state {state} a marsfs node's "
                            "state directory? (see its daemon's log)") from None
    if resp.get("ok"):
        return resp.get("result")
    raise _refusal(resp.get("exit"))(resp.get("error", "unknown error"))


def _refusal(exit_code: Any) -> type[DaemonRefused]:
    """The class a refusal comes back as: the exit status the daemon sent is its class data."""
    return DaemonRejectedUsage if exit_code == DaemonRejectedUsage.exit_code else DaemonRefused
