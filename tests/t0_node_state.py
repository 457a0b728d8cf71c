"""The typed node state: role records on disk, and the one rule that names a mirror's state."""

from __future__ import annotations

import dataclasses
import json

import pytest

from marsfs.errors import StateError
from marsfs.node.state import (
    CloneStatus,
    FailoverLoss,
    HandoverStatus,
    PeerStatus,
    PositionStatus,
    RoleRecord,
    SplitBrain,
    SplitVersionStatus,
    VolumeStatus,
)
from marsfs.node.volstate import FRESH, MirrorFacts, Role, VolumeState, mirror_state, peer_state
from marsfs.replication.session import STALL_AFTER

HEALTHY = MirrorFacts(source="a", fetching=True, fatal="", error="", fetch_paused=False, replay_paused=False,
                      connected=True, since_progress=0.1, missing_records=0, lag_records=0, heartbeat_age=0.2)


def facts(**changes: object) -> MirrorFacts:
    return dataclasses.replace(HEALTHY, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("changes, state", [
    ({}, VolumeState.SYNCED),
    ({"lag_records": 3}, VolumeState.CATCHING_UP),
    ({"heartbeat_age": None}, VolumeState.CATCHING_UP),
    ({"heartbeat_age": FRESH + 0.1}, VolumeState.CATCHING_UP),
    ({"replay_paused": True, "lag_records": 5}, VolumeState.REPLAY_PAUSED),
    ({"fetch_paused": True, "connected": False}, VolumeState.FETCH_PAUSED),
    ({"connected": False}, VolumeState.DISCONNECTED),
    ({"connected": False, "since_progress": STALL_AFTER + 1}, VolumeState.STALLED),
    ({"missing_records": 4, "lag_records": 4, "since_progress": STALL_AFTER + 1}, VolumeState.STALLED),
    ({"fatal": "diverged", "error": "histories diverge"}, VolumeState.SPLIT_BRAIN),
    ({"fatal": "log-trimmed", "error": "trimmed"}, VolumeState.NEEDS_RESYNC),
    ({"fatal": "unknown-volume", "error": "no such volume"}, VolumeState.FAILED),
    ({"fetching": False}, VolumeState.FAILED),
    # precedence: a refusal beats a pause, a pause beats a dead link
    ({"fatal": "diverged", "fetch_paused": True}, VolumeState.SPLIT_BRAIN),
    ({"fetch_paused": True, "connected": False, "since_progress": STALL_AFTER + 1}, VolumeState.FETCH_PAUSED),
])
def test_mirror_state(changes: dict[str, object], state: VolumeState) -> None:
    got, errors = mirror_state(facts(**changes))
    assert got == state
    if state in (VolumeState.STALLED, VolumeState.FAILED) or changes.get("error"):
        assert errors and all(e.strip() for e in errors), errors  # a reason, in words
    if state == VolumeState.SYNCED:
        assert errors == []


@pytest.mark.parametrize("kw, state", [
    ({"connected": True, "fetch_paused": False, "replay_paused": False, "lag_records": 0}, VolumeState.SYNCED),
    ({"connected": True, "fetch_paused": False, "replay_paused": False, "lag_records": 2}, VolumeState.CATCHING_UP),
    ({"connected": True, "fetch_paused": False, "replay_paused": True, "lag_records": 0}, VolumeState.REPLAY_PAUSED),
    ({"connected": False, "fetch_paused": True, "replay_paused": False, "lag_records": 9}, VolumeState.FETCH_PAUSED),
    ({"connected": False, "fetch_paused": False, "replay_paused": False, "lag_records": 9}, VolumeState.DISCONNECTED),
])
def test_peer_state(kw: dict[str, object], state: VolumeState) -> None:
    assert peer_state(**kw) == state  # type: ignore[arg-type]


def test_role_record_round_trip_and_old_files() -> None:
    mirror = RoleRecord(role=Role.MIRROR, epoch=3, source="a", syncing=True, fetch_paused=True, replayed_lsn=7)
    assert RoleRecord.from_json(json.loads(json.dumps(mirror.to_json())), "x") == mirror
    assert RoleRecord.from_json(RoleRecord().to_json(), "x") == RoleRecord()
    # role.json as the previous release wrote it
    old = {"role": "mirror", "state": "mirror", "source": "a", "epoch": 1, "fetch_paused": False,
           "replay_paused": True, "replayed_lsn": 42}
    rec = RoleRecord.from_json(old, "x")
    assert rec.is_mirror and rec.replay_paused and rec.replayed_lsn == 42 and not rec.syncing
    assert RoleRecord.from_json({"role": "primary", "epoch": 1}, "x") == RoleRecord()


@pytest.mark.parametrize("bad", [{"role": "boss"}, {"role": "primary", "epoch": "many"}, {"role": "mirror"}])
def test_unreadable_role_record_is_a_state_error(bad: dict[str, object]) -> None:
    with pytest.raises(StateError, match="role"):
        RoleRecord.from_json(bad, "volumes/v/role.json")


def test_status_json_has_the_product_keys() -> None:
    peer = PeerStatus(node="b", state=VolumeState.SYNCED, connected=True, fetched_lsn=5, replayed_lsn=5,
                      fetch_paused=False, replay_paused=False, lag_bytes=0, lag_records=0, lag_seconds=0.0,
                      last_seen=1.0)
    st = VolumeStatus(volume="v", node="a", role=Role.PRIMARY, state=VolumeState.UP, epoch=1, size=1 << 20,
                      head_lsn=5, durable_lsn=5, fetched_lsn=5, replayed_lsn=5, applied_lsn=0, lag_bytes=0,
                      lag_records=0, lag_seconds=0.0, oldest_version_lsn=0, log_bytes=100, open_handles=0,
                      peers=[peer])
    d = json.loads(json.dumps(st.to_json()))
    for key in ("volume", "node", "role", "state", "epoch", "head_lsn", "durable_lsn", "fetched_lsn",
                "replayed_lsn", "lag_bytes", "lag_seconds", "oldest_version_lsn", "peers", "errors"):
        assert key in d, key
    assert d["role"] == "primary" and d["state"] == "up"
    for key in ("node", "role", "state", "replayed_lsn", "lag_bytes", "lag_seconds"):
        assert key in d["peers"][0], key
    assert d["peers"][0]["state"] == "synced" and d["peers"][0]["role"] == "mirror"


def test_status_json_keys_are_pinned() -> None:
    """Every key of ``status --json``, nested records included: tests and docs rely on them."""
    peer = PeerStatus(node="b", state=VolumeState.SYNCED, connected=True, fetched_lsn=5, replayed_lsn=5,
                      fetch_paused=False, replay_paused=False, lag_bytes=0, lag_records=0, lag_seconds=0.0,
                      last_seen=1.0)
    split = SplitBrain(peer="b", fork_lsn=3, exact=True, own_records=1, own_bytes=10, peer_records=2,
                       peer_bytes=20, found=1.0)
    loss = FailoverLoss(source="b", epoch=2, start_lsn=4, records=1, bytes=10, oldest=1.0, newest=2.0,
                        at_least=True, as_of=2.0)
    position = PositionStatus(node="b", role="mirror", state="synced", epoch=1, head_lsn=5, replayed_lsn=5,
                              source="a", updated=1.0, last_heard=None)
    st = VolumeStatus(volume="v", node="a", role=Role.PRIMARY, state=VolumeState.UP, epoch=1, size=1 << 20,
                      head_lsn=5, durable_lsn=5, fetched_lsn=5, replayed_lsn=5, applied_lsn=0, lag_bytes=0,
                      lag_records=0, lag_seconds=0.0, oldest_version_lsn=0, log_bytes=100, open_handles=0,
                      peers=[peer], clones=[CloneStatus("c", 4)], positions=[position], split_brain=[split],
                      failover_loss=loss, handover=HandoverStatus("b", "fetching", 3), dropped={"b": 7},
                      split_versions=[SplitVersionStatus("split-b-3", "b", 3, 9, 1 << 20, 8192, 1.0, ["c"])],
                      split_versions_bytes=8192)
    d = json.loads(json.dumps(st.to_json()))
    assert list(d) == [
        "schema_version", "volume", "node", "role", "state", "epoch", "size", "head_lsn", "durable_lsn", "fetched_lsn", "replayed_lsn",
        "applied_lsn", "lag_bytes", "lag_records", "lag_seconds", "oldest_version_lsn", "log_bytes", "open_handles",
        "peers", "errors", "next", "source", "connected", "fetch_paused", "replay_paused", "heartbeat_age",
        "primary_durable_lsn", "fetch_rate", "replay_rate", "eta_seconds", "progress", "oldest_version_ns", "history",
        "clones", "clone_of", "designated_primary", "members", "positions", "log_space_limit", "oldest_retained_lsn",
        "warnings", "dropped", "fork_lsn", "split_brain", "split_versions", "split_versions_bytes", "failover_loss",
        "handover", "sync_target_lsn", "sync_bytes",
        "sync_left_bytes", "sync_received_bytes", "mode", "sync_mode", "tls", "writeback_target_lsn",
        "fsync_aio_refused"]
    assert list(d["peers"][0]) == ["node", "state", "connected", "fetched_lsn", "replayed_lsn", "fetch_paused",
                                   "replay_paused", "lag_bytes", "lag_records", "lag_seconds", "last_seen", "role",
                                   "dropped"]
    assert d["clones"] == [{"name": "c", "lsn": 4}]
    assert d["split_versions"] == [{"name": "split-b-3", "node": "b", "fork_lsn": 3, "head_lsn": 9, "size": 1 << 20,
                                    "disk_bytes": 8192, "saved": 1.0, "clones": ["c"]}]
    assert d["positions"] == [{"node": "b", "role": "mirror", "state": "synced", "epoch": 1, "head_lsn": 5,
                               "replayed_lsn": 5, "source": "a", "updated": 1.0, "last_heard": None, "stale": ""}]
    assert d["split_brain"] == [{"peer": "b", "fork_lsn": 3, "exact": True, "own_records": 1, "own_bytes": 10,
                                 "peer_records": 2, "peer_bytes": 20, "found": 1.0, "own_written": None,
                                 "peer_written": None, "peer_bytes_at_least": False}]
    assert d["failover_loss"] == {"source": "b", "epoch": 2, "start_lsn": 4, "records": 1, "bytes": 10,
                                  "heard_before": -1.0,
                                  "oldest": 1.0, "newest": 2.0, "at_least": True, "as_of": 2.0,
                                  "held_by": "", "held_records": 0, "held_bytes": 0, "fork_lsn": -1, "mode": "",
                                  "mirrors": 0, "refuse": False, "degraded_since": 0.0, "acked_lsn": 0,
                                  "acked_lost": 0, "nothing_acked_lost": False}
    assert d["handover"] == {"from": "b", "phase": "fetching", "to_fetch": 3}
    assert d["dropped"] == {"b": 7} and d["peers"][0]["role"] == "mirror" and d["state"] == "up"
    assert st.failover_loss is not None and st.failover_loss.to_json() == d["failover_loss"]
    assert st.positions[0].node == "b" and st.handover is not None and st.handover.to_json() == d["handover"]


def test_a_failover_not_made_is_not_described_as_made() -> None:
    """What a refused handover says a failover would lose: no "forced failover from" and no
    epoch 0, since none happened; the three cases of what the fetch knew."""
    base = FailoverLoss(source="a", epoch=0, start_lsn=7, records=0, bytes=0, oldest=0.0, newest=0.0,
                        at_least=True, as_of=0.0)
    unknown = base.describe_risk()
    known_none = dataclasses.replace(base, as_of=1.7e9).describe_risk()
    some = dataclasses.replace(base, records=3, bytes=12288, oldest=1.7e9 - 5, newest=1.7e9, as_of=1.7e9).describe_risk()
    assert "no word from a" in unknown and "not known" in unknown
    assert known_none.startswith("as of a's last word (2023-11-14T22:13:20Z) this node lacked no record")
    assert some.startswith("at least 3 records (12.0 KiB) written between 2023-11-14T22:13:15Z and")
    gone = dataclasses.replace(base, records=3, bytes=12288, as_of=1.7e9, at_least=False).describe_risk()
    assert gone == "3 records (12.0 KiB): a stopped cleanly at 2023-11-14T22:13:20Z with its log durable up to LSN 9"
    for text in (unknown, known_none, some, gone):
        assert "forced failover" not in text and "epoch" not in text
