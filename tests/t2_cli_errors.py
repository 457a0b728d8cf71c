"""Every verb's mistakes, as the operator sees them: exactly one line on stderr that says what
to do, no traceback, and the exit status docs/user-guide.md ("Errors") gives: 1 for a refusal
or failure, 2 for a command line that is wrong.

The command line runs in-process (``cli.main``) against a real control socket served by a
Node n1 in a thread (volume ``v``, peer ``n2`` known but unreachable, no node ``zed``), against
a state directory with no daemon and one whose socket a dead daemon left; ``serve`` and a
sample of the rest run as ``python -m marsfs``, so a traceback at exit would show. The daemon
refusing a malformed name itself: :func:`test_the_daemon_refuses_a_malformed_name_too`.
Through real daemons (a killed one, unknown and unreachable nodes): tests/t4_cli_errors.py.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from marsfs import cli
from marsfs.errors import InvalidRequest
from marsfs.faces import daemon
from marsfs.faces.commands import COMMANDS, Context, dispatch
from marsfs.faces.control import serve_control
from marsfs.node import Node
from marsfs.node.cluster import Cluster
from marsfs.testing.harness import free_port
from marsfs.testing.runner import run

MiB = 1 << 20
USAGE, REFUSED = 2, 1

#: Each verb of the command table with its arguments, VOL where the volume's name goes.
VERBS: dict[str, list[str]] = {
    "create": ["create", "VOL", "--size", "1M"],
    "delete": ["delete", "VOL"],
    "status": ["status", "VOL"],
    "mark": ["mark", "VOL", "m1"],
    "join": ["join", "VOL", "--from", "n2"],
    "invalidate": ["invalidate", "VOL"],
    "leave": ["leave", "VOL"],
    "pause-fetch": ["pause-fetch", "VOL"],
    "resume-fetch": ["resume-fetch", "VOL"],
    "pause-replay": ["pause-replay", "VOL"],
    "resume-replay": ["resume-replay", "VOL"],
    "wait": ["wait", "VOL", "--synced", "--timeout", "0"],
    "versions": ["versions", "VOL"],
    "history": ["history", "VOL"],
    "clone": ["clone", "VOL@lsn-0", "c1"],
    "discard": ["discard", "VOL@split-n2-1"],
    "primary": ["primary", "VOL"],
    "verify": ["verify", "VOL"],
    "resize": ["resize", "VOL", "2M"],
    "mode": ["mode", "VOL", "sync"],
}
#: The verbs whose unknown volume only another node could name (create makes it; join asks its source).
NO_UNKNOWN = {"create", "join"}


def cases(*rows: tuple[Any, ...]) -> list[Any]:
    """Parameters named by their command line (or size), not by a regex."""
    return [pytest.param(*row, id=" ".join(row[0]) or "-" if isinstance(row[0], list) else row[0]) for row in rows]


def argv(verb: str, volume: str) -> list[str]:
    return [a.replace("VOL", volume) for a in VERBS[verb]]


def cli_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``marsfs ARGS`` in-process: its exit status and its stderr."""
    capsys.readouterr()
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse leaves this way
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def one_line(code: int, err: str, want: int, match: str) -> None:
    """The error as the guide promises it: one line matching ``match``, exit status ``want``."""
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert re.search(match, err), f"{match!r} not in {err!r}"
    assert code == want, (code, err)


# ---------------------------------------------------------------------- a daemon in a thread

