"""The async queue: ``Store`` on a thread of its own, and group commit for producers.

Owns the store's one thread (every store call goes through ``AsyncQueue.call``), the
pending enqueues and the committer task that drains them one transaction at a time, the
wait for room under the block policy, and the checkpointer task. The store itself stays
synchronous and single-threaded; this is the only part that knows of asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from edge_agent.errors import QueueFull, StoreError
from edge_agent.store.facade import Store
from edge_agent.store.records import Appended, NewRecord, RecordBatch, RecordKind

log = logging.getLogger(__package__)  # the package's one logger, "edge_agent.store"

T = TypeVar("T")


@dataclass(slots=True)
class _Pending:
    kind: RecordKind
    records: Sequence[NewRecord] | RecordBatch
    future: asyncio.Future[Appended]
    write_behind: bool = False


class AsyncQueue:
    """``Store`` on a thread of its own, with group commit for producers.

    Enqueues that arrive within ``commit_window_ms`` (or until
    ``commit_max_records``) share one transaction, so the fsync is paid per
    batch. ``enqueue(durable=False)`` returns before the commit (write-behind),
    bounded by the same window.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.settings = store.settings
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edge-agent-sqlite")
        self._pending: list[_Pending] = []
        self._pending_records = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self.on_commit: list[Callable[[], None]] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store operation on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def enqueue(
        self, kind: RecordKind, records: Sequence[NewRecord] | RecordBatch, *, durable: bool = True
    ) -> Appended | None:
        if self._closed:
            raise StoreError("queue is closed")
        deadline = time.monotonic() + self.settings.block_timeout_s
        while True:
            fut: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
            write_behind = not durable and self._pending_records < self.settings.commit_max_records
            self._pending.append(_Pending(kind, records, fut, write_behind))
            self._pending_records += len(records)
            self._wake.set()
            if write_behind:
                fut.add_done_callback(_log_write_behind_failure)
                return None
            try:
                return await fut
            except QueueFull:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                async with self._room:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._room.wait(), timeout=min(left, 0.5))

    async def notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    async def checkpoints(self, interval_s: float = 0.2, reserve_every_s: float = 5.0) -> None:
        """The checkpointer task: keeps the WAL short, off the committer's thread, and takes the
        disk reserve back once a full filesystem has room again."""
        ticks = max(1, round(reserve_every_s / interval_s))
        for tick in itertools.count(1):
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.store.checkpoint)
            except sqlite3.Error as e:
                log.warning("queue checkpoint failed (will retry): %s", e)
            if tick % ticks == 0 and not self.store.disk.held:
                await asyncio.to_thread(self.store.disk.ensure_reserve)

    async def run(self) -> None:
        """The committer task: drains pending enqueues one transaction at a time."""
        try:
            while True:
                await self._wake.wait()
                window = self.settings.commit_window_ms / 1000
                if window and self._pending_records < self.settings.commit_max_records:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full(), timeout=window)
                await self._commit_pending()
        finally:
            await self.flush()

    async def _full(self) -> None:
        while self._pending_records < self.settings.commit_max_records:
            self._wake.clear()
            await self._wake.wait()

    async def _commit_pending(self) -> None:
        self._wake.clear()
        batch, self._pending, self._pending_records = self._pending, [], 0
        if not batch:
            return
        work = asyncio.ensure_future(
            self.call(
                self.store.append_many,
                [(p.kind, p.records) for p in batch],
                [p.write_behind for p in batch],
            )
        )
        try:
            try:
                results = await asyncio.shield(work)
            except asyncio.CancelledError:
                # The transaction runs to its end on the store's thread either
                # way; its producers must still hear how it went.
                results = await work
                self._resolve(batch, results)
                raise
        except Exception as e:
            log.error("queue commit of %d batches failed: %s", len(batch), e)
            err = StoreError(f"queue {self.store.path}: commit failed: {e}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        self._resolve(batch, results)

    def _resolve(self, batch: list[_Pending], results: list[Appended | Exception]) -> None:
        for p, r in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(r, Exception):
                p.future.set_exception(r)
            else:
                p.future.set_result(r)
        for cb in self.on_commit:
            cb()

    async def flush(self) -> None:
        """Commit whatever is pending (used at shutdown)."""
        while self._pending:
            await self._commit_pending()

    async def close(self, *, close_store: bool = True) -> None:
        """Commit what is pending and stop the SQLite thread; the store too unless told not to
        (a caller that reads its stats after)."""
        self._closed = True
        await self.flush()
        if close_store:
            await self.call(self.store.close)
        self._executor.shutdown(wait=True)


def _log_write_behind_failure(fut: asyncio.Future[Appended]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("write-behind enqueue failed: %s", fut.exception())
