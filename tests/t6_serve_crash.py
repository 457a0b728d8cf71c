"""SIGKILL the daemon under ext4-on-loop write+fsync load: fsck clean, fsync'd files whole."""

from __future__ import annotations

from marsfs.testing.crash import crash_rounds
from marsfs.testing.harness import Harness


def test_sigkill_under_fsync_load(harness: Harness) -> None:
    totals = crash_rounds(harness, rounds=3, seed=11)
    assert totals["rounds"] == 3
    assert totals["files_verified"] > 0, "the writer never completed an fsync: the test proves nothing"
