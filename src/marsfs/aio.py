"""trio helpers shared by the layers that run on trio."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

logger = logging.getLogger(__name__)


class single_error:
    """``async with trio.open_nursery()`` inside ``with single_error():`` raises the first real
    error of a task instead of an ExceptionGroup, so callers can catch ConnectionLost & co.

    No error is dropped: when a group holds more than one real error, the others are logged
    (with their tracebacks at debug level) before the first is raised.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, BaseExceptionGroup):
            leaves = _leaves(exc)
            real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
            for other in real[1:]:
                logger.info("also failed in the same task group: %s: %s", type(other).__name__, other,
                            exc_info=other if logger.isEnabledFor(logging.DEBUG) else None)
            raise (real or leaves)[0]


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


async def supervised(what: str, fn: Callable[[], Awaitable[None]]) -> None:
    """Run a background task of the daemon so that its failure never ends the daemon (G11).

    A task is expected to handle the failures it knows (and say so in its own words); whatever
    escapes is a bug, logged with its traceback as an unexpected error, and the task ends.
    Cancellation passes through.
    """
    try:
        await fn()
    except Exception:
        logger.exception("unexpected error in background task %s; it stopped, the daemon goes on", what)
