"""One trio runner and one async ``wait_for`` for the in-process tiers (t2, t3).

``run`` bounds a test in (virtual) seconds so a bug fails instead of hanging. Under trio's
MockClock (the default) the clock stands still while anything runs and jumps to the next
deadline once every task waits; worker threads (append, sync, sums, reads) run in real time and
the clock never jumps while one of them runs, so a loaded machine slows a test down but cannot
make a timeout expire early. ``autojump`` is how long (real seconds) every task must have waited
before the clock jumps; ``autojump=math.inf`` stands the clock still (tests that never sleep);
``autojump=None`` runs on the real clock (the fault proxy, real sockets).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio
import trio.testing

#: real seconds every task must have waited before the MockClock jumps: short, because a test
#: pays it at every jump, and safe, because the clock never jumps while a worker thread runs
AUTOJUMP = 0.001


def run(fn: Callable[[], Awaitable[None]], *, limit: float = 300.0, autojump: float | None = AUTOJUMP) -> None:
    """Run ``fn`` under trio, failing it after ``limit`` seconds (virtual under the MockClock)."""

    async def main() -> None:
        with trio.fail_after(limit):
            await fn()

    if autojump is None:
        trio.run(main)
    else:
        clock = trio.testing.MockClock(autojump_threshold=autojump)
        trio.run(main, clock=clock, instruments=[NoJumpDuringThreads(clock, autojump)])


class NoJumpDuringThreads(trio.abc.Instrument):
    """Stands ``clock`` still while a worker thread runs: trio's MockClock jumps once every task
    has waited ``threshold`` real seconds, even when one of them waits for a ``trio.to_thread``
    call, and a timeout could expire before a slow thread returned. Every ``to_thread`` call
    holds a token of the default limiter from before its thread starts until its task is woken
    with the result; after each task step the autojump is off while any token is out, and back
    at ``threshold`` once none is."""

    def __init__(self, clock: trio.testing.MockClock, threshold: float) -> None:
        self.clock = clock
        self.threshold = threshold

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        busy = trio.to_thread.current_default_thread_limiter().borrowed_tokens > 0
        wanted = math.inf if busy else self.threshold
        if self.clock.autojump_threshold != wanted:
            self.clock.autojump_threshold = wanted


async def wait_for(cond: Callable[[], object], what: str = "condition", timeout: float = 60.0,
                   poll: float = 0.05) -> None:
    """Poll ``cond`` until it holds (is truthy); an AssertionError naming ``what`` after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(poll)
        return
    raise AssertionError(f"timed out waiting for {what}")
