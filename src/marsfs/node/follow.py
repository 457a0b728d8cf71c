"""What following the designated primary asks of one volume here, decided without doing it.

Rules that hold here:

* :func:`decide` is pure: it reads a role record, the designation and a few facts, and says
  what to do. Two places act on it: the follow step (:meth:`Cluster._follow`: fencing,
  becoming a mirror, refetching) and the roles' watch (:meth:`Roles.watch`: finishing a
  promotion, finding a fenced primary's split brain, forgetting resolved ones). Nothing here
  ever claims a volume: only an operator's ``primary`` does.
* A primary that is not the designated primary is fenced; if it wrote at or after the new
  epoch's start its tail diverges (split brain, kept); while its image is open it waits;
  otherwise it becomes the designated primary's mirror. A mirror (not copying its image)
  whose source is not the designated primary fetches from it; one at another epoch takes it.
* A mirror that is itself the designated primary claimed the volume and was not promoted (a
  crash came in between): it is promoted, unless its first copy has not finished.
* No module-level mutable state; imports only pure node modules.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from marsfs.node.meta import Designation
from marsfs.node.state import RoleRecord
from marsfs.node.volstate import Role


class Act(enum.Enum):
    """The one thing the follow step does for a volume."""

    NOTHING = "nothing"  #: not this step's business (a copy runs, a clone, no role to follow)
    FOLLOWING = "following"  #: a mirror of the designated primary at its epoch: all is well
    UNFENCE = "unfence"  #: this node is the designated primary: writable
    SPLIT = "split"  #: fenced, and its tail after the new epoch's start diverges
    WAIT_CLOSED = "wait-closed"  #: fenced, and it follows once the image is closed
    BECOME_MIRROR = "become-mirror"  #: fenced, and becomes the designated primary's mirror
    REFETCH = "refetch"  #: a mirror that fetches from the designated primary instead
    EPOCH = "epoch"  #: a mirror of the designated primary that takes its epoch
    PROMOTE = "promote"  #: a mirror that holds the claim: the roles' watch promotes it


@dataclass(frozen=True)
class Decision:
    act: Act
    fence: str = ""  #: why this node refuses writes ("" : no fence to set)
    error: str = ""  #: what the follow step cannot do, and what to do ("" : nothing to say)


def decide(name: str, me: str, role: RoleRecord, d: Designation, *, head_lsn: int, opens: int,
           copying: bool) -> Decision:
    """What to do for volume ``name`` on node ``me`` given the designation ``d``."""
    if role.role == Role.PRIMARY:
        if d.node == me:
            return Decision(Act.UNFENCE)
        why = (f"volume {name}: node {d.node} is its designated primary (epoch {d.epoch}, from LSN "
               f"{d.start_lsn}); this node refuses writes: write on {d.node}")
        if head_lsn >= d.start_lsn:  # we wrote after the new epoch began: a divergent tail, kept
            return Decision(Act.SPLIT, why, (
                f"this node wrote LSN {d.start_lsn}-{head_lsn} after epoch {d.epoch} began on {d.node}: its tail "
                f"diverges and is kept (split brain); keep what you need, then resolve with: "
                f"marsfs invalidate {name}"))
        if opens:
            return Decision(Act.WAIT_CLOSED, why, (f"it follows {d.node} as a mirror once the image is closed "
                                                   f"here ({opens} handle(s): losetup -d)"))
        return Decision(Act.BECOME_MIRROR, why)
    if role.is_mirror and d.node == me:
        return Decision(Act.NOTHING if role.syncing else Act.PROMOTE)
    if role.is_mirror and not copying:
        if role.source != d.node:
            return Decision(Act.REFETCH)
        if role.epoch != d.epoch:
            return Decision(Act.EPOCH)
        return Decision(Act.FOLLOWING)
    return Decision(Act.NOTHING)
