"""Files the agent must not leave half-written (written beside, synced, then renamed), and
the lock that keeps one writer on a queue."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from edge_agent.errors import QueueInUse


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds either its old bytes or ``data``, whatever the crash or power cut."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself is durable once the directory is synced
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class QueueLock:
    """An exclusive ``flock`` on ``{queue}.lock`` while a process has the queue open for
    writing: a second agent, or ``edge-agent recover`` while the agent runs, is refused
    instead of corrupting the queue. The kernel drops it when the process dies."""

    def __init__(self, queue: Path) -> None:
        self.path = queue.with_name(queue.name + ".lock")
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise QueueInUse(f"{queue} is in use by another process (it holds {self.path})") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
