"""Handover and fork finding: the two short conversations a change of primary needs.

Rules that hold here:

* ``want=handover`` (the client is a mirror that wants to become primary, the server is the
  primary it fetches from). The server answers HANDOVER_PREPARE only after its host fenced the
  volume (no open handle, no new opens) and made its log durable: HANDOVER_READY names that
  durable head and its chain, and nothing is written after it. The client fetches up to that
  head on its ordinary fetch connection, checks the chain, claims the volume for the next
  epoch and says HANDOVER_END. A prepare that is not followed by a claim does not fence the
  primary for ever: the server's host unfences it after the PREPARE's ``timeout`` unless it
  learned of the claim (the END, or the cluster metadata) in the meantime; an END that says
  the client gave up unfences it at once.
* ``want=compare`` (a fetch was refused as ``diverged``): the client sends its chain hashes at
  up to :data:`~marsfs.replication.protocol.MAX_CHAINS` LSNs; the server answers with its own at
  those it holds. Two histories agree up to LSN n exactly when their chains at n agree, so the
  LSNs where they agree are all below the ones where they differ, and each round narrows the
  interval (:class:`ForkSearch`) until the fork (the last LSN both share) is known, or no LSN
  both logs still hold is left to compare (then the fork is "at or before" the lowest one).
  The last CHAINS of each side (``done``) carries the fork and that side's tail after it, so
  both sides record the same split brain.
* ``want=position`` (a forced failover, before it claims): the client names its durable head
  and the chain there; the server says how its own history relates (:func:`position_told`):
  whether that LSN is on its chain, and how many records and bytes of log it holds beyond it.
  Only ``ahead`` (and ``trimmed``, which is further ahead still) is something the asker would lose.
* Everything here is pure except the two ``serve_*``/``ask_*`` pairs at the end, which only
  move messages; what a fence means, what a claim changes and where a split brain is kept is
  the host's (:class:`HandoverHost`, the node's cluster layer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from marsfs.errors import ProtocolError
from marsfs.replication.channel import Channel
from marsfs.replication.protocol import (
    MAX_CHAINS,
    Chains,
    Error,
    HandoverEnd,
    HandoverPrepare,
    HandoverReady,
    Message,
    PositionAsk,
    PositionTold,
)

PREPARE_TIMEOUT = 30.0  #: seconds a primary stays fenced after a prepare that no claim followed
ROUNDS_MAX = 16  #: compare rounds before a peer that never narrows the interval is dropped


# ---------------------------------------------------------------------------- fork finding


@dataclass(frozen=True, slots=True)
class Fork:
    """Where two histories part: the last LSN both share (``exact``), or, when no LSN both logs
    still hold agrees, an LSN the fork is at or before."""

    lsn: int
    exact: bool


class ChainSource(Protocol):
    """What fork finding reads of a log (``marsfs.log.Log`` satisfies it)."""

    @property
    def first_lsn(self) -> int: ...
    @property
    def last_lsn(self) -> int: ...
    def chain_at(self, lsn: int) -> bytes: ...


class ForkSearch:
    """The asking side's bisection over LSNs. ``hints``: LSNs likely to be the fork (the newer
    epoch's start LSN minus one), compared in the first round.

    Invariant: histories agree at ``lo`` (or ``lo`` is None: no agreement seen yet) and differ
    at ``hi``; ``lo < hi``."""

    def __init__(self, log: ChainSource, their_head: int, hints: Sequence[int] = ()) -> None:
        self.log = log
        self.low_end = log.first_lsn - 1  #: the lowest LSN whose chain we know
        self.lo: int | None = None
        # the histories differ at our head or theirs (else the fetch would have been admitted)
        self.hi = min(log.last_lsn, their_head) + 1
        self.hints = [h for h in hints if self.low_end <= h < self.hi]
        self.lowest_answered: int | None = None
        self._stuck = False

    @property
    def fork(self) -> Fork | None:
        """The answer, once known."""
        if self.lo is not None and self.hi == self.lo + 1:
            return Fork(self.lo, True)
        if self._stuck:  # a bound: the fork is at or before it, and never past either head
            if self.lo is not None:  # they agree at lo, nothing up to hi was answered: it lies in [lo, hi)
                return Fork(self.hi - 1, False)
            lowest = self.lowest_answered if self.lowest_answered is not None else self.low_end + 1
            return Fork(max(0, min(lowest, self.hi) - 1), False)
        return None

    def probe(self) -> list[int]:
        """The LSNs to compare next (ascending, at most MAX_CHAINS)."""
        assert self.fork is None
        bottom = self.low_end if self.lo is None else self.lo + 1
        top = self.hi - 1
        n = top - bottom + 1
        if n <= 0:
            self._stuck = True
            return []
        want = {n for h in self.hints for n in (h, h + 1) if bottom <= n <= top}  # agree at h, differ after
        self.hints = []
        slots = MAX_CHAINS - len(want)
        if n <= slots:
            want.update(range(bottom, top + 1))
        else:
            want.update(bottom + (n - 1) * i // (slots - 1) for i in range(slots))
        return sorted(want)[:MAX_CHAINS]

    def answered(self, asked: Sequence[int], lsns: Sequence[int], chains: Sequence[bytes],
                 ours: Callable[[int], bytes]) -> None:
        """Their chains at ``lsns`` (a subset of ``asked``: the ones they hold)."""
        if not set(lsns) <= set(asked):
            raise ProtocolError("CHAINS: field 'lsns' names LSNs that were not asked for")
        if not lsns:
            self._stuck = True  # they hold none of these: no LSN in range both logs hold
            return
        for lsn, chain in zip(lsns, chains):
            self.lowest_answered = lsn if self.lowest_answered is None else min(self.lowest_answered, lsn)
            if ours(lsn) == chain:
                if self.lo is None or lsn > self.lo:
                    self.lo = lsn
            elif lsn < self.hi:
                self.hi = lsn
        if self.lo is not None and self.lo >= self.hi:
            raise ProtocolError(f"CHAINS: chains agree at LSN {self.lo} but differ at {self.hi} below it")
        if self.lo is None and min(lsns) <= self.low_end:
            self._stuck = True  # they differ even at the lowest LSN we know


def chains_at(log: ChainSource, lsns: Sequence[int]) -> tuple[bytes, ...]:
    return tuple(log.chain_at(n) for n in lsns)


def tail(log: ChainSource, fork: int, bytes_between: Callable[[int, int], int]) -> tuple[int, int]:
    """(records, bytes) a log holds after ``fork``."""
    return max(0, log.last_lsn - fork), bytes_between(max(fork, log.first_lsn - 1), log.last_lsn)


def position_told(log: ChainSource, bytes_between: Callable[[int, int], int], stamp: Callable[[int], float],
                  durable_lsn: int, replayed_lsn: int, ask: PositionAsk) -> PositionTold:
    """How this side's history (``log``, durable up to ``durable_lsn``) relates to the asker's
    durable head ``ask.lsn`` with chain ``ask.chain``, and what it holds beyond it; ``stamp``
    is the wall time of a record (reads the log: call in a worker thread)."""
    def told(relation: str, after: int = 0) -> PositionTold:
        """The answer; ``after``: the LSN after which our records count (none when not given)."""
        if relation not in ("ahead", "trimmed"):
            return PositionTold(relation=relation, durable_lsn=durable_lsn, replayed_lsn=replayed_lsn, records=0,
                                bytes=0)
        held = range(log.first_lsn, log.last_lsn + 1)  # a log restarted by a resync may hold none
        return PositionTold(relation=relation, durable_lsn=durable_lsn, replayed_lsn=replayed_lsn,
                            records=durable_lsn - ask.lsn, bytes=bytes_between(after, durable_lsn),
                            oldest=stamp(after + 1) if after + 1 in held else 0.0,
                            newest=stamp(durable_lsn) if durable_lsn in held else 0.0)

    if ask.lsn > log.last_lsn:
        return told("behind")
    if ask.lsn < log.first_lsn - 1:
        return told("trimmed", log.first_lsn - 1)
    if log.chain_at(ask.lsn) != ask.chain:
        return told("diverged")
    if durable_lsn <= ask.lsn:
        return told("same")
    return told("ahead", ask.lsn)


# ---------------------------------------------------------------------------- conversations


@dataclass(frozen=True, slots=True)
class SplitSeen:
    """A split brain as one side found it: with ``peer``, fork at ``fork``; ``ours`` and
    ``theirs``: (records, bytes) each side wrote after it."""

    peer: str
    fork: Fork
    ours: tuple[int, int]
    theirs: tuple[int, int]


class HandoverHost(Protocol):
    """What the serving side of a handover asks of its node (the cluster layer)."""

    async def prepare_handover(self, volume: str, peer: str, req: HandoverPrepare) -> HandoverReady | Error: ...
    async def end_handover(self, volume: str, peer: str, end: HandoverEnd | None) -> None: ...


async def serve_handover(ch: Channel, host: HandoverHost, volume: str, peer: str) -> None:
    """The primary's side of ``want=handover``, after WELCOME. An END that never comes (the
    connection drops) is reported as ``None``: the host decides from its timeout."""
    req = await ch.receive_message()
    if not isinstance(req, HandoverPrepare):
        raise ProtocolError(f"{req.TYPE.name} is not allowed before HANDOVER_PREPARE")
    answer = await host.prepare_handover(volume, peer, req)
    await ch.send_message(answer)
    if isinstance(answer, Error):
        return
    end: HandoverEnd | None = None
    try:
        with trio.move_on_after(req.timeout):
            msg = await ch.receive_message()
            if not isinstance(msg, HandoverEnd):
                raise ProtocolError(f"{msg.TYPE.name} is not allowed after HANDOVER_READY")
            end = msg
    finally:
        with trio.CancelScope(shield=True):
            await host.end_handover(volume, peer, end)


async def serve_compare(ch: Channel, log: ChainSource, bytes_between: Callable[[int, int], int],
                        peer: str, found: Callable[[SplitSeen], None]) -> None:
    """The answering side of ``want=compare``, after WELCOME: our chains at the LSNs asked for
    that we hold; at the asker's last message, record the split and name our tail."""
    for _ in range(ROUNDS_MAX + 1):
        msg = await ch.receive_message()
        if not isinstance(msg, Chains):
            raise ProtocolError(f"{msg.TYPE.name} is not allowed in a compare conversation")
        if msg.done:
            ours = await trio.to_thread.run_sync(tail, log, msg.fork_lsn, bytes_between)
            found(SplitSeen(peer, Fork(msg.fork_lsn, msg.exact), ours,
                            (msg.tail_records, msg.tail_bytes)))
            await ch.send_message(Chains(lsns=(), chains=(), head_lsn=log.last_lsn, done=True,
                                         fork_lsn=msg.fork_lsn, tail_records=ours[0], tail_bytes=ours[1]))
            return
        held = tuple(n for n in msg.lsns if log.first_lsn - 1 <= n <= log.last_lsn)
        chains = await trio.to_thread.run_sync(chains_at, log, held)
        await ch.send_message(Chains(lsns=held, chains=chains, head_lsn=log.last_lsn))
    raise ProtocolError(f"compare conversation longer than {ROUNDS_MAX} rounds")


