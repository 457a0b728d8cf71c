"""Replication modes per volume (``async``, ``sync``) and the gate an application's flush passes.

Rules that hold here:

* A volume's mode is in the cluster metadata (``volume/V/mode``, read by
  :meth:`~marsfs.node.meta.ClusterMeta.mode_of`), so it is replicated with the volume and a
  new primary keeps it; without an entry a volume is ``async``. :class:`ModeSetting` is its
  value; a clone is always ``async`` (it is never replicated).
* Every application flush (the FUSE face's fsync and fdatasync, which is also what a loop
  device's FLUSH becomes) is :meth:`SyncGates.flush`. On an ``async`` volume it is what it
  always was: the volume's flush when anything is to be flushed (:func:`flush_here`: its
  fdatasync an AIO request the trio thread awaits, or a worker thread's), nothing else. Writes without a flush never come here, so they cost the same in both modes.
* On a ``sync`` volume the flush, once durable here up to LSN L, completes when N mirrors
  acknowledged L (an ACK says what is durable in the mirror's log; the mirror sends one as
  soon as a frame is durable). The flush wakes the shipping sessions at once
  (:meth:`~marsfs.replication.server.PeerTable.more`); every ACK wakes the waiting flushes
  (:meth:`SyncGates.acked`, an event: no polling).
* No N acknowledgements within the timeout: the volume **degrades** to async. That flush
  completes (with ``refuse``: fails with EIO), and so does every later one without waiting,
  until N mirrors hold every write a flush acknowledged (``acked_lsn``); then it is in sync
  again by itself, checked at every ACK. A stalled or dead link costs a flush the timeout once,
  never once per flush: flushes that waited together degrade together. Status and the log say
  it (``sync degraded to async since T, behind by X``).
* After a start, or a switch to sync, everything durable may have been acknowledged earlier:
  the volume is ``catching-up`` until N mirrors hold it, and the next flush waits for them
  (up to the timeout) as in sync.
* What a flush acknowledged is ``acked_lsn``, said in every heartbeat with the mode
  (:meth:`SyncGates.word`), so that a forced failover onto a mirror can tell what the primary
  may have acknowledged that the mirror lacks.
* The state lives on the trio thread only (flushes, ACKs, heartbeats and status run there):
  no lock.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from marsfs.errors import InvalidRequest, SyncRefused
from marsfs.node.defaults import DEFAULT_SYNC_TIMEOUT as DEFAULT_TIMEOUT
from marsfs.node.meta import JSON, ClusterMeta
from marsfs.node.state import ReplicationMode, SyncModeStatus, SyncState
from marsfs.replication.server import PeerState, PeerTable, lag_of
from marsfs.replication.session import SyncWord
from marsfs.volume import Volume

logger = logging.getLogger(__name__)

MAX_MIRRORS = 16
MAX_TIMEOUT = 3600.0


@dataclass(frozen=True, slots=True)
class ModeSetting:
    """A volume's replication mode as set (``create --mode``, ``marsfs mode``)."""

    mode: ReplicationMode = ReplicationMode.ASYNC
    mirrors: int = 1  #: sync: how many mirrors must hold a flush
    timeout: float = DEFAULT_TIMEOUT  #: sync: seconds to wait for them before degrading
    refuse: bool = False  #: sync: fail flushes with EIO while degraded instead of completing them

    @property
    def sync(self) -> bool:
        return self.mode is ReplicationMode.SYNC

    def to_json(self, uuid: str) -> dict[str, Any]:
        return {"uuid": uuid, "mode": self.mode.value, "mirrors": self.mirrors, "timeout": self.timeout,
                "refuse": self.refuse}

    @classmethod
    def from_json(cls, d: JSON) -> ModeSetting | None:
        """The setting in a metadata value, None when it is not one (it counts as async)."""
        try:
            return check_setting(d["mode"], d["mirrors"], d["timeout"], d["refuse"])
        except (KeyError, TypeError, InvalidRequest):
            return None

    def describe(self) -> str:
        if not self.sync:
            return "async"
        return (f"sync ({self.mirrors} mirror{'s' if self.mirrors != 1 else ''}, timeout {self.timeout:g} s"
                f"{', refuse: flushes fail with EIO while degraded' if self.refuse else ''})")


def check_setting(mode: Any, mirrors: Any = 1, timeout: Any = DEFAULT_TIMEOUT, refuse: Any = False) -> ModeSetting:
    """A setting from a command's or the metadata's values; InvalidRequest saying what is wrong."""
    try:
        m = ReplicationMode(mode)
    except ValueError:
        raise InvalidRequest(f"replication mode {mode!r}: give async or sync") from None
    if type(mirrors) is not int or not 1 <= mirrors <= MAX_MIRRORS:
        raise InvalidRequest(f"--mirrors {mirrors!r}: give how many mirrors must hold a flush, 1 to {MAX_MIRRORS}")
    if type(timeout) not in (int, float) or not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT:
        raise InvalidRequest(f"--timeout {timeout!r}: give the seconds a flush waits for mirrors, above 0 and at "
                             f"most {MAX_TIMEOUT:g}")
    if not isinstance(refuse, bool):
        raise InvalidRequest(f"refuse {refuse!r} must be true or false")
    return ModeSetting(m, mirrors, float(timeout), refuse)


