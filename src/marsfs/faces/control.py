"""The control socket: how every command but ``serve`` talks to the daemon.

Protocol: a Unix stream socket ``DIR/control.sock`` (mode 0600, and the peer's uid must be
root or the daemon's own). The client sends one JSON object per line,
``{"cmd": NAME, "args": {...}}``; the daemon answers one line, ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": MESSAGE, "exit": CODE}``. A connection may carry several requests.
Requests are bounded (1 MiB); malformed ones get an error answer and never disturb service.

The client side, :func:`call`, is :mod:`marsfs.faces.client` (re-exported here): the command
line imports that alone, without trio. This module only carries requests: what each command means is the table in
:mod:`marsfs.faces.commands`. A refusal keeps its exit status across the socket; a failure
that is not a :class:`MarsError` is a bug, logged with its traceback and answered as an
internal error.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from marsfs.errors import MarsError
from marsfs.faces.client import MAX_SOCKET_PATH as MAX_SOCKET_PATH
from marsfs.faces.client import call as call
from marsfs.faces.client import socket_path as socket_path

logger = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
Dispatch = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def serve_control(state: Path, dispatch: Dispatch, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``DIR/control.sock`` until cancelled; each connection is served in its own task."""
    path = socket_path(state)
    if path.exists() or path.is_symlink():
        path.unlink()  # the state lock is ours, so this socket is stale
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(os.fspath(path))
    except OSError as e:  # e.g. a path longer than a Unix socket address holds (108 bytes)
        sock.close()
        hint = "; use a --state directory with a shorter path" if len(os.fsencode(path)) >= MAX_SOCKET_PATH else ""
        raise MarsError(f"cannot create the control socket {path}: {e.strerror or e}{hint}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(functools.partial(_serve_one, dispatch), [listener])
    finally:
        with trio.CancelScope(shield=True):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def _peer_allowed(stream: trio.SocketStream) -> bool:
    try:
        cred = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", cred)
    return uid in (0, os.geteuid())


async def _serve_one(dispatch: Dispatch, stream: trio.SocketStream) -> None:
    async with stream:
        if not _peer_allowed(stream):
            await _send(stream, {"ok": False, "error": "the control socket is root-only", "exit": 1})
            return
        buf = bytearray()
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            buf += data
            if len(buf) > MAX_REQUEST and b"\n" not in buf:
                await _send(stream, {"ok": False, "error": "request too large", "exit": 2})
                return
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf = bytearray(rest)
                await _send(stream, await _answer(dispatch, line))


async def _answer(dispatch: Dispatch, line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line)
        cmd, args = req["cmd"], req.get("args", {})
        if not isinstance(cmd, str) or not isinstance(args, dict):
            raise ValueError("cmd must be a string and args an object")
    except (ValueError, KeyError, TypeError) as e:
        return {"ok": False, "error": f"malformed request: {e}", "exit": 2}
    try:
        return {"ok": True, "result": await dispatch(cmd, args)}
    except MarsError as e:
        return {"ok": False, "error": str(e), "exit": e.exit_code}
    except Exception as e:  # a bug: keep the daemon up, say where to look
        logger.exception("control command %s failed", cmd)
        return {"ok": False, "error": f"internal error in {cmd}: {e!r}; see the daemon's log", "exit": 1}


async def _send(stream: trio.SocketStream, obj: dict[str, Any]) -> None:
    try:
        await stream.send_all(json.dumps(obj).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
