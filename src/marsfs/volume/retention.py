"""The history window: how much of a volume's past stays openable, in log bytes and/or time.

Rules that hold here:

* A :class:`Retention` has a byte limit, a time limit, or both (``10G``, ``24h``, ``10G,24h``).
  Each limit is a promise of history, not a cap on space: a version is kept while it lies
  inside *either* limit, so with both the window is the longer of the two. The cap on space
  is the node's log space limit (G8), which may cut any window short.
* The byte limit keeps the newest versions whose records take at most that many bytes of log.
  The time limit keeps every version that was current at some instant of the last D seconds,
  and because a time name resolves to a flush point, it keeps back to the newest flush point
  at or before ``now - D`` (so every time inside the window resolves), looking back at most
  ``_FLUSH_SEARCH`` records for one.
* :meth:`Retention.floor` is the newest LSN writeback may apply (versions after it stay). It is
  driven by the timestamps recorded in the log (the primary's clock, also on a mirror) and a
  ``now_ns`` the caller passes, so tests move time without sleeping. Record timestamps are
  assumed not to go backwards (a clock step back can shift the time floor by that step).
* Durations: a number with ``s``, ``min``, ``h``, ``d`` or ``w``; sizes as :func:`parse_size`
  (``m``/``M`` is a size in MiB, so minutes are spelled ``min``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from marsfs.errors import InvalidRequest
from marsfs.log import Log, RecordType
from marsfs.units import human_bytes, parse_size

DEFAULT_HISTORY_BYTES = 256 * 1024 * 1024
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|min|h|d|w)\s*", re.IGNORECASE)
_SECONDS = {"s": 1, "sec": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FLUSH_SEARCH = 4096  #: records the time floor looks back for a flush point


@dataclass(frozen=True)
class Retention:
    """A history window; None for a limit that is not set (at least one is)."""

    keep_bytes: int | None = DEFAULT_HISTORY_BYTES
    keep_seconds: float | None = None

    def __post_init__(self) -> None:
        assert self.keep_bytes is not None or self.keep_seconds is not None, "a window needs a limit"

    @classmethod
    def parse(cls, values: str | int | list[str] | list[str | int]) -> Retention:
        """``"10G"``, ``"24h"``, ``"10G,24h"``, a list of those (repeated ``--history``), or bytes."""
        items = values if isinstance(values, list) else [values]
        keep_bytes: int | None = None
        keep_seconds: float | None = None
        for item in items:
            for part in [item] if isinstance(item, int) else [p for p in str(item).split(",") if p.strip()]:
                if isinstance(part, int) or not _DURATION.fullmatch(part):
                    if keep_bytes is not None:
                        raise InvalidRequest(f"history {values!r} gives two sizes; give at most one size "
                                             "and one duration, like 10G,24h")
                    keep_bytes = part if isinstance(part, int) else _parse_history_size(part)
                else:
                    if keep_seconds is not None:
                        raise InvalidRequest(f"history {values!r} gives two durations; give at most one size "
                                             "and one duration, like 10G,24h")
                    keep_seconds = parse_duration(part)
        if keep_bytes is None and keep_seconds is None:
            raise InvalidRequest("history is empty: give a size like 10G, a duration like 24h, or both (10G,24h)")
        return cls(keep_bytes, keep_seconds)

    def floor(self, log: Log, now_ns: int | None = None) -> int:
        """The newest LSN whose version may leave the window (writeback may apply up to it).
        The caller bounds it by what writeback may do anyway (durable, visible, pinned)."""
        floors = []
        if self.keep_bytes is not None:
            floors.append(log.floor_keeping(self.keep_bytes))
        if self.keep_seconds is not None:
            now = time.time_ns() if now_ns is None else now_ns
            floors.append(_time_floor(log, now - int(self.keep_seconds * 1e9)))
        return min(floors)  # kept while inside either limit

    def describe(self) -> str:
        """``256.0 MiB``, ``24h``, ``10.0 GiB or 24h``: what status shows."""
        parts = []
        if self.keep_bytes is not None:
            parts.append(human_bytes(self.keep_bytes))
        if self.keep_seconds is not None:
            parts.append(format_duration(self.keep_seconds))
        return " or ".join(parts)

    def to_json(self) -> dict[str, int | float | None]:
        return {"keep_bytes": self.keep_bytes, "keep_seconds": self.keep_seconds}


def parse_duration(text: str) -> float:
    m = _DURATION.fullmatch(text)
    if m is None:
        raise InvalidRequest(f"cannot read duration {text!r}: give a number with s, min, h, d or w, like 24h")
    return float(m.group(1)) * _SECONDS[m.group(2).lower()]


def format_duration(seconds: float) -> str:
    for unit in ("w", "d", "h", "min"):
        if seconds >= _SECONDS[unit] and seconds % _SECONDS[unit] == 0:
            return f"{int(seconds // _SECONDS[unit])}{unit}"
    return f"{seconds:g}s"


def _parse_history_size(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidRequest:
        raise InvalidRequest(f"cannot read history {text!r}: give a size like 10G, a duration like 24h "
                             "(s, min, h, d, w), or both: 10G,24h") from None


def _time_floor(log: Log, cutoff_ns: int) -> int:
    """The newest LSN that may leave a window starting at ``cutoff_ns``: the newest flush point
    at or before the cutoff (else the newest record at or before it); ``first - 1`` when every
    retained record is newer."""
    lo, hi = log.first_lsn, log.last_lsn  # find the newest record with timestamp <= cutoff
    best = lo - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if log.info(mid).timestamp_ns <= cutoff_ns:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    for lsn in range(best, max(log.first_lsn, best - _FLUSH_SEARCH) - 1, -1):
        if log.info(lsn).type == RecordType.FLUSH:
            return lsn
    return best