async def ask_compare(ch: Channel, log: ChainSource, bytes_between: Callable[[int, int], int], peer: str,
                      their_head: int, hints: Sequence[int] = ()) -> SplitSeen:
    """The asking side of ``want=compare``, after WELCOME: find the fork, tell the other side."""
    search = ForkSearch(log, their_head, hints)
    for _ in range(ROUNDS_MAX):
        if search.fork is not None:
            break
        asked = search.probe()
        if not asked:
            break
        chains = await trio.to_thread.run_sync(chains_at, log, asked)
        await ch.send_message(Chains(lsns=tuple(asked), chains=chains, head_lsn=log.last_lsn))
        reply = await _chains(ch)
        search.answered(asked, reply.lsns, reply.chains, log.chain_at)
    fork = search.fork
    if fork is None:
        raise ProtocolError(f"no fork found with {peer} in {ROUNDS_MAX} rounds")
    ours = await trio.to_thread.run_sync(tail, log, fork.lsn, bytes_between)
    await ch.send_message(Chains(lsns=(), chains=(), head_lsn=log.last_lsn, done=True, fork_lsn=fork.lsn,
                                 exact=fork.exact, tail_records=ours[0], tail_bytes=ours[1]))
    reply = await _chains(ch)
    if not reply.done:
        raise ProtocolError("CHAINS: the answer to the last CHAINS is not marked done")
    return SplitSeen(peer, fork, ours, (reply.tail_records, reply.tail_bytes))


