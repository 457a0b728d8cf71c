"""Who may ask this node what about a volume: the members rule, and its log.

The gate (:mod:`marsfs.node.identity`) decides who may speak at all: a node that a peer list of
the cluster names, and one daemon per name (with TLS, the name its certificate gives). This
module decides, for every HELLO about a volume this node has, whether that node may ask it.

Rules that hold here (the rule, :func:`refusal`, pure; :class:`Access` asks it and logs):

* Everything about a volume V (want ``fetch``, ``sync``, ``sums``, ``leave``, ``handover``,
  ``compare``, ``position``, and any want a newer peer may send) is answered only for a
  *member* of V as this node knows it (:meth:`marsfs.node.cluster.Cluster.members_of`): a node
  the cluster metadata counts as a member (it published a position for V, or is its
  designated primary), a mirror this node serves V to (its peer table, and the holds on V's
  log, which are persisted), or this node's own source of V; minus the nodes removed from V
  (``leave --node --force``) that have not spoken of V since.
* The one exception is the way in: a fast sync whose HELLO says ``join`` (the operator ran
  ``marsfs join V`` on that node, :attr:`~marsfs.replication.protocol.Hello.join`). The node
  that serves it records the joiner as its mirror at once (peer table and a hold on the log),
  so from its first SYNC_REQUEST on the joiner is a member here, for every later fetch,
  leave, handover or comparison, with no gossip round in between.
* Metadata (want ``meta``) is about no volume: the gate's rule is all (a *peer* is a node some
  ``--peer`` list of the cluster names, here or, through the metadata it owns, on a node
  that accepted it).
* A refusal is ERROR ``not-a-member``, whose message names the members this node knows and the
  command that makes the node one. It is logged as one WARNING line, without a traceback, at
  most once per :data:`LOG_EVERY` seconds per (node, volume); the lines left out are counted
  in the next one.

What it does not hold against: every node with a certificate of the cluster CA may join any
volume (as in MARS), and the metadata is not signed, so a certified node that lies in it (a
position for a volume it does not hold) is taken for a member. The rule keeps a volume's
image, log, sums and role changes from every node that neither holds it nor joined it, and
makes every node that reads a volume show up as its member.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from marsfs.node.logbook import LOG_EVERY, LogBook
from marsfs.replication.protocol import Error, Hello
from marsfs.volume import Volume

logger = logging.getLogger(__name__)

SHOWN = 8  #: members named in a refusal at most

#: what each want asks for, in the words of a refusal
_ASKS = {
    "fetch": "its log", "sync": "its image", "sums": "its block sums (verify)", "leave": "its mirror list",
    "handover": "a handover", "compare": "its history (split-brain comparison)",
    "position": "its position (forced failover)",
}


def refusal(node: str, volume: str, want: str, *, me: str, members: Collection[str], join: bool
            ) -> tuple[str, str] | None:
    """Why ``node``'s HELLO for ``want`` of ``volume`` is refused here (a code and a message that
    says what to do), or None to answer it. ``members``: V's members as node ``me`` knows
    them; ``join``: the HELLO says it is a join's fast sync."""
    if node in members or (join and want == "sync"):
        return None
    names = sorted(members)
    shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
    asks = _ASKS.get(want, f"{want!r}")
    return ("not-a-member", f"node {node} is not a member of volume {volume} as node {me} knows it (members: "
                            f"{shown or 'none'}), and only members may ask for {asks}; to make {node} a mirror "
                            f"of {volume}, run on {node}: marsfs join {volume} --from {me}")


class Access:
    """This node's authorization of HELLOs about its volumes (the server's ``authorize``)."""

    def __init__(self, me: str, members: Callable[[Volume], Collection[str]], clock: Callable[[], float]) -> None:
        """``members(vol)``: the members of ``vol`` as this node knows them (see the module);
        ``clock``: monotonic seconds, for the log's rate limit."""
        self.me = me
        self.members = members
        self.clock = clock
        self.refused = 0  #: HELLOs refused since start
        self._book = LogBook(clock, LOG_EVERY)  #: one line per (node, volume) and minute

    def authorize(self, hello: Hello, vol: Volume) -> Error | None:
        """None to answer ``hello`` about ``vol``, else the ERROR that refuses it (logged)."""
        why = refusal(hello.node, vol.name, hello.want, me=self.me, members=self.members(vol), join=hello.join)
        if why is None:
            return None
        self.refused += 1
        self._log(hello.node, vol.name, why[1])
        return Error(code=why[0], error=why[1])

    def _log(self, node: str, volume: str, why: str) -> None:
        more = self._book.due((node, volume))
        if more is not None:
            logger.warning("refused node %s for volume %s: %s%s", node, volume, why, more)
