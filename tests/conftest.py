"""Shared fixtures: a Harness that always cleans up, and the privilege checks.

With ``CI=true`` nothing may be skipped for want of root, FUSE or loop devices: such a test
fails loudly instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

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


@pytest.fixture
def harness(privileged: None) -> Iterator[Harness]:
    root = Path(tempfile.mkdtemp(prefix="marsfs-test-", dir="/tmp"))
    h = Harness(root)
    try:
        yield h
    finally:
        h.close()
        shutil.rmtree(root, ignore_errors=True)
