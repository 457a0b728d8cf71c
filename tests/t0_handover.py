"""Pure parts of handover and split brain: the protocol 3 messages, fork finding by chain
hashes against a model, and the words status uses for a split brain and a failover's loss."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marsfs.errors import ProtocolError
from marsfs.node.state import FailoverLoss, SplitBrain
from marsfs.replication.handover import ForkSearch, position_told
from marsfs.replication.protocol import (
    MAX_CHAINS,
    Chains,
    HandoverEnd,
    HandoverPrepare,
    HandoverReady,
    Hello,
    MsgType,
    PositionAsk,
    PositionTold,
    encode_frame,
    encode_message,
)
from marsfs.testing.wire import decode_frame

CHAIN = bytes(range(16))
SAMPLES = [
    HandoverPrepare(epoch=3, timeout=30.0),
    HandoverReady(head_lsn=120, chain=CHAIN, epoch=3),
    HandoverEnd(claimed=True, epoch=4, start_lsn=121),
    HandoverEnd(claimed=False, epoch=4, start_lsn=121, reason="the fetch stopped"),
    Chains(lsns=(0, 5, 9), chains=(CHAIN, CHAIN, CHAIN), head_lsn=9),
    Chains(lsns=(), chains=(), head_lsn=9, done=True, fork_lsn=4, exact=True, tail_records=5, tail_bytes=900),
    Hello(proto=3, cluster="c", node="b", volume="vm", want="handover", epoch=1),
    Hello(proto=3, cluster="c", node="b", volume="vm", want="compare", epoch=1),
    Hello(proto=3, cluster="c", node="b", volume="vm", want="position", epoch=0),
    PositionAsk(lsn=7, chain=CHAIN),
    PositionTold(relation="ahead", durable_lsn=30, replayed_lsn=28, records=23, bytes=6 << 20, oldest=1e9,
                 newest=1e9 + 2),
    PositionTold(relation="diverged", durable_lsn=30, replayed_lsn=30, records=0, bytes=0),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(msg: object) -> None:
    assert decode_frame(encode_message(msg)) == msg  # type: ignore[arg-type]


@pytest.mark.parametrize("mtype,payload,why", [
    (MsgType.CHAINS, {"lsns": [3, 2], "chains": [CHAIN.hex()] * 2, "head_lsn": 3}, "ascending"),
    (MsgType.CHAINS, {"lsns": [1], "chains": [], "head_lsn": 3}, "entries for 1 LSNs"),
    (MsgType.CHAINS, {"lsns": list(range(MAX_CHAINS + 1)), "chains": [CHAIN.hex()] * (MAX_CHAINS + 1),
                      "head_lsn": 3}, "more than"),
    (MsgType.CHAINS, {"lsns": [1], "chains": ["zz"], "head_lsn": 3}, "hex digits"),
    (MsgType.CHAINS, {"lsns": [-1], "chains": [CHAIN.hex()], "head_lsn": 3}, "out of range"),
    (MsgType.CHAINS, {"lsns": "1", "chains": [CHAIN.hex()], "head_lsn": 3}, "must be a list"),
    (MsgType.HANDOVER_PREPARE, {"epoch": 1}, "missing field 'timeout'"),
    (MsgType.HANDOVER_PREPARE, {"epoch": 1, "timeout": -1}, "out of range"),
    (MsgType.HANDOVER_READY, {"head_lsn": 1, "chain": "00", "epoch": 1}, "hex digits"),
    (MsgType.HANDOVER_END, {"claimed": 1, "epoch": 1, "start_lsn": 2}, "true or false"),
    (MsgType.POSITION_ASK, {"lsn": 1}, "missing field 'chain'"),
    (MsgType.POSITION, {"relation": "above", "durable_lsn": 1, "replayed_lsn": 1, "records": 0, "bytes": 0},
     "must be one of ahead"),
])
def test_malformed_messages_are_protocol_errors(mtype: MsgType, payload: dict[str, object], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode_frame(encode_frame(mtype, json.dumps(payload).encode()))


class ModelLog:
    """A log's chains as a list: ``chains[i]`` after LSN ``first - 1 + i``."""

    def __init__(self, history: Sequence[int], first: int = 1) -> None:
        self.first_lsn = first
        self.history = list(history)  # history[k] = the record at LSN k + 1 (a value per record)

    @property
    def last_lsn(self) -> int:
        return len(self.history)

    def chain_at(self, lsn: int) -> bytes:
        assert self.first_lsn - 1 <= lsn <= self.last_lsn
        return repr(tuple(self.history[:lsn])).encode()


