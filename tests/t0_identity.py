"""The accept rule for peers (marsfs.node.identity), as pure logic with a fake clock.

* A node in no peer list is refused; so is a HELLO that claims this node's own name with
  another id.
* A second id for a known name is refused while the known one is connected or was heard less
  than RECENT seconds ago, or while the name holds a volume (until it is removed from it);
  after that the new id replaces it (a replaced node).
* The same id is always accepted (a restart keeps its id); an empty id is an id like any other.
* A refused peer is logged once per LOG_EVERY seconds, whatever it retries.
"""

from __future__ import annotations

import logging

import pytest

from marsfs.node.identity import RECENT, Identities, Seen, refusal
from marsfs.node.logbook import LOG_EVERY

REAL = "1" * 32
OTHER = "2" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gate(clock: Clock, listed: set[str] | None = None) -> Identities:
    names = {"b", "c"} if listed is None else listed
    return Identities("a", "0" * 32, lambda n: n in names, clock)


def test_an_unlisted_node_is_refused_and_a_listed_one_accepted() -> None:
    assert refusal("d", OTHER, me="a", my_id="0" * 32, listed=False, seen=None, now=0.0) == (
        "unknown-node", "node d is in no peer list of the cluster (not in a's --peer list, and no member that "
                        "lists it spoke of it); to make it a member, start a's daemon with --peer d=HOST:PORT")
    assert refusal("b", OTHER, me="a", my_id="0" * 32, listed=True, seen=None, now=0.0) is None


def test_a_node_claiming_our_own_name_is_refused() -> None:
    code, why = refusal("a", OTHER, me="a", my_id="0" * 32, listed=False, seen=None, now=0.0) or ("", "")
    assert code == "node-identity" and "uses --node a" in why
    assert refusal("a", "0" * 32, me="a", my_id="0" * 32, listed=False, seen=None, now=0.0) is None


@pytest.mark.parametrize("seen, refused", [
    (Seen(REAL, last=0.0, open=1), True),  # connected now, however long ago it last spoke
    (Seen(REAL, last=200.0 - RECENT + 1), True),  # heard recently
    (Seen(REAL, last=200.0 - RECENT - 1), False),  # silent: taken for a replaced node
    (Seen(OTHER, last=200.0, open=3), False),  # the same node
])
def test_a_second_id_for_a_running_name_is_refused(seen: Seen, refused: bool) -> None:
    why = refusal("b", OTHER, me="a", my_id="0" * 32, listed=True, seen=seen, now=200.0)
    assert (why is not None) is refused
    if why is not None:
        assert why[0] == "node-identity" and f"node b (id {REAL[:8]}) runs already" in why[1]
        assert f"claims the name b with id {OTHER[:8]}" in why[1]


def test_a_second_id_for_a_name_that_holds_volumes_is_refused_until_it_is_removed() -> None:
    """A stopped node still holds its volumes (their log is kept for it): a new id for its name
    is refused, saying how to remove the old node, until that is done."""
    silent = Seen(REAL, last=0.0)
    code, why = refusal("b", OTHER, me="a", my_id="0" * 32, listed=True, seen=silent, now=1000.0,
                        held=("vm", "db")) or ("", "")
    assert code == "node-identity" and "node b (id 11111111) holds volume(s) db, vm" in why
    assert "marsfs leave VOL --node b --force on a survivor, for each of db, vm" in why
    assert refusal("b", OTHER, me="a", my_id="0" * 32, listed=True, seen=silent, now=1000.0, held=()) is None
    assert refusal("b", REAL, me="a", my_id="0" * 32, listed=True, seen=silent, now=1000.0, held=("vm",)) is None


@pytest.mark.allow_log("refused a connection from")
def test_a_replacement_waits_for_the_removal() -> None:
    clock = Clock()
    held = {"b": ["vm"]}
    ids = Identities("a", "0" * 32, lambda n: True, clock, lambda n: held.get(n, []))
    assert ids.admit("b", REAL, "") is None
    ids.closed("b", REAL)
    clock.now += 10 * RECENT
    code, why = ids.admit("b", OTHER, "") or ("", "")
    assert code == "node-identity" and "holds volume(s) vm" in why
    held["b"] = []  # leave vm --node b --force
    assert ids.admit("b", OTHER, "") is None


@pytest.mark.allow_log("refused a connection from")
def test_identities_track_connections_and_let_a_replacement_in_after_silence() -> None:
    clock = Clock()
    ids = gate(clock)
    assert ids.admit("b", REAL, "10.0.0.2:4000") is None
    assert ids.seen["b"].open == 1
    clock.now += 10 * RECENT  # a long-lived fetch connection: still there
    assert ids.admit("b", OTHER, "10.0.0.9:4000") is not None
    assert ids.admit("b", "", "10.0.0.9:4000") is not None  # no id is no way around it
    ids.closed("b", OTHER)  # not its connection: changes nothing
    assert ids.seen["b"].open == 1
    ids.closed("b", REAL)
    clock.now += RECENT - 1
    assert ids.admit("b", OTHER, "10.0.0.9:4000") is not None
    clock.now += 2
    assert ids.admit("b", OTHER, "10.0.0.9:4000") is None  # the old one is gone: replaced
    assert ids.seen["b"] == Seen(OTHER, clock.now, 1)
    assert ids.admit("b", REAL, "10.0.0.2:4000") is not None  # and now the old one is the second


@pytest.mark.allow_log("refused a connection from")
def test_a_refused_peer_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    ids = gate(clock)
    with caplog.at_level(logging.WARNING, "marsfs.node.identity"):
        for _ in range(5):
            assert ids.admit("d", OTHER, "10.0.0.4:4000") is not None
            clock.now += 1
        clock.now += LOG_EVERY
        assert ids.admit("d", OTHER, "10.0.0.4:4000") is not None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(not r.exc_info for r in caplog.records)
    assert lines[0].startswith("refused a connection from 10.0.0.4:4000 (node d, id 22222222): node d is in no "
                               "peer list")
    assert lines[1].endswith("(4 more refused since)")
