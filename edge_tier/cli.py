"""What every command-line entry point shares: running a service until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable


def run_service(main: Callable[[], Awaitable[None]]) -> int:
    """Run ``main`` until it returns or SIGTERM/SIGINT cancels it (then it cleans up)."""

    async def runner() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)  # type: ignore[union-attr]
        try:
            await main()
        except asyncio.CancelledError:
            logging.getLogger("edge_tier").info("stopped by signal")

    asyncio.run(runner())
    return 0
