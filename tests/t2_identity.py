"""The node id in the state directory (marsfs.node.identity), through Node.open.

* Opening a state directory the first time makes a random id in ``node-id`` (mode 0600); later
  opens keep it; another state directory gets another.
* A damaged ``node-id`` is refused with a message that says what to do.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from marsfs.errors import StateError
from marsfs.node import Node


def open_close(state: Path, name: str = "n1") -> str:
    node = Node.open(state, name)
    try:
        return node.node_id
    finally:
        node.close()


def test_the_node_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = open_close(tmp_path / "s1")
    path = tmp_path / "s1" / "node-id"
    assert len(first) == 32 and int(first, 16) >= 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and path.read_text() == first + "\n"
    assert open_close(tmp_path / "s1") == first
    assert open_close(tmp_path / "s2") != first  # a second daemon of the same name differs


def test_a_damaged_node_id_is_refused_in_words(tmp_path: Path) -> None:
    open_close(tmp_path / "s")
    (tmp_path / "s" / "node-id").write_text("not an id\n")
    with pytest.raises(StateError, match=r"node-id: not a node id \(32 hex digits\); remove the file"):
        open_close(tmp_path / "s")
