"""The command table: every command dispatched in-process against a Node and its Cluster, the
control socket's refusals, and the command line built from the same table."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from marsfs import cli
from marsfs.errors import (
    DaemonNotRunning,
    DaemonRefused,
    DaemonRejectedUsage,
    DaemonWentAway,
    InvalidRequest,
    MarsError,
    PeerError,
    UsageError,
    VolumeBusy,
    VolumeError,
    VolumeExists,
    WrongRole,
)
from marsfs.faces.commands import COMMANDS, Context, dispatch
from marsfs.faces.control import call, serve_control
from marsfs.node import Node
from marsfs.node.cluster import Cluster
from marsfs.testing.checks import make_mirror
from marsfs.testing.fakedaemon import FakeDaemon, cli_run
from marsfs.testing.runner import run

MiB = 1 << 20
Body = Callable[[Context], Awaitable[None]]


def with_daemon(node: Node, body: Body, forgotten: list[str] | None = None) -> None:
    """Run ``body`` beside a running Cluster of ``node`` (no peers, no listener)."""

    async def main() -> None:
        cluster = Cluster(node, listen=None, peers={})
        ctx = Context(node, cluster, Path("/mnt/marsfs"), (forgotten if forgotten is not None else []).append)
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run)
            await body(ctx)
            nursery.cancel_scope.cancel()

    run(main, autojump=None)


# ---------------------------------------------------------------------- the daemon's side

def test_every_command_against_a_node(node: Node) -> None:
    forgotten: list[str] = []

    async def body(ctx: Context) -> None:
        ping = await dispatch(ctx, "ping", {})
        assert ping == {"node": "n1", "pid": os.getpid(), "mount": "/mnt/marsfs"}
        row = await dispatch(ctx, "create", {"volume": "v", "size": MiB})
        assert (row["volume"], row["size"], row["role"], row["node"]) == ("v", MiB, "primary", "n1")
        assert (await dispatch(ctx, "create", {"volume": "w", "size": "2M"}))["size"] == 2 * MiB
        rows = await dispatch(ctx, "status", {})
        assert [r["volume"] for r in rows] == ["v", "w"]
        assert [r["volume"] for r in await dispatch(ctx, "status", {"volume": "w"})] == ["w"]
        assert [r["volume"] for r in await dispatch(ctx, "status", {"volume": None})] == ["v", "w"]
        node.volume("v").write(0, b"x" * 512)
        node.volume("v").flush()
        mark = await dispatch(ctx, "mark", {"volume": "v", "name": "m1"})
        assert mark == {"volume": "v", "mark": "m1", "lsn": node.volume("v").head_lsn}
        versions = await dispatch(ctx, "versions", {"volume": "v"})
        assert versions["volume"] == "v" and versions["head_lsn"] == mark["lsn"]
        assert any(v["kind"] == "mark" and v["name"] == "m1" for v in versions["versions"])
        json.dumps(versions)  # every result crosses the socket as JSON
        assert await dispatch(ctx, "delete", {"volume": "w", "force": False}) == {"deleted": "w"}
        assert "w" not in node.volumes and forgotten == ["w"]
        node.acquire("v")
        with pytest.raises(VolumeError, match="is open"):
            await dispatch(ctx, "delete", {"volume": "v"})
        assert await dispatch(ctx, "delete", {"volume": "v", "force": True}) == {"deleted": "v"}
        assert forgotten == ["w", "v"] and node.volumes == {}

    with_daemon(node, body, forgotten)


def test_replication_mode_commands(node: Node) -> None:
    """``create --mode`` and ``mode`` say the mode in the cluster metadata; status shows it;
    options of sync mode without it, and values out of range, are refused in words."""

    async def body(ctx: Context) -> None:
        row = await dispatch(ctx, "create", {"volume": "s", "size": MiB, "mode": "sync", "sync_timeout": 0.5})
        assert row["mode"] == "sync" and row["sync_mode"]["timeout"] == 0.5 and row["sync_mode"]["mirrors"] == 1
        assert row["sync_mode"]["state"] in ("in-sync", "catching-up")
        row = await dispatch(ctx, "create", {"volume": "a", "size": MiB})
        assert row["mode"] == "async" and row["sync_mode"] is None
        out = await dispatch(ctx, "mode", {"volume": "a", "mode": "sync", "mirrors": 2, "refuse": True})
        assert out["here"] and out["described"] == ("sync (2 mirrors, timeout 2 s, refuse: flushes fail with EIO "
                                                    "while degraded)")
        (row,) = await dispatch(ctx, "status", {"volume": "a"})
        assert row["mode"] == "sync" and row["sync_mode"]["mirrors"] == 2 and row["sync_mode"]["refuse"]
        await dispatch(ctx, "mode", {"volume": "a", "mode": "async"})
        assert (await dispatch(ctx, "status", {"volume": "a"}))[0]["sync_mode"] is None
        with pytest.raises(UsageError, match="--mirrors go.es. with sync mode"):
            await dispatch(ctx, "mode", {"volume": "a", "mode": "async", "mirrors": 2})
        with pytest.raises(UsageError, match="go.es. with sync mode"):
            await dispatch(ctx, "create", {"volume": "b", "size": MiB, "refuse": True})
        with pytest.raises(UsageError, match="--mirrors 0: give how many mirrors"):
            await dispatch(ctx, "mode", {"volume": "a", "mode": "sync", "mirrors": 0})
        with pytest.raises(UsageError, match="--timeout 0.0: give the seconds"):
            await dispatch(ctx, "mode", {"volume": "a", "mode": "sync", "sync_timeout": 0})
        with pytest.raises(UsageError, match="replication mode 'fast': give async or sync"):
            await dispatch(ctx, "mode", {"volume": "a", "mode": "fast"})
        with pytest.raises(VolumeError, match="no volume 'nope'"):
            await dispatch(ctx, "mode", {"volume": "nope", "mode": "sync"})
        assert "b" not in node.volumes

    with_daemon(node, body)


def test_mirror_commands(node: Node) -> None:
    node.create("m", MiB)
    node.create("p", MiB)
    make_mirror(node, "m")
    forgotten: list[str] = []

    async def body(ctx: Context) -> None:
        for cmd in ("pause-fetch", "resume-fetch", "pause-replay", "resume-replay", "leave"):
            with pytest.raises(VolumeError, match="not a mirror"):
                await dispatch(ctx, cmd, {"volume": "p"})  # mirror-only commands on a primary
            with pytest.raises(VolumeError, match="no volume 'nope'"):
                await dispatch(ctx, cmd, {"volume": "nope"})
        assert await dispatch(ctx, "pause-fetch", {"volume": "m"}) == {"volume": "m", "fetch_paused": True}
        assert await dispatch(ctx, "pause-replay", {"volume": "m"}) == {"volume": "m", "replay_paused": True}
        assert node.role("m").fetch_paused and node.role("m").replay_paused
        assert await dispatch(ctx, "resume-replay", {"volume": "m"}) == {"volume": "m", "replay_paused": False}
        assert await dispatch(ctx, "resume-fetch", {"volume": "m"}) == {"volume": "m", "fetch_paused": False}
        with pytest.raises(WrongRole, match="is a mirror on node") as wrong:
            await dispatch(ctx, "delete", {"volume": "m"})
        with pytest.raises(WrongRole, match="not a mirror") as other:
            await dispatch(ctx, "leave", {"volume": "p"})
        # the same kind of mistake (a command for the other role) leaves with the same status
        assert wrong.value.exit_code == other.value.exit_code == 1
        with pytest.raises(PeerError, match="unknown peer 'n2'"):
            await dispatch(ctx, "join", {"volume": "q", "source": "n2"})
        with pytest.raises(InvalidRequest, match="invalid volume name"):
            await dispatch(ctx, "join", {"volume": "../q", "source": "n2"})
        assert await dispatch(ctx, "leave", {"volume": "m"}) == {"volume": "m", "left": "x"}
        assert "m" not in node.volumes and forgotten == ["m"]

    with_daemon(node, body, forgotten)


@pytest.mark.parametrize("cmd,args,exc,match", [
    ("bogus", {}, UsageError, "unknown command 'bogus'"),
    ("wait", {"volume": "v"}, UsageError, "unknown command 'wait'"),  # a command-line loop only
    ("create", {"volume": "v"}, UsageError, "missing argument 'size'"),
    ("create", {"size": MiB}, UsageError, "missing argument 'volume'"),
    ("create", {"volume": "v", "size": [1]}, UsageError, "must be a size"),
    ("create", {"volume": "v", "size": True}, UsageError, "must be a size"),
    ("create", {"volume": 7, "size": MiB}, UsageError, "must be a non-empty string"),
    ("create", {"volume": "v", "size": MiB, "colour": "red"}, UsageError, "unknown argument"),
    ("create", {"volume": "v", "size": "12Q"}, UsageError, "cannot read size"),  # a usage mistake: exit 2
    ("join", {"volume": "q", "source": "n2", "rate": 0}, UsageError, "above 0"),
    ("invalidate", {"volume": "e", "rate": "0"}, UsageError, "above 0"),
    ("create", {"volume": "v", "size": 1000}, InvalidRequest, "multiple of 512"),
    ("create", {"volume": "bad/name", "size": MiB}, InvalidRequest, "invalid volume name"),
    ("create", {"volume": "e", "size": MiB}, VolumeError, "already exists"),
    ("delete", {"volume": "e", "force": "yes"}, UsageError, "must be true or false"),
    ("delete", {"volume": "nope"}, VolumeError, "no volume 'nope'"),
    ("status", {"volume": "nope"}, VolumeError, "no volume 'nope'"),
    ("status", {"volume": ["e"]}, UsageError, "must be a non-empty string"),
    ("mark", {"volume": "nope", "name": "m1"}, VolumeError, "no volume 'nope'"),
    ("mark", {"volume": "e"}, UsageError, "missing argument 'name'"),
    ("mark", {"volume": "e", "name": "lsn-3"}, MarsError, "invalid"),
    ("versions", {"volume": "nope"}, VolumeError, "no volume 'nope'"),
    ("join", {"volume": "q"}, UsageError, "missing argument 'source'"),
    ("pause-fetch", {}, UsageError, "missing argument 'volume'"),
])
def test_refusals(node: Node, cmd: str, args: dict[str, Any], exc: type[Exception], match: str) -> None:
    node.create("e", MiB)

    async def body(ctx: Context) -> None:
        with pytest.raises(exc, match=match):
            await dispatch(ctx, cmd, args)

    with_daemon(node, body)


@pytest.mark.allow_log("control command crash failed")
def test_control_socket_keeps_the_exit_status(node: Node, tmp_path: Path) -> None:
    """Across the socket a refusal keeps its exit status; a bug is an internal error, exit 1."""
    node.create("e", MiB)
    sock_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"marsfs-t2-{os.getpid()}"  # sun_path is short
    sock_dir.mkdir(exist_ok=True)

    async def body(ctx: Context) -> None:
        async def handle(cmd: str, args: dict[str, Any]) -> Any:
            if cmd == "crash":
                raise KeyError("a bug")
            return await dispatch(ctx, cmd, args)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, sock_dir, handle)

            def client() -> None:
                assert call(sock_dir, "status", volume="e")[0]["volume"] == "e"
                cases: list[tuple[str, dict[str, Any], type[DaemonRefused], int, str]] = [
                    ("status", {"volume": "nope"}, DaemonRefused, 1, "no volume 'nope'"),
                    ("bogus", {}, DaemonRejectedUsage, 2, "unknown command"),
                    ("create", {"volume": "v"}, DaemonRejectedUsage, 2, "missing argument 'size'"),
                    ("crash", {}, DaemonRefused, 1, "internal error in crash"),
                ]
                for cmd, args, exc, code, match in cases:
                    with pytest.raises(exc, match=match) as e:
                        call(sock_dir, cmd, **args)
                    assert type(e.value) is exc and e.value.exit_code == code

            await trio.to_thread.run_sync(client)
            nursery.cancel_scope.cancel()

    try:
        with_daemon(node, body)
    finally:
        sock_dir.rmdir()


# ---------------------------------------------------------------------- the command line's side

NO_MODE_OPTIONS = {"mirrors": None, "sync_timeout": None, "refuse": False}
NO_MODE = {"mode": None, **NO_MODE_OPTIONS}  #: create without --mode
PARSES = [
    (["create", "v", "--size", "512M"], {"volume": "v", "size": "512M", "thin": False, **NO_MODE}),
    (["create", "v", "--size", "512M", "--thin"], {"volume": "v", "size": "512M", "thin": True, **NO_MODE}),
    (["--state", "/s", "create", "v", "--size", "1G"], {"volume": "v", "size": "1G", "state": "/s", "thin": False, **NO_MODE}),
    (["create", "v", "--size", "1G", "--state", "/s"], {"volume": "v", "size": "1G", "state": "/s", "thin": False, **NO_MODE}),
    (["create", "v", "--size", "1G", "--mode", "sync", "--mirrors", "2", "--timeout", "0.5", "--refuse"],
     {"volume": "v", "size": "1G", "thin": False, "mode": "sync", "mirrors": 2, "sync_timeout": 0.5,
      "refuse": True}),
    (["mode", "v", "async"], {"volume": "v", "mode": "async", "json": False, **NO_MODE_OPTIONS}),
    (["mode", "v", "sync", "--timeout", "5"], {"volume": "v", "mode": "sync", "json": False,
                                               **NO_MODE_OPTIONS, "sync_timeout": 5.0}),
    (["delete", "v"], {"volume": "v", "force": False}),
    (["delete", "v", "--force"], {"volume": "v", "force": True}),
    (["status"], {"volume": None, "json": False, "watch": False, "interval": 1.0}),
    (["status", "v", "--json"], {"volume": "v", "json": True, "watch": False, "interval": 1.0}),
    (["status", "--watch", "--interval", "0.5"], {"volume": None, "json": False, "watch": True, "interval": 0.5}),
    (["mark", "v", "m1"], {"volume": "v", "name": "m1"}),
    (["join", "v", "--from", "n1"], {"volume": "v", "source": "n1", "seed": None, "thin": False, "rate": None,
                                     "wait": False}),
    (["leave", "v"], {"volume": "v", "node": None, "force": False}),
    (["leave", "v", "--node", "n3", "--force"], {"volume": "v", "node": "n3", "force": True}),
    (["pause-fetch", "v"], {"volume": "v"}),
    (["resume-fetch", "v"], {"volume": "v"}),
    (["pause-replay", "v"], {"volume": "v"}),
    (["resume-replay", "v"], {"volume": "v"}),
    (["wait", "v", "--synced"], {"volume": "v", "synced": True, "timeout": None}),
    (["wait", "v", "--synced", "--timeout", "30"], {"volume": "v", "synced": True, "timeout": 30.0}),
    (["versions", "v"], {"volume": "v", "json": False}),
    (["versions", "v", "--json"], {"volume": "v", "json": True}),
    (["serve", "--node", "n1", "--mount", "/m", "--peer", "n2=h:1", "--peer", "n3=h:2", "-v"],
     {"node": "n1", "mount": Path("/m"), "listen": None, "peer": ["n2=h:1", "n3=h:2"], "config": None,
      "history": None, "cluster": None, "stop_timeout": None, "log_space": None, "sync_rate": None,
      "tls_dir": None, "insecure": False, "metrics": None, "verbose": True}),
    (["cluster", "add-node", "n2", "--ca", "/ca", "--out", "/o"],
     {"cluster_command": "add-node", "name": "n2", "ca": Path("/ca"), "out": Path("/o"), "days": 825, "json": False}),
]


@pytest.mark.parametrize("argv,want", PARSES)
def test_parser_accepts_todays_syntax(argv: list[str], want: dict[str, Any]) -> None:
    got = vars(cli.build_parser().parse_args(argv))
    assert got == {"command": argv[0] if argv[0] != "--state" else argv[2], **want}


@pytest.mark.parametrize("argv", [
    [], ["bogus"], ["create"], ["create", "v"], ["create", "--size", "1M"], ["delete"], ["delete", "v", "w"],
    ["mark", "v"], ["join", "v"], ["join", "v", "--source", "n1"], ["pause-fetch"], ["wait"],
    ["status", "--interval", "x"], ["wait", "v", "--timeout", "soon"], ["versions"], ["ping"],
    ["status", "a", "b"], ["delete", "v", "--json"], ["mode", "v"], ["mode", "v", "sync", "--mirrors", "x"],
])
def test_parser_refuses(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    shown = [c for c in COMMANDS.values() if c.help is not None]
    assert {c.name for c in COMMANDS.values() if c.help is None} == {"ping", "verify-progress"}  # daemon side only
    for c in shown:
        assert c.help is not None  # shown holds only commands with help
        assert c.name in out and c.help in out
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([c.name, "--help"])
        sub = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert " ".join((c.description or c.help).split()) in sub, c.name  # what the command does, in full
        for a in c.args:
            assert (a.flag or a.name) in sub or a.hidden, (c.name, a.name)
            assert a.help is None or a.hidden or " ".join(a.help.split()) in sub, (c.name, a.name)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["delete", "--help"])
    sub = " ".join(capsys.readouterr().out.split())
    assert "marsfs leave" in sub and "mirrors" in sub and "clones" in sub and "a primary's or a clone" in sub
    assert "serve" in out


ROW = {"volume": "v", "node": "n1", "role": "primary", "state": "up", "epoch": 1, "size": MiB, "head_lsn": 3,
       "durable_lsn": 3, "applied_lsn": 0, "oldest_version_lsn": 0, "log_bytes": 2048, "lag_bytes": 0,
       "lag_seconds": 0.0, "open_handles": 0, "errors": ["oops"]}


def test_requests_and_output(capsys: pytest.CaptureFixture[str]) -> None:
    d = FakeDaemon({"create": ROW, "delete": {"deleted": "v"}, "status": [ROW],
                    "mark": {"volume": "v", "mark": "m1", "lsn": 3},
                    "join": {"volume": "v", "source": "n2", "size": MiB, "state": "syncing"},
                    "leave": {"volume": "v", "left": "n2"}, "pause-fetch": {"volume": "v", "fetch_paused": True},
                    "resume-replay": {"volume": "v", "replay_paused": False},
                    "versions": {"volume": "v", "oldest_lsn": 0, "head_lsn": 3,
                                 "versions": [{"lsn": 3, "kind": "mark", "name": "m1", "timestamp_ns": 0}]}})
    expect = [
        (["create", "v", "--size", "1M"], ("create", {"volume": "v", "size": MiB, "thin": False, **NO_MODE}),
         "created volume v (1.0 MiB), primary on node n1\n"),
        (["create", "v", "--size", "1M", "--thin"], ("create", {"volume": "v", "size": MiB, "thin": True,
                                                                 **NO_MODE}),
         "created volume v (1.0 MiB, thin), primary on node n1\n"),
        (["delete", "v"], ("delete", {"volume": "v", "force": False}), "deleted volume v\n"),
        (["mark", "v", "m1"], ("mark", {"volume": "v", "name": "m1"}), "marked v at LSN 3 as m1\n"),
        (["join", "v", "--from", "n2"], ("join", {"volume": "v", "source": "n2", "seed": None, "thin": False,
                                                     "rate": None}),
         "joining v from n2: syncing 1.0 MiB, copying only blocks that differ; follow with: marsfs status v  "
         "(or marsfs wait v --synced)\n"),
        (["leave", "v"], ("leave", {"volume": "v", "node": None, "force": False}), "left v (no longer fetching from n2; local copy removed)\n"),
        (["pause-fetch", "v"], ("pause-fetch", {"volume": "v"}), "pause fetch: v\n"),
        (["resume-replay", "v"], ("resume-replay", {"volume": "v"}), "resume replay: v\n"),
        (["versions", "v"], ("versions", {"volume": "v"}),
         "volume v: versions lsn-0 to lsn-3 are retained\n  lsn-3          mark   m1                   \n"),
    ]
    for argv, asked, printed in expect:
        assert cli_run(argv, d) == 0
        assert d.asked[-1] == asked and capsys.readouterr().out == printed, argv
    assert cli_run(["versions", "v", "--json"], d) == 0
    assert json.loads(capsys.readouterr().out) == d.answers["versions"]
    assert cli_run(["status", "v", "--json"], d) == 0
    # a tuple: an `==` would narrow the last request for mypy past the next cli_run
    assert (json.loads(capsys.readouterr().out), d.asked[-1]) == (ROW, ("status", {"volume": "v"}))
    assert cli_run(["status", "--json"], d) == 0
    assert json.loads(capsys.readouterr().out) == [ROW] and d.asked[-1] == ("status", {"volume": None})
    assert cli_run(["status"], d) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["VOLUME", "ROLE", "STATE", "EPOCH", "SIZE", "HEAD", "DURABLE", "APPLIED", "OLDEST",
                                "LOG", "LAG", "OPEN"]
    assert lines[1].split()[:4] == ["v", "primary", "up", "1"] and lines[2] == "v: error: oops"
    d.answers["status"] = []
    assert cli_run(["status"], d) == 0
    assert capsys.readouterr().out == "no volumes (create one with: marsfs create NAME --size SIZE)\n"


def test_client_side_checks_ask_no_daemon() -> None:
    d = FakeDaemon({})
    for argv, exc, match in [(["create", "bad/name", "--size", "1M"], InvalidRequest, "invalid volume name"),
                             (["create", ".hidden", "--size", "1M"], InvalidRequest, "invalid volume name"),
                             (["create", "v", "--size", "12Q"], UsageError, "cannot read size"),
                             (["resize", "v", "12Q"], UsageError, "cannot read size"),
                             (["join", "v", "--from", "n1", "--rate", "0"], UsageError, "above 0"),
                             (["invalidate", "v", "--rate", "0"], UsageError, "above 0"),
                             (["wait", "v"], UsageError, "--synced")]:
        with pytest.raises(exc, match=match):
            cli_run(argv, d)
    assert d.asked == []


def test_wait() -> None:
    mirror = {**ROW, "role": "mirror", "state": "synced", "heartbeat_age": 0.0, "lag_records": 0}
    with pytest.raises(MarsError, match="is primary on node n1 and has no mirrors to wait for"):
        cli_run(["wait", "v", "--synced"], FakeDaemon({"status": [ROW]}))  # see t2_daemon
    assert cli_run(["wait", "v", "--synced"], FakeDaemon({"status": [mirror]})) == 0
    with pytest.raises(MarsError, match="cannot become synced: state split-brain"):
        cli_run(["wait", "v", "--synced"], FakeDaemon({"status": [{**mirror, "state": "split-brain"}]}))
    with pytest.raises(MarsError, match="not synced after 0 s: state catching-up"):
        cli_run(["wait", "v", "--synced", "--timeout", "0"],
                FakeDaemon({"status": [{**mirror, "state": "catching-up"}]}))


def test_main_exit_statuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = os.fspath(tmp_path / "nostate")
    assert cli.main(["--state", state, "status"]) == 1
    err = capsys.readouterr().err
    assert "no marsfs daemon is running" in err and "marsfs serve" in err and err.count("\n") == 1
    assert cli.main(["--state", state, "create", "bad/name", "--size", "1M"]) == 1
    assert "invalid volume name" in capsys.readouterr().err
    assert cli.main(["--state", state, "create", "v", "--size", "12Q"]) == 2  # as the guide says: a usage mistake
    assert "cannot read size '12Q'" in capsys.readouterr().err
    assert cli.main(["--state", state, "wait", "v"]) == 2  # a usage error: one line too, no usage block
    assert capsys.readouterr().err == "marsfs: error: say what to wait for: --synced\n"
    with pytest.raises(SystemExit) as e:
        cli.main(["create"])
    assert e.value.code == 2
    args = argparse.Namespace(command="status")
    assert cli._state(args) == Path(os.environ.get("MARSFS_STATE") or cli.DEFAULT_STATE)


def test_history_command_sets_and_shows_a_volumes_own_window(node: Node) -> None:
    """A retention window per volume, not only per node, from the command line."""
    node.create("v", MiB)

    async def body(ctx: Context) -> None:
        r = await dispatch(ctx, "history", {"volume": "v"})
        assert r == {"volume": "v", "history": "256.0 MiB", "own": False, "node_default": "256.0 MiB"}
        r = await dispatch(ctx, "history", {"volume": "v", "window": "10G,24h"})
        assert r["own"] and r["history"] == "10.0 GiB or 1d"
        assert node.history_of("v").keep_seconds == 24 * 3600
        with pytest.raises(UsageError, match="cannot read history 'soon'"):  # like serve --history soon: exit 2
            await dispatch(ctx, "history", {"volume": "v", "window": "soon"})
        assert node.history_of("v").keep_seconds == 24 * 3600  # a refused window changes nothing
        with pytest.raises(VolumeError, match="no volume 'nope'"):
            await dispatch(ctx, "history", {"volume": "nope", "window": "1G"})
        r = await dispatch(ctx, "history", {"volume": "v", "window": "default"})
        assert not r["own"] and r["history"] == "256.0 MiB"

    with_daemon(node, body)
    args = cli.build_parser().parse_args(["history", "v", "24h"])
    assert (args.command, args.volume, args.window) == ("history", "v", "24h")
    args = cli.build_parser().parse_args(["history", "v", "--json"])
    assert args.window is None and args.json


def test_a_volume_in_its_first_sync_is_named_so(node: Node) -> None:
    """While a mirror's first copy runs the name is taken but nothing is served: commands on it
    say it is being copied and what to run, never "no volume ... create it"."""
    node.begin_mirror("vm3", "n2", 1)  # what join does before the copy starts

    async def body(ctx: Context) -> None:
        for cmd, args in [("clone", {"version": "vm3@lsn-0", "volume": "c"}), ("verify", {"volume": "vm3"}),
                          ("pause-fetch", {"volume": "vm3"}), ("mark", {"volume": "vm3", "name": "m"}),
                          ("versions", {"volume": "vm3"})]:
            with pytest.raises(VolumeError, match=r"'vm3' is still being copied to node n1 from n2 \(its first "
                                                  r"sync\).*marsfs wait vm3 --synced") as e:
                await dispatch(ctx, cmd, args)
            assert "create it" not in str(e.value), cmd
        with pytest.raises(VolumeExists, match=r"'vm3' already exists.*being copied from n2: marsfs wait vm3"):
            await dispatch(ctx, "create", {"volume": "vm3", "size": MiB})

    with_daemon(node, body)


def test_refusals_of_leave_and_delete_advise_what_works(node: Node) -> None:
    """An open mirror's leave is not told to add --force (leave --force needs --node); an open
    primary's delete is."""
    node.create("m", MiB)
    node.create("p", MiB)
    make_mirror(node, "m")
    node.acquire("m")
    node.acquire("p")

    async def body(ctx: Context) -> None:
        with pytest.raises(VolumeBusy, match=r"'m' is open .*detach it first .*then run marsfs leave m again") as e:
            await dispatch(ctx, "leave", {"volume": "m"})
        assert "--force" not in str(e.value)
        with pytest.raises(VolumeBusy, match=r"'p' is open .*or use marsfs delete --force"):
            await dispatch(ctx, "delete", {"volume": "p"})

    with_daemon(node, body)


