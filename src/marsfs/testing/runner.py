"""One trio runner and one async ``wait_for`` for the in-process tiers (t2, t3).

``run`` bounds a test in (virtual) seconds so a bug fails instead of hanging. Under trio's
MockClock (the default), worker threads (append, sync, reads) run in real time while the clock
may jump when every task waits: ``autojump`` is small but not zero, so the clock jumps only after
the threads had real time to finish. ``autojump=math.inf`` stands the clock still (tests that
never sleep); ``autojump=None`` runs on the real clock (the fault proxy, real sockets).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio.testing


def run(fn: Callable[[], Awaitable[None]], *, limit: float = 300.0, autojump: float | None = 0.02) -> None:
    """Run ``fn`` under trio, failing it after ``limit`` seconds (virtual under the MockClock)."""

    async def main() -> None:
        with trio.fail_after(limit):
            await fn()

    if autojump is None:
        trio.run(main)
    else:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=autojump))


async def wait_for(cond: Callable[[], object], what: str = "condition", timeout: float = 60.0,
                   poll: float = 0.05) -> None:
    """Poll ``cond`` until it holds (is truthy); an AssertionError naming ``what`` after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(poll)
        return
    raise AssertionError(f"timed out waiting for {what}")