@dataclass(eq=False)
class _Gate:
    """One volume's sync state on this node (see the module's rules)."""

    name: str
    uuid: str
    acked_lsn: int  #: the newest LSN a completed flush acknowledged
    setting: ModeSetting = field(default_factory=ModeSetting)
    version: int = -1  #: the metadata version ``setting`` was read at
    state: SyncState = SyncState.CATCHING_UP
    since: float = 0.0  #: wall time it degraded
    degradations: int = 0  #: how often it degraded (since the daemon started)
    wake: trio.Event = field(default_factory=trio.Event)  #: set (and replaced) at every ACK

    @property
    def degraded(self) -> bool:
        return self.state is SyncState.DEGRADED


class SyncGates:
    """The replication modes of one node's volumes, and the gate their flushes pass."""

    def __init__(self, meta: ClusterMeta) -> None:
        self.meta = meta
        self._table: PeerTable | None = None
        self._gates: dict[str, _Gate] = {}  #: by volume uuid

    def attach(self, table: PeerTable) -> None:
        """Hear the ACKs of the mirrors in ``table`` and wake its shipping sessions (the cluster
        calls this; without it no mirror ever acknowledges a sync volume's flush)."""
        self._table = table
        table.hooks = self

    def setting(self, vol: Volume) -> ModeSetting:
        """``vol``'s replication mode as the metadata says it (a clone: async)."""
        if vol.clone_of is not None:
            return ModeSetting()
        value = self.meta.mode_of(vol.name, vol.uuid)
        return (ModeSetting.from_json(value) or ModeSetting()) if value is not None else ModeSetting()

    # ------------------------------------------------------------------ the gate

    def _gate(self, vol: Volume) -> _Gate:
        g = self._gates.get(vol.uuid)
        if g is None or g.name != vol.name:
            g = self._gates[vol.uuid] = _Gate(vol.name, vol.uuid, acked_lsn=vol.durable_lsn)
        version = self.meta.version
        if g.version != version:
            new = self.setting(vol)
            first, g.version = g.version < 0, version
            if new != g.setting:
                self._changed(vol, g, new, said=not first)
        return g

    def _changed(self, vol: Volume, g: _Gate, new: ModeSetting, *, said: bool) -> None:
        old, g.setting = g.setting, new
        if old.mode is not new.mode and said and vol.replay_limit is None:
            logger.info("volume %s: replication mode %s (was %s)", vol.name, new.describe(), old.describe())
        if not new.sync:
            g.state, g.since = SyncState.CATCHING_UP, 0.0
        elif g.state is not SyncState.DEGRADED or not old.sync:
            g.state, g.since = SyncState.CATCHING_UP, 0.0
            self._settle(vol, g)

    def _holding(self, g: _Gate, lsn: int) -> list[str]:
        """The connected mirrors that acknowledged ``lsn`` (durable in their logs). Only a mirror
        connected now, and not in a fast sync, counts: its session was admitted on this node's history as it is (the
        chain checked at its FETCH), while a position from an older session may be of a history
        this node no longer has (a split brain resolved here); a disconnected mirror cannot
        acknowledge anything newer anyway."""
        if self._table is None:
            return []
        return [p.node for p in self._mirrors(g) if p.fetched_lsn >= lsn]

    def _mirrors(self, g: _Gate) -> list[PeerState]:
        """The mirrors whose ACKs count (see :meth:`_holding`)."""
        if self._table is None:
            return []
        return [p for p in self._table.for_volume(g.name, g.uuid) if p.connected and not p.syncing]

    def _enough(self, g: _Gate, lsn: int) -> bool:
        return lsn <= 0 or len(self._holding(g, lsn)) >= g.setting.mirrors

    def _settle(self, vol: Volume | None, g: _Gate) -> None:
        """Back in sync if N mirrors hold everything acknowledged."""
        if g.state is SyncState.IN_SYNC or not g.setting.sync or not self._enough(g, g.acked_lsn):
            return
        if g.state is SyncState.DEGRADED:
            logger.info("volume %s: in sync again: %s hold every acknowledged write (up to LSN %d); it was "
                        "degraded to async for %.1f s", g.name, ", ".join(self._holding(g, g.acked_lsn)),
                        g.acked_lsn, max(0.0, time.time() - g.since))
        g.state, g.since = SyncState.IN_SYNC, 0.0

    async def flush(self, vol: Volume) -> None:
        """An application's flush of ``vol`` (see the module's rules): durable here, and on a
        sync volume in N mirrors' logs unless degraded. :class:`SyncRefused` (EIO) when the
        volume is degraded and refuses."""
        if vol.needs_flush:
            lsn = await flush_here(vol)
            if self._table is not None:
                self._table.more(vol.uuid)
        else:
            lsn = vol.durable_lsn
        g = self._gate(vol)
        if g.setting.sync:
            await self._wait(vol, g, lsn)
        g.acked_lsn = max(g.acked_lsn, lsn)
        if g.state is not SyncState.IN_SYNC:
            self._settle(vol, g)

    async def _wait(self, vol: Volume, g: _Gate, lsn: int) -> None:
        """Until N mirrors hold ``lsn``, or the volume degrades (SyncRefused if it refuses)."""
        if not self._enough(g, lsn) and not g.degraded:
            deadline = trio.current_time() + g.setting.timeout
            while not self._enough(g, lsn) and not g.degraded and g.setting.sync:
                with trio.move_on_at(deadline):
                    await g.wake.wait()
                if trio.current_time() >= deadline and not self._enough(g, lsn) and g.setting.sync:
                    self._degrade(vol, g, lsn)
        if g.degraded and g.setting.sync and not self._enough(g, lsn):
            if g.setting.refuse:
                raise SyncRefused(f"flush of {vol.name} refused: the volume is in sync mode with --refuse and "
                                  f"degraded since {_utc(g.since)} (fewer than {g.setting.mirrors} mirror(s) "
                                  "acknowledge); its data is durable on this node only")

    def _degrade(self, vol: Volume, g: _Gate, lsn: int) -> None:
        g.state, g.since = SyncState.DEGRADED, time.time()
        g.degradations += 1
        st = self.status(vol)
        assert st is not None
        mirrors = ([f"{p.node} at LSN {p.fetched_lsn}{'' if p.connected else ' (disconnected)'}"
                    for p in self._table.for_volume(g.name, g.uuid)] if self._table is not None else [])
        logger.warning("volume %s: %s (waited for LSN %d; mirrors: %s)", vol.name, st.describe(vol.name), lsn,
                       ", ".join(mirrors) or "none")

    def acked(self, volume: str, uuid: str) -> None:
        """A mirror of ``volume`` acknowledged a new position: wake the waiting flushes, and
        return to sync once N mirrors hold everything acknowledged."""
        g = self._gates.get(uuid)
        if g is None:
            return
        ev, g.wake = g.wake, trio.Event()
        ev.set()
        if g.state is not SyncState.IN_SYNC:
            self._settle(None, g)

    # ------------------------------------------------------------------ what others read

    def word(self, vol: Volume) -> SyncWord | None:
        """What this primary's heartbeats say about ``vol``'s mode (None on a mirror: only the
        primary acknowledges flushes)."""
        if vol.replay_limit is not None:
            return None
        g = self._gate(vol)
        s = g.setting
        if not s.sync:
            return SyncWord(acked_lsn=g.acked_lsn)
        return SyncWord(mode=s.mode.value, mirrors=s.mirrors, refuse=s.refuse,
                        degraded_since=g.since if g.state is SyncState.DEGRADED else 0.0, acked_lsn=g.acked_lsn)

    def status(self, vol: Volume) -> SyncModeStatus | None:
        """Where ``vol`` stands, on the primary of a sync volume (None otherwise)."""
        if vol.replay_limit is not None:
            return None
        g = self._gate(vol)
        s = g.setting
        if not s.sync:
            return None
        positions = sorted((p.fetched_lsn for p in self._mirrors(g)), reverse=True)
        nth = positions[s.mirrors - 1] if len(positions) >= s.mirrors else 0
        behind_bytes, behind_records, behind_seconds = lag_of(vol, nth)
        return SyncModeStatus(mirrors=s.mirrors, timeout=s.timeout, refuse=s.refuse, state=g.state,
                              since=g.since if g.state is SyncState.DEGRADED else None, acked_lsn=g.acked_lsn,
                              behind_records=behind_records, behind_bytes=behind_bytes,
                              behind_seconds=round(behind_seconds, 3), holding=self._holding(g, g.acked_lsn),
                              degradations=g.degradations)


async def flush_here(vol: Volume) -> int:
    """``vol.flush()`` without a thread hop when it can: the FLUSH record on this (trio) thread,
    the fdatasync as a kernel AIO request whose completion this thread awaits on an eventfd
    (:mod:`marsfs.log.kaio`); in a worker thread as before when the kernel has no AIO, a
    rotation is due or another sync is in flight. The same records, the same fdatasync, the
    same group commit and poisoning; returns the durable LSN. The wait is shielded: a leader
    must finish the sync it started, as a worker thread's flush always did."""
    lead = vol.flush_lead()
    if lead is None:
        return await trio.to_thread.run_sync(vol.flush)
    if isinstance(lead, int):
        return lead
    with trio.CancelScope(shield=True):
        fd = vol.log.start_sync_aio(lead)
        if fd is None:
            return await trio.to_thread.run_sync(vol.flush_complete, lead)
        while (lsn := vol.flush_poll(lead)) is None:
            await trio.lowlevel.wait_readable(fd)
        return lsn
    raise AssertionError("unreachable: a shielded scope is not cancelled")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
