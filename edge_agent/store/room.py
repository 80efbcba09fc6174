"""Room on the filesystem: the ceiling it sets the queue, and what to do when it is full.

The filesystem bounds the queue as the budget does (``edge_agent/disk.py``): before an
append the database gets a page cap (``set_ceiling``), soft past which the writer evicts
(``bytes_over_ceiling``) and hard a transaction's slack above it; everything else runs
without one (``lift_ceiling``). A write that must not fail for space (eviction, frames,
receipts) runs through ``roomy``, which hands back the WAL's blocks or the disk reserve
(``reclaim``) when the filesystem is full and tries again.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from edge_agent.disk import is_disk_full
from edge_agent.errors import DiskFull
from edge_agent.store.chunks import FrameLimits
from edge_agent.store.file import QueueFile

log = logging.getLogger(__package__)  # the package's one logger, "edge_agent.store"

MAX_PAGES = 4294967294  # SQLite's own ceiling: what max_page_count is outside an append

T = TypeVar("T")


class Room:
    def __init__(self, file: QueueFile, limits: FrameLimits) -> None:
        self.file = file
        self.disk = file.disk
        self.limits = limits
        self.soft_cap_pages = MAX_PAGES  # used pages past this are evicted as disk_full

    # -- the ceiling ------------------------------------------------------

    def set_ceiling(self) -> None:
        """Before an append: how many pages the filesystem lets the database hold (soft: past
        it, evict by policy), and a hard cap a transaction's slack above it."""
        try:
            cap = self.disk.capacity_bytes()
        except OSError as e:
            log.warning("cannot read the filesystem of %s: %s", self.file.path, e)
            return
        self.soft_cap_pages = self.soft_cap(cap)
        self.file.db.execute(f"PRAGMA max_page_count={max(1, cap // self.file.page_size)}")

    def soft_cap(self, capacity_bytes: int) -> int:
        """Pages in use past which appends evict: a transaction's slack under the hard cap."""
        page = self.file.page_size
        # an append's own pages, and a chunk that eviction rewrites before it frees the old one
        slack = max(2 * page, min(self.file.wal_limit_bytes // 2, capacity_bytes // 8))
        slack += self.limits.max_bytes
        return max(0, capacity_bytes - slack) // page

    def lift_ceiling(self) -> None:
        # Evicting, cutting frames and deleting receipted records must never hit the cap.
        with contextlib.suppress(sqlite3.Error):
            self.file.db.execute(f"PRAGMA max_page_count={MAX_PAGES}")

    def pages_used(self) -> int:
        db = self.file.db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        return int(pages) - int(db.execute("PRAGMA freelist_count").fetchone()[0])

    def bytes_over_ceiling(self, charged: int) -> int:
        """Budget bytes to evict to bring the pages in use back under the soft cap, at the rate
        the queue (``charged`` bytes now) fills pages; 0 if they are under it. Evicting frees
        room inside pages before it frees whole pages, and that rate shows it."""
        used = self.pages_used()
        over = used - self.soft_cap_pages
        if over <= 0:
            return 0
        page = self.file.page_size
        ratio = max(1.0, used * page / charged) if charged else 1.0
        return int(over * page / ratio) + 1

    # -- a full filesystem ------------------------------------------------

    def free_bytes(self) -> int:
        """What the filesystem has free (0 if it cannot be read: take it as full)."""
        try:
            return self.disk.view().free_bytes
        except OSError:
            return 0

    def fs_really_full(self) -> bool:
        """Not our ceiling but the filesystem itself: another process may have filled it."""
        return self.free_bytes() < self.file.wal_limit_bytes

    def reclaim(self) -> bool:
        """The filesystem is full: hand the WAL's blocks back to it (a checkpoint that truncates
        the WAL needs no room unless the database must grow), and if the filesystem is still
        full, the reserve. False if neither gave anything back."""
        before = self.free_bytes()
        try:
            self.file.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError as e:
            if not is_disk_full(e):
                raise
        gained = self.free_bytes() > before
        if gained and not self.fs_really_full():
            log.warning("the filesystem of %s is full: truncated the WAL to make room", self.file.path)
            return True
        return self.disk.release() or gained

    def roomy(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a write that must not fail for space (eviction, frames, receipts): if the
        filesystem is full, give back the WAL's blocks or the reserve and try again."""
        path = self.file.path
        for _ in range(3):
            try:
                return fn(*args)
            except sqlite3.OperationalError as e:
                if not is_disk_full(e):
                    raise
                if not self.reclaim():
                    raise DiskFull(f"{path}: the filesystem is full, the reserve spent: {e}") from e
        try:
            return fn(*args)
        except sqlite3.OperationalError as e:
            if is_disk_full(e):
                raise DiskFull(f"{path}: the filesystem is full, the reserve spent: {e}") from e
            raise

    def disk_stats(self, nbytes: int) -> dict[str, Any]:
        """What the filesystem can give the queue, in budget bytes: what it holds, plus the
        pages it may still fill at the rate the queue uses pages now."""
        try:
            view = self.disk.view()
        except OSError:
            return {}
        used = self.pages_used()
        page = self.file.page_size
        ratio = max(1.0, used * page / nbytes) if nbytes >= 16 * page else 1.0
        room = self.soft_cap(self.disk.capacity_bytes(view)) - used
        return {
            "disk_budget_bytes": max(0, int(nbytes + room * page / ratio)),
            "disk_free_bytes": view.free_bytes,
            "disk_reserve_held": view.reserve_bytes >= self.disk.reserve_bytes,
        }
