"""G11 at the node and its faces, in-process: one volume's disk failure is that volume's.

What holds:

* a write that meets a full disk shows in ``status`` (state ``no-space`` and a line saying
  what failed and what to do); the other volume reads and writes; the next write that fits
  clears it;
* ``Node.maintain`` never raises: a writeback that fails is the volume's fault, logged once
  (not every pass), retried every pass, and gone when it works again;
* a failed fdatasync of the log: status ``failed``, saying to restart the daemon;
* a volume that cannot be opened at start (its interrupted writeback meets a full disk) is not
  served, the others are: status lists it as failed with one line, commands on it say why;
  ``delete`` removes one (a damaged log) and frees its name;
* ``create`` reserves the base (refusing a volume that cannot fit, with both sizes, leaving
  nothing behind); ``create --thin`` through the command table does not;
* ``delete`` needs no free space (not even a block for the trash directory), and removes a
  volume that could not be opened at start.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from marsfs.errors import NoSpace, StateError
from marsfs.faces.commands import Context, dispatch
from marsfs.node import Node
from marsfs.node import node as node_module
from marsfs.node.cluster import Cluster
from marsfs.node.status import node_rows
from marsfs.testing.checks import make_mirror
from marsfs.testing.runner import run
from marsfs.volume import Retention
from marsfs.volume import writeback as wb

MiB = 1 << 20


@contextmanager
def failing(monkeypatch: pytest.MonkeyPatch, name: str, fd: Callable[[], int], code: int) -> Iterator[None]:
    """``os.<name>`` on the file ``fd()`` fails with ``code``; other files work."""
    real = getattr(os, name)

    def patched(f: int, *args: Any) -> Any:
        if f == fd():
            raise OSError(code, os.strerror(code))
        return real(f, *args)

    with monkeypatch.context() as m:
        m.setattr(os, name, patched)
        yield


def _row(node: Node, name: str) -> dict[str, Any]:
    return next(r for r in node_rows(node) if r["volume"] == name)


def test_a_full_disk_is_one_volumes_error_and_goes_away_by_itself(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    thin, other = node.create("thin", 4 * MiB), node.create("other", MiB)
    other.write(0, b"o" * 4096)
    with failing(monkeypatch, "pwritev", lambda: thin.log._segments[-1].fd, errno.ENOSPC), \
            pytest.raises(NoSpace) as exc:
        thin.write(0, b"t" * 4096)
    assert exc.value.errno == errno.ENOSPC
    row = _row(node, "thin")
    assert row["state"] == "no-space"
    [line] = row["errors"]
    assert "failed with ENOSPC" in line and "free space" in line and "by themselves" in line
    assert _row(node, "other")["state"] == "up" and _row(node, "other")["errors"] == []
    other.write(4096, b"p" * 4096)
    other.flush()
    assert other.read(0, 8192) == b"o" * 4096 + b"p" * 4096
    thin.write(0, b"t" * 4096)  # room again: no restart
    thin.flush()
    assert _row(node, "thin")["state"] == "up" and _row(node, "thin")["errors"] == []


@pytest.mark.allow_log(r"writeback of v: cannot write back into the base image")
def test_maintain_never_raises_and_logs_a_failing_writeback_once(
        node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    vol = node.create("v", MiB)
    node.set_history("v", Retention(0))
    vol.write(0, b"w" * 8192)
    vol.flush()
    for code, state in ((errno.ENOSPC, "no-space"), (errno.EIO, "failed")):
        caplog.clear()
        with failing(monkeypatch, "pwrite", lambda: vol._base_fd, code):
            for _ in range(3):
                node.maintain()
        assert [r.levelname for r in caplog.records if "writeback of v" in r.message] == ["ERROR"]
        row = _row(node, "v")
        assert row["state"] == state and row["applied_lsn"] == 0
        assert len(row["errors"]) == 1 and "writeback into the base image is stuck" in row["errors"][0]
        assert vol.read(0, 8192) == b"w" * 8192
    node.maintain()
    row = _row(node, "v")
    assert (row["state"], row["errors"], row["applied_lsn"]) == ("up", [], vol.head_lsn)
    with open(vol.path / "base.img", "rb") as f:
        assert f.read(8192) == b"w" * 8192


def test_a_failed_fdatasync_of_the_log_says_restart(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    vol, other = node.create("v", MiB), node.create("other", MiB)
    vol.write(0, b"x" * 512)
    with failing(monkeypatch, "fdatasync", lambda: vol.log._segments[-1].fd, errno.EIO), \
            pytest.raises(Exception, match="restart"):
        vol.flush()
    row = _row(node, "v")
    assert row["state"] == "failed" and len(row["errors"]) == 1 and "restart the daemon" in row["errors"][0]
    node.maintain()  # nothing raises, and the other volume is fine
    other.write(0, b"y" * 512)
    other.flush()
    assert _row(node, "other")["state"] == "up"
    node.volumes.pop("v").log._failed = None  # let the fixture close the rest
    vol.close()


@pytest.mark.allow_log(r"volume broken is not served: it could not be opened")
def test_a_volume_that_cannot_open_is_failed_and_the_others_are_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    n = Node.open(state, "n1")
    try:
        for name in ("broken", "fine"):
            vol = n.create(name, MiB)
            vol.write(0, name.encode() * 512)
            vol.flush()
        head = n.volume("broken").head_lsn
    finally:
        n.close()
    wb.persist_intent(state / "volumes" / "broken", 0, head, 0)  # a crash between intent and applied
    real_open, real_pwrite = os.open, os.pwrite
    base = str(state / "volumes" / "broken" / "base.img")
    fds: set[int] = set()

    def track(path: Any, *args: Any, **kw: Any) -> int:
        fd = real_open(path, *args, **kw)
        if str(path) == base:
            fds.add(fd)
        return fd

    def full(fd: int, *args: Any) -> Any:
        if fd in fds:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, *args)

    with monkeypatch.context() as m:
        m.setattr(os, "open", track)
        m.setattr(os, "pwrite", full)
        n = Node.open(state, "n1")
    try:
        assert sorted(n.volumes) == ["fine"] and n.volume("fine").read(0, 4) == b"fine"
        [line] = n.failed.values()
        assert line.startswith("volume broken is not served: it could not be opened: volume broken: cannot finish")
        assert "free space" in line and "restart the daemon" in line and "\n" not in line
        row = _row(n, "broken")
        assert (row["state"], row["errors"]) == ("failed", [line])
        with pytest.raises(StateError, match="not served"):
            n.volume("broken")
        with pytest.raises(Exception, match="already exists"):
            n.create("broken", MiB)

        async def main() -> None:
            cluster = Cluster(n, listen=None, peers={})
            ctx = Context(n, cluster, Path("/mnt"), lambda name: None)
            async with trio.open_nursery() as nursery:
                await nursery.start(cluster.run)
                rows = await dispatch(ctx, "status", {})
                assert [(r["volume"], r["state"]) for r in rows] == [("fine", "up"), ("broken", "failed")]
                assert (await dispatch(ctx, "status", {"volume": "broken"}))[0]["errors"] == [line]
                nursery.cancel_scope.cancel()

        run(main, autojump=None)
    finally:
        n.close()
    n = Node.open(state, "n1")  # room again: a restart opens it and redoes the writeback
    try:
        assert sorted(n.volumes) == ["broken", "fine"] and not n.failed
        assert n.volume("broken").read(0, 6) == b"broken"
    finally:
        n.close()


def test_create_reserves_and_refuses_what_cannot_fit(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = node.create("r", 2 * MiB)
    assert os.stat(vol.path / "base.img").st_blocks * 512 >= 2 * MiB
    monkeypatch.setattr(node_module, "free_bytes", lambda d: MiB)
    with pytest.raises(NoSpace, match=r"reservation of its 2\.0 MiB base image does not fit the 1\.0 MiB free.*--thin"):
        node.create("big", 2 * MiB)
    assert not (node.state / "volumes" / "big").exists() and "big" not in node.volumes
    monkeypatch.setattr(node_module, "free_bytes", lambda d: 64 * MiB)

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(NoSpace, match="does not fit"):
        node.create("big", 2 * MiB)
    assert not (node.state / "volumes" / "big").exists() and "big" not in node.volumes
    thin = node.create("big", 2 * MiB, thin=True)  # thin: nothing to reserve
    assert os.stat(thin.path / "base.img").st_blocks * 512 < MiB


def test_create_thin_through_the_command_table(node: Node) -> None:
    async def main() -> None:
        cluster = Cluster(node, listen=None, peers={})
        ctx = Context(node, cluster, Path("/mnt"), lambda name: None)
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run)
            await dispatch(ctx, "create", {"volume": "t", "size": "8M", "thin": True})
            await dispatch(ctx, "create", {"volume": "r", "size": "8M"})
            nursery.cancel_scope.cancel()

    run(main, autojump=None)
    assert os.stat(node.volume("t").path / "base.img").st_blocks * 512 < MiB
    assert os.stat(node.volume("r").path / "base.img").st_blocks * 512 >= 8 * MiB


def _damage(state: Path, name: str) -> None:
    """Flip a byte in the middle of ``name``'s first log segment (records follow it: damage)."""
    seg = min((state / "volumes" / name / "log").glob("*.seg"))
    with open(seg, "r+b") as f:
        f.seek(seg.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x40]))


