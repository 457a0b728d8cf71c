"""trio helpers shared by the layers that run on trio."""

from __future__ import annotations

import logging
import ssl
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


async def supervised(what: str, fn: Callable[[], Awaitable[None]], *, restart_after: float | None = None) -> None:
    """Run a background task of the daemon so that its failure never ends the daemon (G11).

    A task is expected to handle the failures it knows (and say so in its own words); whatever
    escapes is a bug, logged with its traceback as an unexpected error. A task the node cannot
    do without (``restart_after`` seconds: the metadata rounds, the roles' watch) starts again
    after that pause, so one bad round leaves no node that stopped following its cluster;
    another task ends. Cancellation passes through.
    """
    while True:
        try:
            await fn()
            return
        except Exception:
            if restart_after is None:
                logger.exception("unexpected error in background task %s; it stopped, the daemon goes on", what)
                return
            logger.exception("unexpected error in background task %s; it starts again in %g s", what,
                             restart_after)
        await trio.sleep(restart_after)


def describe(e: BaseException) -> str:
    """An exception in words for status and logs: never empty, never just a class name's colon.

    ``str(trio.TooSlowError())`` and many OSErrors from trio are empty strings, which made
    reasons like "cannot reach peer: ; is its daemon running"."""
    if isinstance(e, trio.TooSlowError):
        return "no answer in time (timed out)"
    tls = e if isinstance(e, ssl.SSLError) else e.__cause__ if isinstance(e.__cause__, ssl.SSLError) else None
    if tls is not None and tls.reason:  # "[SSL: BAD_RECORD_MAC] ... (_ssl.c:2580)" in words
        return f"TLS: {tls.reason.lower().replace('_', ' ')}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower() if e.strerror[:1].isupper() and e.strerror[1:2].islower() else e.strerror
    text = str(e).strip()
    if text:
        return text
    if e.__cause__ is not None:  # trio wraps the OSError that says what happened
        return describe(e.__cause__)
    plain: dict[type[BaseException], str] = {
        ConnectionResetError: "connection reset by peer", ConnectionRefusedError: "connection refused",
        BrokenPipeError: "connection closed by peer", EOFError: "connection closed by peer",
        TimeoutError: "timed out", trio.BrokenResourceError: "connection broken",
        trio.ClosedResourceError: "connection already closed here"}
    return plain.get(type(e), f"{type(e).__name__} (no details)")
