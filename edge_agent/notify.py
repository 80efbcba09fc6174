"""systemd's notify protocol: READY=1 when the agent serves, WATCHDOG=1 while its loop runs.

A few datagrams on ``$NOTIFY_SOCKET`` (sd_notify(3)); nothing happens when the agent is
not started by systemd. The watchdog ping is sent by a task on the event loop, so a
loop that hangs (a blocking call, a deadlock) stops the pings and systemd restarts the
agent after ``WatchdogSec=``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from edge_tier.tasks import running

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr  # abstract namespace
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # ping at half the timeout, as sd_watchdog_enabled(3) advises
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", self.address, e)

    async def watchdog(self) -> None:
        """Ping while the event loop runs; returns at once without a watchdog."""
        if self.watchdog_s is None:
            return
        while running():
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s)
