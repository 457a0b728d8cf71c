"""The node in its cluster: serve peers, compose the pieces, follow the metadata.

Rules that hold here:

* :class:`Cluster` composes the node's pieces and wires them together, each given what it
  needs in its constructor (none of them knows the cluster): :class:`~marsfs.node.peers.Peers`
  reaches the other nodes, :class:`~marsfs.node.mirrors.Mirrors` joins, copies, fetches and
  replays, :class:`~marsfs.node.handover.Roles` changes primaries, the replication
  :class:`~marsfs.replication.server.Server` serves the peers. Its command methods delegate.
* A peer speaks to this node only if a peer list names it, and only one node per name at a
  time (the :class:`~marsfs.node.identity.Identities` the server asks for every HELLO); it
  asks anything about a volume only as a member of it, or as a ``join``'s fast sync (the
  :class:`~marsfs.node.access.Access` the server asks next, over :meth:`Cluster.members_of`).
* Before this node asks a peer about a volume that may not know it as a member yet (a forced
  failover's survey, a comparison after a split brain, verify, a new source after a change of
  primary), it introduces itself (:meth:`Cluster.introduce`: its positions, published and
  exchanged with that peer now), so no gossip round lies between a join and what follows it.
* Status (lag, states, peers) is built by :mod:`marsfs.node.status` from what the pieces hold.
* Cluster metadata (:mod:`marsfs.node.meta`): every ``GOSSIP_EVERY`` seconds, and
  at once after a local change (:meth:`Cluster.gossip_now`), this node publishes its
  position for each volume and exchanges its metadata with every ``--peer`` (both
  directions, :mod:`marsfs.node.gossip`) whose last exchange did not leave it with our map
  as it is now; at least every ``REFRESH`` seconds anyway. A peer that is down is retried
  quietly, logged at INFO once per change. After every change the follow step
  (:meth:`Cluster._follow`, deciding with :func:`marsfs.node.follow.decide`) runs: a primary
  that is not the designated primary is fenced (EROFS, log kept); if its log ends before the
  designated primary's epoch began it becomes that node's mirror; a mirror whose source is
  not the designated primary fetches from it instead; a node removed from a volume (``leave
  --node --force``) no longer holds this node's log. Nothing here ever promotes a node: only
  an operator's ``primary`` claims a volume.
* A clean stop says goodbye (:meth:`Cluster.farewell`): every log made durable, then every
  mirror told its last heartbeat, at most ``FAREWELL_TIMEOUT`` seconds.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import trio

from marsfs.aio import describe, supervised
from marsfs.errors import (
    InvalidRequest,
    MarsError,
    ProtocolError,
    UsageError,
    VolumeBusy,
    VolumeNotFound,
)
from marsfs.node import gossip, status
from marsfs.node.access import Access
from marsfs.node.defaults import DEFAULT_CLUSTER as DEFAULT_CLUSTER
from marsfs.node.follow import Act, decide
from marsfs.node.handover import Roles
from marsfs.node.identity import Identities
from marsfs.node.meta import REFRESH, Position
from marsfs.node.mirrors import Mirrors
from marsfs.node.node import Node, check_volume_name
from marsfs.node.peers import Admission, Peers, TcpPeers, parse_address
from marsfs.node.state import VolumeStatus
from marsfs.node.tls import REFRESH_EVERY, Tls
from marsfs.node.volstate import FenceHolder, Role
from marsfs.replication.channel import Channel, ConnectionLost, PeerRefused
from marsfs.replication.fetch import Connect
from marsfs.replication.protocol import Hello
from marsfs.replication.server import PeerTable, Server
from marsfs.replication.verify import VerifyProgress, VerifyResult, verify_with
from marsfs.volume import Volume
from marsfs.volume.holds import hold_mirror, mirror_hold

logger = logging.getLogger(__name__)

VERIFY_KEPT = 600.0  #: seconds a finished verify waits for its command line to collect it
GOSSIP_EVERY = 1.0  #: seconds between metadata exchanges with each peer (and position updates)
RESTART_AFTER = 1.0  #: seconds before the metadata rounds or the roles' watch start again after a bug
FAREWELL_TIMEOUT = 2.0  #: seconds a clean stop waits for its mirrors to hear its last heartbeat


class Cluster:
    """Replication for every volume of one node. Runs inside the daemon's trio loop."""

    def __init__(self, node: Node, *, listen: str | None, peers: dict[str, str], cluster: str = DEFAULT_CLUSTER,
                 sync_rate: int = 0, connections: Peers | None = None, tls: Tls | None = None) -> None:
        """``connections`` reaches the peers (default: TCP to the ``peers`` addresses, TLS with
        ``tls``; tests pass a fake); ``peers`` names them either way. ``tls`` None: plain TCP
        both ways (``serve --insecure``, and in-process tests)."""
        self.node = node
        self.tls = tls
        self.listen = parse_address(listen) if listen else None
        self.peers = {name: parse_address(addr) for name, addr in peers.items()}
        self.connections: Peers = connections if connections is not None else TcpPeers(self.peers, tls)
        self.admission = Admission(tls)  #: the TLS handshake on the node port, and its bounds
        self.cluster = cluster
        self.peer_table = PeerTable()
        node.sync.attach(self.peer_table)  #: a sync volume's flushes hear the mirrors' ACKs
        self.mirrors = Mirrors(node, cluster, self.connections, spawn=self.spawn, quiet=self._quiet,
                               diverged=self._diverged, introduce=self.introduce)
        self.roles = Roles(node, cluster, self.connections, self.mirrors, spawn=self.spawn,
                           gossip_now=self.gossip_now, known=self.peers.keys, introduce=self.introduce)
        #: who may speak to this node (marsfs.node.identity): peers of a peer list, one node per name
        self.identities = Identities(node.name, node.node_id, self.listed, trio.current_time, self.held_by)
        #: who may ask what of a volume (marsfs.node.access): its members, and a join's fast sync
        self.access = Access(node.name, self.members_of, trio.current_time)
        self.server = Server(node.name, cluster, self.servable, self._epoch, self.peer_table, meta=self._serve_meta,
                             conversations={"handover": self.roles.serve_handover, "compare": self.roles.serve_compare,
                                            "position": self.roles.serve_position},
                             sync_rate=sync_rate, gate=self.identities, authorize=self.access.authorize)
        self.verifies: dict[str, VerifyJob] = {}  #: verify comparisons by id, until collected
        self._verify_seq = 0
        self._nursery: trio.Nursery | None = None
        self.port: int | None = None
        self._init_meta()

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.listen is not None:
                host, port = self.listen
                try:
                    listeners = await trio.open_tcp_listeners(port, host=host)
                except OSError as e:
                    raise MarsError(f"cannot listen for peers on {host}:{port}: {e.strerror}; "
                                    "pick another --listen address or stop what uses it") from None
                nursery.start_soon(trio.serve_listeners, functools.partial(self.admission.handle, self.server.handle),
                                   listeners)
                self.port = listeners[0].socket.getsockname()[1]
                logger.info("node %s listens for peers on %s:%d", self.node.name, host, self.port)
            if self.tls is not None:
                nursery.start_soon(self._renewals, self.tls)
            await self.mirrors.resume()
            nursery.start_soon(self.mirrors.replay_loop)
            await self._start_meta(nursery)
            nursery.start_soon(functools.partial(supervised, "roles", self.roles.watch, restart_after=RESTART_AFTER))
            task_status.started()

    async def farewell(self) -> None:
        """A clean stop's goodbye, once nothing writes any more (the daemon's FUSE loop ended):
        every log is made durable, then every mirror connected (fetching or watching) gets what
        is left to ship and a last heartbeat, so that a failover onto it knows exactly what it
        lacks. A mirror that does not take it within ``FAREWELL_TIMEOUT`` seconds does not
        hold the stop."""
        def sync() -> None:
            for vol in list(self.node.volumes.values()):
                try:
                    vol.log.sync()
                except MarsError as e:  # its error is the volume's (G11); it says goodbye with less
                    logger.error("volume %s: making its log durable at the stop failed: %s", vol.name, describe(e))

        with trio.move_on_after(FAREWELL_TIMEOUT) as waited:
            await trio.to_thread.run_sync(sync)
            await self.server.farewell()
        if waited.cancelled_caught:
            logger.info("stopping without every mirror's goodbye: not all took it within %.0f s", FAREWELL_TIMEOUT)

    async def _renewals(self, tls: Tls) -> None:
        """Pick up a renewed certificate in the TLS directory (the runbook's renewal), never
        ending the daemon over it. On the trio thread: the contexts it changes are used there
        (reading three small files is quick)."""

        async def refresh() -> None:
            tls.refresh()

        while True:
            await trio.sleep(REFRESH_EVERY)
            await supervised("certificate renewal", refresh)

    def spawn(self, what: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` in the cluster's nursery, supervised as ``what`` (only while :meth:`run` runs)."""
        assert self._nursery is not None
        self._nursery.start_soon(supervised, what, fn)

    def connector(self, peer: str) -> Connect:
        """A connection to ``peer`` (PeerError at once for an unknown one): see :mod:`marsfs.node.peers`."""
        return self.connections.connector(peer)

    def listed(self, node: str) -> bool:
        """Whether a peer list names ``node``: this node's ``--peer`` list, or the cluster
        metadata (it holds entries of ``node``: a member that listed it passed them on)."""
        return node in self.peers or any(owner == node for owner, _ in self.meta.snapshot())

    def held_by(self, node: str) -> list[str]:
        """The volumes ``node`` is a member of in the cluster metadata (not removed from them)."""
        volumes = {key.split("/")[1] for _, key in self.meta.snapshot() if key.startswith("volume/")}
        return sorted(v for v in volumes if node in self.meta.members(v))

    def members_of(self, vol: Volume) -> set[str]:
        """The members of ``vol`` as this node knows them, for authorization
        (:mod:`marsfs.node.access`): the metadata's members, the mirrors this node serves it to
        (its peer table, and the holds on its log: persisted, so they count across a restart
        before any gossip), and this node's own source of it; minus the nodes removed from it."""
        name = vol.name
        members = self.meta.members(name) | {p.node for p in self.peer_table.for_volume(name, vol.uuid)}
        members |= {m for m in map(hold_mirror, vol.holds) if m is not None}
        if self.node.is_mirror(name):
            members.add(self.node.role(name).source)
        return members - self.meta.removed(name)

    def servable(self, name: str) -> Volume | None:
        """The volume peers may fetch, join or hand over as ``name``: None for a clone (clones
        are local) and for a name this node does not serve."""
        vol = self.node.volumes.get(name)
        return None if vol is None or vol.clone_of is not None else vol

    def _quiet(self, vol: Volume) -> AbstractAsyncContextManager[None]:
        """The server's quiet for ``vol``, for the mirrors (the server is made after them)."""
        return self.server.quiet(vol)

    async def _diverged(self, vol: Volume, source: str) -> None:
        """A fetch of ``vol`` was refused as diverged: the roles find the fork with ``source``."""
        await self.roles.find_split(vol, source)

    def _epoch(self, name: str) -> int:
        return self.node.role(name).epoch

    # ------------------------------------------------------------------ mirrors (marsfs.node.mirrors)

    async def join(self, name: str, source: str, *, seed: str | None = None, rate: int = 0,
                   thin: bool = False) -> dict[str, Any]:
        """``marsfs join``: see :meth:`Mirrors.join`. A mirror this node has already follows the
        designated primary (the follow step makes it fetch from there again at once), so a join
        of it from another node is refused, before anything is thrown away."""
        check_volume_name(name)
        d = self.meta.designated(name)
        if source != self.node.name:  # naming this node, or an unknown one, has its own refusal
            self.connections.connector(source)
        if (d is not None and source not in (d.node, self.node.name) and self.node.is_mirror(name)
                and name not in self.mirrors.copies):
            raise InvalidRequest(f"volume {name!r} is a mirror on node {self.node.name}, and mirrors follow the "
                                 f"designated primary {d.node} (epoch {d.epoch}), not {source}; to resync this "
                                 f"copy from {d.node}: marsfs invalidate {name}")
        return await self.mirrors.join(name, source, seed=seed, rate=rate, thin=thin)

    async def invalidate(self, name: str, *, ranges: tuple[tuple[int, int], ...] = (), rate: int = 0) -> dict[str, Any]:
        """``marsfs invalidate``: on a split brain's losing node (a split brain recorded here)
        it is the resolution (:meth:`Roles.resolve_split`: the divergent state is kept as a
        split version first, and only the two tails are copied); otherwise the mirror's whole
        image is resynced (:meth:`Mirrors.invalidate`)."""
        if name in self.node.volumes and self.node.splits(name):
            return await self.roles.resolve_split(name, rate=rate)
        return await self.mirrors.invalidate(name, ranges=ranges, rate=rate)

    async def leave(self, name: str) -> dict[str, Any]:
        """``marsfs leave``: see :meth:`Mirrors.leave`."""
        return await self.mirrors.leave(name)

    def set_paused(self, name: str, what: str, paused: bool) -> dict[str, Any]:
        """``marsfs pause-fetch`` and its kin: see :meth:`Mirrors.set_paused`."""
        return self.mirrors.set_paused(name, what, paused)

    # ------------------------------------------------------------------ roles (marsfs.node.handover)

    async def primary(self, name: str, *, force: bool = False, accept_loss: bool = False) -> dict[str, Any]:
        """``marsfs primary VOL [--force [--accept-loss]]``: planned handover to this node, or
        forced failover (``accept_loss``: even when a reachable member holds more)."""
        check_volume_name(name)
        if accept_loss and not force:
            raise UsageError(f"--accept-loss goes with --force (a forced failover): marsfs primary {name} --force "
                             "--accept-loss")
        return await (self.roles.fail_over(name, accept_loss=accept_loss) if force else self.roles.take_over(name))

    # ------------------------------------------------------------------ verify

    def verify(self, name: str, peer: str | None) -> list[str]:
        """Start comparing ``name`` here with ``peer`` at one version (see
        :mod:`marsfs.replication.verify`); returns the ids of the comparisons, one per peer,
        which :meth:`verify_progress` follows. Without ``peer``: a mirror compares with its
        source, a primary with every mirror it knows."""
        vol = self.node.volume(name)
        if vol.clone_of is not None:
            raise InvalidRequest(f"{name} is a clone ({vol.clone_of.describe()}): a local volume, never "
                                 "replicated, so there is nothing to compare it with")
        mine = self.node.is_mirror(name)
        if peer is not None:
            peers = [peer]
        elif mine:
            peers = [self.node.role(name).source]
        else:
            peers = self.mirrors_of(name)
            if not peers:
                raise InvalidRequest(f"{name} is primary on node {self.node.name} and has no mirrors to compare "
                                     f"with; give one: marsfs verify {name} --peer NODE")
        if self.node.name in peers:
            raise InvalidRequest(f"{self.node.name} is this node: give another node with --peer")
        connects = {p: self.connector(p) for p in peers}  # PeerError for an unknown peer, before any starts
        now = trio.current_time()
        for old in [k for k, j in self.verifies.items() if j.finished.is_set() and now - j.started > VERIFY_KEPT]:
            del self.verifies[old]  # finished and never asked for
        ids = []
        for p, connect in connects.items():
            self._verify_seq += 1
            job_id = f"{name}/{p}/{self._verify_seq}"
            job = self.verifies[job_id] = VerifyJob(VerifyProgress(peer=p), started=now)
            self.spawn(f"verify of {name} with {p}", functools.partial(self._run_verify, job, vol, p, connect, mine))
            ids.append(job_id)
        return ids

    async def _run_verify(self, job: VerifyJob, vol: Volume, peer: str, connect: Connect, mine: bool) -> None:
        try:
            await self.introduce(peer)  # a member of a moment ago is one there too
            job.result = await verify_with(vol, self.node.name, self.cluster, peer, connect, mine=mine,
                                           progress=job.progress, node_id=self.node.node_id)
        except MarsError as e:
            job.error = e
        except Exception as e:
            job.error = MarsError(f"verify of {vol.name} with {peer} failed: {describe(e)}; see the daemon's log")
            raise  # a bug: supervised logs it with its traceback
        finally:
            job.finished.set()

    async def verify_progress(self, job_id: str, wait: float) -> dict[str, Any]:
        """How far comparison ``job_id`` got, after waiting up to ``wait`` seconds for its end;
        its result once it ended (then it is forgotten), or its failure raised."""
        job = self.verifies.get(job_id)
        if job is None:
            raise InvalidRequest(f"no verify {job_id!r} is running here (it ended and was reported, or the "
                                 "daemon restarted); run marsfs verify again")
        with trio.move_on_after(wait):
            await job.finished.wait()
        p = job.progress
        if not job.finished.is_set():
            return {"state": "running", "peer": p.peer, "lsn": p.lsn, "size": p.size, "done": p.done}
        del self.verifies[job_id]
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return {"state": "done", **job.result.to_json()}

    # ------------------------------------------------------------------ status

    def _now(self) -> float:
        """The clock the fetch state's timestamps come from (trio's: MockClock drives it in tests)."""
        return trio.current_time()

    def mirrors_of(self, name: str) -> list[str]:
        """The nodes known to fetch ``name`` from this node (connected or not)."""
        vol = self.node.volumes.get(name)
        return [p.node for p in self.peer_table.for_volume(name, vol.uuid)] if vol is not None else []

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """Status rows as JSON objects (what the control socket sends)."""
        return [s.to_json() for s in self.statuses(name)]

    def statuses(self, name: str | None = None) -> list[VolumeStatus]:
        """Every volume's status (or one's), with lag and peers (:mod:`marsfs.node.status`),
        and on each row how this node talks to its peers (TLS, or loudly not)."""
        rows = status.statuses(self, name)
        if self.listen is None and not self.peers:
            return rows
        if self.tls is None:
            said: dict[str, Any] = {"mode": "insecure"}
            warning: str | None = (f"node {self.node.name} runs --insecure: its peers are not authenticated, and "
                                   "anyone who reaches its port can act as a node; issue certificates (marsfs "
                                   "cluster add-node) and restart without --insecure")
        else:
            said, warning = self.tls.status(), self.tls.warning()
        return [r.changed(tls=said, warnings=[*r.warnings, warning] if warning else r.warnings) for r in rows]

        # ------------------------------------------------------------------ cluster metadata

    def _init_meta(self) -> None:
        self.meta = self.node.meta
        self._gossip_wake: dict[str, trio.Event] = {}  #: per peer: exchange now
        self._follow_wake = trio.Event()  #: metadata changed: publish and follow now
        self._heard: dict[str, float] = {}  #: peer -> wall time of our last metadata exchange with it
        #: peer -> (our map's version, trio time) after our last exchange with it, either way
        self._exchanged: dict[str, tuple[int, float]] = {}
        self._gossip_trouble: dict[str, str] = {}  #: peer -> why the last exchange failed ("" : it worked)
        self._meta_errors: dict[str, str] = {}  #: volume -> what the follow step cannot do, and what to do
        self._claim_failed = False  #: a claim of :meth:`_claim_unclaimed` could not be written

    async def _start_meta(self, nursery: trio.Nursery) -> None:
        """One round first (claim, exchange with every peer, follow), so a node that was away
        learns of a newer epoch before it takes a write; then the loops."""
        await trio.to_thread.run_sync(self._claim_unclaimed)
        async with trio.open_nursery() as first:
            for peer in sorted(self.peers):
                first.start_soon(self._exchange, peer)
        await self._meta_round()
        for peer in sorted(self.peers):
            nursery.start_soon(supervised, f"metadata gossip with {peer}", functools.partial(self._gossip_loop, peer))
        nursery.start_soon(functools.partial(supervised, "cluster metadata", self._meta_loop,
                                             restart_after=RESTART_AFTER))

    def gossip_now(self) -> None:
        """Exchange metadata with every peer and follow it now (after a claim, a removal)."""
        for ev in self._gossip_wake.values():
            ev.set()
        self._follow_wake.set()

    async def introduce(self, peer: str) -> None:
        """Before asking ``peer`` about a volume: publish this node's positions and exchange
        metadata with ``peer`` now, so that it knows what this node holds (a join of a moment
        ago included) however recently the last round was. Trouble is left to the conversation
        that follows (the exchange logs it as the gossip does); it takes at most
        :data:`~marsfs.node.gossip.EXCHANGE_TIMEOUT` seconds."""
        with trio.move_on_after(gossip.EXCHANGE_TIMEOUT):
            await self._publish()
            try:
                await self._exchange(peer, force=True)
            except MarsError as e:  # an unknown peer: the conversation says so itself
                logger.info("could not exchange metadata with %s: %s", peer, describe(e))

    async def _serve_meta(self, ch: Channel, greeting: Hello) -> None:
        changed = await gossip.serve(ch, greeting, self.meta, self.cluster)
        self._heard[greeting.node] = time.time()
        self._exchanged[greeting.node] = (self.meta.version, trio.current_time())
        if changed:
            self._follow_wake.set()

    async def _gossip_loop(self, peer: str) -> None:
        while True:
            wake = self._gossip_wake[peer] = trio.Event()
            await self._exchange(peer)
            with trio.move_on_after(GOSSIP_EVERY):
                await wake.wait()

    async def _exchange(self, peer: str, *, force: bool = False) -> None:
        """One metadata exchange with ``peer``, unless it has our map as it is (the last
        exchange either way left it so, less than ``REFRESH`` seconds ago: each node pushes its
        own changes) and not ``force``. Trouble is logged once per change, at INFO."""
        version, when = self._exchanged.get(peer, (-1, 0.0))
        if not force and version == self.meta.version and trio.current_time() - when < REFRESH:
            return
        try:
            changed = await gossip.exchange(self.connector(peer), self.meta, self.cluster, peer,
                                            node_id=self.node.node_id)
        except (OSError, trio.TooSlowError, ConnectionLost, ProtocolError, PeerRefused) as e:
            trouble = describe(e)
        else:
            trouble = ""
            self._heard[peer] = time.time()
            self._exchanged[peer] = (self.meta.version, trio.current_time())
            if changed:
                self._follow_wake.set()
        if trouble != self._gossip_trouble.get(peer, ""):
            if trouble:
                logger.info("metadata exchange with %s failed: %s; retrying every %.0f s", peer, trouble,
                            GOSSIP_EVERY)
            else:
                logger.info("metadata exchange with %s works again", peer)
        self._gossip_trouble[peer] = trouble

    async def _meta_loop(self) -> None:
        while True:
            wake = self._follow_wake = trio.Event()
            with trio.move_on_after(GOSSIP_EVERY):
                await wake.wait()
            await self._meta_round()

    async def _meta_round(self) -> None:
        if self._claim_failed:  # a claim the state disk could not take at start: again, until it does
            await trio.to_thread.run_sync(self._claim_unclaimed)
        await self._publish()
        for name in sorted(self.node.volumes):
            try:
                await self._follow(name)
            except MarsError as e:  # e.g. the disk failed under a role change: say it, try again
                self._meta_errors[name] = f"following the designated primary of {name}: {describe(e)}"

    def _claim_unclaimed(self) -> None:
        """A primary from before the metadata existed claims its volume at its epoch from LSN 1.
        A claim the state disk cannot take (full, failing) is said in status and tried again at
        every metadata round: it must not end the daemon (G11)."""
        self._claim_failed = False
        for name in sorted(self.node.volumes):
            role = self.node.role(name)
            if role.role == Role.PRIMARY and self.meta.designated(name) is None:
                try:
                    self.meta.claim(name, self.node.name, role.epoch, 1)
                except MarsError as e:
                    self._claim_failed = True
                    self._meta_errors[name] = f"claiming {name} in the cluster metadata: {describe(e)}"
                    continue
                self._meta_errors.pop(name, None)
                logger.info("volume %s: claimed epoch %d in the cluster metadata (it had no claim)", name, role.epoch)

    async def _publish(self) -> None:
        now = time.time()
        positions = []
        for name in sorted(self.node.volumes):
            vol = self.node.volumes[name]
            if vol.clone_of is not None:
                continue
            try:  # what a position says, and no more: not the whole status row (clones, splits, peers, ...)
                role = self.node.role(name)
                state = status.verdict(self.node, name, status.cluster_side(self, name)).state
            except MarsError:
                continue  # deleted in the meantime
            positions.append((name, Position(
                role=role.role.value, state=state.value, epoch=role.epoch, head_lsn=vol.head_lsn,
                durable_lsn=vol.durable_lsn, chain_at_head=vol.log.last_chain.hex(), replayed_lsn=vol.replayed_lsn,
                open_handles=self.node.open_count(name), source=role.source if role.is_mirror else "", updated=now)))

        if not any(self.meta.publishes(name, p) for name, p in positions):
            return  # no worker thread for a round with nothing new
        # the unchanged positions that are half due go along: the volumes' refreshes then fall
        # into the same few rounds, one worker thread and one file write for many volumes
        positions = [(name, p) for name, p in positions if self.meta.publishes(name, p, REFRESH / 2)]

        def put() -> bool:
            return any([self.meta.publish(name, p, REFRESH / 2) for name, p in positions])

        if await trio.to_thread.run_sync(put):
            for ev in self._gossip_wake.values():
                ev.set()

    async def _follow(self, name: str) -> None:
        """Act on what the metadata says about ``name`` here (see the module's rules)."""
        vol = self.node.volumes.get(name)
        if vol is None or vol.clone_of is not None:
            return
        for gone in self.meta.removed(name):
            self._forget_mirror(vol, gone)
        d = self.meta.designated(name)
        if d is None:
            return
        role = self.node.role(name)
        do = decide(name, self.node.name, role, d, head_lsn=vol.head_lsn, opens=self.node.open_count(name),
                    copying=name in self.mirrors.copies)
        if do.fence:
            self.node.fence(name, do.fence)
        if do.error:
            self._meta_errors[name] = do.error
        elif do.act not in (Act.NOTHING, Act.PROMOTE):  # a promotion is the roles' watch's
            self._meta_errors.pop(name, None)
        if do.act == Act.UNFENCE:
            self.node.unfence(name)
            self.node.unfence(name, holder=FenceHolder.MIRROR)
        elif do.act == Act.BECOME_MIRROR:
            await trio.to_thread.run_sync(self.node.become_mirror, name, d.node, d.epoch)
            await self.introduce(d.node)  # our new source: it knows us as a member from our word on
            await self.mirrors.stopped(name)  # one started meanwhile would not be ours to keep
            self.mirrors.start(vol)
            self.gossip_now()
        elif do.act == Act.REFETCH:
            logger.info("volume %s: %s is the designated primary (epoch %d); fetching from it instead of %s",
                        name, d.node, d.epoch, role.source)
            await self.mirrors.stop(name)  # the old source's fetcher ends before the new one starts
            await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, source=d.node,
                                                            epoch=d.epoch))
            await self.introduce(d.node)  # our new source: it knows us as a member from our word on
            await self.mirrors.stopped(name)  # another step may have started one from the old source meanwhile
            self.mirrors.start(vol)
            self.gossip_now()
        elif do.act == Act.EPOCH:
            await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, epoch=d.epoch))

    def _forget_mirror(self, vol: Volume, node: str) -> None:
        """``node`` was removed from ``vol``: its position holds nothing here any more."""
        known = any(p.node == node for p in self.peer_table.for_volume(vol.name, vol.uuid))
        self.peer_table.forget(vol.name, vol.uuid, node)
        vol.release(mirror_hold(node))  # also drops its set of changed extents, if its log was dropped
        if known:
            logger.info("volume %s: forgot mirror %s (removed from the volume)", vol.name, node)

    async def leave_node(self, name: str, node: str, *, force: bool) -> dict[str, Any]:
        """Remove a dead ``node`` from volume ``name`` (``leave VOL --node NAME --force``, on a
        survivor): its position stops holding the log here and, by gossip, everywhere."""
        vol = self.node.volume(name)
        d = self.meta.designated(name)
        if node == self.node.name:
            raise InvalidRequest(f"{node} is this node: to stop mirroring {name} here run: marsfs leave {name}")
        if d is not None and d.node == node:
            raise InvalidRequest(f"{node} is the designated primary of {name} (epoch {d.epoch}) and cannot be "
                                 f"removed; make another node primary first: marsfs primary {name} there (a "
                                 f"handover; only if {node} is dead: marsfs primary {name} --force), then run "
                                 "this again")
        known = self.meta.members(name) | {p.node for p in self.peer_table.for_volume(name, vol.uuid)}
        if node not in known:
            raise VolumeNotFound(f"node {node} does not hold volume {name} as far as this node knows "
                                 f"(members: {', '.join(sorted(self.meta.members(name))) or 'none'}); give one of the members")
        if any(p.node == node and p.connected for p in self.peer_table.for_volume(name, vol.uuid)):
            raise VolumeBusy(f"node {node} is connected and fetching {name}: it is not dead; run marsfs leave "
                             f"{name} on {node} instead")
        if not force:
            raise InvalidRequest(f"removing node {node} from {name} forgets its position for good (its log is no "
                                 f"longer kept for it; if it comes back it needs a resync); add --force if "
                                 f"{node} is dead")
        await trio.to_thread.run_sync(self.meta.remove, name, node)
        self._forget_mirror(vol, node)
        self.gossip_now()
        return {"volume": name, "node": node, "members": sorted(self.meta.members(name))}


@dataclass(eq=False)
class VerifyJob:
    """A ``verify`` comparison running in the background, until its result is collected."""

    progress: VerifyProgress
    started: float  #: trio time
    finished: trio.Event = field(default_factory=trio.Event)
    result: VerifyResult | None = None
    error: MarsError | None = None
