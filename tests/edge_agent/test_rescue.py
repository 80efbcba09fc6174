"""Tests for edge_agent.rescue: a set-aside queue file read back, whatever its damage.

The promises: what is read back is what was queued (seq, time, score, features, metadata),
each record at most once; what cannot be read is counted, never made up; the original file
is not touched; rescuing the same file again adds nothing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import StoreSettings
from edge_agent.rescue import pending, report_path, rescue_file
from edge_agent.sqlite_pages import table_rows
from edge_agent.store import RecordBatch, RecordKind, Store, kinds_path
from edge_tier.wire import Dtype

KIND = RecordKind("vibration", Dtype.FLOAT32, 32, "pf", "1")
BATCHES, PER = 400, 20  # one chunk row per batch: about 1.3 MB, 20 pages of 64 KiB
PAGE = 65536

Record = tuple[int, float, bytes, Any]  # time, score, features, meta


def _settings(path: Path) -> StoreSettings:
    return StoreSettings(path=path, synchronous="NORMAL", budget_bytes=64 << 20, reserve_bytes=0)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Record]]:
    """A queue of 8,000 records in 400 chunks, some framed, closed cleanly."""
    d = tmp_path_factory.mktemp("orig")
    store = Store(_settings(d / "queue.db"))
    rng = np.random.default_rng(7)
    for b in range(BATCHES):
        x = rng.standard_normal((PER, KIND.dim)).astype("<f4")
        meta = [{"machine": f"m{b % 7}", "i": b * PER + i} for i in range(PER)] if b % 2 else None
        store.append_many([(KIND, RecordBatch(x.tobytes(), rng.random(PER).astype("<f4"), meta))])
    store.next_frames(3, 100, 1 << 20)  # some records framed (in flight) when the damage came
    want = {seq: (t, score, feats, meta or None) for seq, t, _k, score, feats, meta in store.records()}
    store.close()
    assert len(want) == BATCHES * PER
    return d / "queue.db", want


def _damaged(src: Path, dst_dir: Path, offset: int, length: int, how: str) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / "queue.db.corrupt-20261202T000000"
    shutil.copyfile(src, dst)
    shutil.copyfile(kinds_path(src), kinds_path(dst))  # set aside with the queue, as the store does
    with open(dst, "r+b") as f:
        f.seek(offset)
        if how == "zero":
            f.write(b"\0" * length)
        else:
            f.write(np.random.default_rng(offset).integers(0, 256, length, dtype=np.uint8).tobytes())
    return dst


def _rescued(store: Store) -> dict[int, Record]:
    out: dict[int, Record] = {}
    rows = store.db.execute("SELECT key, kind, seqs, times, scores, features, meta FROM rescued").fetchall()
    for _key, _kid, s, t, sc, f, m in rows:
        seqs, times = np.frombuffer(s, "<u8"), np.frombuffer(t, "<u8")
        scores = np.frombuffer(sc, "<f4")
        metas = json.loads(m) if m else [None] * len(seqs)
        rb = KIND.record_bytes
        for i, seq in enumerate(seqs.tolist()):
            assert seq not in out, f"seq {seq} rescued twice"
            out[seq] = (int(times[i]), float(scores[i]), f[i * rb : (i + 1) * rb], metas[i] or None)
    return out


@contextmanager
def opened(path: Path) -> Iterator[Store]:
    store = Store(_settings(path))
    try:
        yield store
    finally:
        store.close()


def _pages(path: Path) -> int:
    return path.stat().st_size // PAGE


def test_damage_anywhere_loses_only_what_it_touched(original, tmp_path: Path) -> None:
    """One damaged region per file, at offsets across every page, both garbage and zeros."""
    src, want = original
    pages = _pages(src)
    assert pages >= 15
    # every page but the header's, alternately 4 KiB of garbage and half a page of zeros
    cases = [(p * PAGE + 100, 4096, "garbage") if p % 2 else (p * PAGE + PAGE // 2, PAGE // 2, "zero")
             for p in range(1, pages)]  # fmt: skip
    total_rescued = total_lost = 0
    exact = 0
    for i, (offset, length, how) in enumerate(cases):
        aside = _damaged(src, tmp_path / f"case{i}", offset, length, how)
        before = aside.read_bytes()
        with opened(tmp_path / f"case{i}" / "fresh.db") as store:
            report = rescue_file(store, aside)
            got = _rescued(store)
            st = store.stats()
        assert aside.read_bytes() == before, "the set-aside file was changed"
        assert report.records == len(got) == st.rescued_records
        assert set(got) <= set(want), "a record was made up"
        exact += sum(got[s] == want[s] for s in got)
        assert report.lost_records == st.evictions.get("corrupt", 0)
        if not report.damage_unmeasured:
            assert len(got) + report.lost_records == len(want), (offset, how, report)
        assert len(got) + report.lost_records <= len(want)
        # one damaged page costs at most a few pages' worth of records
        assert len(got) >= len(want) * (1 - 4 / pages), (offset, how, report)
        total_rescued += len(got)
        total_lost += report.lost_records
    print(
        f"{len(cases)} damaged files of {len(want)} records: rescued {total_rescued} "
        f"({100 * total_rescued / (len(cases) * len(want)):.1f}%), counted lost {total_lost}, "
        f"identical to what was queued {exact}"
    )
    assert exact == total_rescued


def test_a_file_rescued_twice_adds_nothing_and_is_not_pending(original, tmp_path: Path) -> None:
    src, _ = original
    aside = _damaged(src, tmp_path, 5 * PAGE + 100, 4096, "garbage")
    assert pending(tmp_path / "queue.db") == [aside]
    with opened(tmp_path / "queue.db") as store:
        first = rescue_file(store, aside)
        again = rescue_file(store, aside)
        got = _rescued(store)
        st = store.stats()
    assert first.records == again.records == len(got) > 0
    assert st.evictions.get("corrupt", 0) == first.lost_records + again.lost_records  # each reading reports
    assert json.loads(report_path(aside).read_text())["records"] == len(got)
    assert pending(tmp_path / "queue.db") == []


def test_a_file_without_its_header_is_reported_not_raised(original, tmp_path: Path) -> None:
    src, _ = original
    aside = _damaged(src, tmp_path, 0, 4096, "zero")
    with opened(tmp_path / "queue.db") as store:
        report = rescue_file(store, aside)
        assert store.stats().rescued_records == 0
    assert report.records == 0 and report.damage_unmeasured and report.problems


def test_the_store_sets_its_kinds_aside_with_a_damaged_queue(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    with opened(path) as store:
        store.append_many([(KIND, RecordBatch(b"\0" * 4 * KIND.dim * 3, np.zeros(3, "<f4")))])
    assert json.loads(kinds_path(path).read_text())["1"]["dim"] == KIND.dim
    with open(path, "r+b") as f:
        f.write(b"\0" * 100)  # the header: the file no longer opens
    with opened(path) as store:
        assert store.quarantined is not None
        assert kinds_path(store.quarantined).exists()
        assert not kinds_path(path).exists()  # the fresh queue has none of its own yet


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hits=st.lists(st.tuples(st.integers(0, 2 * PAGE - 1), st.binary(min_size=1, max_size=64)), max_size=8))
def test_the_page_reader_takes_any_damage_without_raising(original, tmp_path: Path, hits) -> None:
    """Mutations anywhere in the first pages (header, schema, b-tree pages, cells, overflow
    pointers): every row it yields is a row, and nothing but 'not an SQLite file' escapes."""
    src, want = original
    data = bytearray(src.read_bytes()[: 4 * PAGE])
    for off, b in hits:
        data[off : off + len(b)] = b
    path = tmp_path / "fuzzed.db"
    path.write_bytes(bytes(data))
    try:
        rows = list(table_rows(path))
    except ValueError as e:
        assert "SQLite file" in str(e) or "page size" in str(e)
        return
    for rowid, values in rows:
        assert isinstance(rowid, int) and isinstance(values, tuple)
    with opened(tmp_path / "queue.db") as store:
        report = rescue_file(store, path)  # whatever the rows hold: reported, never raised
        assert set(_rescued(store)) <= set(want)
    assert report.records <= len(want)
