"""Replication modes as plain data: the setting, its metadata entry, and what a failover can claim.

* A setting round-trips through its metadata value; a value that is not one counts as async;
  out-of-range options are refused in words.
* The mode of a volume is the newest entry naming its uuid, over all owners: a volume created
  anew under an old name has none.
* ``acknowledged``: "nothing acknowledged lost" only for sync with refuse, not degraded, fewer
  than N mirrors unasked, none ahead, nothing known lost; otherwise the acknowledged records
  known lost and the words that say why more may be.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from marsfs.errors import InvalidRequest
from marsfs.node.handover import acknowledged
from marsfs.node.meta import ClusterMeta, mode_key
from marsfs.node.state import FailoverLoss, ReplicationMode
from marsfs.node.syncmode import ModeSetting, check_setting
from marsfs.replication.session import SyncWord

LOSS = FailoverLoss(source="a", epoch=2, start_lsn=101, records=0, bytes=0, oldest=0.0, newest=0.0, at_least=True,
                    as_of=1e9)


def test_a_setting_round_trips_and_junk_is_async() -> None:
    s = ModeSetting(ReplicationMode.SYNC, mirrors=2, timeout=0.5, refuse=True)
    assert ModeSetting.from_json(s.to_json("u")) == s
    assert s.describe() == "sync (2 mirrors, timeout 0.5 s, refuse: flushes fail with EIO while degraded)"
    assert ModeSetting().describe() == "async" and not ModeSetting().sync
    for junk in ({}, {"mode": "sync"}, {"mode": "fast", "mirrors": 1, "timeout": 2, "refuse": False}, "sync", None,
                 {"mode": "sync", "mirrors": True, "timeout": 2, "refuse": False}):
        assert ModeSetting.from_json(junk) is None, junk


@pytest.mark.parametrize("args,match", [
    (("semi",), "replication mode 'semi': give async or sync"),
    (("sync", 0), "--mirrors 0"), (("sync", 17), "--mirrors 17"), (("sync", 1.5), "--mirrors 1.5"),
    (("sync", 1, 0), "--timeout 0"), (("sync", 1, -1.0), "--timeout -1.0"), (("sync", 1, float("inf")), "--timeout inf"),
    (("sync", 1, 4000), "--timeout 4000"), (("sync", 1, 2.0, "yes"), "refuse 'yes'"),
])
def test_out_of_range_is_refused_in_words(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        check_setting(*args)


def test_the_mode_is_the_newest_entry_naming_the_uuid(tmp_path: Path) -> None:
    a, b = ClusterMeta(tmp_path / "a.json", "a"), ClusterMeta(tmp_path / "b.json", "b")
    a.set_mode("vm", ModeSetting(ReplicationMode.SYNC).to_json("u1"))
    b.merge(a.entries())
    assert ModeSetting.from_json(b.mode_of("vm", "u1")) == ModeSetting(ReplicationMode.SYNC)
    b.set_mode("vm", ModeSetting().to_json("u1"))  # b's word is newer: it heard a's
    a.merge(b.entries())
    assert ModeSetting.from_json(a.mode_of("vm", "u1")) == ModeSetting() == ModeSetting.from_json(b.mode_of("vm", "u1"))
    assert a.mode_of("vm", "u2") is None  # a volume created anew under the name: no mode yet
    assert {e.key for e in a.entries()} >= {mode_key("vm")}


def word(**kw: object) -> SyncWord:
    return SyncWord(**{"mode": "sync", "mirrors": 1, "refuse": True, "acked_lsn": 100, **kw})  # type: ignore[arg-type]


def test_only_sync_with_refuse_proves_nothing_acknowledged_lost() -> None:
    proven = acknowledged(LOSS, word(), ours=100, unanswered=0, held_more=False)
    assert proven.nothing_acked_lost and proven.acked_lost == 0 and proven.refuse
    assert proven.describe().endswith("none of its mirrors that answered holds more than this node")
    assert "nothing acknowledged lost: a was in sync mode with --refuse" in proven.describe()
    assert FailoverLoss.from_json(proven.to_json()) == proven
    for why in (dict(w=word(refuse=False)), dict(w=word(degraded_since=5.0)), dict(w=word(mode="async")),
                dict(unanswered=1), dict(held_more=True), dict(ours=99)):
        w = why.pop("w", word())
        kw = {"ours": 100, "unanswered": 0, "held_more": False, **why}
        loss = acknowledged(LOSS, w, **kw)  # type: ignore[arg-type]
        assert not loss.nothing_acked_lost, why
        assert "nothing acknowledged lost" not in loss.describe(), why
    assert acknowledged(LOSS, word(mirrors=2), ours=100, unanswered=1, held_more=False).nothing_acked_lost
    unasked = acknowledged(LOSS, word(), ours=100, unanswered=1, held_more=False).acknowledged()
    assert "with --refuse" in unasked and "not every mirror of it was asked" in unasked and "rules that out" not in unasked


def test_the_words_for_what_is_not_proven() -> None:
    sync = acknowledged(LOSS, word(refuse=False), ours=100, unanswered=0, held_more=False).acknowledged()
    assert sync.startswith("nothing acknowledged known lost: a was in sync at its last word") and "not proven" in sync
    behind = acknowledged(LOSS, word(refuse=False), ours=90, unanswered=0, held_more=False)
    assert behind.acked_lost == 10 and "at least 10 of the lost records were acknowledged" in behind.acknowledged()
    degraded = acknowledged(LOSS, word(degraded_since=1e9, refuse=False), ours=97, unanswered=0, held_more=False)
    assert degraded.acknowledged().startswith("a ran degraded (async) since 2001-09-09T01:46:40Z: writes it "
                                              "acknowledged since then may be lost; at least 3 of the lost")
    asyn = acknowledged(LOSS, SyncWord(acked_lsn=100), ours=94, unanswered=0, held_more=False)
    assert asyn.mode == "async" and "a ran in async mode: at least 6 of the lost records" in asyn.acknowledged()
    clean = acknowledged(LOSS, SyncWord(acked_lsn=100), ours=100, unanswered=0, held_more=False).acknowledged()
    assert "async mode does not wait for mirrors" in clean
    assert acknowledged(LOSS, None, ours=0, unanswered=0, held_more=False) == LOSS  # never heard: nothing said
    assert LOSS.acknowledged() == ""
