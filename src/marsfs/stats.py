"""Counters the storage core keeps for monitoring: a latency histogram and byte counters.

They live below every layer so that the log and the volume can count without knowing who
reads the figures (``serve --metrics`` renders them, :mod:`marsfs.faces.metrics`).

Rules that hold here:

* Counting is cheap and never fails: a few integer additions under a lock nobody else holds
  long (the histogram's own, or the lock the caller already holds for the counted work).
* Counters only grow while the object lives; a volume that is opened again (a daemon
  restart, a resync's switch) starts from 0, which Prometheus reads as a counter reset.
* A reader gets a consistent snapshot (count, sum and buckets from the same instant).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

#: Upper bounds (seconds) of the fsync latency buckets: from a fast SSD's 100 µs to a stalled
#: disk's seconds; an observation above the last is counted in +Inf only.
FSYNC_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A histogram at one instant: ``buckets`` pairs each upper bound with the number of
    observations at or below it (cumulative, as Prometheus wants them)."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    sum: float


class LatencyHistogram:
    """Durations in fixed buckets; safe to observe from any thread."""

    def __init__(self, bounds: tuple[float, ...] = FSYNC_BUCKETS) -> None:
        assert list(bounds) == sorted(bounds) and len(set(bounds)) == len(bounds), "bounds must increase"
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  #: per bucket, not cumulative; the last is above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.bounds, seconds)  # le semantics: a value equal to a bound is in it
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative = []
        running = 0
        for bound, n in zip(self.bounds, counts):
            running += n
            cumulative.append((bound, running))
        return HistogramSnapshot(buckets=tuple(cumulative), count=running + counts[-1], sum=total)


@dataclass(slots=True)
class VolumeCounters:
    """Bytes a volume moved since it was opened. Each field has one writer, which updates it
    under the lock that already serialises that work (see :class:`marsfs.volume.Volume`)."""

    fetched_bytes: int = 0  #: log bytes of records fetched from another node and appended here
    writeback_bytes: int = 0  #: data bytes of WRITE records applied to the base image
    replayed_bytes: int = 0  #: log bytes a mirror's replay made visible to its readers