def search(ours: ModelLog, theirs: ModelLog, hints: Sequence[int] = ()) -> tuple[object, int]:
    s = ForkSearch(ours, theirs.last_lsn, hints)
    rounds = 0
    while s.fork is None:
        asked = s.probe()
        if not asked:
            break
        held = [n for n in asked if theirs.first_lsn - 1 <= n <= theirs.last_lsn]
        s.answered(asked, held, [theirs.chain_at(n) for n in held], ours.chain_at)
        rounds += 1
    return s.fork, rounds


@settings(max_examples=200, deadline=None)
@given(common=st.integers(0, 3000), a=st.integers(1, 500), b=st.integers(0, 500),
       first_a=st.integers(1, 50), first_b=st.integers(1, 50))
def test_fork_search_finds_the_last_common_lsn(common: int, a: int, b: int, first_a: int, first_b: int) -> None:
    base = list(range(common))
    ours = ModelLog(base + [-1] * a, first=min(first_a, common + 1))
    theirs = ModelLog(base + [-2] * b, first=min(first_b, common + 1))
    fork, rounds = search(ours, theirs)
    assert fork is not None and fork.lsn == common and fork.exact  # type: ignore[attr-defined]
    assert rounds <= 3  # 64 LSNs a round: 3000 LSNs take two


def test_a_hint_finds_the_fork_in_one_round() -> None:
    base = list(range(100_000))
    fork, rounds = search(ModelLog(base + [-1] * 9), ModelLog(base + [-2] * 40), hints=[100_000])
    assert fork is not None and fork.lsn == 100_000 and rounds == 1  # type: ignore[attr-defined]


def test_a_fork_below_what_the_logs_hold_is_a_bound() -> None:
    ours = ModelLog(list(range(10)) + [-1] * 100, first=50)
    theirs = ModelLog(list(range(10)) + [-2] * 100, first=60)
    fork, _ = search(ours, theirs)
    assert fork is not None and not fork.exact and fork.lsn <= 59  # type: ignore[attr-defined]


def test_a_members_position_is_told_against_the_askers_history() -> None:
    """What a member holds beyond a would-be primary: only on the same chain is it ``ahead``
    (records and bytes after the asker's LSN, with their times); another chain, a shorter log
    or a log that starts after the asker's LSN say so."""
    member = ModelLog(list(range(30)), first=5)

    def told(ask_log: ModelLog, lsn: int, durable: int = 30) -> PositionTold:
        return position_told(member, lambda a, b: 100 * (b - a), lambda n: 1e9 + n, durable, durable,
                             PositionAsk(lsn=lsn, chain=ask_log.chain_at(lsn)))

    same = ModelLog(list(range(12)))
    t = told(same, 12)
    assert (t.relation, t.records, t.bytes, t.oldest, t.newest) == ("ahead", 18, 1800, 1e9 + 13, 1e9 + 30)
    assert told(same, 12, durable=12).relation == "same"
    assert (told(ModelLog(list(range(12)) + [-1]), 13).relation, told(ModelLog(list(range(12)) + [-1]), 13).records
            ) == ("diverged", 0)
    assert told(ModelLog(list(range(31))), 31).relation == "behind"
    t = told(same, 2)  # the member's log starts at LSN 5: it holds more than its log tells
    assert (t.relation, t.records, t.bytes) == ("trimmed", 28, 2600)
    resynced = ModelLog(list(range(30)), first=31)  # a log a resync restarted: no record, durable at 30
    t = position_told(resynced, lambda a, b: 100 * (b - a), lambda n: 1 / 0, 30, 30,
                      PositionAsk(lsn=2, chain=same.chain_at(2)))
    assert (t.relation, t.records, t.bytes, t.oldest, t.newest) == ("trimmed", 28, 0, 0.0, 0.0)


def test_a_bound_never_lies_past_the_shorter_history() -> None:
    """Our trimmed log starts past their head: the fork is at or before their head, not at or
    before our first LSN (a bound past their head would leave them no tail at all)."""
    ours = ModelLog(list(range(10)) + [-1] * 100, first=50)
    theirs = ModelLog(list(range(10)) + [-2] * 20)
    fork, _ = search(ours, theirs)
    assert fork is not None and not fork.exact and 10 <= fork.lsn <= 30  # type: ignore[attr-defined]


