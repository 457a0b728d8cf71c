"""Shared fixtures: a Harness that always cleans up, the privilege checks, and the log check.

With ``CI=true`` nothing may be skipped for want of root, FUSE or loop devices: such a test
fails loudly instead.

The log check (s3ql's pytest_checklogs): a test fails when marsfs code in the test process logs
a record at WARNING or above, or when a daemon it started logs what only a bug writes (a
traceback, an unexpected handler error, an internal error), unless the test declares the
pattern with ``@pytest.mark.allow_log("regex", ...)``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from marsfs.node import Node
from marsfs.testing.harness import Harness


def _missing_privileges() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control)"
    for tool in ("fusermount3", "losetup", "mkfs.ext4", "e2fsck"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@pytest.fixture
def privileged() -> None:
    """Skip (or, under CI=true, fail) when the machine cannot run real mounts."""
    why = _missing_privileges()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but this machine cannot run the test: {why}")
        pytest.skip(why)


def _allowed(request: pytest.FixtureRequest) -> list[re.Pattern[str]]:
    return [re.compile(p) for m in request.node.iter_markers("allow_log") for p in m.args]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "marsfs" or record.name.startswith("marsfs."):
            self.records.append(record)


@pytest.fixture(autouse=True)
def check_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test on unexpected warnings or exceptions logged by marsfs in this process."""
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    allowed = _allowed(request)
    bad = [f"{r.name} {r.levelname}: {r.getMessage()}" + (" (with traceback)" if r.exc_info else "")
           for r in handler.records]
    bad = [line for line in bad if not any(p.search(line) for p in allowed)]
    if bad:
        pytest.fail("unexpected log records (declare expected ones with @pytest.mark.allow_log):\n  "
                    + "\n  ".join(bad[:20]), pytrace=False)


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    """An in-process node (no daemon, no mount) in ``tmp_path/state``, closed after the test;
    with the volumes that ``@pytest.mark.volumes(name=size, ...)`` (or a module's ``pytestmark``)
    names already created."""
    n = Node.open(tmp_path / "state", "n1")
    try:
        for mark in request.node.iter_markers("volumes"):
            for name, size in mark.kwargs.items():
                n.create(name, size)
        yield n
    finally:
        n.close()


@pytest.fixture
def harness(privileged: None, request: pytest.FixtureRequest) -> Iterator[Harness]:
    root = Path(tempfile.mkdtemp(prefix="marsfs-test-", dir="/tmp"))
    h = Harness(root)
    try:
        yield h
    finally:
        bugs = h.bug_lines()
        try:
            h.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    allowed = _allowed(request)
    bugs = [line for line in bugs if not any(p.search(line) for p in allowed)]
    if bugs:
        pytest.fail("a daemon logged what only a bug writes (declare expected lines with "
                    "@pytest.mark.allow_log):\n  " + "\n  ".join(bugs[:20]), pytrace=False)
