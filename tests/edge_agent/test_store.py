"""Tests for edge_agent.store: the device's durable queue (``Store``) and its group committer.

The promises under test: sequence numbers are never reused (not even after the queue file is
lost), nothing leaves the queue uncounted, the byte budget holds on disk too, frames survive a
restart unchanged, and a corrupt file is kept aside, never deleted.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import random
import sqlite3
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_agent.store as store_mod
from edge_agent.config import StoreSettings
from edge_agent.errors import QueueFull, RecordTooLarge, StoreError
from edge_agent.store import Appended, AsyncQueue, NewRecord, RecordKind, Store
from edge_tier.wire import RECORD_WIRE_OVERHEAD, Dtype

K4 = RecordKind("vib", Dtype.FLOAT32, 4)
K4B = RecordKind("cam", Dtype.FLOAT32, 4)
BIG = RecordKind("vib", Dtype.FLOAT32, 1024)  # 4096 feature bytes + 64 overhead = 4160 per record
BIG_NBYTES = 1024 * 4 + store_mod.ROW_OVERHEAD
MIN_BUDGET = 64 * 1024  # 15 BIG records fit (62400 bytes), 16 do not


def settings(tmp_path: Path, name: str = "q.db", **kw: Any) -> StoreSettings:
    kw.setdefault("synchronous", "NORMAL")
    return StoreSettings(path=tmp_path / name, **kw)


def feats(value: float, kind: RecordKind = K4) -> bytes:
    return np.full(kind.dim, value, dtype=kind.dtype.np_dtype).tobytes()


def recs(n: int, start: int = 0, kind: RecordKind = K4, scores: list[float] | None = None) -> list[NewRecord]:
    return [NewRecord(feats(start + i, kind), scores[i] if scores is not None else 0.5) for i in range(n)]


def ok(result: Appended | Exception) -> Appended:
    assert isinstance(result, Appended), f"batch refused: {result!r}"
    return result


@contextmanager
def opened(s: StoreSettings, **kw: Any) -> Iterator[Store]:
    store = Store(s, **kw)
    try:
        yield store
    finally:
        store.close()


def rows(store: Store) -> list[tuple[int, float, bytes]]:
    return [(seq, score, feats) for seq, _, _, score, feats, _ in store.records()]


def seqs(store: Store) -> list[int]:
    return [r[0] for r in rows(store)]


def fake_time(**overrides: Any) -> types.ModuleType:
    """A stand-in for the ``time`` module as edge_agent.store sees it, with some functions replaced."""
    fake = types.ModuleType("time")
    fake.__dict__.update({k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    fake.__dict__.update(overrides)
    return fake


def bookkeeping(store: Store, enqueued: int) -> None:
    """Every record ever enqueued is in the queue, delivered, or counted as lost."""
    st = store.stats()
    assert enqueued == st.records + st.delivered + sum(st.evictions.values()), st
    assert store.bytes_used == st.bytes
    assert set(st.evictions) == set(st.evicted_bytes)


# -- sequence numbers -------------------------------------------------------------------------


def test_fresh_queue_starts_at_current_time_in_microseconds(tmp_path: Path) -> None:
    before = time.time_ns() // 1000
    with opened(settings(tmp_path)) as s:
        first = ok(s.append_many([(K4, recs(3))])[0])
    after = time.time_ns() // 1000
    assert before < first.first_seq <= after + 1
    assert first.last_seq == first.first_seq + 2


def test_seqs_strictly_increase_across_calls_batches_and_reopen(tmp_path: Path) -> None:
    st = settings(tmp_path)
    ranges: list[tuple[int, int]] = []
    with opened(st) as s:
        for n in (1, 4, 2):
            a = ok(s.append_many([(K4, recs(n))])[0])
            assert a.last_seq - a.first_seq + 1 == n
            ranges.append((a.first_seq, a.last_seq))
        # several producers' batches in one call: each gets its own consecutive range
        res = [ok(r) for r in s.append_many([(K4, recs(3)), (K4B, recs(2)), (K4, recs(1))])]
        ranges += [(r.first_seq, r.last_seq) for r in res]
        handed_out = seqs(s)
    with opened(st) as s:
        a = ok(s.append_many([(K4, recs(2))])[0])
        ranges.append((a.first_seq, a.last_seq))
    for (_, last), (first, _) in itertools.pairwise(ranges):
        assert first == last + 1, ranges
    assert handed_out == list(range(ranges[0][0], ranges[-2][1] + 1))


def test_seqs_never_reused_after_records_are_deleted_and_reopened(tmp_path: Path) -> None:
    st = settings(tmp_path)
    with opened(st) as s:
        a = ok(s.append_many([(K4, recs(10))])[0])
        f = s.next_frame(100, 1 << 20)
        assert f is not None and (f.first_seq, f.last_seq) == (a.first_seq, a.last_seq)
        assert s.finish_frame(f.first_seq, f.last_seq) == 10
        assert seqs(s) == []
    with opened(st) as s:
        b = ok(s.append_many([(K4, recs(1))])[0])
    assert b.first_seq > a.last_seq


def test_zero_byte_queue_file_still_numbers_above_the_floor(tmp_path: Path) -> None:
    st = settings(tmp_path)
    with opened(st) as s:
        old = ok(s.append_many([(K4, recs(5))])[0])
    st.path.unlink()
    st.path.write_bytes(b"")  # what a kill between sqlite3.connect() and the schema leaves behind
    with opened(st) as s:
        new = ok(s.append_many([(K4, recs(1))])[0])
    assert new.first_seq > old.last_seq


def test_seqfloor_keeps_seqs_above_a_corrupt_queue_when_the_clock_is_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = settings(tmp_path)
    with opened(st) as s:
        for _ in range(5):
            last = ok(s.append_many([(K4, recs(7))])[0]).last_seq
    floor_file = tmp_path / "q.db.seqfloor"
    assert int(floor_file.read_text()) > last
    st.path.write_bytes(os.urandom(16384))
    # A device without an RTC boots in 1970: the clock no longer keeps numbers unique.
    monkeypatch.setattr(store_mod, "time", fake_time(time_ns=lambda: 5_000_000_000))
    with opened(st) as s:
        assert s.corrupt_reset
        new = ok(s.append_many([(K4, recs(3))])[0])
        assert s.stats().corrupt_resets == 1
    assert new.first_seq > last
    # the control: without the side file the clock alone would have reused numbers
    assert last > 5_000_000_000 // 1000


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


# -- budget and eviction policies -------------------------------------------------------------


def test_lowest_score_policy_evicts_lowest_scores_first(tmp_path: Path) -> None:
    rng = random.Random(7)
    scores = [round(rng.random(), 6) for _ in range(15)]
    with opened(settings(tmp_path, budget_bytes=MIN_BUDGET, policy="lowest_score")) as s:
        ok(s.append_many([(BIG, recs(15, kind=BIG, scores=scores))])[0])
        assert s.stats().evictions == {}
        a = ok(s.append_many([(BIG, recs(5, start=100, kind=BIG, scores=[2.0] * 5))])[0])
        assert a.evicted == 5
        assert s.bytes_used <= MIN_BUDGET
        kept = sorted(r[1] for r in rows(s) if r[1] < 2.0)
        assert kept == pytest.approx(sorted(scores)[5:])
        st = s.stats()
        assert st.evictions == {"lowest_score": 5}
        assert st.evicted_bytes == {"lowest_score": 5 * BIG_NBYTES}
        bookkeeping(s, 20)


def test_lowest_score_policy_breaks_ties_by_age(tmp_path: Path) -> None:
    with opened(settings(tmp_path, budget_bytes=MIN_BUDGET, policy="lowest_score")) as s:
        first = ok(s.append_many([(BIG, recs(15, kind=BIG))])[0])
        ok(s.append_many([(BIG, recs(3, start=15, kind=BIG))])[0])
        remaining = seqs(s)
        assert remaining[0] == first.first_seq + 3
        assert len(remaining) == 15


def test_oldest_policy_evicts_oldest_regardless_of_score(tmp_path: Path) -> None:
    with opened(settings(tmp_path, budget_bytes=MIN_BUDGET, policy="oldest")) as s:
        a = ok(s.append_many([(BIG, recs(15, kind=BIG, scores=[9.0] * 15))])[0])
        b = ok(s.append_many([(BIG, recs(4, start=15, kind=BIG, scores=[0.0] * 4))])[0])
        assert b.evicted == 4
        assert seqs(s) == list(range(a.first_seq + 4, b.last_seq + 1))
        assert s.stats().evictions == {"oldest": 4}
        assert s.bytes_used <= MIN_BUDGET
        bookkeeping(s, 19)


def test_block_policy_refuses_and_keeps_what_it_had(tmp_path: Path) -> None:
    with opened(settings(tmp_path, budget_bytes=MIN_BUDGET, policy="block")) as s:
        a = ok(s.append_many([(BIG, recs(10, kind=BIG))])[0])
        before = rows(s)
        fits, refused = s.append_many([(BIG, recs(5, start=10, kind=BIG)), (BIG, recs(1, kind=BIG))])
        fits = ok(fits)
        assert isinstance(refused, QueueFull)
        assert "block" in str(refused) and str(s.path) in str(refused)
        assert fits.first_seq == a.last_seq + 1
        after = rows(s)
        assert after[:10] == before and len(after) == 15
        assert s.stats().evictions == {}
        assert s.bytes_used == 15 * BIG_NBYTES <= MIN_BUDGET
        # a refused batch consumes no sequence numbers; a small record still fits, a big one not
        assert ok(s.append_many([(K4, recs(1))])[0]).first_seq == fits.last_seq + 1
        assert isinstance(s.append_many([(BIG, recs(1, kind=BIG))])[0], QueueFull)
        assert len(rows(s)) == 16


@pytest.mark.parametrize("policy", ["lowest_score", "oldest"])
def test_budget_holds_after_every_append_and_everything_is_counted(tmp_path: Path, policy: str) -> None:
    rng = random.Random(policy)
    enqueued = 0
    with opened(settings(tmp_path, budget_bytes=MIN_BUDGET, policy=policy)) as s:
        for step in range(60):
            n = rng.randint(1, 6)
            ok(
                s.append_many(
                    [(BIG, recs(n, start=enqueued, kind=BIG, scores=[rng.random() for _ in range(n)]))]
                )[0]
            )
            enqueued += n
            assert s.bytes_used <= MIN_BUDGET
            if step % 7 == 3:
                f = s.next_frame(4, 1 << 20)
                assert f is not None
                s.finish_frame(f.first_seq, f.last_seq, loss_reason="rejected" if step % 14 == 3 else None)
            bookkeeping(s, enqueued)
        st = s.stats()
        assert st.delivered > 0 and st.evictions.get("rejected", 0) > 0 and st.evictions[policy] > 0
        assert st.evicted_bytes[policy] == st.evictions[policy] * BIG_NBYTES


# The frame tests below use one record per chunk, so frames can be cut at any record; chunks of
# many records are covered by the eviction tests and the system tests.


def test_records_in_a_frame_are_never_evicted(tmp_path: Path) -> None:
    with opened(settings(tmp_path, budget_bytes=MIN_BUDGET, policy="lowest_score"), frame_max_records=1) as s:
        ok(s.append_many([(BIG, recs(5, kind=BIG, scores=[0.0] * 5))])[0])
        frame = s.next_frame(5, 1 << 20)
        assert frame is not None and len(frame.seqs) == 5
        for i in range(10):  # 50 more records, all with higher scores than the framed ones
            ok(s.append_many([(BIG, recs(5, start=10 * i, kind=BIG, scores=[1.0] * 5))])[0])
            assert s.bytes_used <= MIN_BUDGET
        assert set(frame.seqs) <= set(seqs(s))
        [still] = s.open_frames()
        assert still.seqs == frame.seqs and still.features == frame.features
        bookkeeping(s, 55)


def test_disk_use_stays_bounded_under_20x_budget(tmp_path: Path) -> None:
    budget = 1 << 20
    kind = RecordKind("vib", Dtype.FLOAT32, 256)
    per_record = 256 * 4 + store_mod.ROW_OVERHEAD
    rng = random.Random(1)
    total = 20 * budget // per_record
    written = 0
    peaks = [0, 0]  # peak db + wal size while writing the first and the second 10 x budget
    db_peak = 0
    st = settings(tmp_path, budget_bytes=budget, policy="lowest_score")
    with opened(st) as s:
        while written < total:
            batch = [NewRecord(rng.randbytes(1024), rng.random()) for _ in range(100)]
            ok(s.append_many([(kind, batch)])[0])
            written += len(batch)
            assert s.bytes_used <= budget
            db = os.path.getsize(st.path)
            wal = Path(f"{st.path}-wal")
            on_disk = db + (wal.stat().st_size if wal.exists() else 0)
            half = 0 if written < total // 2 else 1
            peaks[half] = max(peaks[half], on_disk)
            db_peak = max(db_peak, db)
        assert s.stats().evictions["lowest_score"] == written - s.stats().records
    peak = max(peaks)
    ratio = peak / budget
    print(
        f"\npeak on-disk size {peak} bytes = {ratio:.2f} x budget (db file alone {db_peak / budget:.2f} x) "
        f"after writing {written * per_record / budget:.1f} x budget"
    )
    # The file: the budget, plus free pages and one 64 KiB page per table and index;
    # the WAL: at most the checkpoint threshold plus one commit.
    slack = 16 * 65536
    assert db_peak <= 2 * budget + slack, f"db file {db_peak / budget:.2f} x budget"
    assert peak <= 2 * budget + slack + s.wal_limit_bytes + 2 * (1 << 20), f"{ratio:.2f} x budget on disk"
    assert peaks[1] <= peaks[0] * 1.05, f"disk use keeps growing: {peaks}"


# -- frames -----------------------------------------------------------------------------------


def test_next_frame_takes_seq_order_one_kind_and_respects_limits(tmp_path: Path) -> None:
    with opened(settings(tmp_path), frame_max_records=1) as s:
        a1 = ok(s.append_many([(K4, recs(10))])[0])
        b = ok(s.append_many([(K4B, recs(3, start=10))])[0])
        a2 = ok(s.append_many([(K4, recs(5, start=13))])[0])
        # frame bytes on the wire: the header, then each record's features, seq, time and score
        per = 16 + RECORD_WIRE_OVERHEAD
        frames = []
        limits = [
            (4, 1 << 20),
            (100, K4.frame_overhead + 2 * per + per // 2),
            (100, 1),
            (100, 1 << 20),
            (100, 1 << 20),
            (100, 1 << 20),
        ]
        for max_records, max_bytes in limits:
            f = s.next_frame(max_records, max_bytes)
            assert f is not None
            frames.append(f)
        assert [f.seqs for f in frames] == [
            list(range(a1.first_seq, a1.first_seq + 4)),
            list(range(a1.first_seq + 4, a1.first_seq + 6)),  # byte limit: 2 records
            [a1.first_seq + 6],  # a limit below one record still takes one
            list(range(a1.first_seq + 7, a1.last_seq + 1)),  # stops where the kind changes
            list(range(b.first_seq, b.last_seq + 1)),
            list(range(a2.first_seq, a2.last_seq + 1)),
        ]
        assert [f.kind for f in frames] == [K4, K4, K4, K4, K4B, K4]
        assert frames[0].prev_seq == 0
        for prev, f in itertools.pairwise(frames):
            assert f.prev_seq == prev.last_seq
            assert (f.first_seq, f.last_seq) == (f.seqs[0], f.seqs[-1])
        charged = 16 + store_mod.ROW_OVERHEAD
        assert all(f.nbytes == charged * len(f.seqs) for f in frames)
        assert s.next_frame(100, 1 << 20) is None
        assert not s.has_unframed
        assert frames[3].features == [feats(i) for i in range(7, 10)]


def test_frames_persist_across_reopen(tmp_path: Path) -> None:
    st = settings(tmp_path)
    with opened(st, frame_max_records=1) as s:
        batch = [NewRecord(feats(i), i / 10, {"site": f"s{i}"} if i % 2 else None) for i in range(9)]
        ok(s.append_many([(K4, batch)])[0])
        made = [s.next_frame(4, 1 << 20) for _ in range(2)]
        assert s.stats().frames_in_flight == 2
    with opened(st, frame_max_records=1) as s:
        again = s.open_frames()
        assert [(f.first_seq, f.last_seq, f.prev_seq) for f in again] == [
            (f.first_seq, f.last_seq, f.prev_seq)
            for f in made  # type: ignore[union-attr]
        ]
        for old, new in zip(made, again, strict=True):
            assert old is not None
            assert (new.seqs, new.scores, new.features, new.meta, new.kind, new.times_ms) == (
                old.seqs,
                old.scores,
                old.features,
                old.meta,
                old.kind,
                old.times_ms,
            )
        assert again[0].meta == [{}, {"site": "s1"}, {}, {"site": "s3"}]
        nxt = s.next_frame(100, 1 << 20)
        assert nxt is not None and nxt.prev_seq == made[1].last_seq  # type: ignore[union-attr]
        assert len(nxt.seqs) == 1


def test_finish_frame_deletes_exactly_its_range_and_counts(tmp_path: Path) -> None:
    with opened(settings(tmp_path), frame_max_records=1) as s:
        ok(s.append_many([(K4, recs(12))])[0])
        f1, f2, f3 = (s.next_frame(4, 1 << 20) for _ in range(3))
        assert f1 and f2 and f3
        per = 16 + store_mod.ROW_OVERHEAD
        assert s.finish_frame(f2.first_seq, f2.last_seq) == 4
        assert seqs(s) == f1.seqs + f3.seqs
        st = s.stats()
        assert (st.delivered, st.evictions, st.frames_in_flight, st.records) == (4, {}, 2, 8)
        assert st.last_receipt_ms is not None and abs(st.last_receipt_ms - time.time() * 1000) < 60_000
        assert s.bytes_used == st.bytes == 8 * per
        assert s.finish_frame(f1.first_seq, f1.last_seq, loss_reason="rejected") == 4
        st = s.stats()
        assert st.delivered == 4
        assert st.evictions == {"rejected": 4} and st.evicted_bytes == {"rejected": 4 * per}
        assert seqs(s) == f3.seqs
        assert [f.first_seq for f in s.open_frames()] == [f3.first_seq]
        bookkeeping(s, 12)


def test_set_frame_prev_persists(tmp_path: Path) -> None:
    st = settings(tmp_path)
    with opened(st, frame_max_records=1) as s:
        ok(s.append_many([(K4, recs(6))])[0])
        s.next_frame(3, 1 << 20)
        f2 = s.next_frame(3, 1 << 20)
        assert f2 is not None
        s.set_frame_prev(f2.first_seq, 12345)
    with opened(st, frame_max_records=1) as s:
        assert [f.prev_seq for f in s.open_frames()] == [0, 12345]


# -- integrity --------------------------------------------------------------------------------


def _garbage_file(path: Path) -> None:
    path.write_bytes(random.Random(3).randbytes(20000))


def _overwrite_pages(path: Path) -> None:
    with opened(StoreSettings(path=path, synchronous="NORMAL")) as s:
        for i in range(20):
            ok(s.append_many([(BIG, recs(20, start=20 * i, kind=BIG))])[0])
    assert not Path(f"{path}-wal").exists()
    page = int.from_bytes(path.read_bytes()[16:18], "big")  # the header's page size (1 means 65536)
    page = 65536 if page == 1 else page
    with open(path, "r+b") as f:
        f.seek(page)  # page 1 (the header and schema) stays, the b-tree pages after it do not
        f.write(random.Random(4).randbytes(6 * page))


@pytest.mark.parametrize("damage", [_garbage_file, _overwrite_pages], ids=["garbage", "pages"])
def test_corrupt_queue_is_moved_aside_and_a_fresh_one_opens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any
) -> None:
    st = settings(tmp_path)
    damage(st.path)
    original = st.path.read_bytes()
    with caplog.at_level(logging.ERROR, logger="edge_agent.store"), opened(st) as s:
        assert s.corrupt_reset
        assert seqs(s) == []
        assert s.stats().corrupt_resets == 1
        ok(s.append_many([(K4, recs(2))])[0])
    aside = [
        p
        for p in tmp_path.iterdir()
        if p.name.startswith("q.db.corrupt-") and not p.name.endswith(("-wal", "-shm", ".kinds"))
    ]
    assert len(aside) == 1
    assert aside[0].read_bytes() == original
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(str(st.path) in r.getMessage() for r in errors), [r.getMessage() for r in errors]
    with opened(st) as s:  # the fresh queue is healthy: no second reset
        assert not s.corrupt_reset
        assert s.stats().corrupt_resets == 1 and len(seqs(s)) == 2


def test_two_resets_in_one_second_keep_both_corrupt_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = time.gmtime(1_700_000_000)
    monkeypatch.setattr(store_mod, "time", fake_time(gmtime=lambda *a: frozen))
    st = settings(tmp_path)
    first, second = b"first garbage " * 1000, b"second garbage " * 1000
    st.path.write_bytes(first)
    Store(st).close()
    st.path.write_bytes(second)
    Store(st).close()
    kept = {p.read_bytes() for p in tmp_path.iterdir() if ".corrupt-" in p.name}
    assert {first, second} <= kept


def test_locked_queue_is_not_treated_as_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = settings(tmp_path)
    with opened(st) as s:
        ok(s.append_many([(K4, recs(5))])[0])
    holder = sqlite3.connect(st.path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO meta(key, value) VALUES ('x', 1)")
        # keep the test fast: the store's connections give up on a lock after 0.1 s, not 5 s
        fast = types.ModuleType("sqlite3")
        fast.__dict__.update(vars(sqlite3))
        fast.connect = functools.partial(sqlite3.connect, timeout=0.1)  # type: ignore[attr-defined]
        monkeypatch.setattr(store_mod, "sqlite3", fast)
        # refusing to start, saying why, is right; moving the queue aside is not
        with pytest.raises(StoreError, match="cannot open the queue: database is locked"):
            Store(st).close()
    finally:
        holder.close()
    assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    with opened(st) as s:
        assert len(seqs(s)) == 5


def _encoded(frame: Any) -> int:
    """What the frame is on the wire, with the longest tenant and device ids."""
    from edge_tier.wire import encode_frame

    return len(encode_frame(frame.to_frame("t" * 64, "d" * 64, 1)))


def test_a_frame_cut_again_keeps_its_records_and_chain_ends_in_frames_that_fit(tmp_path: Path) -> None:
    """The cloud said TOO_LARGE: the same records, smaller frames, chained from the old prev to
    the old last seq, so frames in flight after it still follow."""
    with opened(settings(tmp_path), frame_max_bytes=1 << 20) as s:
        metas = [{"site": f"plant-{i}"} if i % 3 else {} for i in range(60)]
        a = ok(s.append_many([(BIG, [NewRecord(feats(i, BIG), 0.5, m) for i, m in enumerate(metas)])])[0])
        big, after = s.next_frames(2, 50, 1 << 20)
        assert (big.n, after.prev_seq) == (50, big.last_seq)
        limit = 5 * BIG.record_bytes + BIG.frame_overhead + 400
        parts = s.recut_frame(big.first_seq, 50, limit)
        assert len(parts) >= 10
        assert parts[0].prev_seq == big.prev_seq and parts[-1].last_seq == big.last_seq
        for prev, f in itertools.pairwise(parts):
            assert f.prev_seq == prev.last_seq
        assert [q for f in parts for q in f.seqs] == big.seqs
        assert [m for f in parts for m in (f.meta or [{}] * f.n)] == metas[:50]
        assert all(_encoded(f) <= limit for f in parts)
        # durable: the frames in flight after a restart are the new ones, then the one after
        assert [f.first_seq for f in s.open_frames()] == [*(f.first_seq for f in parts), after.first_seq]
        assert s.recut_frame(big.first_seq + 1, 50, limit) == []  # no such frame
        bookkeeping(s, 60)
        assert s.stats().bytes == 60 * BIG_NBYTES + sum(
            len(json.dumps(m, separators=(",", ":"))) for m in metas if m
        )
        assert a.last_seq == after.last_seq


def test_chunks_written_for_a_larger_limit_are_split_when_framed(tmp_path: Path) -> None:
    with opened(settings(tmp_path), frame_max_bytes=1 << 20) as s:
        ok(s.append_many([(BIG, recs(100, kind=BIG))])[0])
        limit = 3 * (BIG.record_bytes + 23) + BIG.frame_overhead
        frames = s.next_frames(100, 4096, limit)
        assert [f.n for f in frames] == [3] * 33 + [1]
        assert all(_encoded(f) <= limit for f in frames)
        assert [q for f in frames for q in f.seqs] == seqs(s)


def test_a_record_no_frame_can_carry_is_refused_whole(tmp_path: Path) -> None:
    with opened(settings(tmp_path), frame_max_bytes=4096) as s:
        (refused,) = s.append_many([(BIG, recs(2, kind=BIG))])
        assert isinstance(refused, RecordTooLarge) and "4096" in str(refused)
        small = ok(s.append_many([(K4, recs(2))])[0])
        assert seqs(s) == [small.first_seq, small.last_seq]


# -- disk full --------------------------------------------------------------------------------


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


# -- read-only and bad records ----------------------------------------------------------------


def test_readonly_store_reads_stats_of_an_existing_queue(tmp_path: Path) -> None:
    st = settings(tmp_path, budget_bytes=MIN_BUDGET, policy="oldest")
    with opened(st) as s:
        ok(s.append_many([(BIG, recs(18, kind=BIG))])[0])
        with opened(st, readonly=True) as ro:  # while the writer has it open
            live = ro.stats()
    with opened(st, readonly=True) as ro:
        after = ro.stats()
        with pytest.raises(sqlite3.OperationalError):
            ro.db.execute("DELETE FROM chunks")
    for got in (live, after):
        assert (got.records, got.bytes, got.evictions) == (15, 15 * BIG_NBYTES, {"oldest": 3})


def test_readonly_store_on_a_missing_file_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no queue file"):
        Store(settings(tmp_path), readonly=True)
    assert list(tmp_path.iterdir()) == []


def test_readonly_store_on_a_damaged_file_raises_store_error(tmp_path: Path) -> None:
    st = settings(tmp_path)
    _garbage_file(st.path)
    with pytest.raises(StoreError, match=str(st.path)):
        Store(st, readonly=True).stats()


def test_readonly_store_with_a_hash_in_the_path(tmp_path: Path) -> None:
    d = tmp_path / "site#1"
    d.mkdir()
    st = settings(d)
    with opened(st) as s:
        ok(s.append_many([(K4, recs(3))])[0])
    try:
        with opened(st, readonly=True) as ro:
            assert ro.stats().records == 3
    finally:
        assert not (tmp_path / "site").exists(), "opened (and created) the wrong file"


def test_record_of_the_wrong_size_is_refused_alone(tmp_path: Path) -> None:
    with opened(settings(tmp_path)) as s:
        bad_batch = [*recs(2), NewRecord(b"\0" * 12, 0.5)]
        r1, r2, r3 = s.append_many([(K4, recs(2)), (K4B, bad_batch), (K4, recs(3, start=2))])
        assert isinstance(r2, StoreError)
        msg = str(r2)
        assert "'cam'" in msg and "16" in msg and "12" in msg and "4 x float32" in msg
        assert "record 2" in msg
        r1, r3 = ok(r1), ok(r3)
        assert r3.first_seq == r1.last_seq + 1
        assert [f for _, _, f in rows(s)] == [feats(i) for i in range(2)] + [feats(i) for i in range(2, 5)]
        assert s.stats().records == 5
        # the refused batch's kind was not registered either
        assert s.db.execute("SELECT count(*) FROM kinds WHERE stream='cam'").fetchone()[0] == 0
