"""Reasons in words: ``marsfs.aio.describe`` and the fetcher's failure reasons.

Status and logs once said "stalled ... TooSlowError: " and "cannot reach peer hole at
127.0.0.1:18198: ; is its daemon running": exceptions whose text is empty. Every exception
becomes words: never an empty string, never a class name followed by nothing.
"""

from __future__ import annotations

import errno
import logging

import pytest
import trio
import trio.testing

from marsfs.aio import describe, supervised
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


# ---------------------------------------------------------------------------- supervised tasks

@pytest.mark.allow_log("unexpected error in background task")
def test_a_task_the_node_needs_starts_again_after_a_bug_and_another_ends(caplog: pytest.LogCaptureFixture) -> None:
    """G11: what escapes a background task is logged and never ends the daemon; the metadata
    rounds and the roles' watch (``restart_after``) run again after the pause, others end."""
    runs: list[float] = []

    async def buggy() -> None:
        runs.append(trio.current_time())
        if len(runs) < 3:
            raise KeyError("a bug in one round")

    async def main() -> None:
        await supervised("rounds", buggy, restart_after=1.0)
        assert len(runs) == 3 and runs[2] - runs[0] == pytest.approx(2.0)
        runs.clear()
        await supervised("once", buggy)
        assert len(runs) == 1

    with caplog.at_level(logging.ERROR, logger="marsfs"):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("unexpected error in background task rounds; it starts again in 1 s") == 2, messages
    assert messages == [*messages[:2], "unexpected error in background task once; it stopped, the daemon goes on"]
