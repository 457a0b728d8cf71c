"""Changes of primary: planned handover, forced failover, and finding a split brain.

Rules that hold here (G7):

* Only a mirror becomes primary, and only through :class:`Roles`: ``marsfs primary VOL``
  (:meth:`Roles.take_over`) is a planned handover, ``--force`` (:meth:`Roles.fail_over`) a
  failover. Both refuse, changing nothing, on a node that is already primary, still copying
  its image, in a split brain, failed, in need of a resync or resyncing (the copy is not
  whole: :func:`~marsfs.node.volstate.promotion_refusal`); a handover also while paused. The
  reasons say what to do.
* A planned handover loses nothing: the old primary is fenced (it refuses while the image is
  open, and serves no open from then on) and flushes before it names its durable head; this
  node fetches up to that head on its ordinary fetch connection, checks the chain there, stops
  fetching, raises the epoch (the claim starts at head + 1) and only then becomes writable.
  Anything that fails before the claim ends the handover: the old primary is told and
  unfenced, and this node stays its mirror. The old primary unfences itself after
  :data:`~marsfs.replication.handover.PREPARE_TIMEOUT` if no claim came (a lost connection).
* A forced failover is for a primary that cannot be reached: it is refused while the primary
  answers. It first asks every other reachable member what it holds beyond this node's
  durable head (``want=position``); when one holds more of the same history it is refused,
  naming the one that holds most and how much, unless the operator accepts the loss
  (``--accept-loss``). This node then becomes primary with what it has, and records what is
  lost: measured from the best position it learnt (exact for what a reachable member holds),
  and beyond that as its fetch last heard of the primary ("at least": the primary may have
  gone on writing after its last word). ``status`` shows it, and what it means for writes the
  primary acknowledged (:func:`acknowledged`, from the mode its heartbeats said): "nothing
  acknowledged lost" only when that is proven (sync with ``refuse``), otherwise how many known
  and why more may be (async, degraded since T, or a sync primary that may have degraded after
  its last word).
* In a split brain with the designated primary, ``--force`` on the other side (a mirror of
  it, or a former primary it fenced) is how the operator keeps that side instead: the
  designated primary answers, but a planned handover cannot join two histories. This node
  claims the next epoch (a former primary keeps its role and loses its fence); the other
  side is fenced by the claim, and ``invalidate`` there keeps its writes as a split version
  and resyncs it from this node.
* A split brain is found from chain hashes: when a fetch is refused as ``diverged`` this node
  and its source compare chains (:mod:`marsfs.replication.handover`), and both record the fork
  LSN and each side's tail after it (:meth:`Node.record_split`). Replication between them stays
  stopped, and nothing resolves it by itself: ``marsfs invalidate`` on the losing node does.
* A failover's loss never claims more certainty than this node has: it says how long before
  the failover this node last heard from the old primary ("no loss known; last heard ... N s
  before this failover", never "nothing lost"), since heartbeats come every half second and
  a primary may write up to its death; it is exact only when that last word was the old
  primary's goodbye at a clean stop (``FetchState.final``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any

import trio

from marsfs.aio import describe
from marsfs.errors import InvalidRequest, MarsError, PeerError, ProtocolError, StateError, VolumeBusy, WrongRole
from marsfs.node import status
from marsfs.node.follow import Act, decide
from marsfs.node.mirrors import Mirrors, Spawn
from marsfs.node.node import Node
from marsfs.node.peers import Peers
from marsfs.node.state import FailoverLoss, HandoverStatus, SplitBrain
from marsfs.node.syncmode import MAX_MIRRORS
from marsfs.node.volstate import SYNCS, Role, Verdict, VolumeState, promotion_refusal
from marsfs.replication.channel import Channel, ConnectionLost, PeerRefused
from marsfs.replication.fetch import PeerChannel, ResyncPlan, hello, open_channel
from marsfs.replication.handover import (
    PREPARE_TIMEOUT,
    SplitSeen,
    ask_compare,
    ask_position,
    position_told,
    serve_compare,
    serve_handover,
    serve_position,
)
from marsfs.replication.protocol import (
    Error,
    HandoverEnd,
    HandoverPrepare,
    HandoverReady,
    Hello,
    PositionAsk,
    PositionTold,
)
from marsfs.replication.session import SyncWord
from marsfs.units import human_bytes
from marsfs.volume import Volume
from marsfs.volume.splits import save_split

logger = logging.getLogger(__name__)

FOLLOW_WAIT = 10.0  #: seconds a handover waits for the old primary to say it follows
WATCH_EVERY = 1.0  #: seconds between looks at what the metadata asks of roles here
CATCH_UP_MARGIN = 5.0  #: seconds of the old primary's fence kept back for the claim after catching up
COMPARE_TRIES = 5  #: attempts at comparing chains with a source that refused us as diverged
SURVEY_TIMEOUT = 5.0  #: seconds a forced failover waits for one member's position


def tail_extents(vol: Volume, fork_lsn: int) -> list[tuple[int, int]] | None:
    """The byte ranges ``(offset, length)`` of ``vol`` that its records after ``fork_lsn``
    wrote, merged and sorted: what a resync after a split brain has to copy for this side's
    tail. None when the log no longer holds the record after the fork (then copy everything)."""
    return vol.extents_between(fork_lsn, vol.head_lsn)


def measured(loss: FailoverLoss, node: str, told: PositionTold) -> FailoverLoss:
    """``loss`` (as the source's last word told it) measured from ``node``'s position: what
    ``node`` holds beyond us is known exactly; only what the source's last word showed beyond
    that stays "at least"."""
    records = max(loss.records, told.records)
    nbytes = max(loss.bytes, told.bytes)
    oldest = min(t for t in (loss.oldest, told.oldest) if t) if (loss.oldest or told.oldest) else 0.0
    newest = max(loss.newest, told.newest)
    return replace(loss, records=records, bytes=nbytes, oldest=oldest, newest=newest, held_by=node,
                   held_records=told.records, held_bytes=told.bytes)


def acknowledged(loss: FailoverLoss, word: SyncWord | None, ours: int, unanswered: int, held_more: bool
                 ) -> FailoverLoss:
    """``loss`` with what it means for the writes the source acknowledged, from the source's
    last heartbeat (``word``; None: never heard). ``ours``: our durable LSN (what the new
    history keeps); ``unanswered``: how many of the source's other mirrors did not answer the
    survey; ``held_more``: one that answered holds more than we do (the loss was accepted).

    Nothing acknowledged is lost provably only with ``refuse``: such a primary never completes
    a flush that fewer than N mirrors hold, so each acknowledged write is on N mirrors; with
    fewer than N unasked and none holding more than us, we hold it. Without ``refuse`` a
    primary cut off from its mirrors degrades after its timeout and goes on acknowledging."""
    if word is None:
        return loss
    lost = max(0, word.acked_lsn - ours)
    proven = (word.mode == "sync" and word.refuse and not word.degraded_since and not held_more
              and unanswered < word.mirrors and not lost)
    return replace(loss, mode=word.mode, mirrors=word.mirrors, refuse=word.refuse,
                   degraded_since=word.degraded_since, acked_lsn=word.acked_lsn, acked_lost=lost,
                   nothing_acked_lost=proven)


class Roles:
    """The role changes of one node's volumes; part of its :class:`~marsfs.node.cluster.Cluster`."""

    def __init__(self, node: Node, cluster: str, peers: Peers, mirrors: Mirrors, *, spawn: Spawn,
                 gossip_now: Callable[[], None], known: Callable[[], Iterable[str]] = tuple,
                 introduce: Callable[[str], Awaitable[None]] | None = None) -> None:
        """``cluster`` is the cluster's name (for the hellos); ``mirrors`` the node's fetchers,
        which a change of primary stops and starts; ``gossip_now`` spreads a claim at once;
        ``known`` names the peers this node was told of (a forced failover asks them too: one
        that has not gossiped yet may still hold more); ``introduce(peer)`` tells ``peer`` what
        this node holds before it is asked about a volume (it answers members only, and this
        node may have joined a moment ago: :meth:`marsfs.node.cluster.Cluster.introduce`)."""
        self.known = known
        self.introduce = introduce
        self.node = node
        self.cluster = cluster
        self.peers = peers
        self.mirrors = mirrors
        self.spawn = spawn
        self.gossip_now = gossip_now
        #: handovers in progress on this node (the new primary's side), by volume
        self.progress: dict[str, HandoverStatus] = {}
        #: old primaries' side: volume -> (new primary, epoch) once the handover was claimed
        self.handed_over: dict[str, tuple[str, int]] = {}
        self._comparing: set[str] = set()  #: volumes whose fork is being looked for by watch()

    # ------------------------------------------------------------------ the new primary's side

    def _check_mirror(self, name: str, command: str, *, choose_side: bool = False) -> tuple[Volume, str, Verdict]:
        """The volume, its source and its state's verdict, if this node may take ``name`` over
        (else the reason). ``choose_side``: a split brain with the source is no refusal (a
        forced failover keeps this node's side of it)."""
        copy = self.mirrors.copies.get(name)
        if copy is not None and name not in self.node.volumes:
            raise VolumeBusy(f"volume {name!r} is still being copied from {copy.source} (syncing); wait until "
                             f"marsfs status {name} shows it catching-up or synced, then run {command}")
        vol = self.node.volume(name)
        role = self.node.role(name)
        if role.role == Role.CLONE:
            raise WrongRole(f"volume {name!r} is a local clone on node {self.node.name}: it is writable here "
                            "already and never replicated")
        if not role.is_mirror:
            designated = self._fenced_side(name)
            if designated is not None:
                raise StateError(f"volume {name!r} on node {self.node.name} is a former primary in a split brain "
                                 f"with {designated}, the designated primary: marsfs primary {name} --force here keeps "
                                 f"this side (then marsfs invalidate {name} on {designated}), marsfs invalidate "
                                 f"{name} here keeps {designated}'s")
            raise WrongRole(f"volume {name!r} is already primary on node {self.node.name}: nothing to do")
        verdict = status.verdict(self.node, name, status.mirror_side(self.mirrors, name, trio.current_time()))
        splits = self.node.splits(name)
        with_source = any(sp.peer == role.source for sp in splits)
        if choose_side and with_source:
            return vol, role.source, verdict  # its fetch is refused as diverged: that is the split brain
        if VolumeState.SPLIT_BRAIN in verdict.conditions:
            keep = f", or marsfs primary {name} --force here to keep this side" if with_source else ""
            raise StateError(f"volume {name!r} on node {self.node.name} is in a split brain with "
                             f"{splits[0].peer if splits else role.source}; resolve it first (marsfs invalidate "
                             f"{name} on the side whose writes are to be discarded{keep})")
        refusal = promotion_refusal(verdict, name, self.node.name, role.source)
        if refusal is not None:
            state, why = refusal
            raise (VolumeBusy if state in SYNCS else StateError)(why)
        return vol, role.source, verdict

    async def take_over(self, name: str) -> dict[str, Any]:
        """Planned handover of ``name`` to this node: returns once it is primary and writable."""
        vol, source, verdict = self._check_mirror(name, f"marsfs primary {name}")
        role = self.node.role(name)
        if VolumeState.FETCH_PAUSED in verdict.conditions:
            raise VolumeBusy(f"the fetch of {name!r} is paused on node {self.node.name}: a handover fetches "
                             f"everything first; run marsfs resume-fetch {name}, then marsfs primary {name}")
        if name in self.progress:
            raise VolumeBusy(f"a change of the primary of {name!r} to this node is already in progress")
        connect = self.peers.connector(source)
        started = self._newest_epoch(name)  #: the claim holds only if no other claim came since
        self.progress[name] = HandoverStatus(source, "preparing", None)
        try:
            ch, _ = await open_channel(connect, hello(self.node.name, self.cluster, name, "handover",
                                                      role.epoch, node_id=self.node.node_id))
        except PeerRefused as e:
            self.progress.pop(name, None)
            raise PeerError(f"{source} refused the handover of {name}: {e.message}") from None
        except (OSError, trio.TooSlowError, ConnectionLost) as e:
            self.progress.pop(name, None)
            raise PeerError(self._unreachable(name, source, describe(e))) from None
        claimed = False
        why = "the handover failed"
        epoch, start = role.epoch + 1, vol.head_lsn + 1
        try:
            ready = await self._prepare(ch, name, source, role.epoch)
            self.progress[name] = HandoverStatus(source, "fetching", max(0, ready.head_lsn - vol.durable_lsn))
            await self._catch_up(vol, name, source, ready)
            self._check_unclaimed(name, started)
            epoch, start = max(self._newest_epoch(name), ready.epoch) + 1, ready.head_lsn + 1
            self.progress[name] = HandoverStatus(source, "claiming", 0)
            await self.mirrors.stop(name)
            await self._claim(name, epoch, start)
            claimed = True
            await trio.to_thread.run_sync(self.node.promote, name, epoch)
        except MarsError as e:
            why = describe(e)
            if not claimed:
                self._resume_fetch(vol)
            raise
        except (ConnectionLost, trio.TooSlowError) as e:
            why = describe(e)
            if not claimed:
                self._resume_fetch(vol)
            raise PeerError(f"the handover of {name} from {source} broke off: {why}; nothing changed (this node "
                            f"still mirrors {source}); run marsfs primary {name} again") from None
        finally:
            self.progress.pop(name, None)
            with trio.CancelScope(shield=True):
                await self._end(ch, name, claimed, epoch, start, why)
        logger.info("handover of %s from %s done: primary here from LSN %d, epoch %d", name, source, start, epoch)
        follows = await self._await_follow(name, source)
        return {"volume": name, "from": source, "epoch": epoch, "start_lsn": start, "lost": 0, "follows": follows}

    def _check_unclaimed(self, name: str, started: int) -> None:
        """Refuse the claim when another node claimed ``name`` after epoch ``started`` (the
        newest this handover knew when it began): that node won; claiming over it would
        override a change of primary that was already reported as done."""
        d = self.node.meta.designated(name)
        if d is not None and d.node != self.node.name and d.epoch > started:
            raise StateError(f"{d.node} became the primary of {name} (epoch {d.epoch}) while this handover ran: "
                             f"{d.node} won; nothing changed here (this node stays a mirror); to move the primary "
                             f"here after all, run marsfs primary {name} again")

    async def _await_follow(self, name: str, source: str) -> bool:
        """Whether ``source`` published, within FOLLOW_WAIT seconds, that it follows this node."""
        with trio.move_on_after(FOLLOW_WAIT):
            while True:
                p = self.node.meta.position(source, name)
                if p is not None and p.role == Role.MIRROR.value and p.source == self.node.name:
                    return True
                await trio.sleep(0.05)
        return False

    def _resume_fetch(self, vol: Volume) -> None:
        """A change of primary failed before its claim: this node goes on mirroring."""
        if vol.name not in self.mirrors.fetchers and self.node.is_mirror(vol.name):
            self.mirrors.start(vol)

    async def _prepare(self, ch: PeerChannel, name: str, source: str, epoch: int) -> HandoverReady:
        await ch.send_message(HandoverPrepare(epoch=epoch, timeout=PREPARE_TIMEOUT))
        with trio.fail_after(PREPARE_TIMEOUT):
            reply = await ch.receive_message()
        if isinstance(reply, Error):
            cls = VolumeBusy if reply.code == "busy" else PeerError
            raise cls(f"{source} refused the handover of {name}: {reply.error}")
        if not isinstance(reply, HandoverReady):
            raise ProtocolError(f"{reply.TYPE.name} is not allowed after HANDOVER_PREPARE")
        return reply

    async def _catch_up(self, vol: Volume, name: str, source: str, ready: HandoverReady) -> None:
        """Wait until our log holds the old primary's head (fetched, durable, same chain)."""
        deadline = trio.current_time() + PREPARE_TIMEOUT - CATCH_UP_MARGIN
        while vol.durable_lsn < ready.head_lsn:
            fetcher = self.mirrors.fetchers.get(name)
            if fetcher is None or fetcher.state.fatal:
                why = fetcher.state.error if fetcher is not None else "no fetch runs"
                raise PeerError(f"the fetch from {source} stopped during the handover of {name}: {why}")
            if trio.current_time() > deadline:
                raise PeerError(f"the handover of {name} from {source} timed out with "
                                f"{ready.head_lsn - vol.durable_lsn} records still to fetch; wait until "
                                f"marsfs wait {name} --synced succeeds, then run marsfs primary {name} again")
            self.progress[name] = HandoverStatus(source, "fetching", ready.head_lsn - vol.durable_lsn)
            await trio.sleep(0.02)
        chain = await trio.to_thread.run_sync(vol.log.chain_at, ready.head_lsn)
        if vol.head_lsn != ready.head_lsn or chain != ready.chain:
            raise StateError(f"this node's log of {name} does not end where {source}'s does (LSN "
                             f"{ready.head_lsn}): the histories diverged; nothing was changed")

    async def _end(self, ch: Channel, name: str, claimed: bool, epoch: int, start: int, why: str) -> None:
        try:
            with trio.move_on_after(5.0):
                await ch.send_message(HandoverEnd(claimed=claimed, epoch=epoch, start_lsn=start,
                                                  reason="" if claimed else why))
        except ConnectionLost as e:
            logger.info("could not tell the old primary how the handover of %s ended: %s", name, describe(e))
        finally:
            await ch.aclose()

    async def _claim(self, name: str, epoch: int, start: int) -> None:
        """Claim ``name`` for ``epoch`` from ``start`` in the cluster metadata (persisted before
        this node is promoted: a crash in between is finished at the next start, see
        :meth:`watch`), and spread it at once."""
        await trio.to_thread.run_sync(functools.partial(self.node.meta.claim, name, self.node.name, epoch,
                                                        start_lsn=start))
        self.gossip_now()

    def _unreachable(self, name: str, source: str, why: str) -> str:
        loss = self._loss(name, source)
        fetcher = self.mirrors.fetchers.get(name)
        word = fetcher.state.primary_sync if fetcher is not None else None
        # before the survey nothing is proven: say what its last word tells (the --force says more)
        acked = acknowledged(loss, word, self.node.volume(name).durable_lsn, MAX_MIRRORS, False).acknowledged()
        return (f"cannot reach {source}, the primary of {name} ({why}); a planned handover needs it. Wait for it, "
                f"or if it is lost: marsfs primary {name} --force makes this node primary with what it has, "
                f"losing what it did not fetch: {loss.describe_risk()}{'; ' + acked if acked else ''}")

    async def fail_over(self, name: str, *, accept_loss: bool = False) -> dict[str, Any]:
        """Forced failover: this node becomes primary of ``name`` without its primary (or, in a
        split brain with it, keeps this node's side). ``accept_loss``: even though a reachable
        member holds more."""
        fenced = self._fenced_side(name)
        if fenced is not None:  # a former primary in a split brain with the designated one
            vol, source = self.node.volume(name), fenced
        else:
            vol, source, _ = self._check_mirror(name, f"marsfs primary {name} --force", choose_side=True)
        if name in self.progress:
            raise VolumeBusy(f"a change of the primary of {name!r} to this node is already in progress")
        split = next((sp for sp in self.node.splits(name) if sp.peer == source), None)
        self.progress[name] = HandoverStatus(source, "failover", None)
        try:
            if split is None and await self._reachable(name, source):
                raise InvalidRequest(f"{source}, the primary of {name}, is reachable: use the planned handover, "
                                     f"marsfs primary {name}, which loses nothing; --force is for a primary that "
                                     "cannot be reached")
            others = sorted((self.node.meta.members(name) | set(self.known())) - {self.node.name, source})
            held, answered = await self._survey(name, vol, others, vol.durable_lsn)
            best = max(held.items(), key=lambda kv: (kv[1].records, kv[0]), default=None)
            if best is not None and not accept_loss:
                node, told = best
                raise StateError(f"{node} holds {told.records} more records ({human_bytes(told.bytes)}) of {name} than "
                                 f"this node (durable up to LSN {vol.durable_lsn}): a forced failover here loses them; "
                                 f"run marsfs primary {name} --force on {node} instead, or add --accept-loss to "
                                 "lose them")
            if split is not None:
                loss = await self._split_loss(name, vol, source, split.fork_lsn)
            else:  # before the fetch stops: it is what knows the source's last word
                loss = self._loss(name, source)
                if best is not None:
                    loss = measured(loss, *best)
                fetcher = self.mirrors.fetchers.get(name)
                loss = acknowledged(loss, fetcher.state.primary_sync if fetcher is not None else None,
                                    vol.durable_lsn, len(set(others) - answered), best is not None)
            await self.mirrors.stop(name)
            epoch = self._newest_epoch(name) + 1
            start = vol.head_lsn + 1
            loss = replace(loss, epoch=epoch, start_lsn=start)
            try:
                await trio.to_thread.run_sync(self.node.record_failover, name, loss)
                await self._claim(name, epoch, start)
            except MarsError:
                self._resume_fetch(vol)
                raise
            if fenced is not None:  # primary already: the claim lifts the designation's fence
                await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, epoch=epoch))
                self.node.unfence(name)
            else:
                await trio.to_thread.run_sync(self.node.promote, name, epoch)
        finally:
            self.progress.pop(name, None)
        logger.warning("forced failover of %s from %s: primary here from LSN %d, epoch %d; %s", name, source,
                       start, epoch, loss.describe())
        out = {"volume": name, "from": source, "epoch": epoch, "start_lsn": start, "loss": loss.to_json(),
               "lost": loss.describe()}
        mode = self.node.sync.setting(vol)
        if mode.sync:  # the new primary keeps the mode; with its old primary gone it may lack mirrors
            then = ("fail with EIO (--refuse) until they do; to write meanwhile: marsfs mode "
                    f"{name} sync (degrade instead of failing) or marsfs mode {name} async") if mode.refuse else \
                "wait up to the timeout once, then the volume runs degraded (async) until they do"
            out["mode_note"] = (f"{name} stays in {mode.describe()}: its flushes need {mode.mirrors} mirror(s) of this "
                                f"node holding them, and they {then}")
        return out

    def _fenced_side(self, name: str) -> str | None:
        """The designated primary, if this node is a former primary of ``name`` (fenced by a
        newer epoch) in a split brain with it: then a forced failover keeps this side."""
        if name not in self.node.volumes or self.node.role(name).role != Role.PRIMARY:
            return None
        d = self.node.meta.designated(name)
        if d is None or d.node == self.node.name or not any(sp.peer == d.node for sp in self.node.splits(name)):
            return None
        return d.node

    async def _survey(self, name: str, vol: Volume, nodes: list[str], lsn: int
                      ) -> tuple[dict[str, PositionTold], set[str]]:
        """What each of ``nodes`` that answers holds beyond our ``lsn`` of ``name``, for those
        whose history continues ours there (``ahead`` or ``trimmed``), and which nodes answered.
        Asked all at once; a node that does not answer within SURVEY_TIMEOUT holds nothing we
        can reach."""
        chain = await trio.to_thread.run_sync(vol.log.chain_at, lsn)
        held: dict[str, PositionTold] = {}
        answered: set[str] = set()

        async def ask(node: str) -> None:
            told = await self._ask_position(name, node, lsn, chain)
            if told is not None:
                answered.add(node)
            if told is not None and told.relation in ("ahead", "trimmed"):
                held[node] = told

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(ask, node)
        return held, answered

    async def _ask_position(self, name: str, node: str, lsn: int, chain: bytes) -> PositionTold | None:
        """``node``'s answer to where its history stands against ours at ``lsn`` (None: no answer)."""
        try:
            with trio.fail_after(SURVEY_TIMEOUT):
                await self._introduce(node)
                ch, _ = await open_channel(self.peers.connector(node),
                                           hello(self.node.name, self.cluster, name, "position",
                                                 node_id=self.node.node_id))
                try:
                    return await ask_position(ch, lsn, chain)
                finally:
                    await ch.aclose()
        except (MarsError, PeerRefused, OSError, trio.TooSlowError, ConnectionLost) as e:
            logger.info("forced failover of %s: no position from %s: %s", name, node, describe(e))
            return None

    async def _split_loss(self, name: str, vol: Volume, source: str, fork: int) -> FailoverLoss:
        """What keeping this side of the split brain with ``source`` leaves out: ``source``'s
        tail after the ``fork``, as it tells it now (its split record here may be older)."""
        told = None
        if vol.log.first_lsn - 1 <= fork <= vol.log.last_lsn:  # else only the split record tells
            chain = await trio.to_thread.run_sync(vol.log.chain_at, fork)
            told = await self._ask_position(name, source, fork, chain)
            if told is not None and told.relation not in ("ahead", "same", "trimmed"):
                told = None  # the fork is only a bound: its records there are not ours
        split = next(sp for sp in self.node.splits(name) if sp.peer == source)
        records, nbytes = (told.records, told.bytes) if told is not None else (split.peer_records, split.peer_bytes)
        return FailoverLoss(source=source, epoch=0, start_lsn=0, records=records, bytes=nbytes,
                            oldest=told.oldest if told is not None else 0.0,
                            newest=told.newest if told is not None else 0.0, at_least=told is None,
                            as_of=time.time(), fork_lsn=fork)

    async def serve_position(self, ch: Channel, hello: Hello, vol: Volume) -> None:
        """Tell a would-be primary what this node holds of ``vol`` beyond its head."""
        def answer(ask: PositionAsk) -> PositionTold:
            return position_told(vol.log, vol.log.bytes_between, lambda n: vol.log.info(n).timestamp_ns / 1e9,
                                 vol.durable_lsn, vol.replayed_lsn, ask)

        await serve_position(ch, answer)

    async def _introduce(self, peer: str) -> None:
        if self.introduce is not None:
            await self.introduce(peer)

    def _newest_epoch(self, name: str) -> int:
        d = self.node.meta.designated(name)
        return max(self.node.role(name).epoch, d.epoch if d is not None else 0)

    async def _reachable(self, name: str, source: str) -> bool:
        """Whether ``source`` answers for ``name`` now (a HELLO that gets its WELCOME, or that it
        refuses only because it does not take this node for a member: it is up all the same)."""
        try:
            ch, _ = await open_channel(self.peers.connector(source),
                                       hello(self.node.name, self.cluster, name, "handover",
                                             node_id=self.node.node_id))
        except PeerRefused as e:
            return e.code == "not-a-member"
        except (OSError, trio.TooSlowError, ConnectionLost, ProtocolError):
            return False
        await ch.aclose()
        return True

    def _loss(self, name: str, source: str) -> FailoverLoss:
        """What becoming primary now would lose, as this node's fetch last heard of ``source``,
        and how long before now it heard that."""
        vol = self.node.volume(name)
        fetcher = self.mirrors.fetchers.get(name)
        now = time.time()
        ours = vol.durable_lsn
        if fetcher is None or not fetcher.state.primary_time:  # never heard it
            return FailoverLoss(source=source, epoch=0, start_lsn=ours + 1, records=0, bytes=0, oldest=0.0,
                                newest=0.0, at_least=True, as_of=0.0)
        fs = fetcher.state
        records = max(0, fs.primary_durable_lsn - ours)
        lost_bytes = fs.lag_bytes if records else 0
        oldest = fs.primary_time - fs.lag_seconds if records else 0.0
        newest = as_of = fs.primary_time
        heard = max(0.0, trio.current_time() - fs.last_heartbeat)
        # its goodbye at a clean stop says exactly how far its log goes (if it is the primary:
        # a mirror we fetch from may lack what its own source wrote); any other last word,
        # however fresh, leaves what it wrote after it unknown
        d = self.node.meta.designated(name)
        final = fs.final and not fs.connected and d is not None and d.node == source
        p = self.node.meta.position(source, name)  # what it published later, through any peer
        if p is not None and p.updated > as_of and p.durable_lsn - ours > records:
            records, newest, as_of = p.durable_lsn - ours, p.updated, p.updated
            oldest = oldest or as_of
            heard, final = min(heard, max(0.0, now - p.updated)), False  # it wrote after its goodbye
        return FailoverLoss(source=source, epoch=0, start_lsn=ours + 1, records=records, bytes=lost_bytes,
                            oldest=oldest, newest=newest if records else 0.0, at_least=not final,
                            as_of=as_of or now, heard_before=heard)

    # ------------------------------------------------------------------ the old primary's side

    async def serve_handover(self, ch: Channel, hello: Hello, vol: Volume) -> None:
        await serve_handover(ch, self, vol.name, hello.node)

    async def prepare_handover(self, volume: str, peer: str, req: HandoverPrepare) -> HandoverReady | Error:
        role = self.node.role(volume)
        if role.is_mirror:
            return Error(code="not-primary", error=f"{self.node.name} is not the primary of {volume}: it mirrors "
                                                  f"it from {role.source}")
        d = self.node.meta.designated(volume)
        if d is not None and d.node != self.node.name:
            return Error(code="not-primary", error=f"{self.node.name} is not the designated primary of {volume} any "
                                                  f"more ({d.node} is, epoch {d.epoch}); hand over from {d.node}")
        if req.epoch != role.epoch:
            return Error(code="epoch", error=f"{peer} knows epoch {req.epoch} of {volume}, {self.node.name} is at "
                                             f"epoch {role.epoch}; wait until it has caught up, then retry")
        try:
            self.node.fence_for_handover(volume, peer)
        except (VolumeBusy, WrongRole) as e:
            return Error(code="busy", error=str(e))
        self.handed_over.pop(volume, None)
        vol = self.node.volume(volume)
        try:
            await trio.to_thread.run_sync(vol.flush)
        except MarsError as e:
            self.node.unfence_handover(volume)
            return Error(code="error", error=f"{self.node.name} could not flush {volume}: {describe(e)}")
        logger.info("volume %s fenced for a handover to %s at LSN %d", volume, peer, vol.head_lsn)
        return HandoverReady(head_lsn=vol.head_lsn, chain=vol.log.last_chain, epoch=role.epoch)

    async def end_handover(self, volume: str, peer: str, end: HandoverEnd | None) -> None:
        if end is not None and end.claimed:
            self.handed_over[volume] = (peer, end.epoch)
            logger.info("volume %s was handed over to %s (epoch %d from LSN %d); this node follows it",
                        volume, peer, end.epoch, end.start_lsn)
            self.gossip_now()  # fetch the claim now: the follow step makes this node its mirror
            return
        if end is not None:
            logger.info("the handover of %s to %s was given up: %s; serving it again", volume, peer,
                        end.reason or "no reason given")
            self.node.unfence_handover(volume)
            return
        # no END: the asker may have claimed and then lost us; wait out the prepare's timeout
        self.spawn(f"handover fence of {volume}", functools.partial(self._unfence_later, volume, peer))

    async def _unfence_later(self, volume: str, peer: str) -> None:
        await trio.sleep(PREPARE_TIMEOUT)
        if volume in self.handed_over or volume not in self.node.volumes:
            return
        d = self.node.meta.designated(volume)
        if d is not None and d.node != self.node.name:
            return  # it was claimed after all: the metadata's fencing and following take over
        logger.info("the handover of %s to %s was not claimed within %.0f s; serving it again", volume, peer,
                    PREPARE_TIMEOUT)
        self.node.unfence_handover(volume)

    # ------------------------------------------------------------------ what the metadata asks of roles

    async def watch(self) -> None:
        """Every WATCH_EVERY seconds: finish a promotion whose claim a crash left behind, and
        find the split brain of a fenced former primary that wrote after the new epoch began
        (it does not fetch, so no refusal tells it)."""
        while True:
            await trio.sleep(WATCH_EVERY)
            for name in sorted(self.node.volumes):
                try:
                    await self._look(name)
                except MarsError as e:
                    logger.info("volume %s: %s", name, describe(e))

    async def _look(self, name: str) -> None:
        vol = self.node.volumes.get(name)
        d = self.node.meta.designated(name)
        if vol is None or d is None or vol.clone_of is not None or name in self.progress:
            return
        do = decide(name, self.node.name, self.node.role(name), d, head_lsn=vol.head_lsn,
                    opens=self.node.open_count(name), copying=name in self.mirrors.copies)
        if do.act == Act.PROMOTE:
            logger.info("volume %s: this node claimed epoch %d but was not promoted (a crash?); promoting it",
                        name, d.epoch)
            await self.mirrors.stop(name)
            await trio.to_thread.run_sync(self.node.promote, name, d.epoch)
            self.gossip_now()
        elif do.act == Act.UNFENCE:  # the designated primary: a loser that follows us again is resolved
            self._resolved_peers(name, vol)
        elif (do.act == Act.SPLIT and not any(s.peer == d.node for s in self.node.splits(name))
              and name not in self._comparing):  # fenced, and it wrote after the new epoch began
            self._comparing.add(name)
            try:
                await self.find_split(vol, d.node)
            finally:
                self._comparing.discard(name)

    # ------------------------------------------------------------------ split brain

    def _resolved_peers(self, name: str, vol: Volume) -> None:
        """Forget a split brain with a peer that follows our history again (it was invalidated):
        its published head lies on our chain."""
        for split in self.node.splits(name):
            p = self.node.meta.position(split.peer, name)
            if p is None or p.role != Role.MIRROR or p.updated < split.found:
                continue
            if not vol.log.first_lsn - 1 <= p.head_lsn <= vol.head_lsn:
                continue
            if vol.log.chain_at(p.head_lsn).hex() == p.chain_at_head:
                logger.info("volume %s: %s follows this node's history again; its split brain is resolved", name,
                            split.peer)
                self.node.clear_splits(name, split.peer)

    async def resolve_split(self, name: str, *, rate: int = 0) -> dict[str, Any]:
        """``marsfs invalidate`` on a split brain's losing node: keep this node's divergent state
        as the split version ``split-<node>-<fork>``, follow the designated primary and resync
        from it, copying only what either side wrote after the fork (both tails; the whole
        image compared when a log no longer holds its tail)."""
        vol = self.node.volume(name)
        splits = self.node.splits(name)
        assert splits, "resolve_split needs a recorded split brain"
        d = self.node.meta.designated(name)
        me = self.node.name
        if d is None or d.node == me:
            peers = ", ".join(s.peer for s in splits)
            raise InvalidRequest(f"this node is the designated primary of {name}: it keeps its history; run "
                                 f"marsfs invalidate {name} on the losing node ({peers})")
        if self.node.open_count(name):
            raise VolumeBusy(f"volume {name!r} is open ({self.node.open_count(name)} handle(s)); close it (losetup -d, "
                             "umount) and run marsfs invalidate again: its divergent state is kept as a version first")
        fork = min(splits, key=lambda s: s.fork_lsn)
        head = vol.head_lsn

        def keep() -> tuple[str, list[tuple[int, int]] | None]:
            view = vol.view(head)
            try:
                info = save_split(vol.path, me, fork.fork_lsn, head, vol.log.chain_at(head), view.size, view.read)
            finally:
                view.close()
            return info.name, vol.extents_between(fork.fork_lsn, head) if fork.exact else None

        kept, tail = await trio.to_thread.run_sync(keep)
        logger.info("volume %s: divergent state up to lsn-%d kept as .versions/%s/%s.img", name, head, name, kept)
        if self.node.role(name).role == Role.PRIMARY:
            await self.mirrors.stop(name)
            await trio.to_thread.run_sync(self.node.become_mirror, name, d.node, d.epoch)
        else:
            await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, source=d.node, epoch=d.epoch))
        self.node.clear_splits(name)
        plan = ResyncPlan(whole=tail is None, ranges=tuple(tail or ()), rate=rate,
                          since=fork.fork_lsn if fork.exact else None)
        await self.mirrors.restart(name, plan)
        self.gossip_now()
        return {"volume": name, "source": d.node, "split_version": f"{kept}.img", "fork_lsn": fork.fork_lsn,
                "state": VolumeState.RESYNCING.value, "size": vol.size}

    async def serve_compare(self, ch: Channel, hello: Hello, vol: Volume) -> None:
        def found(seen: SplitSeen) -> None:
            self._record(vol.name, seen)

        await serve_compare(ch, vol.log, vol.log.bytes_between, hello.node, found)

    async def find_split(self, vol: Volume, source: str) -> None:
        """Our fetch from ``source`` was refused as diverged: find the fork with it, record it."""
        name = vol.name
        d = self.node.meta.designated(name)
        hints = [d.start_lsn - 1] if d is not None and d.start_lsn > 0 else []
        for attempt in range(COMPARE_TRIES):
            try:
                await self._introduce(source)
                ch, welcome = await open_channel(self.peers.connector(source),
                                                 hello(self.node.name, self.cluster, name, "compare",
                                                       node_id=self.node.node_id))
                try:
                    seen = await ask_compare(ch, vol.log, vol.log.bytes_between, source, welcome.head_lsn, hints)
                finally:
                    await ch.aclose()
            except (MarsError, OSError, PeerRefused, trio.TooSlowError, ConnectionLost) as e:
                logger.info("comparing the history of %s with %s failed: %s", name, source, describe(e))
                await trio.sleep(2.0 ** attempt)
                continue
            self._record(name, seen)
            return
        logger.info("split brain of %s with %s: the fork could not be located yet; trying again later", name,
                    source)

    def _record(self, name: str, seen: SplitSeen) -> None:
        split = SplitBrain(peer=seen.peer, fork_lsn=seen.fork.lsn, exact=seen.fork.exact,
                           own_records=seen.ours[0], own_bytes=seen.ours[1], peer_records=seen.theirs[0],
                           peer_bytes=seen.theirs[1], found=time.time())
        self.node.record_split(name, split)
        now = next((s for s in self.node.splits(name) if s.peer == split.peer), split)  # who wrote what
        logger.error("volume %s: %s", name, now.describe(name))
