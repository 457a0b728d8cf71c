"""``marsfs verify`` through the command table: two in-process nodes over TCP on localhost, the
refusals, and what the command line prints and exits with."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from marsfs.errors import DaemonRefused, InvalidRequest, PeerError
from marsfs.faces.commands import Context, dispatch
from marsfs.node import Node
from marsfs.node.cluster import Cluster
from marsfs.testing.fakedaemon import FakeDaemon, cli_run
from marsfs.testing.runner import run, wait_for
from marsfs.volume.blocksums import BLOCK

MiB = 1 << 20


async def verify(ctx: Context, volume: str, peer: str | None = None) -> list[dict[str, Any]]:
    """What the command line does: start, then follow every comparison to its end."""
    jobs = (await dispatch(ctx, "verify", {"volume": volume, "peer": peer}))["jobs"]
    out = []
    for job in jobs:
        while (r := await dispatch(ctx, "verify-progress", {"job": job}))["state"] != "done":
            assert r["state"] == "running"
        out.append(r)
    return out


def test_verify_between_two_nodes(tmp_path: Path) -> None:
    n1 = Node.open(tmp_path / "s1", "n1")
    n2 = Node.open(tmp_path / "s2", "n2")
    n1.create("vm", 4 * MiB)
    n1.create("other", MiB)
    vol = n1.volume("vm")
    for i in range(64):
        vol.write(i * 65536, os.urandom(4096))
    vol.flush()

    async def main() -> None:
        c1 = Cluster(n1, listen=None, peers={})
        c2 = Cluster(n2, listen=None, peers={})
        c1.listen = c2.listen = ("127.0.0.1", 0)  # any free port
        async with trio.open_nursery() as nursery:
            await nursery.start(c1.run)
            await nursery.start(c2.run)
            c1.peers["n2"] = ("127.0.0.1", c2.port or 0)
            c2.peers["n1"] = ("127.0.0.1", c1.port or 0)
            ctx1 = Context(n1, c1, Path("/mnt/1"), lambda name: None)
            ctx2 = Context(n2, c2, Path("/mnt/2"), lambda name: None)
            with pytest.raises(InvalidRequest, match="vm is primary on node n1 and has no mirrors to compare with; "
                                                     "give one: marsfs verify vm --peer NODE"):
                await dispatch(ctx1, "verify", {"volume": "vm"})
            await dispatch(ctx2, "join", {"volume": "vm", "source": "n1"})
            await wait_for(lambda: "vm" in n2.volumes and n2.volume("vm").replayed_lsn >= vol.durable_lsn,
                           "n2 to replay vm", 30)
            (r,) = await verify(ctx2, "vm")  # a mirror: with its source, at its own version
            assert r["identical"] and r["peer"] == "n1" and r["node"] == "n2" and r["lsn"] == vol.durable_lsn
            assert r["compared_bytes"] == 4 * MiB and r["differences"] == []
            (r,) = await verify(ctx1, "vm")  # a primary: with every mirror it knows
            assert r["identical"] and r["peer"] == "n2"
            with pytest.raises(PeerError, match="n2 refused to verify other: node n2 has no volume 'other'"):
                await verify(ctx1, "other", "n2")  # the failure comes back when it is collected
            with pytest.raises(PeerError, match="unknown peer 'n3'"):
                await dispatch(ctx1, "verify", {"volume": "vm", "peer": "n3"})
            with pytest.raises(InvalidRequest, match="n1 is this node"):
                await dispatch(ctx1, "verify", {"volume": "vm", "peer": "n1"})
            with pytest.raises(InvalidRequest, match="no verify 'vm/n2/99' is running here"):
                await dispatch(ctx1, "verify-progress", {"job": "vm/n2/99"})
            # corrupt two blocks of the mirror's base once replay wrote everything back
            mirror = n2.volume("vm")
            await trio.to_thread.run_sync(lambda: mirror.writeback(max_bytes=None))
            assert mirror.applied_lsn == mirror.replayed_lsn
            fd = os.open(mirror.path / "base.img", os.O_WRONLY)
            os.pwrite(fd, b"\xff" * BLOCK, 5 * BLOCK)
            os.pwrite(fd, b"\xff" * 2 * BLOCK, 900 * BLOCK)
            os.close(fd)
            for ctx in (ctx1, ctx2):
                (r,) = await verify(ctx, "vm")
                assert r["differences"] == [{"offset": 5 * BLOCK, "length": BLOCK},
                                            {"offset": 900 * BLOCK, "length": 2 * BLOCK}]
            n1.clone("vm", f"lsn-{vol.head_lsn}", "c")
            with pytest.raises(InvalidRequest, match="c is a clone .* nothing to compare it with"):
                await dispatch(ctx1, "verify", {"volume": "c"})
            nursery.cancel_scope.cancel()

    try:
        run(main, autojump=None)
    finally:
        n2.close()
        n1.close()


SAME = {"state": "done", "volume": "vm", "node": "n1", "peer": "n2", "lsn": 42, "size": 8192,
        "compared_bytes": 8192, "identical": True, "differences": []}
DIFF = {**SAME, "peer": "n3", "identical": False,
        "differences": [{"offset": 4096, "length": 4096}, {"offset": 1 << 30, "length": 3 << 20}]}


def test_command_line_output_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    d = FakeDaemon({"verify": {"jobs": ["vm/n2/1"]}, "verify-progress": SAME})
    assert cli_run(["verify", "vm"], d) == 0
    assert d.asked == [("verify", {"volume": "vm", "peer": None}), ("verify-progress", {"job": "vm/n2/1"})]
    assert capsys.readouterr().out == "vm on n1 and n2: identical at lsn-42 (8192 bytes compared)\n"
    d = FakeDaemon({"verify": {"jobs": ["vm/n3/2"]}, "verify-progress": DIFF})
    assert cli_run(["verify", "vm", "--peer", "n3"], d) == 1
    assert d.asked[0] == ("verify", {"volume": "vm", "peer": "n3"})
    assert capsys.readouterr().out == (
        "vm on n1 and n3: 2 differing range(s), 3149824 bytes (3.0 MiB) at lsn-42 (8192 bytes compared)\n"
        "  offset 4096 length 4096 (4.0 KiB +4.0 KiB)\n"
        "  offset 1073741824 length 3145728 (1.0 GiB +3.0 MiB)\n")
    assert cli_run(["verify", "vm", "--json"], d) == 1
    assert json.loads(capsys.readouterr().out) == [DIFF]
    d = FakeDaemon({"verify": {"jobs": ["vm/n2/3"]},
                    "verify-progress": DaemonRefused("n1 no longer retains lsn-3 of vm")})
    assert cli_run(["verify", "vm"], d) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == "marsfs: error: n1 no longer retains lsn-3 of vm\n"


def test_progress_line_on_a_terminal(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([{"state": "running", "peer": "n2", "lsn": 42, "size": 4 << 30, "done": 1 << 30}, SAME])

    def daemon(cmd: str, args: dict[str, Any]) -> Any:
        return {"jobs": ["vm/n2/1"]} if cmd == "verify" else next(answers)

    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert cli_run(["verify", "vm"], daemon) == 0
    out = capsys.readouterr()
    assert out.err == "\rverifying vm with n2 at lsn-42: 25% (1.0 GiB of 4.0 GiB)\r\x1b[K"
    assert out.out == "vm on n1 and n2: identical at lsn-42 (8192 bytes compared)\n"
