"""What the services' long-running asyncio loops share."""

from __future__ import annotations

import asyncio


def running() -> bool:
    """The condition of a service loop: True, or CancelledError once the task was asked to stop.

    In Python 3.11 ``asyncio.wait_for`` can swallow a cancellation that arrives just as its
    result does (gh-86296), and nats-py waits that way. A loop that checks here on every
    turn still stops, so a TaskGroup never waits forever on a child that missed its cancel.
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop: nothing to stop
        return True
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return True
