"""One line per offender and minute: the rate limit of the refusal logs of the node port.

A stranger, an impostor or a buggy peer may knock thousands of times a second; each refusal
is still logged, but in at most one line per key (a host, a node, a node and volume) and
:data:`LOG_EVERY` seconds, which counts the refusals it left out since the last one. The book
stays bounded: keys whose last line is older than the interval are forgotten (they start anew).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

LOG_EVERY = 60.0  #: seconds between two log lines about one key
KEEP = 4096  #: keys kept before the old ones are swept out


class LogBook:
    """When a refusal of ``key`` is to be logged, and what it left out (``clock``: monotonic s)."""

    def __init__(self, clock: Callable[[], float], every: float = LOG_EVERY) -> None:
        self.clock = clock
        self.every = every
        self._lines: dict[Hashable, tuple[float, int]] = {}  #: key -> (time of its last line, left out since)

    def due(self, key: Hashable) -> str | None:
        """None: leave this one out (it is counted); else log it now, with the suffix returned
        ("" or " (N more refused since)")."""
        now = self.clock()
        last, left_out = self._lines.get(key, (None, 0))
        if last is not None and now - last < self.every:
            self._lines[key] = (last, left_out + 1)
            return None
        self._lines[key] = (now, 0)
        if len(self._lines) > KEEP:  # a scan from many addresses or names: keep the book bounded
            self._lines = {k: v for k, v in self._lines.items() if now - v[0] < self.every}
        return f" ({left_out} more refused since)" if left_out else ""
