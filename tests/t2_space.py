"""G8 on a node: the log space limit, what enforcement frees first, and what status says.

What holds:

* above the high-water mark, enforcement frees the logs down to the low-water mark: history
  first (status warns that the window was cut), and only when history cannot free enough,
  mirrors' holds (the mirror gets a set of changed extents; status shows ``dropped`` and a
  warning naming what to do if it is gone for good);
* an open version is not cut: status names it;
* the write path wakes enforcement once a log grew by a quarter segment;
* segments are sized from the limit; status has ``log_space_limit`` and ``oldest_retained_lsn``;
* ``--log-space`` / ``log-space``: parsed, refused with one line when too small.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from marsfs.errors import InvalidRequest, UsageError
from marsfs.faces.commands import status_table
from marsfs.faces.config import load_config
from marsfs.node import Node
from marsfs.node.space import HIGH_WATER, MIN_SEGMENT_BYTES, LogSpaceSetting
from marsfs.node.status import node_rows as rows
from marsfs.node.status import volume_status
from marsfs.testing.checks import make_mirror
from marsfs.volume import Volume

KiB = 1024
MiB = 1 << 20
LIMIT = 16 * MiB


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Node]:
    n = Node.open(tmp_path / "state", "n1", log_space=LogSpaceSetting(size=LIMIT))
    try:
        yield n
    finally:
        n.close()


def fill(vol: Volume, nbytes: int, rng: random.Random) -> None:
    for _ in range(nbytes // (4 * KiB)):
        vol.write(rng.randrange(vol.size // (4 * KiB)) * 4 * KiB, rng.randbytes(4 * KiB))
    vol.flush()


def used(node: Node) -> int:
    return sum(v.log.end_bytes for v in node.volumes.values())


def test_history_is_cut_before_a_mirror_is_dropped(small: Node) -> None:
    rng = random.Random(1)
    a = small.create("a", 64 * MiB, thin=True)
    b = small.create("b", 64 * MiB, thin=True)
    assert a.log.segment_bytes == MIN_SEGMENT_BYTES  # sized from the limit: 16 MiB / 2 volumes / 16
    b.hold("mirror:m", b.durable_lsn)  # a mirror that stopped fetching
    fill(a, 8 * MiB, rng)
    fill(b, 5 * MiB, rng)
    assert used(small) > LIMIT * HIGH_WATER
    assert small.enforce_space() > 0
    assert used(small) <= LIMIT * HIGH_WATER
    assert b.dropped() == {}, "history was enough: the mirror keeps its log"
    row = volume_status(small, "a")
    assert any("history window of a" in w and "was cut" in w for w in row.warnings), row.warnings
    assert row.log_space_limit == LIMIT and row.oldest_retained_lsn == a.log.first_lsn > 1
    # now only the mirror's log is left to free: it is dropped, and remembered
    fill(b, 9 * MiB, rng)
    small.enforce_space()
    assert used(small) <= LIMIT * HIGH_WATER
    assert "mirror:m" in b.dropped()
    row = volume_status(small, "b")
    assert row.dropped == {"m": b.dropped()["mirror:m"].bytes} and row.dropped["m"] > 0
    assert any("mirror m of b" in w and "--node m --force" in w for w in row.warnings), row.warnings
    assert "b: warning: log space ran out: mirror m of b" in status_table(rows(small, "b"))
    js = rows(small, "b")[0]
    assert js["dropped"] == row.dropped and js["warnings"] == row.warnings and js["log_space_limit"] == LIMIT


def test_an_open_version_is_not_cut_and_status_names_it(small: Node) -> None:
    rng = random.Random(2)
    a = small.create("a", 64 * MiB, thin=True)
    fill(a, MiB, rng)
    view = a.view(a.durable_lsn)
    try:
        fill(a, 14 * MiB, rng)
        small.enforce_space()
        assert a.applied_lsn <= view.lsn
        warnings = volume_status(small, "a").warnings
        assert any(f"open version lsn-{view.lsn} of a" in w for w in warnings), warnings
    finally:
        view.close()
    small.enforce_space()
    assert used(small) <= LIMIT * HIGH_WATER
    assert not any("open version" in w for w in volume_status(small, "a").warnings)


def test_the_write_path_wakes_enforcement(small: Node) -> None:
    a = small.create("a", 64 * MiB, thin=True)
    small.space.wait(0)
    a.write(0, b"x" * (a.log.segment_bytes // 8))
    assert not small.space.wait(0)
    a.write(0, b"y" * (a.log.segment_bytes // 4))
    assert small.space.wait(0)


def test_enforcement_below_the_high_water_mark_does_nothing(small: Node) -> None:
    a = small.create("a", 64 * MiB, thin=True)
    fill(a, 2 * MiB, random.Random(3))
    assert small.enforce_space() == 0 and a.log.first_lsn == 1
    assert volume_status(small, "a").warnings == []


def test_log_space_flag_and_config_key(tmp_path: Path) -> None:
    flags = {"node": "n1", "state": "/s", "mount": "/m", "log_space": "2G"}
    assert load_config(None, flags).log_space == LogSpaceSetting(size=2 << 30)
    conf = tmp_path / "marsfs.toml"
    conf.write_text('node = "n1"\nstate = "/s"\nmount = "/m"\nlog-space = "25%"\n')
    assert load_config(conf, {}).log_space == LogSpaceSetting(percent=25.0)
    assert load_config(conf, {"log_space": "1G"}).log_space.size == 1 << 30, "flags win"
    with pytest.raises(UsageError, match="--log-space.*too small"):
        load_config(None, {**flags, "log_space": "4M"})
    assert load_config(None, {**flags, "log_space": None}).log_space == LogSpaceSetting()


def test_a_percentage_too_small_for_the_filesystem_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="too small"):
        Node.open(tmp_path / "state", "n1", log_space=LogSpaceSetting(percent=1e-9))


def test_a_mirror_whose_replay_keeps_its_log_stops_fetching(small: Node) -> None:
    rng = random.Random(4)
    m = small.create("m", 64 * MiB, thin=True)
    make_mirror(small, "m")
    m.replay_limit = m.durable_lsn  # replay paused here
    fill(m, 13 * MiB, rng)
    small.enforce_space()
    assert "m" in small.space.fetch_stopped
    assert any("fetching of m stopped" in w and "resume-replay m" in w for w in volume_status(small, "m").warnings)
    m.replay_limit = m.durable_lsn  # replay goes on: its log may go
    small.enforce_space()
    assert "m" not in small.space.fetch_stopped and used(small) <= LIMIT * HIGH_WATER


def test_a_dropped_mirror_is_told_only_where_that_mirror_fetches(small: Node) -> None:
    """The warning about a mirror whose log was dropped (and its ``dropped`` bytes) is the
    primary's, the node that mirror fetches from: once this node is a mirror it goes (the set of
    changes stays, for the day it is primary again)."""
    b = small.create("b", 64 * MiB, thin=True)
    b.hold("mirror:m", b.durable_lsn)
    fill(b, 14 * MiB, random.Random(7))
    small.enforce_space()
    row = volume_status(small, "b")
    assert "mirror:m" in b.dropped() and row.dropped["m"] > 0
    assert any("mirror m of b" in w for w in row.warnings), row.warnings
    make_mirror(small, "b")
    row = volume_status(small, "b")
    assert row.dropped == {} and not any("mirror m of b" in w for w in row.warnings), row.warnings
    assert "mirror:m" in b.dropped()


def test_a_smaller_log_space_at_restart_applies_without_writes(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Restarted with a smaller limit and no write since: the first pass brings the log under it
    (the segment started under the larger limit is sealed and goes whole), the history cut it
    reports is the one that happened, and a pass that can free nothing says so once."""
    big = Node.open(tmp_path / "state", "n1", log_space=LogSpaceSetting(size=1 << 30))
    try:
        a = big.create("a", 64 * MiB, thin=True)
        fill(a, 20 * MiB, random.Random(5))
        assert len(list((a.path / "log").glob("*.seg"))) == 1, "one segment, started under the larger limit"
        head = a.head_lsn
    finally:
        big.close()
    n = Node.open(tmp_path / "state", "n1", log_space=LogSpaceSetting(size=LIMIT))
    try:
        a = n.volumes["a"]
        assert used(n) > LIMIT
        n.maintain()
        assert used(n) <= LIMIT * HIGH_WATER and a.head_lsn == head == a.applied_lsn
        [cut] = [w for w in volume_status(n, "a").warnings if "history window of a" in w]
        assert f"was cut at lsn-{head}" in cut and f"the oldest version is lsn-{head}" in cut
        # an open version pins what log space needs: passes that free nothing say it once
        fill(a, 14 * MiB, random.Random(6))
        view = a.view(a.log.first_lsn)
        try:
            caplog.set_level(logging.INFO, logger="marsfs.node.space")
            caplog.clear()
            for _ in range(4):
                n.enforce_space()
            said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("log space: ")
                    and "used" in r.getMessage()]
            assert len(said) == 1 and "nothing could be freed" in said[0], said
        finally:
            view.close()
        assert n.enforce_space() > 0
    finally:
        n.close()
