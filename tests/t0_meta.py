"""Cluster metadata (marsfs.node.meta): stamps, the merge laws, persistence, designated()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marsfs.errors import MarsError, ProtocolError, StateError
from marsfs.node.meta import (
    META_FILE,
    ClusterMeta,
    Entry,
    Position,
    Stamp,
    check_entry,
    position_key,
    primary_key,
    removed_key,
)
from marsfs.replication.protocol import (
    MAX_META_ENTRIES,
    MAX_META_KEY,
    MAX_META_VALUE,
    PROTO_VERSION,
    FrameDecoder,
    Hello,
    Message,
    MetaEntries,
    MetaWelcome,
    MsgType,
    decode_message,
    encode_frame,
    encode_message,
)


def meta(tmp_path: Path, node: str = "a") -> ClusterMeta:
    return ClusterMeta(tmp_path / f"{node}-{META_FILE}", node)


def position(**kw: object) -> Position:
    d: dict[str, object] = dict(role="mirror", state="synced", epoch=1, head_lsn=5, durable_lsn=5,
                                chain_at_head="00" * 16, replayed_lsn=5, open_handles=0, source="a", updated=1.0)
    d.update(kw)
    return Position(**d)  # type: ignore[arg-type]


def test_stamps_order_by_clock_then_node() -> None:
    assert Stamp(1, "z") < Stamp(2, "a") < Stamp(2, "b")
    assert max([Stamp(3, "a"), Stamp(3, "c"), Stamp(2, "z")]) == Stamp(3, "c")


def test_put_stamps_newer_than_everything_seen(tmp_path: Path) -> None:
    m = meta(tmp_path)
    s1 = m.put("k", 1)
    m.merge([Entry("b", "k", 2, Stamp(40, "b"))])
    s2 = m.put("k", 3)
    assert s1 < Stamp(40, "b") < s2 and s2.node == "a"
    assert m.get("a", "k") == 3 and m.get("b", "k") == 2 and m.get("c", "k") is None


def test_merge_reports_what_changed_and_keeps_newest(tmp_path: Path) -> None:
    m = meta(tmp_path)
    new, old = Entry("b", "k", "new", Stamp(5, "b")), Entry("b", "k", "old", Stamp(4, "b"))
    assert m.merge([new]) == {("b", "k")}
    assert m.merge([old, new]) == set()
    assert m.get("b", "k") == "new"


def test_persisted_and_clock_never_goes_back(tmp_path: Path) -> None:
    m = meta(tmp_path)
    m.put("x", {"a": [1, 2]})
    m.merge([Entry("b", "y", None, Stamp(99, "b"))])
    again = meta(tmp_path)
    assert again.get("a", "x") == {"a": [1, 2]} and again.entry("b", "y") is not None
    assert again.clock == 99
    assert again.put("x", 0).clock == 100


def test_unreadable_file_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / f"a-{META_FILE}").write_text("{not json")
    with pytest.raises(StateError, match="move it away"):
        meta(tmp_path)


def test_designated_is_the_claim_with_highest_epoch_then_stamp(tmp_path: Path) -> None:
    a, b, c = meta(tmp_path, "a"), meta(tmp_path, "b"), meta(tmp_path, "c")
    assert a.designated("v") is None
    a.claim("v", "a", 1, 1)
    b.merge(a.entries())
    b.claim("v", "b", 2, 17)
    c.claim("v", "c", 1, 1)  # an old, partitioned claim: lower epoch loses whatever its stamp
    c.put("spin", 0)
    for m in (a, b, c):
        for other in (a, b, c):
            m.merge(other.entries())
    for m in (a, b, c):
        d = m.designated("v")
        assert d is not None and (d.node, d.epoch, d.start_lsn) == ("b", 2, 17)
    # two claims of one epoch: the newer stamp wins
    a.claim("v", "a", 2, 20)
    b.merge(a.entries())
    d = b.designated("v")
    assert d is not None and d.node == "a"


def test_unreadable_claims_are_ignored(tmp_path: Path) -> None:
    m = meta(tmp_path)
    m.claim("v", "a", 1, 1)
    m.merge([Entry("b", primary_key("v"), {"node": "b", "epoch": "9"}, Stamp(50, "b"))])
    d = m.designated("v")
    assert d is not None and d.node == "a"


def test_members_positions_and_removal(tmp_path: Path) -> None:
    a, b = meta(tmp_path, "a"), meta(tmp_path, "b")
    a.claim("v", "a", 1, 1)
    b.publish("v", position(source="a"))
    a.merge(b.entries())
    assert a.members("v") == {"a", "b"}
    assert a.position("b", "v") == position(source="a")
    a.remove("v", "b")
    assert a.members("v") == {"a"} and a.is_removed("v", "b")
    # b comes back and speaks of the volume again: a member again
    b.merge(a.entries())
    b.publish("v", position(source="a", head_lsn=9))
    a.merge(b.entries())
    assert a.members("v") == {"a", "b"}


def test_publish_skips_unchanged_positions_until_refresh(tmp_path: Path) -> None:
    m = meta(tmp_path)
    assert m.publish("v", position(updated=1.0))
    assert not m.publish("v", position(updated=2.0))
    assert m.publish("v", position(updated=2.0, head_lsn=6))
    assert m.publish("v", position(updated=100.0, head_lsn=6))


def test_position_from_foreign_json() -> None:
    assert Position.from_json("x") is None
    assert Position.from_json({"role": "mirror"}) is None
    assert Position.from_json({**position().to_json(), "newer": 1}) == position()


def test_check_entry_bounds() -> None:
    assert check_entry("a", "k", 1, [1]) is None
    assert check_entry("", "k", 1, 1) is not None
    assert check_entry("a", "k" * 300, 1, 1) is not None
    assert check_entry("a", "k", 0, 1) is not None
    assert check_entry("a", "k", 1, "x" * 5000) is not None
    assert check_entry("a", "k", 1, {1, 2}) is not None
    assert check_entry("a", "k", 2**53 + 1, 1) is not None  # past the clock's end
    assert check_entry("a", "k", 101, 1, ceiling=100) == "clock 101 is not from 1 to 100"


def test_names_in_keys_and_values_follow_the_rule() -> None:
    """A node or volume name this node reads out of an entry (and may use as a file name or a
    hold key) is a legal name; keys outside ``volume/`` are a newer node's and left alone."""
    claim = {"node": "b", "epoch": 2, "start_lsn": 1}
    assert check_entry("a", "volume/vm/primary", 1, claim) is None
    assert check_entry("a", "volume/vm/removed/b", 1, True) is None
    assert check_entry("a", "volume/vm/position", 1, {"source": ""}) is None
    assert check_entry("a", "volume/vm/position", 1, None) is None
    assert check_entry("a", "other/../x", 1, 1) is None
    assert check_entry("a", "volume/../primary", 1, claim) == "key 'volume/../primary' names no volume"
    assert check_entry("a", "volume/vm", 1, 1) == "key 'volume/vm' names no volume"
    assert check_entry("a", "volume/vm/removed/" + "n" * 100, 1, True) is not None
    assert check_entry("a", "volume/vm/removed/b/c", 1, True) is not None
    assert check_entry("a", "volume/vm/primary", 1, {**claim, "node": "../b"}) == (
        "primary of volume vm names '../b', which is not a node name")
    assert check_entry("a", "volume/vm/position", 1, {"source": "x" * 65}) is not None


