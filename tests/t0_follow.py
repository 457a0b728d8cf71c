"""What following the designated primary asks of a volume (marsfs.node.follow.decide), as a table.

One row per situation: this node's role record, who is designated (epoch 3 from LSN 100), the
volume's head, its open handles and whether its image copy runs; the act, and whether a fence
and an error come with it. Every act has a row.
"""

from __future__ import annotations

import pytest

from marsfs.node.follow import Act, Decision, decide
from marsfs.node.meta import Designation, Stamp
from marsfs.node.state import RoleRecord
from marsfs.node.volstate import Role

ME = "b"
D_OTHER = Designation(node="a", epoch=3, stamp=Stamp(7, "a"), start_lsn=100)
D_ME = Designation(node=ME, epoch=3, stamp=Stamp(7, ME), start_lsn=100)
PRIMARY = RoleRecord(role=Role.PRIMARY, epoch=2)
MIRROR_OF_A = RoleRecord(role=Role.MIRROR, epoch=3, source="a")

#: (id, role, designation, head_lsn, opens, copying, act, fenced, error contains)
ROWS = [
    ("primary, designated", PRIMARY, D_ME, 150, 1, False, Act.UNFENCE, False, ""),
    ("primary, other designated, wrote after the epoch began", PRIMARY, D_OTHER, 150, 0, False,
     Act.SPLIT, True, "split brain"),
    ("primary, other designated, its head is the epoch's start", PRIMARY, D_OTHER, 100, 0, False,
     Act.SPLIT, True, "LSN 100-100"),
    ("primary, split brain while open: the split is said first", PRIMARY, D_OTHER, 150, 2, False,
     Act.SPLIT, True, "diverges"),
    ("primary, a prefix, open", PRIMARY, D_OTHER, 99, 2, False, Act.WAIT_CLOSED, True, "2 handle(s)"),
    ("primary, a prefix, closed", PRIMARY, D_OTHER, 99, 0, False, Act.BECOME_MIRROR, True, ""),
    ("mirror of the designated primary", MIRROR_OF_A, D_OTHER, 99, 0, False, Act.FOLLOWING, False, ""),
    ("mirror of another node", RoleRecord(role=Role.MIRROR, epoch=3, source="c"), D_OTHER, 99, 0, False,
     Act.REFETCH, False, ""),
    ("mirror of another node, copying its image", RoleRecord(role=Role.MIRROR, epoch=3, source="c"), D_OTHER,
     0, 0, True, Act.NOTHING, False, ""),
    ("mirror of the designated primary at an older epoch", RoleRecord(role=Role.MIRROR, epoch=2, source="a"),
     D_OTHER, 99, 0, False, Act.EPOCH, False, ""),
    ("mirror holding the claim (a crash before its promotion)", MIRROR_OF_A, D_ME, 99, 0, False,
     Act.PROMOTE, False, ""),
    ("mirror holding the claim, first copy unfinished", RoleRecord(role=Role.MIRROR, source="a", syncing=True),
     D_ME, 0, 0, False, Act.NOTHING, False, ""),
    ("clone", RoleRecord(role=Role.CLONE), D_OTHER, 150, 0, False, Act.NOTHING, False, ""),
]


@pytest.mark.parametrize(("role", "d", "head_lsn", "opens", "copying", "act", "fenced", "error"),
                         [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_decide(role: RoleRecord, d: Designation, head_lsn: int, opens: int, copying: bool, act: Act,
                fenced: bool, error: str) -> None:
    do = decide("v", ME, role, d, head_lsn=head_lsn, opens=opens, copying=copying)
    assert do.act == act
    assert bool(do.fence) == fenced
    if fenced:  # the fence names who is designated and where to write
        assert f"write on {d.node}" in do.fence and f"epoch {d.epoch}" in do.fence
    if error:
        assert error in do.error
    else:
        assert do.error == ""


def test_every_act_has_a_row() -> None:
    assert {row[6] for row in ROWS} == set(Act)


def test_decide_is_pure() -> None:
    """Same facts, same decision; the role record is not changed."""
    before = RoleRecord(role=Role.MIRROR, epoch=2, source="c")
    first = decide("v", ME, before, D_OTHER, head_lsn=99, opens=0, copying=False)
    assert first == decide("v", ME, before, D_OTHER, head_lsn=99, opens=0, copying=False) == Decision(Act.REFETCH)
    assert before == RoleRecord(role=Role.MIRROR, epoch=2, source="c")
