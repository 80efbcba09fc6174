"""Tests of the writer (edge_agent/store/writer.py): each batch of a group commit gets its own
consecutive seqs, across calls and reopens; a bad batch, or one with a record no frame can
carry, is refused alone and consumes no sequence numbers.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from edge_agent.errors import RecordTooLarge, StoreError
from edge_agent.store import NewRecord
from tests.edge_agent.test_store_kit import BIG, K4, K4B, feats, ok, opened, recs, rows, seqs, settings


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


def test_a_record_no_frame_can_carry_is_refused_whole(tmp_path: Path) -> None:
    with opened(settings(tmp_path), frame_max_bytes=4096) as s:
        (refused,) = s.append_many([(BIG, recs(2, kind=BIG))])
        assert isinstance(refused, RecordTooLarge) and "4096" in str(refused)
        small = ok(s.append_many([(K4, recs(2))])[0])
        assert seqs(s) == [small.first_seq, small.last_seq]


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
