"""Tests of the async queue (edge_agent/store/queue.py): concurrent producers share commits and
each gets its own range; write-behind returns before the commit, and a write-behind batch the
store refuses is still counted.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from edge_agent.store import Appended, AsyncQueue, NewRecord, Store
from tests.edge_agent.test_store_kit import BIG, K4, MIN_BUDGET, feats, ok, recs, rows, seqs, settings

# -- group commit -----------------------------------------------------------------------------


def test_group_commit_shares_transactions_and_gives_each_caller_its_own_range(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[Appended | None], int, list[tuple[int, float, bytes]]]:
        q = AsyncQueue(Store(settings(tmp_path, commit_window_ms=20)))
        runner = asyncio.create_task(q.run())
        try:
            # caller i sends i % 3 + 1 records whose features all equal i
            results = await asyncio.gather(
                *[q.enqueue(K4, [NewRecord(feats(i), 0.5)] * (i % 3 + 1)) for i in range(50)]
            )
            commits = q.store.commits
            content = rows(q.store)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await q.close()
        return results, commits, content

    results, commits, content = asyncio.run(scenario())
    assert 1 <= commits <= 5, f"{commits} commits for 50 concurrent enqueues"
    by_seq = {seq: f for seq, _, f in content}
    spans = []
    for i, r in enumerate(results):
        assert isinstance(r, Appended)
        assert r.last_seq - r.first_seq + 1 == i % 3 + 1
        spans.append((r.first_seq, r.last_seq))
        for seq in range(r.first_seq, r.last_seq + 1):
            assert by_seq[seq] == feats(i), f"caller {i} got seq {seq} holding someone else's record"
    spans.sort()
    for (_, last), (first, _) in itertools.pairwise(spans):
        assert first > last
    assert len(by_seq) == sum(i % 3 + 1 for i in range(50))


def test_write_behind_returns_at_once_and_commits_on_flush(tmp_path: Path) -> None:
    async def scenario() -> None:
        q = AsyncQueue(Store(settings(tmp_path, commit_window_ms=1000)))
        try:
            assert await q.enqueue(K4, recs(4), durable=False) is None
            assert await q.enqueue(K4, recs(2, start=4), durable=False) is None
            assert q.store.commits == 0 and seqs(q.store) == []
            await q.flush()
            assert q.store.commits == 1
            assert [f for _, _, f in rows(q.store)] == [feats(i) for i in range(6)]
        finally:
            await q.close()

    asyncio.run(scenario())


def test_write_behind_refused_by_block_policy_is_counted(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, dict[str, int]]:
        q = AsyncQueue(Store(settings(tmp_path, budget_bytes=MIN_BUDGET, policy="block", block_timeout_s=0)))
        runner = asyncio.create_task(q.run())
        try:
            ok(await asyncio.wait_for(q.enqueue(BIG, recs(15, kind=BIG)), 10))
            assert await q.enqueue(BIG, recs(5, kind=BIG), durable=False) is None
            await q.flush()
            st = q.store.stats()
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await q.close()
        return st.records, st.evictions

    records, evictions = asyncio.run(scenario())
    assert records + sum(evictions.values()) == 20
