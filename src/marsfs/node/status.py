"""``marsfs status``: a volume's facts gathered in one place, and its status row built from them.

Rules that hold here:

* What the cluster holds about a volume is read in one place: the mirrors' fetcher, image
  copy and replay samples in :func:`mirror_side`, the rest (a handover in progress, what
  following the designated primary cannot do, the mirrors that fetch from us) in
  :func:`cluster_side`. Everything a state depends on becomes a
  :class:`~marsfs.node.volstate.VolumeFacts` in one place, :func:`gather`, and the state with
  its error lines comes only from :func:`~marsfs.node.volstate.volume_state`.
* A row is a :class:`~marsfs.node.state.VolumeStatus` of typed records; ``status --json`` is
  its ``to_json``. Status only reads.
* A fetch or replay that should progress and has not for ``STALL_AFTER`` seconds is reported
  as ``stalled`` with the reason.
* A mirror's lag is measured against its source's newest durable LSN as the last heartbeat
  told it, also while its fetch is paused (the fetcher then only watches). An image copy's
  progress is the fraction of the ranges compared, with the compare rate and ETA.
* Without a cluster (:func:`node_statuses`: what the node alone knows, e.g. right after
  ``create``) a mirror's fetch is unknown: at best it is ``catching-up`` (not sure it is not
  behind), and only the node's own facts can put it higher.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from marsfs.errors import NoSpace
from marsfs.node.meta import Position, position_key
from marsfs.node.mirrors import ImageCopy, Mirrors
from marsfs.node.node import Node, history_floor
from marsfs.node.state import (
    CloneStatus,
    HandoverStatus,
    PeerStatus,
    PositionStatus,
    RoleRecord,
    SplitVersionStatus,
    SyncState,
    VolumeStatus,
)
from marsfs.node.volstate import FRESH, MirrorFacts, Role, Verdict, VolumeFacts, peer_state, volume_state
from marsfs.replication.server import PeerState, PeerTable, lag_of
from marsfs.replication.session import FetchState, SyncStatus
from marsfs.volume import Retention, Volume
from marsfs.volume.holds import hold_mirror
from marsfs.volume.splits import disk_bytes

UNREACHABLE_AFTER = 5.0  #: seconds without a metadata exchange after which a node counts as unreachable


class HandoverView(Protocol):
    @property
    def progress(self) -> Mapping[str, HandoverStatus]: ...


class ClusterView(Protocol):
    """What status reads of the node's cluster (:class:`~marsfs.node.cluster.Cluster` is one);
    a protocol, so this module does not import the cluster that uses it."""

    @property
    def node(self) -> Node: ...
    @property
    def mirrors(self) -> Mirrors: ...
    @property
    def peer_table(self) -> PeerTable: ...
    @property
    def roles(self) -> HandoverView: ...
    @property
    def _meta_errors(self) -> Mapping[str, str]: ...
    @property
    def _heard(self) -> Mapping[str, float]: ...
    def _now(self) -> float: ...


@dataclass(frozen=True, slots=True)
class ClusterSide:
    """What the cluster holds about one volume at one instant: its mirror side (read by
    :func:`mirror_side`) and what status adds (read by :func:`cluster_side`)."""

    now: float  #: the clock of the fetch state's timestamps
    fetcher: FetchState | None  #: the state of a running fetcher (None: none runs)
    resync: bool  #: the fetcher has a resync plan (staged or running)
    copy: ImageCopy | None
    copy_fetch: FetchState | None  #: the state of the fetcher that makes the copy
    replay_samples: tuple[tuple[float, int], ...]
    handover: HandoverStatus | None = None
    meta_error: str = ""
    mirrors: tuple[PeerState, ...] = ()  #: the mirrors that fetch the volume from this node
    heard: Mapping[str, float] = field(default_factory=dict)  #: peer -> wall time of our last metadata exchange


def mirror_side(mirrors: Mirrors, name: str, now: float) -> ClusterSide:
    """The one place that reads the mirrors' attributes (fetchers, image copies, replay
    samples) for a volume's state; ``now``: the fetch state's clock (trio's)."""
    f = mirrors.fetchers.get(name)
    copy = mirrors.copies.get(name)
    return ClusterSide(
        now=now, fetcher=f.state if f is not None else None, resync=f is not None and f.resync is not None,
        copy=copy, copy_fetch=copy.fetcher.state if copy is not None and copy.fetcher is not None else None,
        replay_samples=tuple(mirrors.replay_samples.get(name) or ()))


def cluster_side(cluster: ClusterView, name: str) -> ClusterSide:
    """The one place that reads the cluster's attributes for a volume's status."""
    vol = cluster.node.volumes.get(name)
    return replace(mirror_side(cluster.mirrors, name, cluster._now()), handover=cluster.roles.progress.get(name),
                   meta_error=cluster._meta_errors.get(name, ""),
                   mirrors=tuple(cluster.peer_table.for_volume(name, vol.uuid)) if vol is not None else (),
                   heard=dict(cluster._heard))


def gather(node: Node, name: str, side: ClusterSide | None = None) -> VolumeFacts:
    """Everything the state of ``name`` here depends on (``side``: the cluster's part; None:
    the node alone, which knows nothing of a mirror's fetch)."""
    copy = side.copy if side is not None else None
    if name not in node.volumes and copy is not None:  # a first copy: not served yet
        return VolumeFacts(volume=name, role=Role.MIRROR, source=copy.source, copying=not copy.failed,
                           copy_failed=copy.failed, copy_error=(side.copy_fetch.error if side is not None
                                                                and side.copy_fetch is not None else ""))
    if name not in node.volumes and name in node.failed:
        role = node.failed_role(name)
        return VolumeFacts(volume=name, role=role.role, source=role.source, open_failure=node.failed[name])
    vol = node.volume(name)
    role = node.role(name)
    faults = vol.faults
    fetch = _mirror_facts(node, name, role, side) if role.is_mirror and side is not None else None
    return VolumeFacts(
        volume=name, role=role.role, source=role.source, errors=tuple(vol.errors), fault_lines=tuple(vol.fault_lines()),
        disk_failed=vol.needs_restart or any(not isinstance(f, NoSpace) for f in faults), no_space=bool(faults),
        log_space_stopped=role.is_mirror and name in node.space.fetch_stopped,
        fences=tuple(node.fenced(name).items()), split_brains=tuple(x.describe(name) for x in node.splits(name)),
        fetch=fetch, meta_error=side.meta_error if side is not None else "")


def _mirror_facts(node: Node, name: str, role: RoleRecord, side: ClusterSide) -> MirrorFacts:
    fs = side.fetcher
    if fs is None:
        return MirrorFacts(source=role.source, fetching=False, fatal="", error="", fetch_paused=role.fetch_paused,
                           replay_paused=role.replay_paused, connected=False, since_progress=0.0, missing_records=0,
                           lag_records=0, heartbeat_age=None)
    vol = node.volume(name)
    return MirrorFacts(
        source=fs.source, fetching=True, fatal=fs.fatal, error=fs.error, fetch_paused=role.fetch_paused,
        replay_paused=role.replay_paused, connected=fs.connected, since_progress=side.now - fs.last_progress,
        missing_records=fs.lag_records, lag_records=fs.lag_records + vol.durable_lsn - vol.replayed_lsn,
        heartbeat_age=_heartbeat_age(fs, side.now),
        resyncing=fs.sync is not None or side.resync or vol.resync is not None,
        sync_waiting=fs.sync.waiting if fs.sync is not None else "")


def _heartbeat_age(fs: FetchState, now: float) -> float | None:
    """How old the source's state behind the newest heartbeat is at most (see FetchState)."""
    return now - fs.heartbeat_basis if fs.heartbeat_basis else None


def verdict(node: Node, name: str, side: ClusterSide | None = None) -> Verdict:
    """The state of ``name`` here, its error lines and the operator's next command."""
    return volume_state(gather(node, name, side))


# ---------------------------------------------------------------------------- rows


def node_statuses(node: Node, name: str | None = None) -> list[VolumeStatus]:
    """What the node alone knows: every served volume's row (or one's), then the failed ones."""
    names = [name] if name is not None else sorted(node.volumes)
    rows = [volume_status(node, n) for n in names]
    if name is None:
        rows += [_failed_status(node, n) for n in sorted(node.failed)]
    return rows


def node_rows(node: Node, name: str | None = None) -> list[dict[str, Any]]:
    """:func:`node_statuses` as JSON objects."""
    return [st.to_json() for st in node_statuses(node, name)]


def statuses(cluster: ClusterView, name: str | None = None) -> list[VolumeStatus]:
    """Every volume's status (or one's), with lag, peers and the cluster metadata. Reads only."""
    node = cluster.node
    if name is not None and name not in node.volumes:
        if name in cluster.mirrors.copies:
            return [_copy_status(node, name, cluster_side(cluster, name))]
        if name in node.failed:
            return [_failed_status(node, name)]
        node.volume(name)  # raises the usual unknown-volume error
    names = [name] if name is not None else sorted(node.volumes)
    rows = [_row(node, n, cluster_side(cluster, n)) for n in names]
    if name is None:
        rows += [_failed_status(node, n) for n in sorted(node.failed)]
        rows += [_copy_status(node, n, cluster_side(cluster, n)) for n in sorted(cluster.mirrors.copies)]
    return rows


def _row(node: Node, name: str, side: ClusterSide) -> VolumeStatus:
    return _with_meta(node, volume_status(node, name, side), side)


def volume_status(node: Node, name: str, side: ClusterSide | None = None) -> VolumeStatus:
    """The status row of served volume ``name`` (``side``: the cluster's part, None: the node's
    view alone)."""
    vol = node.volume(name)
    role = node.role(name)
    verdict = volume_state(gather(node, name, side))
    head = vol.head_lsn
    splits = node.splits(name)
    designation = node.meta.designated(name)
    history = node.history_of(name)
    st = VolumeStatus(
        volume=vol.name, node=node.name, role=role.role, state=verdict.state, epoch=role.epoch, size=vol.current_size,
        head_lsn=head, durable_lsn=vol.durable_lsn, fetched_lsn=vol.durable_lsn if role.is_mirror else head,
        replayed_lsn=vol.replayed_lsn, applied_lsn=vol.applied_lsn, lag_bytes=0, lag_records=0,
        lag_seconds=0.0, oldest_version_lsn=vol.oldest_version_lsn, log_bytes=vol.log.end_bytes,
        open_handles=node.open_count(name), errors=list(verdict.errors), next=verdict.next,
        oldest_version_ns=vol.oldest_version_timestamp_ns or None, history=history.describe(),
        writeback_target_lsn=_writeback_target(vol, history), fsync_aio_refused=vol.log.aio_refused or None,
        clones=[CloneStatus(c, lsn) for c, lsn in node.clones_of(name)],
        clone_of=vol.clone_of.describe() if vol.clone_of is not None else None,
        designated_primary=designation.node if designation is not None else None,
        members=sorted(node.meta.members(name)),
        log_space_limit=node.space.last_limit, oldest_retained_lsn=vol.log.first_lsn,
        warnings=node.space.warnings(vol, history, primary=role.role == Role.PRIMARY),
        dropped={hold_mirror(k) or k: cs.bytes for k, cs in vol.dropped().items()} if not role.is_mirror else {},
        fork_lsn=min(x.fork_lsn for x in splits) if splits else None,
        split_brain=splits, failover_loss=node.failover_loss(name))
    versions = split_versions(node, name)
    st = st.changed(split_versions=versions, split_versions_bytes=sum(v.disk_bytes for v in versions))
    st = _with_mode(node, vol, st)
    if side is None:
        return st
    st = st.changed(handover=side.handover)
    if role.is_mirror:
        return _mirror_row(node, st, role, side)
    peers = []
    for p in side.mirrors:
        if not _follows(node, name, p):
            continue  # it fetched from us once; its newer word says it does not now
        # now, not when the last session shipped: a dead link keeps lagging
        lag_b, lag_r, lag_s = lag_of(vol, p.fetched_lsn)
        peers.append(PeerStatus(
            node=p.node, connected=p.connected, fetched_lsn=p.fetched_lsn, replayed_lsn=p.replayed_lsn,
            fetch_paused=p.fetch_paused, replay_paused=p.replay_paused, lag_bytes=lag_b, lag_records=lag_r,
            lag_seconds=lag_s, last_seen=p.last_seen, dropped=st.dropped.get(p.node, 0),
            state=peer_state(connected=p.connected, fetch_paused=p.fetch_paused, replay_paused=p.replay_paused,
                             lag_records=lag_r, syncing=p.syncing)))
    return st.changed(peers=peers)


def _with_mode(node: Node, vol: Volume, st: VolumeStatus) -> VolumeStatus:
    """A row with the volume's replication mode and, on a sync volume's primary, where it
    stands (a warning while it is degraded or catching up)."""
    sync = node.sync.status(vol)
    warnings = st.warnings
    if sync is not None and sync.state is SyncState.DEGRADED:
        warnings = [*warnings, sync.describe(vol.name)]
    elif sync is not None and sync.state is SyncState.CATCHING_UP:
        warnings = [*warnings, f"sync: fewer than {sync.mirrors} mirror(s) hold every acknowledged write of "
                               f"{vol.name} yet (LSN {sync.acked_lsn}; holding: {', '.join(sync.holding) or 'none'}): "
                               f"the next flush waits for them, at most {sync.timeout:g} s, then the volume runs "
                               "degraded (async) until they catch up"]
    return st.changed(mode=node.sync.setting(vol).mode, sync_mode=sync, warnings=warnings)


def split_versions(node: Node, name: str) -> list[SplitVersionStatus]:
    """The split versions of served volume ``name`` here, oldest fork first, with their space
    and the clones that read from each."""
    vol = node.volume(name)
    clones = node.split_version_clones(name)
    return [SplitVersionStatus(name=s.name, node=s.node, fork_lsn=s.fork_lsn, head_lsn=s.head_lsn, size=s.size,
                               disk_bytes=disk_bytes(vol.path, s.name), saved=s.saved,
                               clones=[c for c, of in clones if of == s.name])
            for s in vol.splits()]


def _follows(node: Node, name: str, p: PeerState) -> bool:
    """Is ``p`` (a node that fetched ``name`` from us) our mirror now? While connected, yes;
    otherwise until it said otherwise after its last ACK: it left (its position is withdrawn),
    or it published that it is a primary or mirrors another node."""
    if p.connected:
        return True
    e = node.meta.entry(p.node, position_key(name))
    if e is None:
        return True
    pos = Position.from_json(e.value)
    if pos is None:
        return False  # withdrawn: it left the volume
    return pos.updated <= p.last_seen or (pos.role == Role.MIRROR.value and pos.source == node.name)


def _mirror_row(node: Node, st: VolumeStatus, role: RoleRecord, side: ClusterSide) -> VolumeStatus:
    """A mirror's row: its source, pause flags, lag against the source's last word, rates."""
    base = st.changed(source=role.source, fetch_paused=role.fetch_paused, replay_paused=role.replay_paused,
                      replay_rate=_rate(side.replay_samples))
    fs = side.fetcher
    if fs is None:
        return base
    vol = node.volume(st.volume)
    now = side.now
    heartbeat_age = _heartbeat_age(fs, now)
    lag_records = fs.lag_records + st.fetched_lsn - st.replayed_lsn
    lag_bytes = fs.lag_bytes + (vol.log.bytes_between(st.replayed_lsn, st.fetched_lsn) if st.durable_lsn else 0)
    lag_seconds = fs.lag_seconds
    if heartbeat_age is None or heartbeat_age > FRESH or not fs.connected:
        # our newest word from the source describes it `age` seconds ago (heartbeats queue
        # behind records on a slow link): we cannot claim to be closer than that
        lag_seconds = max(lag_seconds, heartbeat_age if heartbeat_age is not None else now - fs.last_progress)
    fetch_rate = 0.0 if role.fetch_paused else fs.rate()  # the samples are from before the pause
    eta = (fs.lag_bytes / fetch_rate) if fs.lag_bytes and fetch_rate else (0.0 if not fs.lag_bytes else None)
    row = base.changed(connected=fs.connected, heartbeat_age=heartbeat_age, primary_durable_lsn=fs.primary_durable_lsn,
                       lag_records=lag_records, lag_bytes=lag_bytes, lag_seconds=lag_seconds, fetch_rate=fetch_rate,
                       eta_seconds=eta)
    return _with_sync(row, fs.sync)


def _writeback_target(vol: Volume, history: Retention) -> int | None:
    """The newest record writeback goes to now (what :meth:`Node.maintain` asks for): the
    history window's floor, at most durable and, on a mirror, at most its replay position; an
    open version may hold writeback lower. None for a clone, which never writes back."""
    if vol.clone_of is not None:
        return None
    target = history_floor(vol, history, time.time_ns())
    if vol.replay_limit is not None:
        target = max(vol.applied_lsn, min(target, vol.replay_limit))
    return target


def _copy_status(node: Node, name: str, side: ClusterSide) -> VolumeStatus:
    """The row of a first image copy (running, or failed and waiting for the operator)."""
    c = side.copy
    assert c is not None
    verdict = volume_state(gather(node, name, side))
    fs = side.copy_fetch
    row = VolumeStatus(
        volume=name, node=node.name, role=Role.MIRROR, state=verdict.state, epoch=0,
        size=c.size, head_lsn=0, durable_lsn=0, fetched_lsn=0, replayed_lsn=0, applied_lsn=0,
        lag_bytes=c.size, lag_records=0, lag_seconds=0.0, oldest_version_lsn=0, log_bytes=0, open_handles=0,
        source=c.source, errors=list(verdict.errors), next=verdict.next, connected=fs.connected if fs is not None else None, progress=0.0)
    if c.failed or fs is None or fs.sync is None:
        return row
    return _with_sync(row, fs.sync).changed(lag_bytes=fs.sync.total - fs.sync.compared or c.size)


def _failed_status(node: Node, name: str) -> VolumeStatus:
    """The row of a volume that could not be opened at start: failed, with why."""
    role = node.failed_role(name)
    verdict = volume_state(gather(node, name))
    return VolumeStatus(
        volume=name, node=node.name, role=role.role, state=verdict.state, epoch=role.epoch, size=0,
        head_lsn=0, durable_lsn=0, fetched_lsn=0, replayed_lsn=0, applied_lsn=0, lag_bytes=0, lag_records=0,
        lag_seconds=0.0, oldest_version_lsn=0, log_bytes=0, open_handles=0, errors=list(verdict.errors), next=verdict.next)


def _with_meta(node: Node, st: VolumeStatus, side: ClusterSide) -> VolumeStatus:
    """A row with the positions the members published (the node's row has the designation);
    a node that left or was removed has none. A position from before the designated primary's
    epoch says what that node was, not what it is: ``stale`` says so (and that it is
    unreachable, when no metadata exchange with it happened for :data:`UNREACHABLE_AFTER` s)."""
    heard = side.heard
    members = set(st.members)
    d = node.meta.designated(st.volume)
    now = time.time()
    rows = []
    for owner, p in sorted(node.meta.positions(st.volume).items()):
        if owner == node.name or owner not in members:
            continue
        last = heard.get(owner)
        stale = ""
        if d is not None and p.epoch < d.epoch and owner != d.node:
            gone = last is None or now - last > UNREACHABLE_AFTER
            stale = (f"{'unreachable, ' if gone else ''}not following {d.node} (epoch {d.epoch}) yet: this is its "
                     f"last word, from epoch {p.epoch}")
        rows.append(PositionStatus(node=owner, role=p.role, state=p.state, epoch=p.epoch, head_lsn=p.head_lsn,
                                   replayed_lsn=p.replayed_lsn, source=p.source, updated=p.updated,
                                   last_heard=last, stale=stale))
    return st.changed(positions=rows)


def _with_sync(st: VolumeStatus, sync: SyncStatus | None) -> VolumeStatus:
    """A row with the figures of a fast sync under way."""
    if sync is None:
        return st
    return st.changed(progress=sync.fraction, fetch_rate=sync.rate(), eta_seconds=sync.eta(),
                      sync_target_lsn=sync.lsn or None, sync_bytes=sync.total,
                      sync_left_bytes=sync.total - sync.compared, sync_received_bytes=sync.received)


def _rate(samples: Sequence[tuple[float, int]]) -> float:
    if len(samples) < 2:
        return 0.0
    (t0, v0), (t1, v1) = samples[0], samples[-1]
    return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0
