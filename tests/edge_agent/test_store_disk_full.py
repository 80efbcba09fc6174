"""Tests of a full disk (edge_agent/store/room.py, and the writer's retries): past the
filesystem's ceiling records are evicted by policy and counted as ``disk_full``, what is left
is intact, and a batch that can never fit is refused alone, each producer told so.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

from edge_agent.errors import StoreError
from edge_agent.store import Appended, AsyncQueue, NewRecord, RecordKind, Store
from edge_tier.wire import Dtype
from tests.edge_agent.test_store_kit import bookkeeping, ok, opened, recs, rows, seqs, settings

# The real small filesystems are in tests/system/test_disk_full.py.


def _fill_to_page_limit(s: Store, extra_pages: int) -> int:
    """A filesystem with room for about ``extra_pages`` 4 KiB pages more (whatever the page
    size): the store's ceiling, as a small disk would set it (the real small filesystems are
    in tests/system/test_disk_full.py)."""
    pages = s.db.execute("PRAGMA page_count").fetchone()[0]
    page_size = s.db.execute("PRAGMA page_size").fetchone()[0]
    limit = pages + max(1, extra_pages * 4096 // page_size)
    s.disk.capacity_bytes = lambda view=None: limit * page_size  # type: ignore[method-assign]
    return limit


def test_disk_full_evicts_by_policy_counts_and_keeps_the_rest_intact(tmp_path: Path) -> None:
    kind = RecordKind("vib", Dtype.FLOAT32, 256)
    written: dict[int, bytes] = {}
    rng = random.Random(5)

    def append(s: Store, n: int) -> Appended:
        batch = [NewRecord(rng.randbytes(1024), 0.5) for _ in range(n)]
        a = ok(s.append_many([(kind, batch)])[0])
        written.update(zip(range(a.first_seq, a.last_seq + 1), (r.features for r in batch), strict=True))
        return a

    with opened(settings(tmp_path, budget_bytes=64 << 20, policy="oldest")) as s:
        for _ in range(5):
            append(s, 60)
        frame = s.next_frame(10, 1 << 20)  # the oldest records, but in flight: not evictable
        assert frame is not None
        limit = _fill_to_page_limit(s, 300)
        for _ in range(60):
            append(s, 20)  # must never raise: each batch fits once room is made
            assert s.db.execute("PRAGMA page_count").fetchone()[0] <= limit
        st = s.stats()
        assert st.evictions.get("disk_full", 0) > 0, "the page limit was never reached"
        assert set(st.evictions) == {"disk_full"}
        bookkeeping(s, len(written))
        left = rows(s)
        assert {seq: f for seq, _, f in left} == {seq: written[seq] for seq, _, _ in left}
        assert set(frame.seqs) <= {seq for seq, _, _ in left}
        unframed = [seq for seq, _, _ in left if seq > frame.last_seq]
        assert unframed == sorted(w for w in written if w >= unframed[0])  # policy 'oldest'
        assert unframed[-1] == max(written)


def test_disk_full_batch_that_can_never_fit_raises_and_loses_nothing_silently(tmp_path: Path) -> None:
    kind = RecordKind("vib", Dtype.FLOAT32, 256)
    with opened(settings(tmp_path, budget_bytes=64 << 20, policy="oldest")) as s:
        a = ok(s.append_many([(kind, recs(100, kind=kind))])[0])
        _fill_to_page_limit(s, 40)
        (refused,) = s.append_many([(kind, recs(1000, kind=kind))])
        assert isinstance(refused, StoreError) and "disk full" in str(refused)
        bookkeeping(s, 100)
        assert all(seq <= a.last_seq for seq in seqs(s))
        b = ok(s.append_many([(kind, recs(5, kind=kind))])[0])
        assert b.first_seq == a.last_seq + 1  # the failed batch consumed no numbers
        bookkeeping(s, 105)


def test_disk_full_fails_only_the_batch_that_cannot_fit(tmp_path: Path) -> None:
    kind = RecordKind("vib", Dtype.FLOAT32, 256)
    with opened(settings(tmp_path, budget_bytes=64 << 20, policy="oldest")) as s:
        ok(s.append_many([(kind, recs(300, kind=kind))])[0])
        _fill_to_page_limit(s, 40)
        small, huge = s.append_many([(kind, recs(5, kind=kind)), (kind, recs(2000, kind=kind))])
        assert isinstance(ok(small), Appended)
        assert isinstance(huge, Exception)


def test_async_queue_tells_every_producer_its_batch_did_not_fit(tmp_path: Path) -> None:
    kind = RecordKind("vib", Dtype.FLOAT32, 256)

    async def scenario() -> list[Any]:
        q = AsyncQueue(Store(settings(tmp_path, budget_bytes=64 << 20, commit_window_ms=50)))
        runner = asyncio.create_task(q.run())
        try:
            await q.call(_fill_to_page_limit, q.store, 10)
            return await asyncio.gather(
                q.enqueue(kind, recs(500, kind=kind)),
                q.enqueue(kind, recs(500, kind=kind)),
                return_exceptions=True,
            )
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await q.close()

    results = asyncio.run(scenario())
    assert all(isinstance(r, StoreError) and "disk full" in str(r) for r in results), results
