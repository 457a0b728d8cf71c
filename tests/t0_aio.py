"""Reasons in words: ``marsfs.aio.describe`` and the fetcher's failure reasons.

Status and logs once said "stalled ... TooSlowError: " and "cannot reach peer hole at
127.0.0.1:18198: ; is its daemon running": exceptions whose text is empty. Every exception
becomes words: never an empty string, never a class name followed by nothing.
"""

from __future__ import annotations

import errno

import pytest
import trio

from marsfs.aio import describe
from marsfs.errors import ProtocolError
from marsfs.replication.channel import ConnectionLost
from marsfs.replication.fetch import failure_reason


def _wrapped(cause: BaseException) -> BaseException:
    """What trio raises: an empty error whose cause says what happened."""
    try:
        try:
            raise cause
        except BaseException as e:
            raise trio.BrokenResourceError() from e
    except trio.BrokenResourceError as outer:
        return outer


@pytest.mark.parametrize("exc, words", [
    (trio.TooSlowError(), "no answer in time (timed out)"),
    (OSError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
    (OSError(errno.EHOSTUNREACH, "No route to host"), "no route to host"),
    (OSError(), "OSError (no details)"),
    (OSError("Multiple exceptions: [Errno 111] Connect call failed"), "Multiple exceptions: [Errno 111] Connect call failed"),
    (ConnectionResetError(), "connection reset by peer"),
    (ConnectionRefusedError(), "connection refused"),
    (BrokenPipeError(), "connection closed by peer"),
    (TimeoutError(), "timed out"),
    (EOFError(), "connection closed by peer"),
    (trio.BrokenResourceError(), "connection broken"),
    (trio.ClosedResourceError(), "connection already closed here"),
    (_wrapped(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")), "connection reset by peer"),
    (ValueError("  "), "ValueError (no details)"),
    (ConnectionLost("no data from a for 10 s"), "no data from a for 10 s"),
], ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else None)
def test_describe(exc: BaseException, words: str) -> None:
    assert describe(exc) == words


@pytest.mark.parametrize("exc", [trio.TooSlowError(), OSError(), ConnectionResetError(), trio.BrokenResourceError(),
                                 EOFError(), ConnectionLost(""), ProtocolError("frame checksum mismatch")])
def test_fetch_failure_reasons_are_words(exc: BaseException) -> None:
    reason = failure_reason(exc)
    assert reason.strip() and not reason.startswith(f"{type(exc).__name__}: ")
    assert ": ;" not in f"{reason};" and not reason.endswith(": ")


def test_a_protocol_error_keeps_its_name_after_the_words() -> None:
    assert failure_reason(ProtocolError("frame checksum mismatch")) == (
        "damaged or invalid data from the peer (ProtocolError: frame checksum mismatch)")
