"""Tests of frames and receipts (edge_agent/store/frames.py): frames take seq order, one kind and
their limits; they survive a restart unchanged; a receipt removes exactly its frame's records
and counts them; a frame cut again keeps its records and chain ends, and old chunks are split
to fit smaller frames.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

from edge_agent.store import ROW_OVERHEAD, NewRecord
from edge_tier.wire import RECORD_WIRE_OVERHEAD
from tests.edge_agent.test_store_kit import (
    BIG,
    BIG_NBYTES,
    K4,
    K4B,
    bookkeeping,
    feats,
    ok,
    opened,
    recs,
    seqs,
    settings,
)

# The frame tests below use one record per chunk, so frames can be cut at any record; chunks of
# many records are covered by the eviction tests and the system tests.


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
        charged = 16 + ROW_OVERHEAD
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
        per = 16 + ROW_OVERHEAD
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


# -- frames cut again --------------------------------------------------------------------------


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
