"""The docs' text against the code: what the guide and runbook say exists, and nothing they
point to lies outside the repository (the commands themselves: tests/t5_docs_walk.py)."""

from __future__ import annotations

import re
from pathlib import Path

from marsfs.faces.commands import status_table
from marsfs.faces.config import CONFIG_KEYS

ROOT = Path(__file__).resolve().parent.parent
GUIDE = (ROOT / "docs" / "user-guide.md").read_text()
RUNBOOK = (ROOT / "docs" / "runbook.md").read_text()


def test_the_guide_names_every_config_key() -> None:
    """The sentence "the keys are ..." lists every key a --config file may have."""
    m = re.search(r"the keys are (.*?); flags win", GUIDE, re.S)
    assert m is not None
    named = set(re.findall(r"`([a-z-]+)`", m.group(1))) | ({"peers"} if "`[peers]`" in m.group(1) else set())
    assert named == set(CONFIG_KEYS)


def test_the_docs_point_to_nothing_outside_the_repository() -> None:
    """No goal numbers (G1 ...) of a contract that is not in the repository, no file of it:
    in the README and every page of docs/."""
    docs = [(p.name, p.read_text()) for p in sorted((ROOT / "docs").glob("*.md"))]
    assert len(docs) >= 8  # the glob found the pages
    for name, text in [("README", (ROOT / "README.md").read_text()), *docs]:
        assert "PRODUCT" not in text, name
        assert not re.search(r"\(G\d+\)", text), (name, re.findall(r".*\(G\d+\).*", text))


def test_the_runbook_claims_no_status_column_status_has_not() -> None:
    """A comment after ``marsfs status`` in a runbook block names table columns in capitals;
    each must be a column of the table, followed by words status prints, not invented ones."""
    head = status_table([{"volume": "v", "role": "primary", "state": "up", "epoch": 1, "size": 1, "head_lsn": 0,
                          "durable_lsn": 0, "applied_lsn": 0, "oldest_version_lsn": 0, "log_bytes": 0,
                          "lag_bytes": 0, "lag_seconds": 0.0, "open_handles": 0, "errors": []}]).splitlines()[0]
    columns = set(head.split())
    for line in RUNBOOK.splitlines():
        if line.startswith("marsfs status") and "# ROLE" in line:
            comment = line.split("#", 1)[1]
            for clause in comment.split(","):
                words = clause.split()
                assert words[0] in columns, (line, words[0])
                # "ROLE mirror (source node2)": the table has no source; the JSON has
                assert "(source" not in clause or "--json" in clause, line