@pytest.mark.allow_log(r"volume (broken|m1|m2) is not served: it could not be opened: log damaged")
def test_a_volume_whose_log_is_damaged_can_be_deleted_or_left(tmp_path: Path) -> None:
    state = tmp_path / "state"
    n = Node.open(state, "n1")
    try:
        for name in ("broken", "m1", "m2"):
            vol = n.create(name, MiB)
            for i in range(16):
                vol.write(i * 65536, os.urandom(65536))
                vol.flush()
        make_mirror(n, "m1")
        make_mirror(n, "m2")
    finally:
        n.close()
    for name in ("broken", "m1", "m2"):
        _damage(state, name)
    n = Node.open(state, "n1")
    try:
        assert {r["volume"]: r["state"] for r in node_rows(n)} == {"broken": "failed", "m1": "failed", "m2": "failed"}
        n.delete("broken")
        assert sorted(n.failed) == ["m1", "m2"] and not (state / "volumes" / "broken").exists()
        n.create("broken", MiB).write(0, b"x" * 512)  # the name is free again

        async def main() -> None:
            cluster = Cluster(n, listen=None, peers={})
            ctx = Context(n, cluster, Path("/mnt"), lambda name: None)
            async with trio.open_nursery() as nursery:
                await nursery.start(cluster.run)
                assert await dispatch(ctx, "delete", {"volume": "m1", "force": False}) == {"deleted": "m1"}
                assert await dispatch(ctx, "leave", {"volume": "m2", "node": None, "force": False}) == {
                    "volume": "m2", "left": "x"}
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert n.failed == {} and sorted(n.volumes) == ["broken"]
        assert sorted(p.name for p in (state / "volumes").iterdir()) == ["broken"]
    finally:
        n.close()


