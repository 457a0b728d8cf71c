"""Versions of one volume: every name form, the bounded listing, shared indexes, the window.

Time is driven through the timestamps the log recorded (``now_ns`` arguments), never by sleeping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from marsfs.errors import InvalidRequest, VersionNotFound
from marsfs.volume import Retention, Volume
from marsfs.volume.retention import format_duration, parse_duration
from marsfs.volume.versions import format_time_ns, listing, parse_time_ns

KiB = 1 << 10
S = 10**9


def _volume(tmp_path: Path, **kw: object) -> Volume:
    return Volume.create(tmp_path / "v", "v", 1 << 20, sync_interval=None, **kw)  # type: ignore[arg-type]


def _rounds(vol: Volume, n: int) -> list[tuple[int, int, bytes]]:
    """n rounds of one 4 KiB write + flush; (flush LSN, its timestamp, the block) per round."""
    out = []
    for i in range(n):
        data = os.urandom(4 * KiB)
        vol.write((i % 8) * 4 * KiB, data)
        lsn = vol.flush()
        out.append((lsn, vol.log.info(lsn).timestamp_ns, data))
    return out


def test_time_names_parse_to_the_nanosecond() -> None:
    assert parse_time_ns("1970-01-01T00:00:01Z") == S
    assert parse_time_ns("1970-01-01T00:00:01.5Z") == S + S // 2
    assert parse_time_ns("1970-01-01T00:00:01.000000007Z") == S + 7
    assert parse_time_ns("1970-01-01T01:00:01+01:00") == S
    assert parse_time_ns("1970-01-01T00:00:01") == S  # UTC unless it says otherwise
    for bad in ("lsn-3", "yesterday", "1970-01-01", "1970-13-01T00:00:00Z", "1970-01-01T00:00:01.0000000001Z"):
        assert parse_time_ns(bad) is None
    ns = 1_795_000_000_123_456_789
    assert parse_time_ns(format_time_ns(ns)) == ns


def test_every_name_form_resolves(tmp_path: Path) -> None:
    with _volume(tmp_path) as vol:
        rounds = _rounds(vol, 5)
        mark = vol.mark("before-upgrade")
        t0, (f2, t2, _) = rounds[0][1], rounds[2]
        assert vol.find_version(f"lsn-{f2}") == f2
        assert vol.find_version(f"lsn-{f2 - 1}") == f2 - 1  # any LSN, not just flush points
        assert vol.find_version("before-upgrade") == mark
        assert vol.find_version(format_time_ns(t2)) == f2  # exactly at a flush: that flush
        assert vol.find_version(format_time_ns(t2 + 1)) == f2
        assert vol.find_version(format_time_ns(t2 - 1)) == rounds[1][0]  # just before: the one before
        whole = format_time_ns(t2 - t2 % S + S)[:19] + "Z"  # a time without fraction
        newest = max(f for f, t, _ in rounds if t <= parse_time_ns(whole))  # type: ignore[operator]
        assert vol.find_version(whole) == newest
        with pytest.raises(VersionNotFound, match="no flush point"):
            vol.find_version(format_time_ns(t0 - 1))
        with pytest.raises(VersionNotFound, match="give lsn-N"):
            vol.find_version("no-such-mark")
        with pytest.raises(VersionNotFound, match=r"not retained; available: lsn-0 to lsn-\d+"):
            vol.find_version(f"lsn-{vol.head_lsn + 1}")


def test_outside_the_window_names_the_oldest_and_a_mirror_stops_at_replay(tmp_path: Path) -> None:
    with _volume(tmp_path) as vol:
        rounds = _rounds(vol, 6)
        vol.writeback(rounds[2][0])
        assert vol.oldest_version_lsn == rounds[2][0]
        with pytest.raises(VersionNotFound, match=f"available: lsn-{rounds[2][0]} ") as e:
            vol.find_version(f"lsn-{rounds[1][0]}")
        assert e.value.errno == 2
        with pytest.raises(VersionNotFound, match="no flush point"):
            vol.find_version(format_time_ns(rounds[1][1]))
        vol.replay_limit = rounds[4][0]  # a mirror that replayed this far
        assert vol.find_version(format_time_ns(rounds[5][1])) == rounds[4][0]
        with pytest.raises(VersionNotFound):
            vol.find_version(f"lsn-{rounds[5][0]}")
        assert max(v.lsn for v in vol.version_listing()) == rounds[4][0]
        assert max(v.lsn for v in vol.versions()) == rounds[4][0]


def test_listing_is_bounded_newest_100_then_hourly() -> None:
    # 1000 flush points, one every 36 s (10 hours), and marks
    flushes = [(10 + 2 * i, 1_000_000 * S + i * 36 * S) for i in range(1000)]
    marks = {11: "first", 1999: "last", 5: "too-old"}
    out = listing(flushes, marks, 8, 3000)
    names = [v.name for v in out]
    assert "first" in names and "last" in names and "too-old" not in names
    flush = [v for v in out if v.kind == "flush"]
    assert [v.lsn for v in flush[-100:]] == [lsn for lsn, _ in flushes[-100:]]
    older = flush[:-100]
    hours = {ts // 3600 // S for _, ts in flushes[:-100]}
    assert len(older) == len(hours) <= 11  # one per hour: the newest flush point of it
    for v in older:
        assert v.lsn == max(lsn for lsn, ts in flushes[:-100] if ts // 3600 // S == v.timestamp_ns // 3600 // S)
    assert [v.lsn for v in out] == sorted(v.lsn for v in out)
    assert len(listing(flushes, {}, 8, 100)) == 46  # only what lies inside the window
    assert listing([], {}, 0, 0) == []


def test_two_opens_share_one_index_built_once_and_freed_after_both_close(tmp_path: Path) -> None:
    with _volume(tmp_path) as vol:
        rounds = _rounds(vol, 20)
        lsn, _, data = rounds[3]
        idx = vol.open_versions
        a = vol.view(lsn)
        b = vol.view(lsn)
        assert idx.builds == 1 and idx.views(lsn) == 2 and list(idx.shared()) == [lsn]
        assert a.read(3 * 4 * KiB, 4 * KiB) == b.read(3 * 4 * KiB, 4 * KiB) == data
        assert vol.writeback() == lsn  # pinned: the base never passes an open version
        assert a.read(3 * 4 * KiB, 4 * KiB) == data
        a.close()
        assert idx.views(lsn) == 1 and idx.shared() == {lsn: 4}
        c = vol.view(lsn)
        assert idx.builds == 1  # still shared with b
        b.close()
        c.close()
        assert idx.shared() == {} and idx.views(lsn) == 0 and not idx
        with vol.view(lsn):
            assert idx.builds == 2  # a new open after the last close builds again
        assert vol.writeback() == vol.head_lsn


def test_retention_by_bytes_by_time_and_both(tmp_path: Path) -> None:
    with _volume(tmp_path, segment_bytes=64 * KiB) as vol:
        rounds = _rounds(vol, 40)
        log = vol.log
        k = rounds[25][0]
        keep = log.bytes_between(k, log.last_lsn)
        assert Retention(keep_bytes=keep).floor(log) == k
        assert Retention(keep_bytes=keep - 1).floor(log) == k + 1
        t = rounds[30][1]
        only_time = Retention(None, 60)
        assert only_time.floor(log, t + 60 * S) == rounds[30][0]  # the flush current at now - 60 s
        assert only_time.floor(log, t + 60 * S - 1) == rounds[29][0]
        assert only_time.floor(log, rounds[0][1] + 59 * S) == log.first_lsn - 1  # everything is recent
        both = Retention(keep, 60)  # kept while inside either limit: the longer window wins
        assert both.floor(log, t + 60 * S) == k
        assert both.floor(log, rounds[39][1] + 3600 * S) == k


def test_the_oldest_version_keeps_its_time_after_trim_and_restart(tmp_path: Path) -> None:
    vol = _volume(tmp_path, segment_bytes=16 * KiB)
    rounds = _rounds(vol, 30)
    target, ts, _ = rounds[20]
    vol.writeback(target)
    assert rounds[10][0] < vol.log.first_lsn <= target  # older segments went; its record stays (its name)
    assert vol.oldest_version_lsn == target and vol.oldest_version_timestamp_ns == ts
    names = {f"lsn-{lsn}": vol.find_version(f"lsn-{lsn}") for lsn, _, _ in rounds[20:]}
    vol.close()
    with Volume.open(tmp_path / "v", sync_interval=None) as again:
        assert again.oldest_version_timestamp_ns == ts
        assert {n: again.find_version(n) for n in names} == names
        assert again.find_version(format_time_ns(rounds[25][1])) == rounds[25][0]


@pytest.mark.parametrize("text,want", [("10G", (10 << 30, None)), ("24h", (None, 86400.0)),
                                       ("10G,24h", (10 << 30, 86400.0)), (["10G", "24h"], (10 << 30, 86400.0)),
                                       ("90min", (None, 5400.0)), ("1w", (None, 604800.0)),
                                       ("512M", (512 << 20, None)), (4096, (4096, None)), ("30s", (None, 30.0))])
def test_history_values(text: str | list[str] | int, want: tuple[int | None, float | None]) -> None:
    r = Retention.parse(text)
    assert (r.keep_bytes, r.keep_seconds) == want


@pytest.mark.parametrize("text", ["", ",", "10G,20G", "1h,2h", "soon", "-1h", "h"])
def test_bad_history_values(text: str) -> None:
    with pytest.raises(InvalidRequest):
        Retention.parse(text)


def test_durations_read_back() -> None:
    for text in ("30s", "90min", "24h", "2d", "1w", "1.5s"):
        assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)
    assert [format_duration(parse_duration(t)) for t in ("90min", "24h", "36h")] == ["90min", "1d", "36h"]
    assert Retention(10 << 30, 86400).describe() == "10.0 GiB or 1d"
