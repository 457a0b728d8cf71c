"""The mirror side of a node: joining, first copies, fetchers, resyncs, replay, leaving.

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
* At most one fetch runs per volume, and :meth:`Mirrors.stop` is the one way to end one: it
  returns once the fetch appends nothing more (a new source, a resync, a promotion or a
  deleted log needs that). :meth:`Mirrors.start` refuses while the old fetch still runs.
* Replay moves a mirror's visible version to its durable fetched LSN every ``REPLAY_EVERY``
  seconds unless paused. Pause flags and the paused replay position persist in role.json.
  A node with no mirror volume looks only every ``REPLAY_IDLE`` seconds (its idle cost must
  not be a 50 Hz timer), and :meth:`Mirrors.start`, the one way records reach a mirror, wakes
  the loop at once.
* A node becomes a member of a volume by the operator's ``join``: the first copy's fetcher
  (also when a restart resumes it) and a join onto an existing image say so in their fast
  sync's HELLO, and the source takes them for a member from then on (:mod:`marsfs.node.access`).
  A fetch refused as ``not-a-member`` introduces this node to its source (its positions, by
  a metadata exchange) before it retries.
* What the mirrors need of the rest of the node comes in through the constructor (the peers,
  a way to run a task, the server's quiet, what to do when a fetch is refused as diverged,
  how to introduce this node to a peer);
  nothing here knows the :class:`~marsfs.node.cluster.Cluster` that composes it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from marsfs.aio import describe
from marsfs.errors import InvalidRequest, MarsError, PeerError, VolumeBusy, VolumeExists, WrongRole
from marsfs.log import genesis_chain
from marsfs.node.node import Node, check_volume_name
from marsfs.node.peers import Peers, welcome
from marsfs.node.volstate import VolumeState
from marsfs.replication.channel import PeerRefused
from marsfs.replication.fetch import Fetcher, ResyncPlan, hello, open_channel
from marsfs.replication.protocol import Welcome
from marsfs.replication.session import Stop
from marsfs.volume import Volume

logger = logging.getLogger(__name__)

REPLAY_EVERY = 0.02
REPLAY_IDLE = 0.5  #: seconds between looks of the replay loop while no volume here is a mirror
SEED_CHUNK = 4 * 1024 * 1024

#: runs ``fn`` as a supervised background task named ``what`` (the cluster's nursery)
Spawn = Callable[[str, Callable[[], Awaitable[None]]], None]
#: what a fetch does once it ended (its fetcher, and whether :meth:`Mirrors.stop` ended it)
Cleanup = Callable[[Fetcher, bool], Awaitable[None]]


@dataclass(eq=False)
class ImageCopy:
    """A mirror's image copy in progress, or one that failed and waits for the operator."""

    source: str
    size: int
    started: float  #: trio time
    failed: str = ""  #: why the copy failed, in words ("" while it runs)
    fetcher: Fetcher | None = None  #: the fetcher whose fast sync makes the copy