@pytest.mark.allow_log(r"volume broken is not served: it could not be opened")
def test_delete_needs_no_free_space_and_removes_a_volume_that_failed_to_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``delete`` on a disk without a block for the trash directory still removes the volume
    (and a restart finds nothing of it); a volume that could not be opened at start is deleted
    too, instead of being refused as failed."""
    state = tmp_path / "state"
    n = Node.open(state, "n1")
    try:
        n.create("v", MiB)
        n.create("broken", MiB)
        shutil.rmtree(state / "trash", ignore_errors=True)  # as if it could not be made at start
        real_mkdir = Path.mkdir

        def full(self: Path, *args: Any, **kw: Any) -> None:
            if self.name == "trash":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_mkdir(self, *args, **kw)

        with monkeypatch.context() as m:
            m.setattr(Path, "mkdir", full)
            n.delete("v")
        assert not (state / "volumes" / "v").exists() and "v" not in n.volumes
    finally:
        n.close()
    for f in (state / "volumes" / "broken" / "log").iterdir():
        f.unlink()  # its log is gone: it cannot be opened
    n = Node.open(state, "n1")
    try:
        assert sorted(n.volumes) == [] and list(n.failed) == ["broken"]
        n.delete("broken")
        assert not n.failed and not (state / "volumes" / "broken").exists()
    finally:
        n.close()
    n = Node.open(state, "n1")
    try:
        assert not n.volumes and not n.failed and list((state / "trash").iterdir()) == []
    finally:
        n.close()
