"""Faults: the disk failures standing on a volume (G11), by the path that met them.

Failures of the disk under the state directory are the volume's, never the process's: a full
disk (:class:`~marsfs.errors.NoSpace`), a failing one (:class:`~marsfs.errors.DiskFailed`, or
:class:`~marsfs.errors.LogFailed` from the log) reaches the caller of the operation that met
it and stands here under its path until the same path next succeeds, so a volume recovers by
itself when space returns.

Rules that hold here:

* A path is one of :data:`PATHS` (``write``, ``flush``, ``writeback``); each holds at most one
  failure, the newest.
* Only :data:`IO_FAULTS` are recorded; any other exception passes through untouched.
* A success of a path clears its failure; the hot path (no fault standing) pays one truth test.
* :class:`Faults` holds no lock: one dict assignment or pop per call, readers copy first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from marsfs.errors import DiskFailed, LogFailed, MarsError, NoSpace

#: What the disk under the state directory can make an operation fail with (G11).
IO_FAULTS = (NoSpace, DiskFailed, LogFailed)
#: The paths a failure can stand on.
PATHS = ("write", "flush", "writeback")


class Faults:
    """Path -> the disk failure standing on it."""

    def __init__(self) -> None:
        self._by_path: dict[str, MarsError] = {}

    def record(self, where: str, error: MarsError) -> None:
        """``where`` failed with ``error``: it stands until ``where`` next succeeds."""
        assert where in PATHS, where
        self._by_path[where] = error

    def clear(self, where: str) -> None:
        """``where`` succeeded: its failure (if any) is over."""
        if self._by_path:  # the hot path pays one truth test
            self._by_path.pop(where, None)

    def get(self, where: str) -> MarsError | None:
        """The failure standing at ``where``, None if it works."""
        return self._by_path.get(where)

    def distinct(self) -> list[MarsError]:
        """The standing failures, one per message."""
        seen: dict[str, MarsError] = {}
        for e in list(self._by_path.values()):
            seen.setdefault(str(e), e)
        return list(seen.values())

    def lines(self) -> list[str]:
        """What ``status`` says about each standing failure: what fails, why, and what to do."""
        out: list[str] = []
        seen: set[str] = set()
        for where, e in list(self._by_path.items()):
            if str(e) in seen:
                continue
            seen.add(str(e))
            code = "ENOSPC" if isinstance(e, NoSpace) else "EIO"
            if where == "writeback":
                out.append(f"writeback into the base image is stuck: {e}; it retries every second, and writes "
                           "go on into the log while it has room")
            else:
                out.append(f"the last {where} failed with {code}: {e}; writes work again by themselves "
                           "once the disk takes them")
        return out

    def __bool__(self) -> bool:
        return bool(self._by_path)


class HasFaults(Protocol):
    """What :func:`io_path` decorates the methods of."""

    @property
    def fault_state(self) -> Faults: ...


_S = TypeVar("_S", bound=HasFaults)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def io_path(where: str) -> Callable[[Callable[Concatenate[_S, _P], _R]], Callable[Concatenate[_S, _P], _R]]:
    """Record a disk failure of the decorated operation as its owner's fault at ``where``
    (and re-raise it); a success clears that fault: space came back, the disk answered."""
    assert where in PATHS, where

    def decorate(fn: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
        @functools.wraps(fn)
        def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                result = fn(self, *args, **kwargs)
            except IO_FAULTS as e:
                self.fault_state.record(where, e)
                raise
            self.fault_state.clear(where)
            return result

        return wrapper

    return decorate