class Daemon:
    """Node n1 with volume ``v`` answering on ``state``/control.sock from a thread."""

    def __init__(self, node: Node, state: Path) -> None:
        self.node = node
        self.state = state
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.scope: trio.CancelScope | None = None
        self.thread = threading.Thread(target=self._run, name="t2-cli-daemon", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            cluster = Cluster(self.node, listen=None, peers={"n2": f"127.0.0.1:{free_port()}"})
            ctx = Context(self.node, cluster, Path("/mnt/marsfs"), lambda name: None)
            async with trio.open_nursery() as nursery:
                self.scope, self.token = nursery.cancel_scope, trio.lowlevel.current_trio_token()
                await nursery.start(cluster.run)
                await nursery.start(serve_control, self.state, functools.partial(dispatch, ctx))
                self.ready.set()

        try:
            trio.run(main)
        except BaseException as e:
            self.failure = e
        finally:
            self.ready.set()

    def __enter__(self) -> Daemon:
        self.thread.start()
        self.ready.wait(30)
        if self.failure is not None:
            raise self.failure
        return self

    def __exit__(self, *exc: object) -> None:
        if self.token is not None and self.scope is not None:
            trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.failure is not None:
            raise self.failure


@pytest.fixture(scope="module")
def socket_dirs() -> Iterator[Path]:
    """A directory short enough for Unix socket addresses (a pytest tmp_path may not be)."""
    root = Path(tempfile.mkdtemp(prefix="marsfs-t2cli-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def up(socket_dirs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``--state`` of the running daemon (its volumes: ``v``, 1 MiB, primary)."""
    node = Node.open(tmp_path_factory.mktemp("node") / "state", "n1")
    try:
        node.create("v", MiB)
        (socket_dirs / "up").mkdir()
        with Daemon(node, socket_dirs / "up"):
            yield socket_dirs / "up"
    finally:
        node.close()


@pytest.fixture(scope="module")
def down(socket_dirs: Path) -> Path:
    """A state directory where no daemon ever ran."""
    (socket_dirs / "down").mkdir()
    return socket_dirs / "down"


@pytest.fixture(scope="module")
def stale(socket_dirs: Path) -> Path:
    """A state directory whose control socket a daemon that died left behind."""
    state = socket_dirs / "stale"
    state.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(os.fspath(state / "control.sock"))  # bound, never listening: as after a SIGKILL
    return state


# ---------------------------------------------------------------------- every verb

def test_the_table_has_every_verb() -> None:
    """A new verb needs its cases here."""
    assert set(VERBS) == {c.name for c in COMMANDS.values() if c.help is not None}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_a_malformed_volume_name(verb: str, up: Path, down: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Named as such, before any daemon is asked: the same line with the daemon up or down."""
    for state in (up, down):
        code, err = cli_main(["--state", os.fspath(state), *argv(verb, "bad/name")], capsys)
        one_line(code, err, REFUSED, r"^marsfs: error: invalid volume name 'bad/name': use 1-64 letters")
    if verb == "clone":  # the new volume's name too
        code, err = cli_main(["--state", os.fspath(up), "clone", "v@lsn-0", ".hidden"], capsys)
        one_line(code, err, REFUSED, r"invalid volume name '\.hidden'")


@pytest.mark.parametrize("verb", sorted(set(VERBS) - NO_UNKNOWN))
def test_an_unknown_volume(verb: str, up: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli_main(["--state", os.fspath(up), *argv(verb, "nope")], capsys)
    one_line(code, err, REFUSED, r"^marsfs: error: no volume 'nope' on node n1 \(volumes here: v\); create it with")


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_no_daemon(verb: str, down: Path, stale: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No control socket, and one a dead daemon left: both say how to start one."""
    code, err = cli_main(["--state", os.fspath(down), *argv(verb, "v")], capsys)
    one_line(code, err, REFUSED, rf"^marsfs: error: no marsfs daemon is running for state directory {down}; "
                                 rf"start one with: marsfs serve --node NAME --state {down} --mount DIR$")
    code, err = cli_main(["--state", os.fspath(stale), *argv(verb, "v")], capsys)
    one_line(code, err, REFUSED, rf"no marsfs daemon is running for state directory {stale} \({stale}/control.sock "
                                 r"is left from one that is gone\); start one with: marsfs serve")


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_usage_mistakes(verb: str, down: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Arguments missing, an option that does not exist: one line naming the help, not the usage block."""
    if verb != "status":  # the one verb without a required argument
        code, err = cli_main(["--state", os.fspath(down), verb], capsys)
        one_line(code, err, USAGE, rf"^marsfs {verb}: error: the following arguments are required: .*; "
                                   rf"see: marsfs {verb} --help$")
    code, err = cli_main(["--state", os.fspath(down), *argv(verb, "v"), "--colour"], capsys)
    one_line(code, err, USAGE, rf"^marsfs {verb}: error: unrecognized arguments: --colour; see: marsfs {verb} --help$")


@pytest.mark.parametrize("args,want,match", cases(
    ([], USAGE, r"^marsfs: error: the following arguments are required: COMMAND; see: marsfs --help$"),
    (["bogus"], USAGE, r"^marsfs: error: argument COMMAND: invalid choice: 'bogus' \(choose from"),
    (["--state"], USAGE, r"^marsfs: error: argument --state: expected one argument"),
    (["create", "v2", "--size", "12Q", "--thin", "--thin"], USAGE, r"cannot read size '12Q'"),
    (["clone", "v", "c1"], USAGE, r"^marsfs: error: clone 'v': give VOL@VERSION, like"),
    (["discard", "v"], USAGE, r"^marsfs: error: discard 'v': give VOL@VERSION, like vm@split-node2-4711$"),
    (["wait", "v"], USAGE, r"^marsfs: error: say what to wait for: --synced$"),
    (["wait", "v", "--synced", "--timeout", "-1"], USAGE, r"argument --timeout: '-1': give seconds, 0 or more"),
    (["wait", "v", "--synced", "--timeout", "soon"], USAGE, r"argument --timeout: 'soon': give seconds"),
    (["wait", "v", "--synced", "--timeout", "nan"], USAGE, r"argument --timeout: 'nan': give seconds"),
    (["status", "--watch", "--interval", "-1"], USAGE, r"argument --interval: '-1': give seconds"),
    (["status", "--watch", "--interval", "inf"], USAGE, r"argument --interval: 'inf': give seconds between"),
    (["history", "v", "soon"], USAGE, r"^marsfs: error: cannot read history 'soon': give a size like 10G"),
    (["history", "v", "1G,2G"], USAGE, r"gives two sizes"),
    (["leave", "v", "--force"], USAGE, r"leave --force goes with --node NAME"),
    (["primary", "v", "--force", "--accept-loss", "--json", "x"], USAGE, r"unrecognized arguments: x"),
    (["mode", "v", "fast"], USAGE, r"fast"),
    (["mode", "v", "sync", "--mirrors", "0"], USAGE, r"--mirrors"),
    (["mode", "v", "sync", "--mirrors", "x"], USAGE, r"--mirrors"),
    (["mode", "v", "sync", "--timeout", "-1"], USAGE, r"--timeout"),
    (["mode", "v", "sync", "--timeout", "soon"], USAGE, r"--timeout"),
))
def test_other_usage_mistakes(args: list[str], want: int, match: str, up: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    one_line(*cli_main(["--state", os.fspath(up), *args], capsys), want, match)


# ---------------------------------------------------------------------- sizes, rates, nodes

UNREADABLE = [
    ("-1", USAGE, r"^marsfs: error: cannot read size '-1': give bytes or a number with K, M, G or T, like 512M"),
    ("12Q", USAGE, r"^marsfs: error: cannot read size '12Q'"),
    ("1.5", USAGE, r"^marsfs: error: size '1.5' is not a whole number of bytes"),
]


@pytest.mark.parametrize("size,want,match", cases(
    ("0", REFUSED, r"volume size 0 bytes \(0 B\) is not possible here: give a multiple of 512 bytes up to"),
    ("1000", REFUSED, r"volume size 1000 bytes \(1000 B\) is not possible here: give a multiple of 512 bytes"),
    ("99999999T", REFUSED, r"\(99999999.0 TiB\) is not possible here: give a multiple of 512 bytes up to .*, the "
                           r"largest file the filesystem of .* holds"),
    *UNREADABLE,
))
def test_create_sizes(size: str, want: int, match: str, up: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli_main(["--state", os.fspath(up), "create", "v2", "--size", size], capsys)
    one_line(code, err, want, match)


@pytest.mark.parametrize("size,want,match", cases(
    ("0", REFUSED, r"volume size 0 is not a positive multiple of 512 bytes; give a size like 512M"),
    ("1048577", REFUSED, r"multiple of 512"),
    ("99999999T", REFUSED, r"\(99999999.0 TiB\) is not possible here: the filesystem of .* holds files up to"),
    ("512K", REFUSED, r"volume v is 1048576 bytes; shrinking it to 524288 is not supported .*give a larger size"),
    *UNREADABLE,
))
def test_resize_sizes(size: str, want: int, match: str, up: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli_main(["--state", os.fspath(up), "resize", "v", size], capsys)
    one_line(code, err, want, match)


@pytest.mark.parametrize("verb", ["join", "invalidate"])
@pytest.mark.parametrize("rate,match", [("0", r"rate '0': give bytes per second above 0"),
                                        ("-1", r"cannot read size '-1'"), ("12Q", r"cannot read size '12Q'")])
def test_rates(verb: str, rate: str, match: str, down: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli_main(["--state", os.fspath(down), *argv(verb, "v"), "--rate", rate], capsys)
    one_line(code, err, USAGE, match)


@pytest.mark.parametrize("args,match", cases(
    (["join", "w", "--from", "zed"], r"unknown peer 'zed' \(known: n2\); start the daemon with --peer zed=HOST:PORT"),
    (["join", "w", "--from", "n2"], r"cannot reach peer n2 at 127\.0\.0\.1:\d+: .*is its daemon running with --listen"),
    (["join", "w", "--from", "n1"], r"n1 is this node: run marsfs join w --from NODE with the node that holds"),
    (["verify", "v", "--peer", "zed"], r"unknown peer 'zed' \(known: n2\)"),
    (["verify", "v", "--peer", "n2"], r"cannot reach peer n2 to verify v"),
    (["verify", "v"], r"v is primary on node n1 and has no mirrors to compare with; give one"),
    (["leave", "v", "--node", "zed", "--force"], r"node zed does not hold volume v .*\(members: n1\); give one of"),
    (["leave", "v", "--node", "n1", "--force"], r"n1 is this node: to stop mirroring v here run: marsfs leave v"),
))
def test_nodes(args: list[str], match: str, up: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_line(*cli_main(["--state", os.fspath(up), *args], capsys), REFUSED, match)


@pytest.mark.parametrize("args", [["join", "w", "--from", "bad/n"], ["verify", "v", "--peer", "bad/n"],
                                  ["leave", "v", "--node", "bad/n", "--force"]])
def test_a_malformed_node_name(args: list[str], up: Path, down: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Named as such (not as an unknown peer to add with --peer), with the daemon up or down."""
    for state in (up, down):
        code, err = cli_main(["--state", os.fspath(state), *args], capsys)
        one_line(code, err, REFUSED, r"^marsfs: error: invalid node name 'bad/n': use 1-64 letters")


@pytest.mark.parametrize("args,match", cases(
    (["create", "v", "--size", "1M"], r"volume 'v' already exists on node n1; pick another name, or remove it first"),
    (["primary", "v"], r"volume 'v' is already primary on node n1: nothing to do"),
    (["pause-fetch", "v"], r"volume 'v' is not a mirror on node n1: .*run it on a node that mirrors v"),
    (["leave", "v"], r"volume 'v' is not a mirror on node n1; use marsfs delete"),
    (["invalidate", "v"], r"run it on the mirror whose copy is damaged or divergent"),
    (["wait", "v", "--synced"], r"v is primary on node n1 and has no mirrors to wait for; run marsfs wait"),
    (["clone", "v@lsn-99", "c1"], r"version lsn-99 .* is not retained; available: lsn-0 to lsn-0"),
    (["discard", "v@split-n2-1"], r"no split version split-n2-1 of volume v on this node; list them with"),
    (["mark", "v", "lsn-3"], r"mark name 'lsn-3' is invalid"),
))
def test_refusals_of_the_wrong_moment(args: list[str], match: str, up: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Right name, wrong role or state: each says what to do instead."""
    one_line(*cli_main(["--state", os.fspath(up), *args], capsys), REFUSED, match)


# ---------------------------------------------------------------------- the daemon's side

REQUESTS: dict[str, dict[str, Any]] = {
    "create": {"size": MiB}, "mark": {"name": "m1"}, "join": {"source": "n2"}, "resize": {"size": 2 * MiB},
    "clone": {"version": "v@lsn-0"},
}


@pytest.mark.parametrize("verb", sorted(c.name for c in COMMANDS.values()
                                        if c.handler is not None and any(a.name == "volume" for a in c.args)))
def test_the_daemon_refuses_a_malformed_name_too(verb: str, node: Node) -> None:
    """Another client of the control socket gets the same refusal as the command line."""
    node.create("v", MiB)

    async def main() -> None:
        ctx = Context(node, Cluster(node, listen=None, peers={}), Path("/m"), lambda name: None)
        with pytest.raises(InvalidRequest, match="invalid volume name 'bad/name'"):
            await dispatch(ctx, verb, {"volume": "bad/name", **REQUESTS.get(verb, {})})
        if verb in ("join", "verify", "leave"):
            key = {"join": "source", "verify": "peer", "leave": "node"}[verb]
            with pytest.raises(InvalidRequest, match="invalid node name 'bad/n'"):
                await dispatch(ctx, verb, {"volume": "v", key: "bad/n"})

    run(main, autojump=None)


# ---------------------------------------------------------------------- files only: cluster

def test_cluster_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca, afile = tmp_path / "ca", tmp_path / "afile"
    afile.write_text("")
    cases: list[tuple[list[str], int, str]] = [
        (["cluster"], USAGE, r"^marsfs cluster: error: the following arguments are required: init\|add-node"),
        (["cluster", "bogus"], USAGE, r"^marsfs cluster: error: argument init\|add-node: invalid choice: 'bogus'"),
        (["cluster", "init"], USAGE, r"^marsfs cluster init: error: .*required: --dir; see: marsfs cluster init --help"),
        (["cluster", "init", "--dir", os.fspath(ca), "--cluster", ""], USAGE, r"--cluster: give a non-empty"),
        (["cluster", "init", "--dir", os.fspath(afile)], REFUSED, rf"cannot use --dir {afile}: not a directory; give"),
        (["cluster", "init", "--dir", "/proc/marsfs-ca"], REFUSED, r"cannot use --dir /proc/marsfs-ca: "),
        (["cluster", "init", "--dir", os.fspath(ca)], 0, ""),
        (["cluster", "init", "--dir", os.fspath(ca)], REFUSED, r"holds a CA already \(ca\.crt\); .*another --dir"),
        (["cluster", "add-node", "n1", "--ca", os.fspath(ca)], USAGE, r"required: --out; see: marsfs cluster add-node"),
        (["cluster", "add-node", "bad/n", "--ca", os.fspath(ca), "--out", os.fspath(tmp_path / "o")], REFUSED,
         r"invalid node name 'bad/n'"),
        (["cluster", "add-node", "n1", "--ca", os.fspath(tmp_path / "nope"), "--out", os.fspath(tmp_path / "o")],
         REFUSED, r"ca\.crt does not exist: give the directory marsfs cluster init --dir made"),
        (["cluster", "add-node", "n1", "--ca", os.fspath(afile), "--out", os.fspath(tmp_path / "o")], REFUSED,
         rf"cannot use --ca {afile}: .*not a directory; give --ca the directory marsfs cluster init --dir made"),
        (["cluster", "add-node", "n1", "--ca", os.fspath(ca), "--out", os.fspath(afile)], REFUSED,
         rf"cannot use --out {afile}: not a directory; give --out a directory"),
        (["cluster", "add-node", "n1", "--ca", os.fspath(ca), "--out", "/proc/marsfs-tls"], REFUSED,
         r"cannot use --out /proc/marsfs-tls: "),
        (["cluster", "add-node", "n1", "--ca", os.fspath(ca), "--out", os.fspath(tmp_path / "o"), "--days", "0"],
         USAGE, r"--days 0: give the days the certificate is valid, above 0"),
        (["cluster", "add-node", "n1", "--ca", os.fspath(ca), "--out", os.fspath(tmp_path / "o"), "--days", "x"],
         USAGE, r"argument --days: invalid int value: 'x'; see: marsfs cluster add-node --help"),
    ]
    for args, want, match in cases:
        code, err = cli_main(args, capsys)
        if want == 0:
            assert (code, err) == (0, ""), args
        else:
            one_line(code, err, want, match)


# ---------------------------------------------------------------------- as a process

def marsfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "marsfs", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


SERVE = cases(
    ([], USAGE, r"marsfs serve needs --node, --state, --mount \(or the same keys in --config\)"),
    (["--node", "bad/name"], USAGE, r"--node 'bad/name' is not a node name: give 1-64 letters"),
    (["--peer", "bad/n=127.0.0.1:7600"], USAGE, r"--peer 'bad/n' is not a node name: give the peer's name"),
    (["--peer", "n2"], USAGE, r"--peer 'n2': give NAME=HOST:PORT"),
    (["--peer", "n1=127.0.0.1:7600"], USAGE, r"n1 is this node's own name; list the other nodes only"),
    (["--listen", "nonsense"], USAGE, r"--listen: address 'nonsense': give HOST:PORT"),
    (["--history", "soon"], USAGE, r"--history: cannot read history 'soon'"),
    (["--log-space", "0"], USAGE, r"--log-space: log space 0 \(0 B\) is too small: .*give more"),
    (["--log-space", "-1"], USAGE, r"--log-space: cannot read log space '-1'"),
    (["--log-space", "1.5"], USAGE, r"--log-space: cannot read log space '1.5'"),
    (["--log-space", "12Q"], USAGE, r"--log-space: cannot read log space '12Q'"),
    (["--log-space", "99999999T"], USAGE, r"--log-space 99999999.0 TiB .* is more than the filesystem of"),
    (["--stop-timeout", "soon"], USAGE, r"--stop-timeout 'soon': give seconds"),
    (["--sync-rate", "0"], USAGE, r"--sync-rate '0': give bytes per second above 0"),
    (["--metrics", "x"], USAGE, r"--metrics: address 'x': give HOST:PORT"),
    (["--cluster", ""], USAGE, r"--cluster '': give a non-empty cluster id"),
    (["--config", "/nonexistent.toml"], USAGE, r"config file /nonexistent.toml does not exist"),
    (["--bogus"], USAGE, r"^marsfs serve: error: unrecognized arguments: --bogus; see: marsfs serve --help$"),
    (["--mount", "MISSING"], REFUSED, r"mount point .*/missing does not exist; create it with: mkdir -p"),
    (["--state", "AFILE"], REFUSED, r"state directory .*/afile is not a directory; give a directory"),
)


def serve_args(flags: list[str], where: Path) -> list[str]:
    """``serve`` with a good --node, --state and --mount, and ``flags`` on top (MISSING: a
    directory that is not there, AFILE: a file)."""
    (where / "mnt").mkdir(parents=True)
    (where / "afile").write_text("")
    if not flags:
        return []
    base = {"--node": "n1", "--state": os.fspath(where / "state"), "--mount": os.fspath(where / "mnt")}
    given = {f: v.replace("MISSING", os.fspath(where / "missing")).replace("AFILE", os.fspath(where / "afile"))
             for f, v in zip(flags[::2], flags[1::2], strict=False)}
    return [x for f, v in {**base, **given}.items() for x in (f, v)] + flags[len(flags) // 2 * 2:]


@pytest.mark.parametrize("flags,want,match", SERVE)
def test_serve_refuses_before_it_starts(flags: list[str], want: int, match: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Each mistake is one line before anything is touched; usage mistakes exit 2, which systemd
    does not retry (packaging/marsfs.service: RestartPreventExitStatus=2). In-process: a case
    that got past the checks would fail at the first step after them, before any start."""

    def started(cfg: object) -> None:
        raise AssertionError("serve got past its checks")

    monkeypatch.setattr(daemon, "configure_logging", lambda verbose: None)
    monkeypatch.setattr(daemon, "_load_tls", started)
    one_line(*cli_main(["serve", *serve_args(flags, tmp_path)], capsys), want, match)
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("args,want,match", cases(
    (["create", "v", "--size", "12Q"], USAGE, r"^marsfs: error: cannot read size '12Q'"),
    (["create"], USAGE, r"^marsfs create: error: the following arguments are required"),
    (["status", "bad/name"], REFUSED, r"invalid volume name"),
    (["status"], REFUSED, r"no marsfs daemon is running for state directory"),
    (["cluster", "init", "--dir", "/proc/marsfs-ca"], REFUSED, r"cannot use --dir /proc/marsfs-ca"),
    (["serve", "--node", "bad/name", "--mount", "/nonexistent/mnt"], USAGE, r"--node 'bad/name' is not a node name"),
    (["serve", "--node", "n1", "--mount", "/nonexistent/mnt"], REFUSED, r"mount point /nonexistent/mnt does not "
                                                                        r"exist; create it with: mkdir -p"),
))
def test_as_a_process(args: list[str], want: int, match: str, down: Path) -> None:
    r = marsfs("--state", os.fspath(down), *args)
    one_line(r.returncode, r.stderr, want, match)


def test_state_directories_no_daemon_can_have(tmp_path: Path, socket_dirs: Path) -> None:
    """A --state that is a file, or too long for a socket address: one line, no traceback."""
    (tmp_path / "afile").write_text("")
    r = marsfs("--state", os.fspath(tmp_path / "afile"), "status")
    one_line(r.returncode, r.stderr, REFUSED, r"state directory .*afile is not a directory: give the --state")
    long = socket_dirs / ("x" * 120)
    long.mkdir()
    r = marsfs("status", env={"MARSFS_STATE": os.fspath(long)})
    one_line(r.returncode, r.stderr, REFUSED, r"no marsfs daemon can run for state directory .*: the path of its "
                                              r"control socket is longer than a Unix socket address holds")
