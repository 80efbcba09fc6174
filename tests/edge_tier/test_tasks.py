"""A service loop stops even when a cancellation was swallowed on its way (gh-86296)."""

from __future__ import annotations

import asyncio
import contextlib

from edge_tier.tasks import running


def test_a_loop_stops_after_its_cancellation_was_swallowed() -> None:
    turns = 0

    async def loop() -> None:
        nonlocal turns
        while running():
            turns += 1
            # what a racing wait_for does: the cancel is lost and the loop goes on
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)

    async def scenario() -> bool:
        task = asyncio.create_task(loop())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait([task], timeout=1.0)
        return task.cancelled()

    assert asyncio.run(scenario()), "the loop did not stop"
    assert turns >= 2


def test_running_outside_a_task_is_true() -> None:
    assert running()
