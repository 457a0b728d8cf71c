"""Who a peer is: this node's id, and which peers' HELLOs this node accepts.

A node name is what the operator gives with ``--node``; two daemons given the same name (a copy
of the command line on another machine, a test node started twice) would otherwise both answer
for it, and the second one's connections would replace the first's (its hold on the log, its
mirror line). So every node also has a *node id*: random, made once when the state directory
is first used (``STATE/node-id``, mode 0600), the same across restarts, new only with a new
state directory. Every HELLO carries it (``Hello.node_id``).

Rules that hold here (the accept rule, :func:`refusal`, pure; :class:`Identities` keeps what it
needs and logs):

* A HELLO is refused when its node is in no peer list: neither this node's ``--peer`` list nor
  the cluster metadata (a node some member accepted, whose entries reached us) names it.
* A HELLO is refused when it claims this node's own name with another id.
* A HELLO is refused when it claims a name whose known id (the one this node last accepted
  for that name) is another, while that node is running (a connection of it is open here, or
  it was heard less than :data:`RECENT` seconds ago) or while the name holds a volume in the
  cluster metadata (a member that was not removed: its copy and the log held for it are the
  old node's). Otherwise the new id replaces the old (logged): a node replaced by a new
  machine or a new state directory is accepted once the old one is stopped, silent for
  :data:`RECENT` seconds and removed from its volumes (docs/runbook.md, "Replacing a node").
* An empty id is an id like any other (a HELLO that carries none claims no identity, and is
  refused where a node of that name with an id runs).
* A refusal is logged in one line without a traceback, at most once per :data:`LOG_EVERY`
  seconds per refused (name, id, reason); the lines left out are counted in the next one.
* Known ids are kept in memory only: after a restart the first node to speak for a name is
  known by its id (both copies of a name cannot be accepted at once either way).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from marsfs.errors import StateError
from marsfs.fsutil import write_atomic
from marsfs.node.logbook import LOG_EVERY, LogBook

logger = logging.getLogger(__name__)

NODE_ID_FILE = "node-id"
RECENT = 30.0  #: seconds after its last word that a node of a known id still counts as running
_ID = re.compile(r"[0-9a-f]{32}")


def load_node_id(state: Path) -> str:
    """This node's id from ``state/node-id``, made (random, mode 0600) if there is none."""
    path = state / NODE_ID_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        node_id = secrets.token_hex(16)
        write_atomic(path, (node_id + "\n").encode(), 0o600)
        return node_id
    if not _ID.fullmatch(text):
        raise StateError(f"{path}: not a node id (32 hex digits); remove the file to make a new one (the "
                         f"other nodes then take this node for a new one, see the runbook, 'Replacing a node')")
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)
    return text


def short(node_id: str) -> str:
    """An id as logs and messages show it (its first 8 digits)."""
    return node_id[:8] if node_id else "(none)"


@dataclass
class Seen:
    """The id this node last accepted for a name, and how lately it spoke."""

    node_id: str
    last: float  #: the clock's time of its last accepted HELLO or closed connection
    open: int = 0  #: its connections open here now


def refusal(name: str, node_id: str, *, me: str, my_id: str, listed: bool, seen: Seen | None,
            now: float, held: Sequence[str] = ()) -> tuple[str, str] | None:
    """Why a HELLO from ``name`` with ``node_id`` is refused (a code and a message that says what
    to do), or None to accept it. ``listed``: a peer list names ``name``; ``held``: the volumes
    ``name`` holds in the cluster metadata (see the module)."""
    if name == me and node_id != my_id:
        return ("node-identity", f"node {me} is this node (id {short(my_id)}); another daemon (id "
                                 f"{short(node_id)}) uses --node {me}: give it its own name")
    if name != me and not listed:
        return ("unknown-node", f"node {name} is in no peer list of the cluster (not in {me}'s --peer list, "
                                f"and no member that lists it spoke of it); to make it a member, start {me}'s "
                                f"daemon with --peer {name}=HOST:PORT")
    if seen is not None and seen.node_id != node_id and (seen.open > 0 or now - seen.last < RECENT):
        heard = "connected now" if seen.open else f"heard {now - seen.last:.0f} s ago"
        return ("node-identity", f"node {name} (id {short(seen.node_id)}) runs already ({heard}); this "
                                 f"connection claims the name {name} with id {short(node_id)}: two daemons "
                                 f"use --node {name}; stop one or give it its own name (a replaced node is "
                                 f"accepted {RECENT:.0f} s after the old one stopped)")
    if seen is not None and seen.node_id != node_id and held:
        vols = ", ".join(sorted(held))
        return ("node-identity", f"node {name} (id {short(seen.node_id)}) holds volume(s) {vols}; this connection "
                                 f"claims the name {name} with id {short(node_id)}: if the old {name} is gone for "
                                 f"good, remove it first (marsfs leave VOL --node {name} --force on a survivor, "
                                 f"for each of {vols}); else two daemons use --node {name}: stop one")
    return None


class Identities:
    """The known ids of the peers that spoke to this node, and the accept rule over them."""

    def __init__(self, me: str, my_id: str, listed: Callable[[str], bool],
                 clock: Callable[[], float], held: Callable[[str], Sequence[str]] = lambda name: ()) -> None:
        """``listed(name)``: a peer list names ``name``; ``clock``: monotonic seconds;
        ``held(name)``: the volumes ``name`` holds in the cluster metadata."""
        self.me = me
        self.held = held
        self.my_id = my_id
        self.listed = listed
        self.clock = clock
        self.seen: dict[str, Seen] = {}
        self._book = LogBook(clock, LOG_EVERY)  #: one line per (name, id, refusal) and minute

    def admit(self, name: str, node_id: str, where: str) -> tuple[str, str] | None:
        """Accept (and count as an open connection until :meth:`closed`) or refuse a HELLO
        from ``name`` with ``node_id``, which came from ``where`` (an address, for the log)."""
        now = self.clock()
        seen = self.seen.get(name)
        other = seen is not None and seen.node_id != node_id  # only then does what it holds count
        why = refusal(name, node_id, me=self.me, my_id=self.my_id, listed=self.listed(name), seen=seen, now=now,
                      held=self.held(name) if other else ())
        if why is not None:
            self._log(name, node_id, where, why, now)
            return why
        if seen is None or seen.node_id != node_id:
            if seen is not None:
                logger.info("node %s speaks with a new node id %s (it was %s, silent for %.0f s): taken for "
                            "a replaced node", name, short(node_id), short(seen.node_id), now - seen.last)
            seen = self.seen[name] = Seen(node_id, now)
        seen.open += 1
        seen.last = now
        return None

    def closed(self, name: str, node_id: str) -> None:
        """An accepted connection of ``name`` with ``node_id`` ended."""
        seen = self.seen.get(name)
        if seen is not None and seen.node_id == node_id:
            seen.open = max(0, seen.open - 1)
            seen.last = self.clock()

    def _log(self, name: str, node_id: str, where: str, why: tuple[str, str], now: float) -> None:
        more = self._book.due((name, node_id, why[0]))
        if more is not None:
            logger.warning("refused a connection from %s (node %s, id %s): %s%s", where or "?", name, short(node_id),
                           why[1], more)
