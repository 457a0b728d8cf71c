"""The test kit's runner: under its MockClock time jumps only while nothing works.

A timeout in a t2/t3 test must not expire because a worker thread was slow (a loaded machine),
and a test sleeps virtual seconds, not real ones.
"""

from __future__ import annotations

import time

import trio

from marsfs.testing.runner import run


def test_the_clock_stands_still_while_a_worker_thread_runs() -> None:
    async def main() -> None:
        start = trio.current_time()
        with trio.move_on_after(1) as scope:  # the nearest deadline: where a jump would go
            await trio.to_thread.run_sync(time.sleep, 0.2)  # 200 times the autojump threshold
            assert trio.current_time() == start
        assert not scope.cancelled_caught

    run(main)


def test_the_clock_jumps_once_every_task_waits() -> None:
    async def main() -> None:
        start = trio.current_time()
        for _ in range(100):
            await trio.sleep(60)
        assert trio.current_time() == start + 6000

    run(main, limit=7000)
