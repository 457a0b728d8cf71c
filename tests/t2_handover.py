"""``marsfs primary`` as the command line runs it, against a fake daemon and in-process.

* While the daemon works on a handover, the command prints its progress from ``status``
  (phase and records left to fetch), once per change, then the result in words.
* A failover's answer says what may be lost; ``--json`` prints the answer as it came.
* In-process: ``primary`` on a primary, or on a volume that does not exist, is refused.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from marsfs.errors import MarsError, WrongRole
from marsfs.faces.commands import Context, dispatch
from marsfs.node import Node
from marsfs.node.cluster import Cluster
from marsfs.testing.fakedaemon import cli_run
from marsfs.testing.runner import run

MiB = 1 << 20


class Daemon:
    """Answers ``primary`` after ``status`` was asked a few times (the handover takes a while)."""

    def __init__(self, result: dict[str, Any], progress: list[dict[str, Any] | None]) -> None:
        self.result, self.progress = result, list(progress)
        self.asked: list[tuple[str, dict[str, Any]]] = []
        self.done = threading.Event()

    def __call__(self, cmd: str, args: dict[str, Any]) -> Any:
        self.asked.append((cmd, args))
        if cmd == "primary":
            assert self.done.wait(10)
            return self.result
        assert cmd == "status"
        step = self.progress.pop(0) if self.progress else None
        if not self.progress:
            self.done.set()
        return [{"volume": "v", "handover": step}]


def test_primary_shows_progress_then_the_result(capsys: pytest.CaptureFixture[str]) -> None:
    steps: list[dict[str, Any] | None] = [{"from": "a", "phase": "preparing", "to_fetch": None}, {"from": "a", "phase": "fetching", "to_fetch": 7},
             {"from": "a", "phase": "fetching", "to_fetch": 7}, {"from": "a", "phase": "fetching", "to_fetch": 2},
             None]
    d = Daemon({"volume": "v", "from": "a", "epoch": 2, "start_lsn": 10, "lost": 0}, steps)
    assert cli_run(["primary", "v"], d) == 0
    assert ("primary", {"volume": "v", "force": False, "accept_loss": False}) in d.asked
    assert capsys.readouterr().out == (
        "v: handover from a: preparing\n"
        "v: handover from a: fetching, 7 records to fetch\n"
        "v: handover from a: fetching, 2 records to fetch\n"
        "v: primary on this node now (epoch 2, writes from LSN 10); handed over from a, which follows it now; "
        "nothing lost\n")


def test_failover_says_what_is_lost(capsys: pytest.CaptureFixture[str]) -> None:
    loss = {"records": 3, "bytes": 4096}
    result = {"volume": "v", "from": "a", "epoch": 2, "start_lsn": 10, "loss": loss, "lost": "lost at least 3 records"}
    assert cli_run(["primary", "v", "--force"], Daemon(result, [None])) == 0
    assert capsys.readouterr().out.endswith("failover without a: lost at least 3 records\n")
    assert cli_run(["primary", "v", "--force", "--json"], Daemon(result, [None])) == 0
    assert json.loads(capsys.readouterr().out) == result
    d = Daemon(result, [None])
    assert cli_run(["primary", "v", "--force", "--accept-loss"], d) == 0  # even though a member holds more
    assert ("primary", {"volume": "v", "force": True, "accept_loss": True}) in d.asked


def test_a_refusal_is_raised(capsys: pytest.CaptureFixture[str]) -> None:
    class Refusing(Daemon):
        def __call__(self, cmd: str, args: dict[str, Any]) -> Any:
            if cmd == "primary":
                raise MarsError("volume 'v' is open on its primary a (1 holder(s)")
            return [{"volume": "v"}]

    with pytest.raises(MarsError, match="1 holder"):
        cli_run(["primary", "v"], Refusing({}, []))


def test_primary_on_a_primary_is_refused(node: Node) -> None:
    node.create("p", MiB, thin=True)

    async def main() -> None:
        cluster = Cluster(node, listen=None, peers={})
        ctx = Context(node=node, cluster=cluster, mount=node.state, forget_volume=lambda name: None)
        with pytest.raises(WrongRole, match="already primary"):
            await dispatch(ctx, "primary", {"volume": "p"})
        with pytest.raises(WrongRole, match="already primary"):
            await dispatch(ctx, "primary", {"volume": "p", "force": True})
        with pytest.raises(MarsError, match="no volume 'q'"):
            await dispatch(ctx, "primary", {"volume": "q"})

    run(main, autojump=None)


def test_status_shows_a_failover_loss_under_the_table() -> None:
    from marsfs.faces.commands import status_table

    loss = {"source": "a", "epoch": 2, "start_lsn": 22, "records": 11, "bytes": 4096, "oldest": 1e9, "newest": 1e9,
            "at_least": True, "as_of": 1e9}
    row = {"volume": "v", "role": "primary", "state": "up", "epoch": 2, "size": MiB, "head_lsn": 30, "durable_lsn": 30,
           "applied_lsn": 0, "oldest_version_lsn": 0, "log_bytes": 0, "lag_bytes": 0, "lag_seconds": 0.0,
           "open_handles": 0, "errors": [], "failover_loss": loss}
    assert status_table([row]).splitlines()[-1].startswith(
        "v: forced failover from a (epoch 2 from LSN 22) lost at least 11 records (at least 4.0 KiB)")
