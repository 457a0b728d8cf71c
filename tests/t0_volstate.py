"""The one rule that names a volume's state: every state, and every precedence pair; and which
states a copy may not become primary from (a handover's or failover's refusal)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest

from marsfs.node.volstate import (
    FRESH,
    FenceHolder,
    MirrorFacts,
    Role,
    VolumeFacts,
    VolumeState,
    peer_state,
    promotion_refusal,
    refusal_state,
    volume_state,
)
from marsfs.replication.session import STALL_AFTER

S = VolumeState
FETCH = MirrorFacts(source="a", fetching=True, fatal="", error="", fetch_paused=False, replay_paused=False,
                    connected=True, since_progress=0.1, missing_records=0, lag_records=0, heartbeat_age=0.2)
MIRROR = VolumeFacts(volume="v", role=Role.MIRROR, source="a", fetch=FETCH)
PRIMARY = VolumeFacts(volume="v", role=Role.PRIMARY)

Change = Callable[[VolumeFacts], VolumeFacts]


def facts(**changes: object) -> Change:
    return lambda f: dataclasses.replace(f, **changes)  # type: ignore[arg-type]


def fetch(**changes: object) -> Change:
    def change(f: VolumeFacts) -> VolumeFacts:
        assert f.fetch is not None
        return dataclasses.replace(f, fetch=dataclasses.replace(f.fetch, **changes))  # type: ignore[arg-type]
    return change


#: one way to make each condition hold, in precedence order (the first that holds wins)
FAILED = ("failed", S.FAILED, facts(errors=("writeback of v: EIO",)))
NO_SPACE = ("no-space", S.NO_SPACE, facts(no_space=True, fault_lines=("writes fail: no space left",)))
LOG_SPACE = ("log space", S.NO_SPACE, facts(log_space_stopped=True))
SPLIT = ("split-brain", S.SPLIT_BRAIN, facts(split_brains=("split brain with b: ...",)))
RESYNC = ("needs-resync", S.NEEDS_RESYNC, fetch(fatal="log-trimmed", error="trimmed"))
RESYNCING = ("resyncing", S.RESYNCING, fetch(resyncing=True))
FENCED = ("fenced", S.FENCED, facts(fences=((FenceHolder.DESIGNATION, "b is the designated primary"),)))
FETCH_PAUSED = ("fetch-paused", S.FETCH_PAUSED, fetch(fetch_paused=True))
REPLAY_PAUSED = ("replay-paused", S.REPLAY_PAUSED, fetch(replay_paused=True))
STALLED = ("stalled", S.STALLED, fetch(connected=False, since_progress=STALL_AFTER + 1))
DISCONNECTED = ("disconnected", S.DISCONNECTED, fetch(connected=False))
CATCHING_UP = ("catching-up", S.CATCHING_UP, fetch(lag_records=3))

MIRROR_ORDER = [FAILED, NO_SPACE, LOG_SPACE, SPLIT, RESYNC, RESYNCING, FETCH_PAUSED, REPLAY_PAUSED, STALLED,
                DISCONNECTED, CATCHING_UP]
PRIMARY_ORDER = [FAILED, NO_SPACE, SPLIT, FENCED]
#: conditions made by the same facts, which cannot hold together
EXCLUSIVE = {("no-space", "log space"), ("stalled", "disconnected")}


@pytest.mark.parametrize("base, change, state", [
    (MIRROR, facts(), S.SYNCED),
    (PRIMARY, facts(), S.UP),
    (VolumeFacts(volume="c", role=Role.CLONE), facts(), S.UP),
    (MIRROR, fetch(heartbeat_age=None), S.CATCHING_UP),
    (MIRROR, fetch(heartbeat_age=FRESH + 0.1), S.CATCHING_UP),
    (MIRROR, fetch(missing_records=4, lag_records=4, since_progress=STALL_AFTER + 1), S.STALLED),
    (MIRROR, fetch(fatal="diverged", error="histories diverge"), S.SPLIT_BRAIN),
    (MIRROR, fetch(fatal="volume-deleted", error="a deleted volume v"), S.NEEDS_RESYNC),
    (MIRROR, fetch(fatal="unknown-volume", error="no such volume"), S.FAILED),
    (MIRROR, fetch(fetching=False), S.FAILED),
    (MIRROR, facts(fault_lines=("writes fail with EIO: fdatasync failed",), disk_failed=True), S.FAILED),
    (MIRROR, facts(fetch=None, copying=True), S.SYNCING),
    (MIRROR, facts(fetch=None), S.CATCHING_UP),  # the node's view alone: not sure it is not behind
    (MIRROR, facts(fetch=None, copy_failed="refused"), S.FAILED),
    (PRIMARY, facts(open_failure="volume v is not served: it could not be opened"), S.FAILED),
    *[(MIRROR, change, state) for _, state, change in MIRROR_ORDER],
    *[(PRIMARY, change, state) for _, state, change in PRIMARY_ORDER],
], ids=lambda x: x.value if isinstance(x, VolumeState) else "")
def test_every_state(base: VolumeFacts, change: Change, state: VolumeState) -> None:
    verdict = volume_state(change(base))
    assert verdict.state == state and verdict.conditions[0] == state
    if state in (S.UP, S.SYNCED):
        assert verdict.errors == () and verdict.next == "" and verdict.conditions == (state,)
    if state in (S.FAILED, S.NO_SPACE, S.SPLIT_BRAIN, S.NEEDS_RESYNC, S.STALLED, S.FENCED):
        assert verdict.errors and all(e.strip() for e in verdict.errors), verdict  # a reason, in words


@pytest.mark.parametrize("base, order", [(MIRROR, MIRROR_ORDER), (PRIMARY, PRIMARY_ORDER)], ids=["mirror", "primary"])
def test_each_precedence_pair(base: VolumeFacts, order: list[tuple[str, VolumeState, Change]]) -> None:
    checked = 0
    for (hi_name, hi, hi_change), (lo_name, lo, lo_change) in itertools.combinations(order, 2):
        if (hi_name, lo_name) in EXCLUSIVE:
            continue
        for both in (hi_change(lo_change(base)), lo_change(hi_change(base))):
            verdict = volume_state(both)
            assert verdict.state == hi, f"{hi_name} must win over {lo_name}: {verdict}"
            assert hi in verdict.conditions and lo in verdict.conditions, (hi_name, lo_name, verdict)
        checked += 1
    assert checked == len(order) * (len(order) - 1) // 2 - sum(
        1 for x, y in itertools.combinations(order, 2) if (x[0], y[0]) in EXCLUSIVE)


def test_the_two_kinds_of_no_space_say_which_space() -> None:
    disk = volume_state(NO_SPACE[2](MIRROR))
    log = volume_state(LOG_SPACE[2](dataclasses.replace(MIRROR, fetch=dataclasses.replace(FETCH, replay_paused=True,
                                                                                         missing_records=9,
                                                                                         lag_records=9,
                                                                                         since_progress=99.0))))
    assert disk.state == log.state == S.NO_SPACE
    assert disk.errors == ("writes fail: no space left",) and "free space" in disk.next
    assert log.conditions[:2] == (S.NO_SPACE, S.REPLAY_PAUSED), log  # not stalled, not catching-up
    assert len(log.errors) == 1 and "log space is full" in log.errors[0] and "resume-replay v" in log.errors[0]
    assert log.next == "marsfs resume-replay v"


@pytest.mark.parametrize("change, todo", [
    (SPLIT[2], "marsfs invalidate v"), (RESYNC[2], "marsfs invalidate v"),
    (FETCH_PAUSED[2], "marsfs resume-fetch v"), (REPLAY_PAUSED[2], "marsfs resume-replay v"),
    (facts(fetch=None, copy_failed="refused"), "marsfs join v --from a"),
    (facts(fetch=None, open_failure="volume v is not served: log damaged"), "marsfs invalidate v"),  # a new copy
])
def test_the_next_command(change: Change, todo: str) -> None:
    assert volume_state(change(MIRROR)).next == todo


def test_error_lines_keep_their_order() -> None:
    f = dataclasses.replace(MIRROR, errors=("e1",), fault_lines=("f1",), split_brains=("s1",), meta_error="m1",
                            fetch=dataclasses.replace(FETCH, error="refused", sync_waiting="the source is busy"))
    assert volume_state(f).errors == ("e1", "f1", "s1", "fetch from a: refused",
                                      "resync done, switch waits: the source is busy", "m1")
    fenced = dataclasses.replace(PRIMARY, fences=((FenceHolder.HANDOVER, "being handed over"),))
    assert volume_state(fenced).errors == ("being handed over",)
    mirror_fenced = dataclasses.replace(MIRROR, fences=((FenceHolder.MIRROR, "a mirror here"),))
    assert volume_state(mirror_fenced).state == S.SYNCED, "a mirror's own fence is no state"


def test_a_refusal_is_named_through_one_mapping() -> None:
    assert refusal_state("diverged") == S.SPLIT_BRAIN and refusal_state("log-trimmed") == S.NEEDS_RESYNC
    assert refusal_state("cluster") == S.FAILED
    assert volume_state(fetch(fatal="log-trimmed")(MIRROR)).refusal == "log-trimmed"
    assert volume_state(MIRROR).refusal == ""


@pytest.mark.parametrize("kw, state", [
    ({"syncing": True, "fetch_paused": True}, S.SYNCING),
    ({"fetch_paused": True, "replay_paused": True}, S.FETCH_PAUSED),
    ({"replay_paused": True, "connected": False}, S.REPLAY_PAUSED),
    ({"connected": False, "lag_records": 3}, S.DISCONNECTED),
])
def test_peer_state_keeps_the_same_order(kw: dict[str, bool | int], state: VolumeState) -> None:
    args: dict[str, bool | int] = {"connected": True, "fetch_paused": False, "replay_paused": False,
                                   "lag_records": 0, **kw}
    assert peer_state(**args) == state  # type: ignore[arg-type]


#: a copy must not become primary while its copy is not whole or not trusted (the handover and
#: the failover refuse); in every other state a handover may fetch what is missing
@pytest.mark.parametrize("change, refused, says", [
    (FAILED[2], S.FAILED, ("failed", "writeback of v: EIO", "another mirror")),
    (RESYNC[2], S.NEEDS_RESYNC, ("a refused its fetch (log-trimmed)", "marsfs invalidate v", "another mirror")),
    (facts(fetch=None, copying=True), S.SYNCING, ("first copy from a", "marsfs wait v --synced")),
    (RESYNCING[2], S.RESYNCING, ("resynced from a", "not whole", "marsfs wait v --synced", "another mirror")),
    (fetch(resyncing=True, sync_waiting="1 open version(s)"), S.RESYNCING,
     ("resync done, switch waits: 1 open version(s)", "marsfs wait v --synced")),
    (lambda f: RESYNCING[2](FAILED[2](f)), S.FAILED, ("failed",)),  # the first by precedence names it
    (lambda f: RESYNCING[2](NO_SPACE[2](f)), S.RESYNCING, ("resyncing",)),  # no-space itself does not refuse
    (facts(), None, ()), (CATCHING_UP[2], None, ()), (STALLED[2], None, ()), (DISCONNECTED[2], None, ()),
    (FETCH_PAUSED[2], None, ()), (REPLAY_PAUSED[2], None, ()), (NO_SPACE[2], None, ()),
], ids=lambda x: x.value if isinstance(x, VolumeState) else "")
def test_which_copies_may_not_become_primary(change: Change, refused: VolumeState | None, says: tuple[str, ...]
                                             ) -> None:
    got = promotion_refusal(volume_state(change(MIRROR)), "v", "b", "a")
    if refused is None:
        assert got is None
        return
    assert got is not None
    state, line = got
    assert state == refused and line.startswith(f"volume 'v' on node b is {refused.value}: ") and "\n" not in line
    assert all(s in line for s in says), line
