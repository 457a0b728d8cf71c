"""The node's log space limit (G8): what it is, and keeping every volume's log inside it.

Rules that hold here:

* One limit for the log bytes of all volumes of the node together (``serve --log-space``):
  a size (``20G``), or a percentage of the state filesystem's size (``10%``). Without it the
  limit is half of the space the logs and the thin base images could take now: the
  filesystem's free space plus what the logs and the thin images already take
  (:data:`DEFAULT_PERCENT`), and never more than the free space plus the logs; reserved base
  images are not free, so they are left out. It is recomputed at every pass, so it follows
  the filesystem. The other half stays for thin images, metadata and whatever else shares
  the filesystem.
* The log space is held for the node: what the logs may still take (the limit less what they
  take) stays free. A write into a thin volume (its base is not reserved; a clone too) is
  refused with NoSpace (ENOSPC; on a thin mirror, a fetched record: its fetch retries) when
  the free space after it would be less than that plus
  what writeback will still add to the thin base images (their unapplied log bytes), so a
  thin volume that fills the disk fails its own writes, never a reserved volume's
  (:meth:`LogSpace.room_for`). Something else filling the filesystem is not held off.
* A limit below :data:`MIN_LOG_SPACE` (eight of the smallest segments) is refused with one
  line: the log shrinks by whole segments and needs room for a few. Segments are sized from
  the limit (:func:`segment_bytes_for`): a sixteenth of each volume's share, between
  :data:`MIN_SEGMENT_BYTES` and the log's default of 64 MiB.
* Enforcement runs ahead of the limit: when the logs pass :data:`HIGH_WATER` of it,
  :meth:`LogSpace.enforce` frees them down to :data:`LOW_WATER`. It is woken by the write path
  (each volume calls :meth:`LogSpace.wake` every quarter segment it grows) and runs at least
  once a second, in its own task, so writes never wait on it.
* What to free, oldest first, the largest logs first: first only history (writeback up to the
  oldest mirror position, :meth:`Volume.free_log` without drop), and only then mirrors' holds
  (``drop``): a mirror that fell behind the limit costs the primary nothing, it copies the
  changed extents later. An open version (a view, a clone) is the one thing that may not be
  cut: the pass goes as far as it can and status says which version holds the rest.
* A mirror's log counts like any other. A mirror whose replay is behind (paused) cannot write
  back, so its log cannot go: while the logs stay above the high-water mark it stops fetching
  (:attr:`LogSpace.fetch_stopped`, which its fetcher reads as a pause) and says so, instead of
  failing; it fetches again once the logs are below the mark.
* What enforcement did stays visible in :meth:`LogSpace.warnings` (status): a history
  window cut short (until the window is whole again), mirrors whose log was dropped (until
  they caught up or left), a version pinning log.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from marsfs.errors import InvalidRequest, MarsError, NoSpace
from marsfs.log import DEFAULT_SEGMENT_BYTES
from marsfs.units import human_bytes, parse_size
from marsfs.volume import Retention, Volume
from marsfs.volume.holds import hold_mirror

logger = logging.getLogger(__name__)

MIN_SEGMENT_BYTES = 1 << 20
SEGMENTS_PER_SHARE = 16
MIN_LOG_SPACE = 8 * MIN_SEGMENT_BYTES
DEFAULT_PERCENT = 50.0  #: of free space + log bytes, when --log-space is not given
HIGH_WATER = 0.75  #: enforcement starts above this share of the limit ...
LOW_WATER = 0.5  #: ... and frees down to this share
_PERCENT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")


@dataclass(frozen=True)
class LogSpaceSetting:
    """``--log-space``: a size, a percentage of the state filesystem, or None (the default)."""

    size: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, value: str | int | None) -> LogSpaceSetting:
        if value is None:
            return cls()
        if isinstance(value, int):
            size = value
        else:
            m = _PERCENT.fullmatch(value)
            if m is not None:
                pct = float(m.group(1))
                if not 0 < pct <= 100:
                    raise InvalidRequest(f"log space {value!r}: give a percentage above 0 and at most 100%")
                return cls(percent=pct)
            try:
                size = parse_size(value)
            except InvalidRequest:
                raise InvalidRequest(f"cannot read log space {value!r}: give a size like 20G or a percentage of "
                                     "the state filesystem like 10%") from None
        check_limit(size, f"{value}")
        return cls(size=size)

    def describe(self) -> str:
        if self.size is not None:
            return human_bytes(self.size)
        if self.percent is not None:
            return f"{self.percent:g}% of the state filesystem"
        return f"default ({DEFAULT_PERCENT:g}% of free space plus the logs)"


def check_limit(limit: int, given: str) -> None:
    if limit < MIN_LOG_SPACE:
        raise InvalidRequest(f"log space {given} ({human_bytes(limit)}) is too small: the log shrinks by whole "
                             f"segments and needs at least {human_bytes(MIN_LOG_SPACE)} (8 segments of "
                             f"{human_bytes(MIN_SEGMENT_BYTES)}); give more")


def segment_bytes_for(limit: int, volumes: int) -> int:
    """Segment size for each of ``volumes`` logs under ``limit``: a sixteenth of a volume's
    share, whole MiB, at least :data:`MIN_SEGMENT_BYTES`, at most the default 64 MiB."""
    share = limit // max(1, volumes) // SEGMENTS_PER_SHARE
    return max(MIN_SEGMENT_BYTES, min(DEFAULT_SEGMENT_BYTES, share // MIN_SEGMENT_BYTES * MIN_SEGMENT_BYTES))


def limit_for(setting: LogSpaceSetting, state: Path, log_bytes: int, thin_bytes: int = 0) -> int:
    """The limit in bytes now (see the module doc), at least :data:`MIN_LOG_SPACE`;
    ``log_bytes``: what the logs take now, ``thin_bytes``: what the thin base images take."""
    return max(MIN_LOG_SPACE, _computed(setting, state, log_bytes, thin_bytes))


def _computed(setting: LogSpaceSetting, state: Path, log_bytes: int, thin_bytes: int = 0) -> int:
    if setting.size is not None:
        return setting.size
    st = os.statvfs(state)
    if setting.percent is not None:
        return int(st.f_blocks * st.f_frsize * setting.percent / 100)
    free = st.f_bavail * st.f_frsize
    return min(free + log_bytes, int((free + log_bytes + thin_bytes) * DEFAULT_PERCENT / 100))


def free_bytes(state: Path) -> int:
    """Bytes an unprivileged file may still take on ``state``'s filesystem."""
    st = os.statvfs(state)
    return st.f_bavail * st.f_frsize