async def _chains(ch: Channel) -> Chains:
    msg: Message = await ch.receive_message()
    if isinstance(msg, Error):
        raise ProtocolError(f"peer refused the comparison: {msg.error}")
    if not isinstance(msg, Chains):
        raise ProtocolError(f"{msg.TYPE.name} is not allowed in a compare conversation")
    return msg


async def serve_position(ch: Channel, answer: Callable[[PositionAsk], PositionTold]) -> None:
    """The answering side of ``want=position``, after WELCOME: one POSITION_ASK, one POSITION
    (``answer`` runs in a worker thread: it reads the log)."""
    msg = await ch.receive_message()
    if not isinstance(msg, PositionAsk):
        raise ProtocolError(f"{msg.TYPE.name} is not allowed in a position conversation")
    await ch.send_message(await trio.to_thread.run_sync(answer, msg))


async def ask_position(ch: Channel, lsn: int, chain: bytes) -> PositionTold:
    """The asking side of ``want=position``, after WELCOME."""
    await ch.send_message(PositionAsk(lsn=lsn, chain=chain))
    msg = await ch.receive_message()
    if isinstance(msg, Error):
        raise ProtocolError(f"peer refused to tell its position: {msg.error}")
    if not isinstance(msg, PositionTold):
        raise ProtocolError(f"{msg.TYPE.name} is not allowed in a position conversation")
    return msg