# ---------------------------------------------------------------------------- merge laws

NODES = st.sampled_from(["a", "b", "c"])
entries = st.builds(lambda owner, key, clock, value: Entry(owner, key, value, Stamp(clock, owner)),
                    NODES, st.sampled_from(["k", "volume/v/primary", position_key("v")]),
                    st.integers(1, 6), st.one_of(st.none(), st.integers(0, 3), st.text(max_size=2)))


def state_of(m: ClusterMeta) -> dict[tuple[str, str], Entry]:
    return m.snapshot()


@settings(max_examples=60, deadline=None)
@given(st.lists(entries, max_size=12), st.randoms())
def test_merge_converges_in_any_order_with_duplicates(tmp_path_factory: pytest.TempPathFactory,
                                                      batch: list[Entry], rnd: object) -> None:
    """Commutative, associative, idempotent: any order, any grouping, any duplication of the same
    entries gives the same map."""
    import random
    assert isinstance(rnd, random.Random)
    d = tmp_path_factory.mktemp("m")
    one = ClusterMeta(d / "one.json", "x")
    one.merge(batch)
    other = ClusterMeta(d / "other.json", "y")
    shuffled = batch + rnd.sample(batch, len(batch) // 2)
    rnd.shuffle(shuffled)
    cut = rnd.randint(0, len(shuffled))
    other.merge(shuffled[:cut])
    other.merge(shuffled[cut:])
    other.merge(batch)
    assert state_of(one) == state_of(other)
    # merging node to node (entries() of a map) also gives the same map
    third = ClusterMeta(d / "third.json", "z")
    third.merge(other.entries())
    assert state_of(third) == state_of(one)
    if batch:  # persisted, with the clock past every stamp seen
        assert json.loads((d / "one.json").read_text())["clock"] == max(e.stamp.clock for e in batch)
        assert ClusterMeta(d / "one.json", "x").snapshot() == state_of(one)


keyed = st.builds(lambda owner, key, clock, value: Entry(owner, key, value, Stamp(clock, owner)),
                  NODES, st.sampled_from(["k", "volume/v/primary", position_key("v"), position_key("w"),
                                          removed_key("v", "a"), removed_key("v", "b"), removed_key("w", "c"),
                                          "volume/v/removed/", "volume/v/removed/x/y"]),
                  st.integers(1, 6), st.one_of(st.none(), st.booleans(), st.integers(0, 3)))


@pytest.mark.allow_log("cannot write the cluster metadata")
@settings(max_examples=60, deadline=None)
@given(st.lists(keyed, max_size=14), st.lists(st.tuples(st.sampled_from(["k", removed_key("v", "c")]),
                                                        st.booleans()), max_size=3))
def test_the_indexes_answer_as_a_scan_of_the_map(tmp_path_factory: pytest.TempPathFactory,
                                                  batch: list[Entry], puts: list[tuple[str, bool]]) -> None:
    """What the node asks per volume comes from indexes by key and by volume: they must say
    what looking through every entry says, after merges, puts and a failed put's rollback."""
    d = tmp_path_factory.mktemp("i")
    m = ClusterMeta(d / "m.json", "a")
    m.merge(batch)
    for key, value in puts:
        m.put(key, value)
    m.put(removed_key("w", "z"), True)
    m.path = d / "missing" / "m.json"  # durable puts fail now: rolled back (a new key, maybe an old one)
    for failing in (removed_key("w", "q"), removed_key("v", "a")):
        with pytest.raises(MarsError):
            m.put(failing, False)
    m.path = d / "m.json"
    every = m.snapshot()
    for key in {k for _, k in every} | {removed_key("w", "q")}:
        assert sorted(m._with_key(key), key=lambda e: e.owner) == sorted(
            (e for (_, k), e in every.items() if k == key), key=lambda e: e.owner)
    for vol in ("v", "w", "u"):
        prefix = removed_key(vol, "")
        scanned = {k[len(prefix):] for (_, k) in every if k.startswith(prefix)}
        assert m.removed(vol) == {n for n in scanned if m.is_removed(vol, n)}
    assert ("a", removed_key("w", "q")) not in every
    assert ClusterMeta(d / "m.json", "a").snapshot() == every


# ---------------------------------------------------------------------------- the wire form

def decode_json(mtype: MsgType, obj: object) -> Message:
    frames = FrameDecoder().feed(encode_frame(mtype, json.dumps(obj).encode()))
    return decode_message(frames[0])


def test_meta_messages_round_trip() -> None:
    for msg in (MetaWelcome(node="b", cluster="c"),
                MetaEntries(entries=(("a", "k", 3, {"x": [1]}), ("b", "j", 1, None)), more=True),
                Hello(proto=PROTO_VERSION, cluster="c", node="a", volume="", want="meta", epoch=0)):
        assert decode_message(FrameDecoder().feed(encode_message(msg))[0]) == msg


@pytest.mark.parametrize("entries,why", [
    ("x", "must be a list"),
    ([["a", "k", 1]], r"\[owner, key, clock, value\]"),
    ([[1, "k", 1, 1]], "owner"),
    ([["a", "", 1, 1]], "key"),
    ([["a", "k" * (MAX_META_KEY + 1), 1, 1]], "key"),
    ([["a", "k", 0, 1]], "clock"),
    ([["a", "k", True, 1]], "clock"),
    ([["a", "k", 1, "v" * MAX_META_VALUE]], "longer"),
    ([["a", "k", 1, 1]] * (MAX_META_ENTRIES + 1), "at most"),
])
def test_malformed_meta_entries_are_protocol_errors(entries: object, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode_json(MsgType.META_ENTRIES, {"entries": entries, "more": False})


def test_meta_welcome_fields_are_checked() -> None:
    with pytest.raises(ProtocolError, match="cluster"):
        decode_json(MsgType.META_WELCOME, {"node": "b"})
    with pytest.raises(ProtocolError, match="want"):
        decode_json(MsgType.HELLO, {"proto": PROTO_VERSION, "cluster": "c", "node": "a", "volume": "",
                                    "want": "gossip", "epoch": 0})


@pytest.mark.allow_log("cannot write the cluster metadata")
def test_a_full_state_disk_fails_only_durable_puts_and_keeps_soft_state(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import errno as _errno

    import marsfs.node.meta as meta_mod
    from marsfs.errors import NoSpace

    m = ClusterMeta(tmp_path / "meta.json", "a")
    m.claim("vm", "a", 1, 1)
    other = ClusterMeta(tmp_path / "other.json", "b")
    other.claim("w", "b", 1, 1)

    def full(path: Path, obj: object) -> None:
        raise OSError(_errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(meta_mod, "write_json", full)
    with pytest.raises(NoSpace, match="free space"):
        m.claim("vm", "a", 2, 10)
    d = m.designated("vm")
    assert d is not None and d.epoch == 1  # the failed claim is not said
    assert m.merge(other.entries())  # soft: kept in memory, written later
    monkeypatch.undo()
    m.claim("vm", "a", 2, 10)
    again = ClusterMeta(tmp_path / "meta.json", "a")
    assert again.designated("w") is not None and again.designated("vm").epoch == 2  # type: ignore[union-attr]