def test_status_words() -> None:
    split = SplitBrain(peer="a", fork_lsn=21, exact=True, own_records=5, own_bytes=2048, peer_records=11,
                       peer_bytes=4096, found=0.0)
    text = split.describe("vm")
    assert "fork after LSN 21" in text and "5 records (2.0 KiB)" in text and "a 11 (4.0 KiB)" in text
    assert "marsfs invalidate vm" in text and SplitBrain.from_json(split.to_json()) == split
    old = {k: v for k, v in split.to_json().items() if k not in ("own_written", "peer_written", "peer_bytes_at_least")}
    assert SplitBrain.from_json(old) == split, "a record from before the written counts still reads"
    told = replace(split, own_written=0, peer_written=11, exact=False).describe("vm")
    assert "holds at least 5 records (at least 2.0 KiB), none written here as primary (all fetched)" in told
    assert "a at least 11 (at least 4.0 KiB), all written there as primary" in told
    assert "3 written here as primary and 2 fetched" in replace(split, own_written=3).describe("vm")
    loss = FailoverLoss(source="a", epoch=2, start_lsn=22, records=11, bytes=4096, oldest=1e9, newest=1e9 + 5,
                        at_least=True, as_of=1e9 + 5)
    assert "lost at least 11 records (at least 4.0 KiB)" in loss.describe()
    assert "2001-09-09T01:46:40Z and 2001-09-09T01:46:45Z" in loss.describe()
    assert FailoverLoss.from_json(loss.to_json()) == loss
    none = FailoverLoss(source="a", epoch=2, start_lsn=22, records=0, bytes=0, oldest=0, newest=0, at_least=True,
                        as_of=1e9)
    assert "no loss known (its last word" in none.describe() and "may have written more" in none.describe()
    # how long before the failover this node last heard: said with every loss that is not exact
    heard = replace(none, heard_before=2.34).describe()
    assert ": no loss known; last heard from a 2.3 s before this failover (its last word, " in heard, heard
    assert "no record" not in heard.split("(")[0] and "lost at least" not in heard
    assert "; last heard from a 0.5 s before this failover; a may have written more" in replace(
        loss, heard_before=0.5).describe()
    never = replace(none, as_of=0.0)
    assert never.describe().endswith(": what is lost is not known: this node never heard from a"), never.describe()
    # the goodbye of a clean stop: exact, no "at least", no "may have written more"
    gone = replace(loss, at_least=False, heard_before=0.1)
    assert gone.describe().endswith(" lost 11 records (4.0 KiB) written between 2001-09-09T01:46:40Z and "
                                    "2001-09-09T01:46:45Z: a stopped cleanly at 2001-09-09T01:46:45Z with its log "
                                    "durable up to LSN 32"), gone.describe()
    assert ": nothing lost: a stopped cleanly at " in replace(none, at_least=False).describe()
    assert FailoverLoss.from_json(gone.to_json()) == gone
    # measured from a reachable member's position: exact for what it holds, "at least" for the rest
    held = FailoverLoss(source="a", epoch=2, start_lsn=22, records=15, bytes=6 << 20, oldest=1e9, newest=1e9 + 5,
                        at_least=True, as_of=1e9 + 5, held_by="b", held_records=11, held_bytes=5 << 20)
    text = held.describe()
    assert "lost 11 records (5.0 MiB)" in text and "measured from b's position" in text, text
    assert "and at least 4 more (at least 1.0 MiB) that only a had" in text, text
    assert "no reachable node holds" in text and FailoverLoss.from_json(held.to_json()) == held
    side = FailoverLoss(source="c", epoch=3, start_lsn=140, records=2, bytes=66000, oldest=1e9, newest=1e9,
                        at_least=False, as_of=1e9, fork_lsn=37)
    assert "kept this node's side of the split brain: c's 2 records" in side.describe()
    assert "after the fork at LSN 37" in side.describe() and "marsfs invalidate on c" in side.describe()
    old = {k: v for k, v in loss.to_json().items() if k not in ("held_by", "held_records", "held_bytes", "fork_lsn")}
    assert FailoverLoss.from_json(old) == loss  # a record written before those fields existed