def test_status_watch_clears_only_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """Into a file or a pipe ``status --watch`` writes the tables one after the other, without
    the terminal's clear-screen codes."""
    asked: list[int] = []

    def daemon(cmd: str, args: dict[str, Any]) -> Any:
        asked.append(1)
        if len(asked) > 2:
            raise MarsError("enough")
        return [ROW]

    with pytest.raises(MarsError, match="enough"):
        cli_run(["status", "--watch", "--interval", "0"], daemon)
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("VOLUME  ROLE") == 2 and "\n\nVOLUME" in out


def test_resize_whose_daemon_went_away_says_what_is_known(capsys: pytest.CaptureFixture[str]) -> None:
    """The daemon died after the resize was asked: the command line looks at the size once the
    daemon answers again, or says how to find out; it never just reports a failure."""
    went = DaemonWentAway("the daemon closed the control connection without answering; see its log")
    grown = FakeDaemon({"resize": went, "status": [{**ROW, "size": 2 * MiB}]})
    assert cli_run(["resize", "v", "2M"], grown) == 0
    assert "v is 2.0 MiB (2097152 bytes) now: the resize applied" in capsys.readouterr().out
    same = FakeDaemon({"resize": went, "status": [ROW]})
    with pytest.raises(DaemonWentAway, match=r"did not apply: it is still 1.0 MiB.*marsfs resize v 2097152 again"):
        cli_run(["resize", "v", "2M"], same)
    gone = FakeDaemon({"resize": went, "status": DaemonNotRunning("no marsfs daemon is running")})
    with pytest.raises(DaemonWentAway, match=r"went away during the resize of v to 2.0 MiB.*may have applied it.*"
                                             r"marsfs status v shows the size"):
        cli_run(["resize", "v", "2M"], gone)
    ok = FakeDaemon({"resize": {"volume": "v", "size": 2 * MiB, "lsn": 4, "image": "/m/v.img"}})
    assert cli_run(["resize", "v", "2M"], ok) == 0
    assert capsys.readouterr().out.startswith("resized v to 2.0 MiB (2097152 bytes) at lsn-4")
