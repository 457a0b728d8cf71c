"""The daemon's faces in-process: serve's configuration and --listen checks, the primary's
status table, ``wait --synced``, the planned commands, mark name rules, the stopping daemon's
open refusal and honest messages. No root, no mount (tests/t4_daemon.py has the
same cases through real daemons)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from marsfs import cli
from marsfs.errors import InvalidRequest, MarsError, UsageError
from marsfs.faces.commands import COMMANDS, PLANNED, Context, dispatch, status_table
from marsfs.faces.config import DEFAULT_STOP_TIMEOUT, check_listen, load_config
from marsfs.faces.fuse import Operations
from marsfs.node import Node
from marsfs.node.cluster import Cluster
from marsfs.testing.checks import setattr_fields
from marsfs.testing.fakedaemon import cli_run
from marsfs.testing.runner import run

MiB = 1 << 20
NO_FLAGS: dict[str, Any] = {"node": "n1", "state": "/s", "mount": "/m", "listen": None, "peer": [],
                            "history": None, "cluster": None, "stop_timeout": None}

#: the shared in-process node (conftest) has a volume ``v``
pytestmark = pytest.mark.volumes(v=MiB)


class Answers:
    """A fake daemon that answers ``status`` from a list, the last answer repeating."""

    def __init__(self, *rows: dict[str, Any]) -> None:
        self.rows = list(rows)
        self.asked = 0

    def __call__(self, cmd: str, args: dict[str, Any]) -> Any:
        assert cmd == "status"
        self.asked += 1
        return [self.rows.pop(0) if len(self.rows) > 1 else self.rows[0]]


PRIMARY = {"volume": "v", "node": "n1", "role": "primary", "state": "up", "epoch": 1, "size": MiB, "head_lsn": 9,
           "durable_lsn": 9, "applied_lsn": 0, "oldest_version_lsn": 0, "log_bytes": 9 * MiB, "lag_bytes": 0,
           "lag_seconds": 0.0, "open_handles": 0, "errors": [], "peers": []}
PEER = {"node": "b", "state": "synced", "connected": True, "fetched_lsn": 9, "replayed_lsn": 9,
        "fetch_paused": False, "replay_paused": False, "lag_bytes": 0, "lag_records": 0, "lag_seconds": 0.0,
        "last_seen": 0.0, "role": "mirror"}
MIRROR = {**PRIMARY, "node": "n2", "role": "mirror", "state": "synced", "heartbeat_age": 0.4, "lag_records": 0}


# ---------------------------------------------------------------------- finding 13: the config file

def test_config_refuses_unknown_keys_by_name(tmp_path: Path) -> None:
    conf = tmp_path / "marsfs.toml"
    conf.write_text('node = "n1"\nstate = "/s"\nmount = "/m"\nlisen = "127.0.0.1:7600"\n')
    with pytest.raises(UsageError, match=r"unknown key 'lisen' \(the keys are cluster, history, insecure, listen"):
        load_config(conf, NO_FLAGS)
    conf.write_text('peers = "n2=127.0.0.1:1"\n')
    with pytest.raises(UsageError, match="'peers' must be a table"):
        load_config(conf, NO_FLAGS)
    conf.write_text('stop-timeout = 5\n[peers]\nn2 = "127.0.0.1:7601"\n')
    cfg = load_config(conf, NO_FLAGS)
    assert cfg.stop_timeout == 5.0 and cfg.peers == {"n2": "127.0.0.1:7601"}
    assert load_config(conf, {**NO_FLAGS, "stop_timeout": "0"}).stop_timeout == 0.0  # flags win
    assert load_config(None, NO_FLAGS).stop_timeout == DEFAULT_STOP_TIMEOUT
    assert load_config(None, {**NO_FLAGS, "stop_timeout": "inf"}).stop_timeout == float("inf")
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(UsageError, match="--stop-timeout"):
            load_config(None, {**NO_FLAGS, "stop_timeout": bad})


# ---------------------------------------------------------------------- finding 6: --listen before the mount

@pytest.mark.parametrize("listen,match", [("nonsense", "give HOST:PORT"), ("127.0.0.1:99999", "give HOST:PORT"),
                                          ("127.0.0.1:0x", "give HOST:PORT")])
def test_malformed_addresses_are_refused_with_the_configuration(listen: str, match: str) -> None:
    with pytest.raises(UsageError, match=f"--listen: .*{match}"):
        load_config(None, {**NO_FLAGS, "listen": listen})
    if ":" in listen:
        with pytest.raises(UsageError, match=f"peer n2: .*{match}"):
            load_config(None, {**NO_FLAGS, "peer": [f"n2={listen}"]})


def test_check_listen_binds_before_the_mount() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(MarsError, match=f"cannot listen for peers on 127.0.0.1:{port}: .*something else listens"):
            check_listen(f"127.0.0.1:{port}")
    with pytest.raises(MarsError, match="not an address of this machine"):
        check_listen("192.0.2.1:7600")  # TEST-NET-1: never on this machine
    check_listen(f"127.0.0.1:{port}")  # and the port is free again once its listener closed


# ---------------------------------------------------------------------- finding 8: the primary's table

def test_status_table_shows_a_primarys_mirrors() -> None:
    lagging = {**PEER, "state": "disconnected", "connected": False, "fetched_lsn": 4, "replayed_lsn": 3,
               "lag_bytes": 8 * MiB, "lag_records": 5, "lag_seconds": 12.25}
    text = status_table([{**PRIMARY, "peers": [PEER, {**lagging, "node": "c"}]}, {**MIRROR, "volume": "w"}])
    lines = text.splitlines()
    assert lines[1].startswith("v ") and "primary" in lines[1]
    assert lines[2] == "  mirror b: synced, lag 0 B/0.0s (0 records), fetched 9, replayed 9"
    assert lines[3] == "  mirror c: disconnected, lag 8.0 MiB/12.2s (5 records), fetched 4, replayed 3"
    assert lines[4].startswith("w ")
    # then the view's warnings: a mirror that is not keeping up
    assert lines[5:] == ["v: warning: mirror c is disconnected: lag 8.0 MiB/12.2s (5 records)"]
    # the columns of the volume rows still line up (the peer lines do not widen them)
    assert lines[0].index("ROLE") == lines[1].index("primary") == lines[4].index("mirror")


# ---------------------------------------------------------------------- finding 10: wait --synced

def test_wait_timeout_zero_on_a_synced_mirror_is_one_check() -> None:
    daemon = Answers(MIRROR)  # synced on the word of a heartbeat 0.4 s old
    assert cli_run(["wait", "v", "--synced", "--timeout", "0"], daemon) == 0
    assert daemon.asked == 1
    with pytest.raises(MarsError, match="not synced after 0 s: state catching-up"):
        cli_run(["wait", "v", "--synced", "--timeout", "0"], Answers({**MIRROR, "state": "catching-up"}))


def test_wait_on_a_mirror_wants_a_heartbeat_after_it_began() -> None:
    # the first answer predates the wait (a write just made on the primary may be missing)
    daemon = Answers({**MIRROR, "heartbeat_age": 5.0}, {**MIRROR, "heartbeat_age": 0.0})
    assert cli_run(["wait", "v", "--synced", "--timeout", "10"], daemon) == 0
    assert daemon.asked == 2


def test_wait_on_a_primary_waits_for_every_mirror() -> None:
    behind = {**PEER, "node": "c", "state": "catching-up", "fetched_lsn": 7, "replayed_lsn": 7, "lag_records": 2}
    replaying = {**PEER, "node": "c", "replayed_lsn": 8}  # fetched all, not replayed all yet
    daemon = Answers({**PRIMARY, "peers": [PEER, behind]}, {**PRIMARY, "peers": [PEER, replaying]},
                     {**PRIMARY, "peers": [PEER, {**PEER, "node": "c"}]})
    assert cli_run(["wait", "v", "--synced", "--timeout", "10"], daemon) == 0
    assert daemon.asked == 3
    with pytest.raises(MarsError, match="not synced after 0 s: mirror c is catching-up, lag 2 records") as e:
        cli_run(["wait", "v", "--synced", "--timeout", "0"], Answers({**PRIMARY, "peers": [PEER, behind]}))
    assert "mirror b" not in str(e.value)
    with pytest.raises(MarsError, match="v is primary on node n1 and has no mirrors to wait for"):
        cli_run(["wait", "v", "--synced"], Answers(PRIMARY))


# ---------------------------------------------------------------------- finding 13: planned commands

def test_every_command_of_the_product_is_there_and_none_is_planned() -> None:
    """The planned commands of finding 13 all exist now (invalidate, the last, with fast sync)."""
    assert dict(PLANNED) == {}
    for name in ("create", "delete", "status", "join", "leave", "primary", "invalidate", "pause-fetch",
                 "resume-fetch", "pause-replay", "resume-replay", "mark", "versions", "clone", "verify", "resize",
                 "wait"):
        assert name in COMMANDS and COMMANDS[name].help is not None, name


def test_unknown_options_of_real_commands_are_still_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["status", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


# ---------------------------------------------------------------------- finding 13: mark names

@pytest.mark.parametrize("name", ["head", "HEAD", "oldest", "flush", "mark", "lsn-5", "lsn-x", ".hidden", "a/b",
                                  "2026-11-23T22:00:00Z", "2026-11-23", "tab\there", "new\nline", "x" * 201])
def test_mark_names_that_shadow_a_version_are_refused_with_the_rule(node: Node, name: str) -> None:
    async def main() -> None:
        ctx = Context(node, Cluster(node, listen=None, peers={}), Path("/m"), lambda name: None)
        with pytest.raises(InvalidRequest, match="is invalid: 1-200 bytes; not head, oldest, flush or mark"):
            await dispatch(ctx, "mark", {"volume": "v", "name": name})
        assert node.volume("v").log.marks == {}

    run(main, autojump=None)


def test_good_mark_names(node: Node) -> None:
    for name in ("before-upgrade", "head-1", "v2.0", "Ünïcode", "2026"):
        node.mark("v", name)
    assert sorted(node.volume("v").log.marks.values()) == sorted(
        ["before-upgrade", "head-1", "v2.0", "Ünïcode", "2026"])


# ---------------------------------------------------------------------- finding 7: a stopping daemon

@pytest.mark.allow_log("refused to open v.img: node n1 is stopping")
def test_a_stopping_daemon_refuses_new_opens_and_keeps_open_ones(node: Node) -> None:
    ops = Operations(node)

    async def main() -> None:
        ino = int((await ops.lookup(pyfuse3.ROOT_INODE, b"v.img", None)).st_ino)
        fi = await ops.open(ino, os.O_RDWR, None)
        ops.closing = True
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(ino, os.O_RDONLY, None)
        assert e.value.errno == errno.EBUSY
        assert await ops.write(fi.fh, 0, b"k" * 512) == 512  # the open handle keeps working
        await ops.fsync(fi.fh, False)
        await ops.release(fi.fh)
        assert node.opens["v"] == 0

    run(main, autojump=None)


# ---------------------------------------------------------------------- finding 13: messages

@pytest.mark.allow_log("refused to change the size")
def test_the_size_refusal_names_no_command_that_does_not_exist(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    ops = Operations(node)
    fields = setattr_fields(size=True)

    async def main() -> None:
        ino = int((await ops.lookup(pyfuse3.ROOT_INODE, b"v.img", None)).st_ino)
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 2 * MiB
        with pytest.raises(pyfuse3.FUSEError):
            await ops.setattr(ino, attr, fields, None, None)

    run(main, autojump=None)
    said = [r.getMessage() for r in caplog.records if "refused to change the size" in r.getMessage()]
    assert said and all("a volume grows with marsfs resize" in m for m in said)  # which exists now
