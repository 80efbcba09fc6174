"""Room on the queue's filesystem: what it can still give the queue, and a reserve for bad days.

The byte budget bounds the queue, but the filesystem may bound it first: a small
partition, or another process writing beside the queue. SQLite needs disk to free disk
(deleting records writes the WAL; a checkpoint may grow the database file), so a queue
that lets its filesystem fill up can no longer evict, cut frames or delete what the cloud
receipted, and every restart fails the same way. Two defences, kept here:

* **A ceiling.** Before each commit the store asks :meth:`DiskRoom.capacity_bytes` how
  large the database may grow: what it holds now, plus the free space, less a WAL
  allowance, the reserve and a margin. Records past that ceiling are evicted by the
  queue's policy and counted as ``disk_full``; the queue goes on taking records within
  what fits. So the queue's budget is ``min(store.budget_bytes, what the filesystem can
  give)``, and the status says which one binds.
* **A reserve file** (``{queue}.reserve``), preallocated so its blocks are really the
  queue's. When a write fails with ENOSPC anyway (someone else filled the disk), the store
  deletes it and so has room for the eviction, the checkpoint, the frame bookkeeping and the
  receipt deletes that get it out; the reserve is taken back once the space is there again.
  A reserve left from before a crash is there at the next start, so a full disk never stops
  the agent from opening its queue.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARGIN_BYTES = 256 * 1024  # side files (sequence floor, control state, -shm) and rounding


@dataclass(frozen=True, slots=True)
class DiskView:
    """The queue's files and its filesystem at one moment."""

    free_bytes: int  # what an unprivileged writer may still allocate (f_bavail)
    total_bytes: int  # the filesystem's size
    db_bytes: int
    wal_bytes: int
    reserve_bytes: int  # of the reserve file, as held now


class DiskRoom:
    """The reserve file and the ceiling for one queue file. Thread-safe enough: file
    operations only, and a wrong answer in a race costs one more eviction or one retry."""

    def __init__(self, db_path: Path, *, reserve_bytes: int, wal_allowance_bytes: int) -> None:
        self.db_path = db_path
        self.reserve_path = db_path.with_name(db_path.name + ".reserve")
        self.reserve_bytes = reserve_bytes
        self.wal_allowance_bytes = wal_allowance_bytes
        self.released = 0  # times the reserve was given up (tests and status read it)

    # -- the reserve ----------------------------------------------------------

    @property
    def held(self) -> bool:
        return self._size(self.reserve_path) >= self.reserve_bytes

    def ensure_reserve(self) -> bool:
        """Take the reserve (back) if the filesystem has room for it and for the WAL beside it;
        True if it is held afterwards. Never takes the last free bytes from the queue."""
        if self.reserve_bytes <= 0 or self.held:
            return True
        have = self._size(self.reserve_path)
        try:
            st = os.statvfs(self.reserve_path.parent)
        except OSError:
            return False
        free = st.f_bavail * st.f_frsize
        if free < (self.reserve_bytes - have) + self.wal_allowance_bytes + MARGIN_BYTES:
            return False
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                _allocate(fd, self.reserve_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("could not take the queue's disk reserve %s (will retry): %s", self.reserve_path, e)
            with contextlib.suppress(OSError):
                if self._size(self.reserve_path) < self.reserve_bytes:
                    os.unlink(self.reserve_path)
            return False
        log.info("queue disk reserve held: %s (%d bytes)", self.reserve_path, self.reserve_bytes)
        return True

    def release(self) -> bool:
        """Give the reserve's blocks back to the filesystem; True if there was one."""
        size = self._size(self.reserve_path)
        if size <= 0:
            return False
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            return False
        self.released += 1
        log.error(
            "the filesystem of %s is full: released the queue's %d-byte disk reserve so the queue can "
            "evict, checkpoint and take receipts; it is taken back once there is room",
            self.db_path,
            size,
        )
        return True

    # -- the ceiling ------------------------------------------------------------

    def view(self) -> DiskView:
        st = os.statvfs(self.db_path.parent)
        return DiskView(
            free_bytes=st.f_bavail * st.f_frsize,
            total_bytes=st.f_blocks * st.f_frsize,
            db_bytes=self._size(self.db_path),
            wal_bytes=self._size(self._wal_path),
            reserve_bytes=self._size(self.reserve_path),
        )

    def capacity_bytes(self, view: DiskView | None = None) -> int:
        """How large the database file may be: all the queue's files and the free space, less
        the WAL allowance, the reserve (held, or to be taken back) and a margin."""
        v = view or self.view()
        mine = v.db_bytes + v.wal_bytes + v.reserve_bytes + v.free_bytes
        wal = max(self.wal_allowance_bytes, v.wal_bytes)
        return mine - wal - self.reserve_bytes - MARGIN_BYTES

    @property
    def _wal_path(self) -> Path:
        return self.db_path.with_name(self.db_path.name + "-wal")

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0


def filesystem_bytes(directory: Path) -> int:
    """The size of the filesystem holding ``directory`` (0 if it cannot be read)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_blocks * st.f_frsize


def is_disk_full(e: BaseException) -> bool:
    """SQLite's SQLITE_FULL or an OSError ENOSPC/EDQUOT: no room on the filesystem."""
    if isinstance(e, sqlite3.Error):
        return (getattr(e, "sqlite_errorcode", -1) & 0xFF) == sqlite3.SQLITE_FULL
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _allocate(fd: int, size: int) -> None:
    """Really allocate ``size`` bytes (a sparse file would give nothing back when deleted)."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    block = b"\0" * (1 << 20)
    os.lseek(fd, 0, os.SEEK_SET)
    left = size
    while left > 0:
        left -= os.write(fd, block[: min(left, len(block))])
