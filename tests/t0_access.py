"""The members rule (marsfs.node.access), as pure logic with a fake clock.

* A member is answered whatever it asks; a node that is none is refused whatever it asks,
  with ``not-a-member`` and a message naming the members and the command that makes it one.
* The one way in is a join's fast sync (``join`` with want ``sync``); ``join`` on any other
  want counts for nothing.
* A refused (node, volume) is logged once per LOG_EVERY seconds, whatever it retries; the
  lines left out are counted in the next one.
"""

from __future__ import annotations

import logging
from typing import cast

import pytest

from marsfs.node.access import Access, refusal
from marsfs.node.logbook import LOG_EVERY
from marsfs.replication.fetch import hello
from marsfs.replication.protocol import Want
from marsfs.volume import Volume

WANTS: tuple[Want, ...] = ("fetch", "sync", "sums", "leave", "handover", "compare", "position")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeVolume:
    name = "vm"


VM = cast(Volume, FakeVolume())


@pytest.mark.parametrize("want", WANTS)
def test_members_are_answered_and_others_refused_whatever_they_ask(want: Want) -> None:
    assert refusal("b", "vm", want, me="a", members={"a", "b"}, join=False) is None
    code, why = refusal("c", "vm", want, me="a", members={"a", "b"}, join=False) or ("", "")
    assert code == "not-a-member"
    assert why.startswith("node c is not a member of volume vm as node a knows it (members: a, b), and only "
                          "members may ask for ")
    assert why.endswith("; to make c a mirror of vm, run on c: marsfs join vm --from a")


def test_only_a_joins_fast_sync_lets_a_node_in() -> None:
    assert refusal("c", "vm", "sync", me="a", members={"a"}, join=True) is None
    for want in WANTS:
        if want != "sync":
            assert refusal("c", "vm", want, me="a", members={"a"}, join=True) is not None, want


def test_a_long_member_list_is_cut_short() -> None:
    members = {f"n{i:02d}" for i in range(20)}
    _, why = refusal("c", "vm", "fetch", me="a", members=members, join=False) or ("", "")
    assert "(members: n00, n01, n02, n03, n04, n05, n06, n07 and 12 more)" in why
    _, why = refusal("c", "vm", "fetch", me="a", members=set(), join=False) or ("", "")
    assert "(members: none)" in why


@pytest.mark.allow_log("refused node c for volume vm")
def test_a_refused_node_is_logged_once_a_minute_per_volume(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    asked: list[str] = []

    def members(vol: Volume) -> set[str]:
        asked.append(vol.name)
        return {"a", "b"}

    access = Access("a", members, clock)
    caplog.set_level(logging.WARNING, logger="marsfs.node.access")
    assert access.authorize(hello("b", "x", "vm", "fetch"), VM) is None
    for _ in range(5):
        error = access.authorize(hello("c", "x", "vm", "fetch"), VM)
        assert error is not None and error.code == "not-a-member"
    clock.now += LOG_EVERY
    assert access.authorize(hello("c", "x", "vm", "sums"), VM) is not None
    assert access.authorize(hello("c", "x", "vm", "sync", join=True), VM) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and access.refused == 6 and asked == ["vm"] * 8
    assert lines[0].startswith("refused node c for volume vm: node c is not a member") and "more refused" not in lines[0]
    assert lines[1].endswith("(4 more refused since)") and "only members may ask for its block sums" in lines[1]
