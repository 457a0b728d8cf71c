"""The control socket stays root-only: the socket file is 0600 and a peer whose uid is neither
root nor the daemon's is refused by its credentials (SO_PEERCRED), also when the file's mode
would let it connect. A request that is not a line of JSON gets an answer, never a crash."""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from marsfs.faces.control import serve_control, socket_path
from marsfs.testing.runner import run

NOBODY = 65534


def _ask(path: Path, line: bytes, uid: int | None = None) -> dict[str, Any]:
    """One request over the socket, from a child process that runs as ``uid`` (None: as we do)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become someone else, connect, send, pass the answer back
        code = 0
        try:
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(os.fspath(path))
            except PermissionError:
                os.write(w, b'{"connect": "EACCES"}\n')
            else:
                try:
                    s.sendall(line)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a refused peer may be answered and closed before it has sent: read the answer
                os.write(w, s.makefile("rb").readline())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    answer: dict[str, Any] = json.loads(out)
    return answer


@pytest.mark.usefixtures("privileged")
def test_the_control_socket_is_root_only() -> None:
    with tempfile.TemporaryDirectory(prefix="marsfs-test-control-", dir="/tmp") as d:
        state = Path(d)
        os.chmod(state, 0o755)  # the directory lets others through (/tmp does too): only the socket decides
        _root_only(state)


def _root_only(tmp_path: Path) -> None:
    async def dispatch(cmd: str, args: dict[str, Any]) -> Any:
        return {"cmd": cmd}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, tmp_path, dispatch)
            path = socket_path(tmp_path)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600

            async def ask(line: bytes, uid: int | None = None) -> dict[str, Any]:
                return await trio.to_thread.run_sync(_ask, path, line, uid)

            assert await ask(b'{"cmd": "status"}\n') == {"ok": True, "result": {"cmd": "status"}}
            assert await ask(b'{"cmd": "status"}\n', NOBODY) == {"connect": "EACCES"}
            os.chmod(path, 0o666)  # the mode would let anyone in: the credentials still do not
            refused = await ask(b'{"cmd": "status"}\n', NOBODY)
            assert refused == {"ok": False, "error": "the control socket is root-only", "exit": 1}
            bad = await ask(b"not json\n")
            assert bad["ok"] is False and bad["exit"] == 2, bad
            assert await ask(b'{"cmd": "status"}\n') == {"ok": True, "result": {"cmd": "status"}}
            nursery.cancel_scope.cancel()

    run(main, autojump=None)
