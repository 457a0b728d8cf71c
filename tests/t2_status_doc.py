"""docs/status.md against what ``status --json`` emits.

What must hold:

* Every key a status row emits, at every level (the row, its peers, positions, clones, split
  brains, split versions, failover loss, handover, sync mode, tls), is documented in docs/status.md, and
  every documented key is one that the records of :mod:`marsfs.node.state` (or the TLS status)
  emit: the document and the schema cannot drift apart.
* A key documented as possibly null is one whose field may be None, and the other way round.
* Each row carries ``schema_version`` first, and the document names its current value.
* A real node's rows (in process) have exactly the documented keys.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from marsfs.node import Node
from marsfs.node import tls as tls_mod
from marsfs.node.state import (
    STATUS_SCHEMA_VERSION,
    CloneStatus,
    FailoverLoss,
    HandoverStatus,
    PeerStatus,
    PositionStatus,
    SplitBrain,
    SplitVersionStatus,
    SyncModeStatus,
    SyncState,
    VolumeStatus,
)
from marsfs.node.status import node_rows
from marsfs.node.volstate import Role, VolumeState

DOC = Path(__file__).resolve().parent.parent / "docs" / "status.md"

#: the document's sections (the word in backticks after ``###``, or "The row") and their records
SECTIONS: dict[str, Any] = {
    "The row": VolumeStatus, "peers[]": PeerStatus, "positions[]": PositionStatus, "clones[]": CloneStatus,
    "split_brain[]": SplitBrain, "split_versions[]": SplitVersionStatus, "failover_loss": FailoverLoss,
    "handover": HandoverStatus, "sync_mode": SyncModeStatus, "tls": None,
}
#: row key -> the section of the records it holds
NESTED = {"peers": "peers[]", "positions": "positions[]", "clones": "clones[]", "split_brain": "split_brain[]",
          "split_versions": "split_versions[]", "failover_loss": "failover_loss", "handover": "handover",
          "sync_mode": "sync_mode", "tls": "tls"}


def documented() -> dict[str, dict[str, str]]:
    """Section -> {key: its type as documented}, from the tables of docs/status.md."""
    out: dict[str, dict[str, str]] = {}
    section = None
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            m = re.match(r"### (?:`([^`]+)`|(The row))", line)
            assert m, f"docs/status.md: a section heading names no record: {line!r}"
            section = m.group(1) or m.group(2)
            assert section in SECTIONS, f"docs/status.md: unknown section {section!r}"
            out[section] = {}
        elif section is not None and (m := re.match(r"\| `([a-z_]+)` \| ([^|]+) \|", line)):
            assert m.group(1) not in out[section], f"{section}: {m.group(1)} documented twice"
            out[section][m.group(1)] = m.group(2).strip()
    return out


def full_row() -> dict[str, Any]:
    """A status row with every nested record present once, as JSON."""
    peer = PeerStatus(node="b", state=VolumeState.SYNCED, connected=True, fetched_lsn=1, replayed_lsn=1,
                      fetch_paused=False, replay_paused=False, lag_bytes=0, lag_records=0, lag_seconds=0.0, last_seen=1.0)
    pos = PositionStatus(node="c", role="mirror", state="synced", epoch=1, head_lsn=1, replayed_lsn=1, source="a",
                         updated=1.0, last_heard=None)
    split = SplitBrain(peer="b", fork_lsn=1, exact=True, own_records=1, own_bytes=1, peer_records=1, peer_bytes=1,
                       found=1.0)
    version = SplitVersionStatus(name="split-b-1", node="b", fork_lsn=1, head_lsn=2, size=1, disk_bytes=1, saved=1.0)
    loss = FailoverLoss(source="a", epoch=2, start_lsn=3, records=0, bytes=0, oldest=0, newest=0, at_least=True,
                        as_of=1.0)
    st = VolumeStatus(volume="v", node="a", role=Role.PRIMARY, state=VolumeState.UP, epoch=1, size=1, head_lsn=1,
                      durable_lsn=1, fetched_lsn=1, replayed_lsn=1, applied_lsn=1, lag_bytes=0, lag_records=0,
                      lag_seconds=0.0, oldest_version_lsn=0, log_bytes=0, open_handles=0, peers=[peer],
                      clones=[CloneStatus("c", 1)], positions=[pos], split_brain=[split], split_versions=[version],
                      failover_loss=loss, handover=HandoverStatus(source="b", phase="fetching", to_fetch=None),
                      sync_mode=SyncModeStatus(mirrors=1, timeout=2.0, refuse=False, state=SyncState.IN_SYNC, since=None,
                                               acked_lsn=1, behind_records=0, behind_bytes=0, behind_seconds=0.0),
                      tls={"mode": "insecure"})
    return st.to_json()


def tls_keys(tmp_path: Path) -> set[str]:
    """The keys of both kinds of ``tls``: a node with a certificate, and one run --insecure."""
    tls_mod.init_ca(tmp_path / "ca", "test")
    tls_mod.add_node(tmp_path / "ca", "a", tmp_path / "a")
    return set(tls_mod.load(tmp_path / "a", "a", "test").status()) | {"mode"}


def test_every_emitted_key_is_documented_and_every_documented_key_is_emitted(tmp_path: Path) -> None:
    doc = documented()
    assert set(doc) == set(SECTIONS), f"docs/status.md lacks sections {set(SECTIONS) - set(doc)}"
    row = full_row()
    emitted: dict[str, set[str]] = {"The row": set(row), "tls": tls_keys(tmp_path)}
    for key, section in NESTED.items():
        if key != "tls":
            value = row[key]
            emitted[section] = set(value[0] if isinstance(value, list) else value)
    for section, keys in emitted.items():
        assert keys - set(doc[section]) == set(), f"{section}: emitted but not in docs/status.md"
        assert set(doc[section]) - keys == set(), f"{section}: in docs/status.md but never emitted"


@pytest.mark.parametrize("section", [s for s, record in SECTIONS.items() if record is not None])
def test_null_is_documented_where_a_field_may_be_none(section: str) -> None:
    doc = documented()[section]
    record = SECTIONS[section]
    json_name = {"source": "from"} if record is HandoverStatus else {}
    for f in dataclasses.fields(record):
        nullable = "None" in str(f.type)
        key = json_name.get(f.name, f.name)
        assert nullable == ("null" in doc[key]), f"{section}.{key}: field type {f.type}, documented {doc[key]!r}"


def test_each_row_says_its_schema_version_first() -> None:
    row = full_row()
    assert next(iter(row)) == "schema_version" and row["schema_version"] == STATUS_SCHEMA_VERSION
    assert f"(now `{STATUS_SCHEMA_VERSION}`)" in DOC.read_text(), "docs/status.md names another schema version"


@pytest.mark.volumes(v=1 << 20)
def test_a_real_nodes_rows_have_exactly_the_documented_keys(node: Node) -> None:
    node.create("w", 1 << 20)
    doc = documented()
    for row in node_rows(node):
        assert set(row) == set(doc["The row"]), row["volume"]
        assert row["schema_version"] == STATUS_SCHEMA_VERSION
