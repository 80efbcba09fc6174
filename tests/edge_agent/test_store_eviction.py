"""Tests of the budget and the eviction policies (edge_agent/store/eviction.py): the byte budget
holds after every append and on disk too, each policy evicts in its order, ``block`` refuses
instead, records in a frame are never evicted, and nothing leaves the queue uncounted.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from edge_agent.errors import QueueFull
from edge_agent.store import ROW_OVERHEAD, NewRecord, RecordKind
from edge_tier.wire import Dtype
from tests.edge_agent.test_store_kit import (
    BIG,
    BIG_NBYTES,
    K4,
    MIN_BUDGET,
    bookkeeping,
    ok,
    opened,
    recs,
    rows,
    seqs,
    settings,
)

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


# The test below uses one record per chunk, so frames can be cut at any record; chunks of


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
    per_record = 256 * 4 + ROW_OVERHEAD
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
