"""Tests of the queue file (edge_agent/store/file.py): sequence numbers are never reused, not
even after the queue file is lost (the seed and the side file's floor); a corrupt file is
kept aside, never deleted, and a locked one is not taken for corrupt; a read-only store reads
a queue without touching it.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import sqlite3
import time
import types
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import StoreSettings
from edge_agent.errors import StoreError
from edge_agent.store import Store
from tests.edge_agent.test_store_kit import (
    BIG,
    BIG_NBYTES,
    K4,
    MIN_BUDGET,
    fake_time,
    ok,
    opened,
    patch_store,
    recs,
    seqs,
    settings,
)

# -- sequence numbers -------------------------------------------------------------------------


def test_fresh_queue_starts_at_current_time_in_microseconds(tmp_path: Path) -> None:
    before = time.time_ns() // 1000
    with opened(settings(tmp_path)) as s:
        first = ok(s.append_many([(K4, recs(3))])[0])
    after = time.time_ns() // 1000
    assert before < first.first_seq <= after + 1
    assert first.last_seq == first.first_seq + 2


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
    patch_store(monkeypatch, "time", fake_time(time_ns=lambda: 5_000_000_000))
    with opened(st) as s:
        assert s.corrupt_reset
        new = ok(s.append_many([(K4, recs(3))])[0])
        assert s.stats().corrupt_resets == 1
    assert new.first_seq > last
    # the control: without the side file the clock alone would have reused numbers
    assert last > 5_000_000_000 // 1000


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
    patch_store(monkeypatch, "time", fake_time(gmtime=lambda *a: frozen))
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
        patch_store(monkeypatch, "sqlite3", fast)
        # refusing to start, saying why, is right; moving the queue aside is not
        with pytest.raises(StoreError, match="cannot open the queue: database is locked"):
            Store(st).close()
    finally:
        holder.close()
    assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    with opened(st) as s:
        assert len(seqs(s)) == 5


# -- read-only --------------------------------------------------------------------------------


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
