"""The node in its cluster: serve peers, keep mirrors fetching and replaying, report lag.

Rules that hold here:

* ``join`` answers as soon as the source node accepted (errors such as an unknown peer or
  volume come back to the operator at once); the first copy then runs in the background, shown
  as state ``syncing`` with progress. Until it finishes the mirror's image is not offered.
* Every copy is a fast sync (:mod:`marsfs.replication.fetch`): a new replica starts as zeros
  (or as a ``--seed`` image) at LSN 0 and is brought to the source's version comparing block
  sums, staging straight into its base (nobody reads it yet). A lost connection retries and
  a crash resumes it (:attr:`Node.resuming`); neither resends what was staged.
* A mirror resyncs (state ``resyncing``) when the operator says so (``invalidate``: the whole
  image; ``join`` onto its existing image: what changed, when the source can tell) or by
  itself when its source no longer holds the log it needs (``log-trimmed``). It keeps serving
  its last version meanwhile and switches atomically. ``resync_whole`` in the role record
  keeps an interrupted whole-image resync whole across a restart.
* Replay moves a mirror's visible version to its durable fetched LSN every ``REPLAY_EVERY``
  seconds unless paused. Pause flags and the paused replay position persist in role.json.
* A fetch or replay that should progress and has not for ``STALL_AFTER`` seconds is reported
  as ``stalled`` with the reason.
* A mirror's lag is measured against its source's newest durable LSN as the last heartbeat
  told it, also while its fetch is paused (the fetcher then only watches). An image copy's
  progress is the fraction of the ranges compared, with the compare rate and ETA.
* Cluster metadata (:mod:`marsfs.node.meta`, issue 10): every ``GOSSIP_EVERY`` seconds, and
  at once after a local change (:meth:`Cluster.gossip_now`), this node publishes its
  position for each volume and exchanges its metadata with every ``--peer`` (both
  directions, :mod:`marsfs.node.gossip`) whose last exchange did not leave it with our map
  as it is now; at least every ``REFRESH`` seconds anyway. A peer that is down is retried quietly, logged at
  INFO once per change. After every change the follow step (:meth:`Cluster._follow`) runs:
  a primary that is not the designated primary is fenced (EROFS, log kept); if its log ends
  before the designated primary's epoch began it becomes that node's mirror; a mirror whose
  source is not the designated primary fetches from it instead; a node removed from a volume
  (``leave --node --force``) no longer holds this node's log. Nothing here ever promotes a
  node: only an operator's ``primary`` claims a volume.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from marsfs.aio import describe, supervised
from marsfs.errors import (
    InvalidRequest,
    MarsError,
    PeerError,
    ProtocolError,
    VolumeBusy,
    VolumeExists,
    VolumeNotFound,
    WrongRole,
)
from marsfs.log import genesis_chain
from marsfs.node import gossip
from marsfs.node.follow import Act, decide
from marsfs.node.handover import Roles
from marsfs.node.meta import REFRESH, Position
from marsfs.node.node import MIRROR_FENCE, Node, check_volume_name
from marsfs.node.peers import Peers, TcpPeers, parse_address, welcome
from marsfs.node.state import (
    FRESH,
    MirrorFacts,
    PeerStatus,
    Role,
    VolumeState,
    VolumeStatus,
    mirror_state,
    peer_state,
)
from marsfs.replication.channel import Channel, ConnectionLost, PeerRefused
from marsfs.replication.fetch import Connect, Fetcher, ResyncPlan, hello, open_channel
from marsfs.replication.protocol import Hello, Welcome
from marsfs.replication.server import PeerTable, Server, lag_of
from marsfs.replication.session import SyncStatus
from marsfs.replication.verify import VerifyProgress, VerifyResult, verify_with
from marsfs.volume import Volume
from marsfs.volume.holds import mirror_hold

logger = logging.getLogger(__name__)

REPLAY_EVERY = 0.02
VERIFY_KEPT = 600.0  #: seconds a finished verify waits for its command line to collect it
GOSSIP_EVERY = 1.0  #: seconds between metadata exchanges with each peer (and position updates)
DEFAULT_CLUSTER = "marsfs"


class Cluster:
    """Replication for every volume of one node. Runs inside the daemon's trio loop."""

    def __init__(self, node: Node, *, listen: str | None, peers: dict[str, str], cluster: str = DEFAULT_CLUSTER,
                 sync_rate: int = 0, connections: Peers | None = None) -> None:
        """``connections`` reaches the peers (default: TCP to the ``peers`` addresses; tests
        pass a fake); ``peers`` names them either way."""
        self.node = node
        self.listen = parse_address(listen) if listen else None
        self.peers = {name: parse_address(addr) for name, addr in peers.items()}
        self.connections: Peers = connections if connections is not None else TcpPeers(self.peers)
        self.cluster = cluster
        self.peer_table = PeerTable()
        self.roles = Roles(self)
        self.server = Server(node.name, cluster, self._servable, self._epoch, self.peer_table, meta=self._serve_meta,
                             conversations={"handover": self.roles.serve_handover, "compare": self.roles.serve_compare},
                             sync_rate=sync_rate)
        self.fetchers: dict[str, Fetcher] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._fetch_ended: dict[str, trio.Event] = {}  #: set when a mirror's fetch task has ended
        self.copies: dict[str, ImageCopy] = {}  #: image copies running, or failed and not yet retried
        self.verifies: dict[str, VerifyJob] = {}  #: verify comparisons by id, until collected
        self._verify_seq = 0
        self._replay_samples: dict[str, deque[tuple[float, int]]] = {}
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
                nursery.start_soon(trio.serve_listeners, self.server.handle, listeners)
                self.port = listeners[0].socket.getsockname()[1]
                logger.info("node %s listens for peers on %s:%d", self.node.name, host, self.port)
            for name, vol in list(self.node.volumes.items()):
                if self.node.is_mirror(name):
                    self.start_fetch(vol)
            for name, vol in list(self.node.resuming.items()):  # first copies a crash interrupted
                del self.node.resuming[name]
                copy = ImageCopy(source=self.node.role(name).source, size=vol.size, started=trio.current_time())
                self.copies[name] = copy
                self._start_copy(vol, copy, ResyncPlan(whole=self.node.role(name).resync_whole))
            for name, source in list(self.node.rejoin.items()):
                try:
                    await self.join(name, source)
                except MarsError as e:
                    logger.error("could not restart the image copy of %s from %s: %s", name, source, describe(e))
                    self.copies[name] = ImageCopy(source=source, size=0, started=trio.current_time(),
                                                  failed=describe(e))
            nursery.start_soon(self._replay_loop)
            await self._start_meta(nursery)
            nursery.start_soon(supervised, "roles", self.roles.watch)
            task_status.started()

    def spawn(self, what: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` in the cluster's nursery, supervised as ``what`` (only while :meth:`run` runs)."""
        assert self._nursery is not None
        self._nursery.start_soon(supervised, what, fn)

    def connector(self, peer: str) -> Connect:
        """A connection to ``peer`` (PeerError at once for an unknown one): see :mod:`marsfs.node.peers`."""
        return self.connections.connector(peer)

    async def _welcome(self, source: str, name: str) -> Welcome:
        """Ask ``source`` whether it serves ``name`` (refusals come back to the operator at once)."""
        return await welcome(self.connections, self.node.name, self.cluster, source, name)

    def _servable(self, name: str) -> Volume | None:
        vol = self.node.volumes.get(name)
        return None if vol is None or vol.clone_of is not None else vol  # clones are local

    def _epoch(self, name: str) -> int:
        return self.node.role(name).epoch

    # ------------------------------------------------------------------ join and leave

    async def join(self, name: str, source: str, *, seed: str | None = None, rate: int = 0) -> dict[str, Any]:
        """Become a mirror of ``name`` from ``source``: returns once the source accepted.

        A new replica starts empty (or as a copy of ``seed``, an image file on this node) and
        reaches the source's version by fast sync: only blocks that differ are sent, and a
        copy interrupted by a crash or a lost connection resumes. A mirror that exists here
        already is resynced from ``source`` (only what changed, when the source can tell) when
        it is stale (its fetch stopped for good) or fetches from another node.
        A copy that failed stays visible (state failed, with the reason) until the operator
        joins again or leaves; a join while a copy runs is refused."""
        check_volume_name(name)
        if source == self.node.name:
            raise InvalidRequest(f"{source} is this node: run marsfs join {name} --from NODE with the node "
                                 "that holds the volume, on the node that should mirror it")
        self.connector(source)  # an unknown source is refused before anything changes
        old = self.copies.get(name)
        if old is not None and not old.failed:
            raise VolumeBusy(f"volume {name!r} is already being copied from {old.source}; "
                             f"follow it with: marsfs status {name}")
        if name in self.node.volumes and self.node.is_mirror(name):
            f = self.fetchers.get(name)
            if self.node.role(name).source == source and f is not None and not f.state.fatal:
                raise VolumeExists(f"volume {name!r} already exists on node {self.node.name}: it mirrors {source} "
                                   f"and follows its log; to resync its image anyway: marsfs invalidate {name}")
            if seed is not None:
                raise InvalidRequest(f"volume {name!r} already has an image on node {self.node.name}; --seed is "
                                     f"for a new copy (marsfs join {name} --from {source} fast-syncs this one)")
            return await self._join_existing(name, source, rate)
        self.node.check_new(name)
        seed_path = _seed_file(seed) if seed is not None else None
        welcome = await self._welcome(source, name)
        if seed_path is not None and seed_path.stat().st_size > welcome.size:
            raise InvalidRequest(f"seed {seed_path} holds {seed_path.stat().st_size} bytes, more than volume "
                                 f"{name} on {source} ({welcome.size}); give an image of that volume")
        copy = ImageCopy(source=source, size=welcome.size, started=trio.current_time())
        self.copies[name] = copy

        def make_volume() -> Volume:
            path = self.node.begin_mirror(name, source, welcome.epoch)  # a crash from here on resumes
            if seed_path is not None:  # a seed is not trusted: the resync compares every block
                self.node.set_role(name, resync_whole=True)
            vol = Volume.create_replica(path, name, welcome.size, welcome.uuid, 0, genesis_chain(welcome.uuid))
            if seed_path is not None:
                try:
                    _copy_seed(seed_path, vol)
                except BaseException:
                    vol.close()
                    raise
            return vol

        try:
            vol = await trio.to_thread.run_sync(make_volume)
        except BaseException:
            self.copies.pop(name, None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.node.abort_mirror, name)
            raise
        self._start_copy(vol, copy, ResyncPlan(whole=seed_path is not None, rate=rate))
        return {"volume": name, "source": source, "size": welcome.size, "state": "syncing",
                "seed": str(seed_path) if seed_path is not None else None}

    def _start_copy(self, vol: Volume, copy: ImageCopy, plan: ResyncPlan) -> None:
        """Run the first copy of a new replica (a fast sync straight into its base), then fetch.
        The replica is served once it switched; a fatal refusal or ``leave`` removes it."""
        name = vol.name
        served: list[bool] = []  #: once served, the volume is leave's and delete's, not ours

        def synced() -> None:  # in the fetcher's worker thread, right after the switch
            self.node.finish_mirror(vol)
            served.append(True)
            self.copies.pop(name, None)
            logger.info("first copy of %s from %s done at LSN %d; fetching the log", name, copy.source,
                        vol.head_lsn)

        async def cleanup(fetcher: Fetcher) -> None:
            if served:
                return  # served: leave and delete own it now
            if fetcher.state.fatal and not copy.scope.cancelled_caught:
                copy.failed = fetcher.state.error or fetcher.state.fatal
                logger.error("copy of %s from %s failed: %s; retry with marsfs join", name, copy.source, copy.failed)
            else:
                self.copies.pop(name, None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(vol.close)
                await trio.to_thread.run_sync(self.node.abort_mirror, name)

        copy.fetcher = self.start_fetch(vol, resync=plan, direct=True, synced=synced, scope=copy.scope,
                                         cleanup=cleanup)

    async def _join_existing(self, name: str, source: str, rate: int) -> dict[str, Any]:
        """``join`` of a mirror this node has (stale, or fetching from another node): resync it
        from ``source``, comparing what changed since its LSN when the source can tell."""
        await self._welcome(source, name)
        if self.node.role(name).source != source:
            await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, source=source))
        await self.restart_fetch(name, ResyncPlan(rate=rate))
        return {"volume": name, "source": source, "size": self.node.volume(name).size, "state": "resyncing",
                "seed": None}

    async def invalidate(self, name: str, *, ranges: tuple[tuple[int, int], ...] = (), rate: int = 0) -> dict[str, Any]:
        """Discard this mirror's copy of ``name`` as untrusted (divergent or damaged) and resync
        it from its source, comparing the whole image; ``ranges`` are compared in any case.
        The mirror keeps serving its last version until it switches. Refused on a primary.

        On a split brain's losing node (a split brain recorded here) it is the resolution
        (:meth:`Roles.resolve_split`): the divergent state is kept as a split version first, and
        only the two tails are copied."""
        if name in self.node.volumes and self.node.splits(name):
            return await self.roles.resolve_split(name, rate=rate)
        copy = self.copies.get(name)
        if copy is not None and name not in self.node.volumes and not copy.failed:
            raise VolumeBusy(f"volume {name!r} is still being copied from {copy.source} (a first copy compares "
                             f"every block already); follow it with: marsfs status {name}")
        vol = self.node.volume(name)
        role = self.node.role(name)
        if not role.is_mirror:
            raise WrongRole(f"volume {name!r} is {role.role} on node {self.node.name}: invalidate discards a "
                            "mirror's copy and resyncs it from its source; run it on the mirror whose copy is "
                            "damaged or divergent")
        self.connector(role.source)  # an unknown source is refused before anything changes
        await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, resync_whole=True))
        await self.restart_fetch(name, ResyncPlan(whole=True, ranges=ranges, rate=rate))
        logger.info("invalidated %s: resyncing the whole image from %s", name, role.source)
        return {"volume": name, "source": role.source, "size": vol.size, "state": "resyncing"}

    async def restart_fetch(self, name: str, plan: ResyncPlan) -> None:
        """Stop the fetcher of mirror ``name`` (waiting until it stopped: a resync needs the log
        still) and start one that runs ``plan`` first."""
        await self.stop_fetch(name)
        self.start_fetch(self.node.volume(name), resync=plan)

    def start_fetch(self, vol: Volume, *, resync: ResyncPlan | None = None, direct: bool = False,
                     synced: Callable[[], None] | None = None, scope: trio.CancelScope | None = None,
                     cleanup: Callable[[Fetcher], Awaitable[None]] | None = None) -> Fetcher | None:
        """Start fetching mirror ``vol`` from its source (a PeerError for an unknown source goes
        to the volume's errors, and None comes back); :meth:`stop_fetch` is its one way to stop."""
        name = vol.name
        role = self.node.role(name)
        try:
            connect = self.connector(role.source)
        except PeerError as e:
            vol.errors.append(str(e))
            return None
        if resync is None and role.resync_whole:  # an invalidate or seeded copy a restart interrupted
            resync = ResyncPlan(whole=True)

        def resynced() -> None:
            if self.node.role(name).resync_whole:
                self.node.set_role(name, resync_whole=False)

        source = role.source
        fetcher = Fetcher(vol, self.node.name, self.cluster, source, connect,
                          paused=lambda: (self.node.role(name).fetch_paused  # or log space is full (G8)
                                          or name in self.node.space.fetch_stopped),
                          replayed=lambda: vol.replayed_lsn,
                          replay_paused=lambda: self.node.role(name).replay_paused,
                          resync=resync, direct=direct, synced=synced or resynced,
                          quiet=lambda: self.server.quiet(vol))
        self.fetchers[name] = fetcher
        scope = scope if scope is not None else trio.CancelScope()
        self._scopes[name] = scope
        ended = self._fetch_ended[name] = trio.Event()

        async def run() -> None:
            try:
                with scope:
                    await fetcher.run()
                    if fetcher.state.fatal == "diverged":  # a split brain: where, and how much each side wrote
                        await self.roles.find_split(vol, source)
                if cleanup is not None:
                    await cleanup(fetcher)
            finally:
                ended.set()

        self.spawn(f"fetch of {name}", run)
        return fetcher

    async def stop_fetch(self, name: str) -> None:
        """Stop the fetch of ``name`` and wait until it appends nothing more."""
        scope = self._scopes.pop(name, None)
        self.fetchers.pop(name, None)
        ended = self._fetch_ended.pop(name, None)
        if scope is not None:
            scope.cancel()
        if ended is not None:
            await ended.wait()

    # ------------------------------------------------------------------ roles (marsfs.node.handover)

    async def primary(self, name: str, *, force: bool = False) -> dict[str, Any]:
        """``marsfs primary VOL [--force]``: planned handover to this node, or forced failover."""
        check_volume_name(name)
        return await (self.roles.fail_over(name) if force else self.roles.take_over(name))

    async def leave(self, name: str) -> dict[str, Any]:
        """Stop mirroring ``name`` and remove this node's copy. A refusal changes nothing."""
        copy = self.copies.get(name)
        if copy is not None and name not in self.node.volumes:  # an image copy, running or failed
            copy.scope.cancel()
            del self.copies[name]
            return {"volume": name, "left": copy.source}
        if not self.node.is_mirror(name):
            self.node.volume(name)
            raise WrongRole(f"volume {name!r} is not a mirror on node {self.node.name}; use marsfs delete")
        source = self.node.role(name).source
        self.node.check_delete(name)  # refuse before stopping anything
        fetching = name in self.fetchers
        await self.stop_fetch(name)  # its append thread has ended before the log is deleted
        try:
            await trio.to_thread.run_sync(lambda: self.node.delete(name, force=False))
        except MarsError:
            if fetching:  # opened in the meantime: keep mirroring as before
                self.start_fetch(self.node.volume(name))
            raise
        try:  # tell the source to stop holding log for us; it will also notice the silence
            ch, _ = await open_channel(self.connector(source), hello(self.node.name, self.cluster, name, "leave"))
            await ch.aclose()
        except (MarsError, OSError, PeerRefused, trio.TooSlowError) as e:
            logger.info("could not tell %s that we left %s: %s", source, name, describe(e))
        return {"volume": name, "left": source}

    # ------------------------------------------------------------------ pause and resume

    def set_paused(self, name: str, what: str, paused: bool) -> dict[str, Any]:
        if not self.node.is_mirror(name):
            self.node.volume(name)
            raise WrongRole(f"volume {name!r} is not a mirror on node {self.node.name}")
        vol = self.node.volume(name)
        if what == "replay":
            self.node.set_role(name, replay_paused=paused, replayed_lsn=vol.replayed_lsn)
        else:
            self.node.set_role(name, fetch_paused=paused)
            fetcher = self.fetchers.get(name)
            if fetcher is not None:
                fetcher.wake()  # the session of the other kind starts now, not after the next heartbeat
        return {"volume": name, f"{what}_paused": paused}

    async def _replay_loop(self) -> None:
        persisted: dict[str, float] = {}
        while True:
            await trio.sleep(REPLAY_EVERY)
            now = trio.current_time()
            for name, vol in list(self.node.volumes.items()):
                role = self.node.role(name)
                if not role.is_mirror or role.replay_paused:
                    continue
                if vol.replay_limit is not None and vol.durable_lsn > vol.replay_limit:
                    vol.replay_limit = vol.durable_lsn
                samples = self._replay_samples.setdefault(name, deque(maxlen=50))
                if not samples or now - samples[-1][0] > 0.1:
                    samples.append((now, vol.replayed_lsn))
                if now - persisted.get(name, 0) > 1.0 and role.replayed_lsn != vol.replayed_lsn:
                    persisted[name] = now
                    await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, replayed_lsn=vol.replayed_lsn))

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
            job.result = await verify_with(vol, self.node.name, self.cluster, peer, connect, mine=mine,
                                           progress=job.progress)
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
        """Every volume's status (or one's), with lag and peers. Reads only."""
        if name is not None and name not in self.node.volumes:
            if name in self.copies:
                return [self._copy_status(name)]
            if name in self.node.failed:
                return [self.node.failed_status(name)]
            self.node.volume(name)  # raises the usual unknown-volume error
        names = [name] if name is not None else sorted(self.node.volumes)
        rows = [self._with_meta(self._volume_status(n)) for n in names]
        if name is None:
            rows += [self.node.failed_status(n) for n in sorted(self.node.failed)]
            rows += [self._copy_status(n) for n in sorted(self.copies)]
        return rows

    def _volume_status(self, name: str) -> VolumeStatus:
        st = self.node.volume_status(name).changed(handover=self.roles.progress.get(name))
        if st.role == Role.MIRROR:
            return self._mirror_status(st)
        vol = self.node.volumes[name]
        peers = []
        for p in self.peer_table.for_volume(name, vol.uuid):
            # now, not when the last session shipped: a dead link keeps lagging
            lag_b, lag_r, lag_s = lag_of(vol, p.fetched_lsn)
            peers.append(PeerStatus(
                node=p.node, connected=p.connected, fetched_lsn=p.fetched_lsn, replayed_lsn=p.replayed_lsn,
                fetch_paused=p.fetch_paused, replay_paused=p.replay_paused, lag_bytes=lag_b, lag_records=lag_r,
                lag_seconds=lag_s, last_seen=p.last_seen, dropped=st.dropped.get(p.node, 0),
                state=VolumeState.SYNCING if p.syncing else peer_state(
                    connected=p.connected, fetch_paused=p.fetch_paused, replay_paused=p.replay_paused,
                    lag_records=lag_r)))
        return st.changed(peers=peers)

    def _copy_status(self, name: str) -> VolumeStatus:
        c = self.copies[name]
        fs = c.fetcher.state if c.fetcher is not None else None
        sync = fs.sync if fs is not None else None
        errors = [f"copy from {c.source} failed: {c.failed}; retry with: marsfs join {name} --from "
                  f"{c.source}, or give up with: marsfs leave {name}"] if c.failed else []
        if not c.failed and fs is not None and fs.error:
            errors.append(f"copy from {c.source}: {fs.error} (retrying; the copy resumes where it was)")
        fields = _sync_fields(sync) if not c.failed else {}
        return VolumeStatus(
            volume=name, node=self.node.name, role=Role.MIRROR,
            state=VolumeState.FAILED if c.failed else VolumeState.SYNCING, epoch=0,
            size=c.size, head_lsn=0, durable_lsn=0, fetched_lsn=0, replayed_lsn=0, applied_lsn=0,
            lag_bytes=fields.get("sync_left_bytes") or c.size, lag_records=0, lag_seconds=0.0,
            oldest_version_lsn=0, log_bytes=0, open_handles=0, source=c.source, errors=errors,
            connected=fs.connected if fs is not None else None, **{"progress": 0.0, **fields})

    def _mirror_status(self, st: VolumeStatus) -> VolumeStatus:
        name = st.volume
        role = self.node.role(name)
        vol = self.node.volumes[name]
        now = self._now()
        replay_rate = _rate(self._replay_samples.get(name) or deque())
        f = self.fetchers.get(name)
        base = st.changed(source=role.source, fetch_paused=role.fetch_paused, replay_paused=role.replay_paused,
                          replay_rate=replay_rate)
        if f is None:
            state, errors = mirror_state(MirrorFacts(
                source=role.source, fetching=False, fatal="", error="", fetch_paused=role.fetch_paused,
                replay_paused=role.replay_paused, connected=False, since_progress=0.0, missing_records=0,
                lag_records=0, heartbeat_age=None))
            return base.changed(state=state, errors=st.errors + errors)
        fs = f.state
        # how old the source's state behind the newest heartbeat is at most (see FetchState)
        heartbeat_age = now - fs.heartbeat_basis if fs.heartbeat_basis else None
        replay_lag = st.fetched_lsn - st.replayed_lsn
        lag_records = fs.lag_records + replay_lag
        lag_bytes = fs.lag_bytes + (vol.log.bytes_between(st.replayed_lsn, st.fetched_lsn) if st.durable_lsn else 0)
        lag_seconds = fs.lag_seconds
        if heartbeat_age is None or heartbeat_age > FRESH or not fs.connected:
            # our newest word from the source describes it `age` seconds ago (heartbeats queue
            # behind records on a slow link): we cannot claim to be closer than that
            lag_seconds = max(lag_seconds, heartbeat_age if heartbeat_age is not None else now - fs.last_progress)
        fetch_rate = 0.0 if role.fetch_paused else fs.rate()  # the samples are from before the pause
        eta = (fs.lag_bytes / fetch_rate) if fs.lag_bytes and fetch_rate else (0.0 if not fs.lag_bytes else None)
        state, errors = mirror_state(MirrorFacts(
            source=fs.source, fetching=True, fatal=fs.fatal, error=fs.error, fetch_paused=role.fetch_paused,
            replay_paused=role.replay_paused, connected=fs.connected, since_progress=now - fs.last_progress,
            missing_records=fs.lag_records, lag_records=lag_records, heartbeat_age=heartbeat_age,
            resyncing=fs.sync is not None or f.resync is not None or vol.resync is not None))
        row = base.changed(
            state=state, errors=st.errors + errors, connected=fs.connected, heartbeat_age=heartbeat_age,
            primary_durable_lsn=fs.primary_durable_lsn, lag_records=lag_records, lag_bytes=lag_bytes,
            lag_seconds=lag_seconds, **{"fetch_rate": fetch_rate, "eta_seconds": eta, **_sync_fields(fs.sync)})
        if fs.sync is not None and fs.sync.waiting:
            row = row.changed(errors=[*row.errors, f"resync done, switch waits: {fs.sync.waiting}"])
        return row


    # ------------------------------------------------------------------ cluster metadata (issue 10)

    def _init_meta(self) -> None:
        self.meta = self.node.meta
        self._gossip_wake: dict[str, trio.Event] = {}  #: per peer: exchange now
        self._follow_wake = trio.Event()  #: metadata changed: publish and follow now
        self._heard: dict[str, float] = {}  #: peer -> wall time of our last metadata exchange with it
        #: peer -> (our map's version, trio time) after our last exchange with it, either way
        self._exchanged: dict[str, tuple[int, float]] = {}
        self._gossip_trouble: dict[str, str] = {}  #: peer -> why the last exchange failed ("" : it worked)
        self._meta_errors: dict[str, str] = {}  #: volume -> what the follow step cannot do, and what to do

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
        nursery.start_soon(supervised, "cluster metadata", self._meta_loop)

    def gossip_now(self) -> None:
        """Exchange metadata with every peer and follow it now (after a claim, a removal)."""
        for ev in self._gossip_wake.values():
            ev.set()
        self._follow_wake.set()

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

    async def _exchange(self, peer: str) -> None:
        """One metadata exchange with ``peer``, unless it has our map as it is (the last
        exchange either way left it so, less than ``REFRESH`` seconds ago: each node pushes its
        own changes). Trouble is logged once per change, at INFO."""
        version, when = self._exchanged.get(peer, (-1, 0.0))
        if version == self.meta.version and trio.current_time() - when < REFRESH:
            return
        try:
            changed = await gossip.exchange(self.connector(peer), self.meta, self.cluster, peer)
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
        await self._publish()
        for name in sorted(self.node.volumes):
            try:
                await self._follow(name)
            except MarsError as e:  # e.g. the disk failed under a role change: say it, try again
                self._meta_errors[name] = f"following the designated primary of {name}: {describe(e)}"

    def _claim_unclaimed(self) -> None:
        """A primary from before the metadata existed claims its volume at its epoch from LSN 1."""
        for name in sorted(self.node.volumes):
            role = self.node.role(name)
            if role.role == Role.PRIMARY and self.meta.designated(name) is None:
                self.meta.claim(name, self.node.name, role.epoch, 1)
                logger.info("volume %s: claimed epoch %d in the cluster metadata (it had no claim)", name, role.epoch)

    async def _publish(self) -> None:
        now = time.time()
        positions = []
        for name in sorted(self.node.volumes):
            vol = self.node.volumes[name]
            if vol.clone_of is not None:
                continue
            try:
                st = self._volume_status(name)
            except MarsError:
                continue  # deleted in the meantime
            positions.append((name, Position(
                role=st.role.value, state=st.state.value, epoch=st.epoch, head_lsn=st.head_lsn,
                durable_lsn=st.durable_lsn, chain_at_head=vol.log.last_chain.hex(), replayed_lsn=st.replayed_lsn,
                open_handles=st.open_handles, source=st.source or "", updated=now)))

        def put() -> bool:
            return any([self.meta.publish(name, p) for name, p in positions])

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
        do = decide(name, self.node.name, role, d, head_lsn=vol.head_lsn, opens=self.node.opens[name],
                    copying=name in self.copies)
        if do.fence:
            self.node.fence(name, do.fence)
        if do.error:
            self._meta_errors[name] = do.error
        elif do.act != Act.NOTHING:
            self._meta_errors.pop(name, None)
        if do.act == Act.UNFENCE:
            self.node.unfence(name)
            self.node.unfence(name, holder=MIRROR_FENCE)
        elif do.act == Act.BECOME_MIRROR:
            await trio.to_thread.run_sync(self.node.become_mirror, name, d.node, d.epoch)
            self.start_fetch(vol)
            self.gossip_now()
        elif do.act == Act.REFETCH:
            logger.info("volume %s: %s is the designated primary (epoch %d); fetching from it instead of %s",
                        name, d.node, d.epoch, role.source)
            await self.stop_fetch(name)  # the old source's fetcher ends before the new one starts
            await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, source=d.node,
                                                            epoch=d.epoch))
            self.start_fetch(vol)
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
                                 f"removed; make a survivor primary first (marsfs primary {name} --force there)")
        known = self.meta.members(name) | {p.node for p in self.peer_table.for_volume(name, vol.uuid)}
        if node not in known:
            raise VolumeNotFound(f"node {node} does not hold volume {name} as far as this node knows "
                                 f"(members: {', '.join(sorted(self.meta.members(name))) or 'none'})")
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

    def _with_meta(self, st: VolumeStatus) -> VolumeStatus:
        """A status row with the other nodes' published positions, and what following the
        designated primary cannot do (the node's row has the designation and the fences)."""
        name = st.volume
        rows = []
        for owner, p in sorted(self.meta.positions(name).items()):
            if owner != self.node.name:
                rows.append({"node": owner, "role": p.role, "state": p.state, "epoch": p.epoch,
                             "head_lsn": p.head_lsn, "replayed_lsn": p.replayed_lsn, "source": p.source,
                             "updated": p.updated, "last_heard": self._heard.get(owner)})
        error = self._meta_errors.get(name)
        return st.changed(positions=rows, errors=[*st.errors, error] if error else st.errors)


@dataclass(eq=False)
class VerifyJob:
    """A ``verify`` comparison running in the background, until its result is collected."""

    progress: VerifyProgress
    started: float  #: trio time
    finished: trio.Event = field(default_factory=trio.Event)
    result: VerifyResult | None = None
    error: MarsError | None = None


@dataclass(eq=False)
class ImageCopy:
    """A mirror's image copy in progress, or one that failed and waits for the operator."""

    source: str
    size: int
    started: float  #: trio time
    failed: str = ""  #: why the copy failed, in words ("" while it runs)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  #: leave cancels it
    fetcher: Fetcher | None = None  #: the fetcher whose fast sync makes the copy


def _seed_file(seed: str) -> Path:
    """The seed image file of a join, checked before anything is created."""
    path = Path(seed)
    if not path.is_absolute():
        raise InvalidRequest(f"seed {seed!r}: give an absolute path (the daemon reads it)")
    try:
        if not path.is_file():
            raise InvalidRequest(f"seed {seed}: not a regular file; give an image file copied from the volume")
        with open(path, "rb"):
            pass
    except OSError as e:
        raise InvalidRequest(f"seed {seed}: cannot read it: {e.strerror}") from None
    return path


SEED_CHUNK = 4 * 1024 * 1024


def _copy_seed(path: Path, vol: Volume) -> None:
    """Lay the seed image into a new replica's base (chunks of zeros stay holes), durably."""
    zero = bytes(SEED_CHUNK)
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while data := os.pread(fd, SEED_CHUNK, off):
            if data != zero[: len(data)]:
                vol.write_base(off, data)
            off += len(data)
    finally:
        os.close(fd)
    vol.sync_base()


def _sync_fields(sync: SyncStatus | None) -> dict[str, Any]:
    """Status fields of a fast sync under way (none when there is none)."""
    if sync is None:
        return {}
    return {"progress": sync.fraction, "fetch_rate": sync.rate(), "eta_seconds": sync.eta(),
            "sync_target_lsn": sync.lsn or None, "sync_bytes": sync.total,
            "sync_left_bytes": sync.total - sync.compared, "sync_received_bytes": sync.received}


def _rate(samples: deque[tuple[float, int]]) -> float:
    if len(samples) < 2:
        return 0.0
    (t0, v0), (t1, v1) = samples[0], samples[-1]
    return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0