class Mirrors:
    """The fetchers, image copies and replay of one node's mirror volumes.

    ``fetchers`` (volume -> its fetcher, also one that ended for good and waits for the
    operator), ``copies`` (image copies running or failed) and ``replay_samples`` (volume ->
    recent (trio time, replayed LSN)) are read by status; only this class changes them."""

    def __init__(self, node: Node, cluster: str, peers: Peers, *, spawn: Spawn,
                 quiet: Callable[[Volume], AbstractAsyncContextManager[None]],
                 diverged: Callable[[Volume, str], Awaitable[None]],
                 introduce: Callable[[str], Awaitable[None]] | None = None) -> None:
        """``quiet(vol)`` keeps this node's own server off ``vol``'s log while a resync
        switches; ``diverged(vol, source)`` runs after a fetch was refused as diverged (it
        finds the split brain's fork); ``introduce(peer)`` tells ``peer`` what this node holds
        (:meth:`marsfs.node.cluster.Cluster.introduce`)."""
        self.introduce = introduce
        self.node = node
        self.cluster = cluster
        self.peers = peers
        self.spawn = spawn
        self.quiet = quiet
        self.diverged = diverged
        self.fetchers: dict[str, Fetcher] = {}
        self.copies: dict[str, ImageCopy] = {}  #: image copies running, or failed and not yet retried
        self.replay_samples: dict[str, deque[tuple[float, int]]] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._ended: dict[str, trio.Event] = {}  #: set when a mirror's fetch task has ended
        self._replay_wake = trio.Event()  #: a fetch started: the replay loop looks now

    async def resume(self) -> None:
        """At start: fetch for every mirror, resume the first copies a crash interrupted, and
        restart those a crash interrupted before their replica existed."""
        for name, vol in list(self.node.volumes.items()):
            if self.node.is_mirror(name):
                self.start(vol)
        for name, vol in self.node.take_resuming().items():
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

    # ------------------------------------------------------------------ fetchers

    def start(self, vol: Volume, *, resync: ResyncPlan | None = None, direct: bool = False,
              synced: Callable[[], None] | None = None, cleanup: Cleanup | None = None,
              joining: bool = False) -> Fetcher | None:
        """Start fetching mirror ``vol`` from its source (a PeerError for an unknown source goes
        to the volume's errors, and None comes back); :meth:`stop` is its one way to stop.
        ``joining``: the operator's ``join`` asks for it (its fast sync says so)."""
        name = vol.name
        old = self._ended.get(name)
        assert old is None or old.is_set(), f"the fetch of {name} still runs: stop it first"
        role = self.node.role(name)
        try:
            connect = self.peers.connector(role.source)
        except PeerError as e:
            vol.errors.append(str(e))
            return None
        if resync is None and role.resync_whole:  # an invalidate or seeded copy a restart interrupted
            resync = ResyncPlan(whole=True)

        def resynced() -> None:
            if self.node.role(name).resync_whole:
                self.node.set_role(name, resync_whole=False)

        source = role.source
        introduce = self.introduce

        async def refused(code: str) -> None:
            if code == "not-a-member" and introduce is not None:
                await introduce(source)

        fetcher = Fetcher(vol, self.node.name, self.cluster, source, connect,
                          paused=lambda: (self.node.role(name).fetch_paused  # or log space is full (G8)
                                          or name in self.node.space.fetch_stopped),
                          replayed=lambda: vol.replayed_lsn,
                          replay_paused=lambda: self.node.role(name).replay_paused,
                          resync=resync, direct=direct, synced=synced or resynced,
                          quiet=lambda: self.quiet(vol), node_id=self.node.node_id, joining=joining,
                          refused=refused)
        self.fetchers[name] = fetcher
        scope = self._scopes[name] = trio.CancelScope()
        ended = self._ended[name] = trio.Event()

        async def run() -> None:
            try:
                with scope:
                    await fetcher.run()
                    # a split brain: find where, and how much each side wrote
                    if fetcher.state.stop is Stop.SPLIT_BRAIN:
                        await self.diverged(vol, source)
                if cleanup is not None:
                    await cleanup(fetcher, scope.cancelled_caught)
            finally:
                ended.set()

        self.spawn(f"fetch of {name}", run)
        self._replay_wake.set()
        return fetcher

    async def stop(self, name: str) -> None:
        """Stop the fetch of ``name`` (a first copy's too) and wait until it appends nothing
        more and its cleanup ran."""
        scope = self._scopes.pop(name, None)
        self.fetchers.pop(name, None)
        ended = self._ended.pop(name, None)
        if scope is not None:
            scope.cancel()
        if ended is not None:
            await ended.wait()

    def running(self, name: str) -> bool:
        """Whether a fetch of ``name`` runs (or has not yet ended after :meth:`stop`)."""
        ended = self._ended.get(name)
        return ended is not None and not ended.is_set()

    async def stopped(self, name: str) -> None:
        """:meth:`stop`, until no fetch of ``name`` runs. While one step waits for the old
        fetcher to end, another (a resync's end, the roles' watch, a metadata round) may start
        a new one; with no checkpoint between this and a :meth:`start`, that start finds none
        running, as it asserts."""
        await self.stop(name)
        while self.running(name):
            await self.stop(name)

    async def restart(self, name: str, plan: ResyncPlan, *, joining: bool = False) -> None:
        """Stop the fetcher of mirror ``name`` (waiting until it stopped: a resync needs the log
        still) and start one that runs ``plan`` first (``joining``: for the operator's join)."""
        await self.stopped(name)
        self.start(self.node.volume(name), resync=plan, joining=joining)

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

        async def cleanup(fetcher: Fetcher, stopped: bool) -> None:
            if served:
                return  # served: leave and delete own it now
            if fetcher.state.fatal and not stopped:
                copy.failed = fetcher.state.error or fetcher.state.fatal
                logger.error("copy of %s from %s failed: %s; retry with marsfs join", name, copy.source, copy.failed)
            else:
                self.copies.pop(name, None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(vol.close)
                await trio.to_thread.run_sync(self.node.abort_mirror, name)

        copy.fetcher = self.start(vol, resync=plan, direct=True, synced=synced, cleanup=cleanup, joining=True)

    # ------------------------------------------------------------------ join and leave

    async def join(self, name: str, source: str, *, seed: str | None = None, rate: int = 0,
                   thin: bool = False) -> dict[str, Any]:
        """Become a mirror of ``name`` from ``source``: returns once the source accepted.

        A new replica's base image is reserved on disk (fallocate), as ``create``'s is, unless
        ``thin``: a reservation that does not fit the free space is refused (NoSpace, both
        numbers) before anything is created. A new replica starts empty (or as a copy of ``seed``, an image file on this node) and
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
        self.peers.connector(source)  # an unknown source is refused before anything changes
        old = self.copies.get(name)
        if old is not None and not old.failed:
            raise VolumeBusy(f"volume {name!r} is already being copied from {old.source}; "
                             f"follow it with: marsfs status {name}")
        if old is not None:
            await self.stop(name)  # the failed copy's fetch has ended, and its cleanup with it
        if name in self.node.volumes and self.node.is_mirror(name):
            f = self.fetchers.get(name)
            if self.node.role(name).source == source and f is not None and not f.state.fatal:
                raise VolumeExists(f"volume {name!r} already exists on node {self.node.name}: it mirrors {source} "
                                   f"and follows its log; to resync its image anyway: marsfs invalidate {name}")
            if seed is not None:
                raise InvalidRequest(f"volume {name!r} already has an image on node {self.node.name}; --seed is "
                                     f"for a new copy (marsfs join {name} --from {source} fast-syncs this one)")
            return await self._join_existing(name, source, rate)
        if name in self.node.failed and self.node.is_mirror(name):
            if seed is not None:
                raise InvalidRequest(f"volume {name!r} on node {self.node.name} is a failed mirror; its own image "
                                     f"is the seed of a join: run it without --seed")
            return await self.recopy(name, source, rate=rate)
        self.node.check_new(name)
        seed_path = _seed_file(seed) if seed is not None else None
        answer = await welcome(self.peers, self.node.name, self.cluster, source, name, self.node.node_id)
        if seed_path is not None and seed_path.stat().st_size > answer.size:
            raise InvalidRequest(f"seed {seed_path} holds {seed_path.stat().st_size} bytes, more than volume "
                                 f"{name} on {source} ({answer.size}); give an image of that volume")
        if not thin:
            self.node.check_room(name, answer.size, join=source)
        return await self._new_replica(name, source, answer, seed_path, rate, thin)

    async def _new_replica(self, name: str, source: str, answer: Welcome, seed_path: Path | None,
                           rate: int, thin: bool) -> dict[str, Any]:
        """Make a new replica of ``name`` (as ``source`` described it in ``answer``), from zeros
        or from ``seed_path`` (compared whole), reserved unless ``thin``, and start its first
        copy in the background."""
        copy = ImageCopy(source=source, size=answer.size, started=trio.current_time())
        self.copies[name] = copy

        def make_volume() -> Volume:
            path = self.node.begin_mirror(name, source, answer.epoch)  # a crash from here on resumes
            if seed_path is not None:  # a seed is not trusted: the resync compares every block
                self.node.set_role(name, resync_whole=True)
            try:
                vol = Volume.create_replica(path, name, answer.size, answer.uuid, 0, genesis_chain(answer.uuid),
                                            reserve=not thin)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self.node.check_room(name, answer.size, join=source)  # says both numbers
                raise
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
        return {"volume": name, "source": source, "size": answer.size, "state": VolumeState.SYNCING,
                "seed": str(seed_path) if seed_path is not None else None}

    async def _join_existing(self, name: str, source: str, rate: int) -> dict[str, Any]:
        """``join`` of a mirror this node has (stale, or fetching from another node): resync it
        from ``source``, comparing what changed since its LSN when the source can tell."""
        await welcome(self.peers, self.node.name, self.cluster, source, name, self.node.node_id)
        if self.node.role(name).source != source:
            await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, source=source))
        await self.restart(name, ResyncPlan(rate=rate), joining=True)
        return {"volume": name, "source": source, "size": self.node.volume(name).size, "state": VolumeState.RESYNCING,
                "seed": None}

    async def recopy(self, name: str, source: str, *, rate: int = 0) -> dict[str, Any]:
        """Replace a failed mirror of ``name`` (one that could not be opened at start, e.g. its
        log is damaged) by a new replica from ``source``: its directory goes to the trash and
        its base image seeds the new replica, so the fast sync compares every block but sends
        only those that differ. The source is asked first: a refusal changes nothing."""
        self.peers.connector(source)  # an unknown source is refused before anything changes
        answer = await welcome(self.peers, self.node.name, self.cluster, source, name, self.node.node_id)
        self.node.check_room(name, answer.size, join=source)  # the old image stays until the seed is laid
        old = await trio.to_thread.run_sync(self.node.discard_failed, name)
        seed = old / "base.img"
        try:
            usable = seed.is_file() and seed.stat().st_size <= answer.size
            result = await self._new_replica(name, source, answer, seed if usable else None, rate, False)
        finally:
            await trio.to_thread.run_sync(functools.partial(shutil.rmtree, old, ignore_errors=True))
        logger.info("replaced the failed copy of %s: copying it anew from %s", name, source)
        return result

    async def invalidate(self, name: str, *, ranges: tuple[tuple[int, int], ...] = (), rate: int = 0) -> dict[str, Any]:
        """Discard this mirror's copy of ``name`` as untrusted (divergent or damaged) and resync
        it from its source, comparing the whole image; ``ranges`` are compared in any case.
        The mirror keeps serving its last version until it switches. Refused on a primary.
        (A split brain's losing node resolves it instead: :meth:`Roles.resolve_split`.)"""
        copy = self.copies.get(name)
        if copy is not None and name not in self.node.volumes and not copy.failed:
            raise VolumeBusy(f"volume {name!r} is still being copied from {copy.source} (a first copy compares "
                             f"every block already); follow it with: marsfs status {name}")
        if name in self.node.failed and self.node.is_mirror(name):  # not openable: a new copy
            return await self.recopy(name, self.node.role(name).source, rate=rate)
        vol = self.node.volume(name)
        role = self.node.role(name)
        if not role.is_mirror:
            raise WrongRole(f"volume {name!r} is {role.role} on node {self.node.name}: invalidate discards a "
                            "mirror's copy and resyncs it from its source; run it on the mirror whose copy is "
                            "damaged or divergent")
        self.peers.connector(role.source)  # an unknown source is refused before anything changes
        await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, resync_whole=True))
        await self.restart(name, ResyncPlan(whole=True, ranges=ranges, rate=rate))
        logger.info("invalidated %s: resyncing the whole image from %s", name, role.source)
        return {"volume": name, "source": role.source, "size": vol.size, "state": VolumeState.RESYNCING}

    async def leave(self, name: str) -> dict[str, Any]:
        """Stop mirroring ``name`` and remove this node's copy. A refusal changes nothing."""
        copy = self.copies.get(name)
        if copy is not None and name not in self.node.volumes:  # an image copy, running or failed
            await self.stop(name)  # its cleanup removed the replica
            self.copies.pop(name, None)
            await self._tell_left(copy.source, name)  # the source's sync held its log for us
            return {"volume": name, "left": copy.source}
        if not self.node.is_mirror(name):
            self.node.volume(name)
            raise WrongRole(f"volume {name!r} is not a mirror on node {self.node.name}; use marsfs delete")
        source = self.node.role(name).source
        if name in self.node.failed:  # not openable, so not fetching: only its directory is left
            await trio.to_thread.run_sync(functools.partial(self.node.delete, name, force=False))
            await self._tell_left(source, name)
            return {"volume": name, "left": source}
        self.node.check_delete(name)  # refuse before stopping anything
        fetching = name in self.fetchers
        await self.stop(name)  # its append thread has ended before the log is deleted
        try:
            await trio.to_thread.run_sync(lambda: self.node.delete(name, force=False))
        except MarsError:
            if fetching:  # opened in the meantime: keep mirroring as before
                self.start(self.node.volume(name))
            raise
        await self._tell_left(source, name)
        return {"volume": name, "left": source}

    async def _tell_left(self, source: str, name: str) -> None:
        """Tell ``source`` to stop holding its log of ``name`` for us and forget our mirror line
        (from the first copy's start on it holds it); trouble is logged: it changes nothing here."""
        try:
            ch, _ = await open_channel(self.peers.connector(source),
                                       hello(self.node.name, self.cluster, name, "leave", node_id=self.node.node_id))
            await ch.aclose()
        except (MarsError, OSError, PeerRefused, trio.TooSlowError) as e:
            logger.info("could not tell %s that we left %s: %s", source, name, describe(e))

    # ------------------------------------------------------------------ pause, resume and replay

    def set_paused(self, name: str, what: str, paused: bool) -> dict[str, Any]:
        """Pause or resume the ``fetch`` or the ``replay`` of mirror ``name`` (persisted)."""
        if not self.node.is_mirror(name):
            self.node.volume(name)
            raise WrongRole(f"volume {name!r} is not a mirror on node {self.node.name}: pausing and resuming its "
                            f"{what} is for a mirror; run it on a node that mirrors {name} (marsfs status {name} "
                            "here lists them)")
        vol = self.node.volume(name)
        if what == "replay":
            self.node.set_role(name, replay_paused=paused, replayed_lsn=vol.replayed_lsn)
        else:
            self.node.set_role(name, fetch_paused=paused)
            fetcher = self.fetchers.get(name)
            if fetcher is not None:
                fetcher.wake()  # the session of the other kind starts now, not after the next heartbeat
        return {"volume": name, f"{what}_paused": paused}

    async def replay_loop(self) -> None:
        """Every REPLAY_EVERY seconds (REPLAY_IDLE while no volume is a mirror): move each
        unpaused mirror's visible version to its durable LSN, sample the replay rate, and
        persist the replayed LSN at most every second."""
        persisted: dict[str, float] = {}
        while True:
            if any(v.replay_limit is not None for v in self.node.volumes.values()):  # a mirror is here
                await trio.sleep(REPLAY_EVERY)
            else:
                self._replay_wake = trio.Event()
                with trio.move_on_after(REPLAY_IDLE):
                    await self._replay_wake.wait()
            now = trio.current_time()
            for name, vol in list(self.node.volumes.items()):
                role = self.node.role(name)
                if not role.is_mirror or role.replay_paused:
                    continue
                if vol.replay_limit is not None and vol.durable_lsn > vol.replay_limit:
                    vol.counters.replayed_bytes += vol.log.bytes_between(vol.replay_limit, vol.durable_lsn)
                    vol.replay_limit = vol.durable_lsn
                samples = self.replay_samples.setdefault(name, deque(maxlen=50))
                if not samples or now - samples[-1][0] > 0.1:
                    samples.append((now, vol.replayed_lsn))
                if now - persisted.get(name, 0) > 1.0 and role.replayed_lsn != vol.replayed_lsn:
                    persisted[name] = now
                    await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, replayed_lsn=vol.replayed_lsn))


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