@dataclass
class HistoryCut:
    lsn: int  #: writeback went this far, past the window
    at: float  #: wall time


class LogSpace:
    """The node's log space: its limit, the enforcement, and what status says about it.

    Thread-safe: :meth:`enforce` runs in one worker thread at a time (its own lock)."""

    def __init__(self, state: Path, setting: LogSpaceSetting | None = None) -> None:
        self.state = state
        self.setting = setting or LogSpaceSetting()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.cuts: dict[str, HistoryCut] = {}  #: volume -> how far the last cut of its history went
        self.pinned: dict[str, str] = {}  #: volume -> what an open version stops from being freed
        #: mirrors that stop fetching: the logs stay above the high-water mark and their replay,
        #: which is what lets their log go, is behind (paused); fetching resumes below it
        self.fetch_stopped: set[str] = set()
        self.last_limit = self.setting.size or MIN_LOG_SPACE  #: computed at every pass (and by adopt)
        self.passes = 0  #: enforcement passes that freed something (tests, metrics)
        self._volumes: list[Volume] = []  #: the node's volumes, as :meth:`adopt` last saw them
        self._stuck_said = False  #: a pass that freed nothing was logged (once, until one frees)

    def check(self) -> None:
        """Refuse a percentage that comes out too small on this filesystem (at start)."""
        if self.setting.percent is not None:
            check_limit(_computed(self.setting, self.state, 0), f"{self.setting.percent:g}% of {self.state}'s filesystem")

    # ------------------------------------------------------------------ waking

    def wake(self) -> None:
        """The write path grew a log: enforce soon (cheap, from any thread)."""
        self._wake.set()

    def wait(self, timeout: float) -> bool:
        """Block until woken or ``timeout`` seconds passed (the enforcing task's sleep)."""
        woken = self._wake.wait(timeout)
        self._wake.clear()
        return woken

    # ------------------------------------------------------------------ limit

    def limit(self, volumes: Iterable[Volume]) -> int:
        vols = list(volumes)
        self.last_limit = limit_for(self.setting, self.state, sum(v.log.end_bytes for v in vols),
                                    sum(v.base_allocated for v in vols if v.thin))
        return self.last_limit

    def adopt(self, volumes: list[Volume]) -> None:
        """Size the segments of every volume from the limit, let them wake us, and make the
        thin ones ask :meth:`room_for` before each write. Called whenever the node's set of
        volumes changed."""
        seg = segment_bytes_for(self.limit(volumes), len(volumes))
        self._volumes = list(volumes)
        for v in volumes:
            v.log.segment_bytes = seg
            v.on_growth = self.wake
            v.room_for = functools.partial(self.room_for, v.name) if v.thin else None

    def held(self) -> int:
        """Free space held for the logs: what they may still take (the last limit less what
        they take), plus what writeback will still add to the thin base images."""
        vols = self._volumes
        logs = sum(v.log.end_bytes for v in vols)
        pending = sum(v.unapplied_bytes for v in vols if v.thin and v.clone_of is None)
        return max(0, self.last_limit - logs) + pending

    def room_for(self, name: str, n: int) -> None:
        """Refuse (NoSpace) a write of ``n`` bytes into thin volume ``name`` that would eat into
        the free space held for the logs (see the module doc)."""
        free = free_bytes(self.state)
        held = self.held()
        if free - n >= held:
            return
        raise NoSpace(f"volume {name} is thin and the state directory's filesystem is nearly full: of its "
                      f"{human_bytes(free)} free, {human_bytes(held)} is held for the logs of this node's volumes "
                      "(log space) and for writing back thin volumes; its writes fail with ENOSPC until there is "
                      "more free space: free space on the state directory's filesystem, or lower --log-space")

    # ------------------------------------------------------------------ enforcement

    def enforce(self, volumes: dict[str, Volume], history_of: Callable[[str], Retention],
                now_ns: int | None = None) -> int:
        """One pass: when the logs take more than :data:`HIGH_WATER` of the limit, free them
        down to :data:`LOW_WATER` (history first, then mirrors' holds). Returns bytes freed."""
        with self._lock:
            vols = [v for v in volumes.values() if v.clone_of is None]
            used = sum(v.log.end_bytes for v in volumes.values())
            limit = self.limit(volumes.values())
            if used <= limit * HIGH_WATER:
                self._forget_pins(vols)
                self.fetch_stopped.clear()
                self._stuck_said = False
                return 0
            need = used - int(limit * LOW_WATER)
            freed = 0
            now = time.time_ns() if now_ns is None else now_ns
            for vol in vols:  # a segment started under a larger limit cannot go until it is sealed
                try:
                    vol.log.seal_oversized()
                except MarsError as e:
                    logger.info("log space: cannot seal the log segment of %s: %s", vol.name, e)
            for drop in (False, True):  # history first, then mirrors' holds
                for vol in sorted(vols, key=lambda v: v.log.end_bytes, reverse=True):
                    if freed >= need:
                        break
                    try:
                        freed += self._free(vol, need - freed, drop, history_of(vol.name), now)
                    except MarsError as e:  # the volume's disk fault (it stands in its status); the others go on
                        logger.info("log space: cannot free log of %s: %s", vol.name, e)
            self._stop_fetching(vols, used - freed > limit * HIGH_WATER)
            if freed:
                self.passes += 1
                self._stuck_said = False
                logger.info("log space: %s of %s used, freed %s", human_bytes(used), human_bytes(limit),
                            human_bytes(freed))
            elif not self._stuck_said:  # said once until a pass frees something or the logs fit again
                self._stuck_said = True
                logger.info("log space: %s of %s used, nothing could be freed now; status says what keeps it",
                            human_bytes(used), human_bytes(limit))
            return freed

    def _free(self, vol: Volume, need: int, drop: bool, history: Retention, now_ns: int) -> int:
        before = vol.log.end_bytes
        if not drop:  # the log shrinks by whole segments: cut a segment more history rather than drop a mirror
            need += vol.log.segment_bytes
        cap = min(vol.durable_lsn, vol.hold_floor()) if not drop else vol.durable_lsn
        upto = _whole_segments(vol.trim_points(), vol.log.floor_keeping(max(0, before - need)), cap)
        if upto < vol.log.first_lsn:  # nothing whole to free here at this stage
            return 0
        window_floor = min(vol.durable_lsn, max(vol.applied_lsn, history.floor(vol.log, now_ns)))
        dropped_before = set(vol.dropped())
        reach = vol.free_log(upto, drop=drop)
        if reach > window_floor:
            self.cuts[vol.name] = HistoryCut(reach, time.time())
            logger.info("log space: history of %s cut at lsn-%d", vol.name, reach)
        for key in sorted(set(vol.dropped()) - dropped_before):
            logger.info("log space: log of %s dropped for %s up to lsn-%d; it will copy the changed extents",
                        vol.name, hold_mirror(key) or key, reach)
        pin = vol.open_versions.oldest()
        if reach < upto and pin is not None and pin <= reach:
            self.pinned[vol.name] = (f"open version lsn-{pin} of {vol.name} (a reader, a loop device or a clone) "
                                     f"keeps {human_bytes(vol.log.bytes_between(pin, vol.head_lsn))} of log that log "
                                     "space needs freed; close it")
        else:
            self.pinned.pop(vol.name, None)
        return max(0, before - vol.log.end_bytes)

    def _stop_fetching(self, vols: list[Volume], full: bool) -> None:
        """A mirror whose log cannot go because its replay is behind stops fetching while the
        logs stay full (its fetcher asks :attr:`fetch_stopped`), instead of failing."""
        stopped = {v.name for v in vols if full and v.replay_limit is not None and v.replay_limit < v.durable_lsn}
        for name in sorted(stopped - self.fetch_stopped):
            logger.info("log space is full: %s stops fetching until its replay lets log go", name)
        self.fetch_stopped = stopped

    def _forget_pins(self, vols: list[Volume]) -> None:
        for vol in vols:
            self.pinned.pop(vol.name, None)

    # ------------------------------------------------------------------ status

    def warnings(self, vol: Volume, history: Retention, now_ns: int | None = None, *,
                 primary: bool = True) -> list[str]:
        """What status says about ``vol`` and log space (see the module doc), where it applies:
        mirrors' dropped log on a primary (the node they fetch from), a stopped fetch on a mirror."""
        out: list[str] = []
        cut = self.cuts.get(vol.name)
        if cut is not None:
            if _window_whole(vol, history, now_ns):
                self.cuts.pop(vol.name, None)
            else:
                out.append(f"log space ran out (limit {human_bytes(self.last_limit)}): the history window of "
                           f"{vol.name} ({history.describe()}) was cut at lsn-{cut.lsn}; the oldest version is "
                           f"lsn-{vol.oldest_version_lsn}; raise --log-space or shorten the history")
        for key, cs in sorted(vol.dropped().items()) if primary else ():
            mirror = hold_mirror(key) or key
            out.append(f"log space ran out: mirror {mirror} of {vol.name} fell behind by more than the log space; "
                       f"its log up to lsn-{cs.upto} was dropped and it will copy {human_bytes(cs.bytes)} of changed "
                       f"extents when it returns (if it is gone for good: marsfs leave {vol.name} on it, or marsfs "
                       f"leave {vol.name} --node {mirror} --force here)")
        if vol.name in self.pinned:
            out.append(self.pinned[vol.name])
        if vol.name in self.fetch_stopped and not primary:
            out.append(f"log space is full: fetching of {vol.name} stopped, because its replay (at lsn-"
                       f"{vol.replay_limit}) keeps {human_bytes(vol.log.end_bytes)} of log; it fetches again once "
                       f"replay lets log go (marsfs resume-replay {vol.name}) or --log-space is raised")
        return out


def _whole_segments(points: list[int], want: int, cap: int) -> int:
    """How far to free: the first whole-segment end at or past ``want`` (the log goes by whole
    segments), or the last one at or below ``cap`` if that is beyond it; 0 if none. Never
    between two ends: writeback past the last end that trim can delete would cut history for
    nothing."""
    past = next((p for p in points if p >= want), points[-1] if points else 0)
    if past <= cap:
        return past
    return max((p for p in points if p <= cap), default=0)


def _window_whole(vol: Volume, history: Retention, now_ns: int | None) -> bool:
    """Does the volume keep its whole history window again (a cut is over)?"""
    if history.keep_bytes is not None and vol.log.bytes_between(vol.oldest_version_lsn, vol.head_lsn) >= history.keep_bytes:
        return True
    if history.keep_seconds is not None:
        ts = vol.oldest_version_timestamp_ns
        now = time.time_ns() if now_ns is None else now_ns
        return bool(ts) and ts <= now - int(history.keep_seconds * 1e9)
    return False
