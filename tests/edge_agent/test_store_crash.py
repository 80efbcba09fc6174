"""Real crashes: a child process appends (and frames, and finishes frames) until SIGKILL.

Every line the child prints is printed only after the call it reports has returned, so a
printed line is an acknowledgement: what it reports must survive the kill.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import StoreSettings
from edge_agent.store import NewRecord, RecordKind, Store
from edge_tier.wire import Dtype

REPO = Path(__file__).resolve().parents[2]
DIM = 8
KIND = RecordKind("vib", Dtype.FLOAT32, DIM)
BATCH = 5

PRELUDE = f"""
import sys
import numpy as np
from edge_agent.config import StoreSettings
from edge_agent.store import NewRecord, RecordKind, Store
from edge_tier.wire import Dtype

store = Store(StoreSettings(path=sys.argv[1], synchronous="FULL", budget_bytes=1 << 30))
kind = RecordKind("vib", Dtype.FLOAT32, {DIM})

def batch(i):
    return [NewRecord(np.full({DIM}, i + j, dtype="<f4").tobytes(), 0.5) for j in range({BATCH})]
"""

APPEND_LOOP = (
    PRELUDE
    + """
i = 0
while True:
    r = store.append_many([(kind, batch(i))])[0]
    print(r.first_seq, r.last_seq, flush=True)
    i += len(batch(i))
"""
)

FRAME_LOOP = (
    PRELUDE
    + """
open_frames = []
i = 0
while True:
    r = store.append_many([(kind, batch(i))])[0]
    print("A", r.first_seq, r.last_seq, flush=True)
    i += 5
    f = store.next_frame(7, 1 << 20)
    if f is not None:
        print("F", f.first_seq, f.last_seq, f.prev_seq, flush=True)
        open_frames.append(f)
    if len(open_frames) > 2:
        f = open_frames.pop(0)
        print("X", f.first_seq, f.last_seq, flush=True)
        n = store.finish_frame(f.first_seq, f.last_seq)
        print("D", f.first_seq, f.last_seq, n, flush=True)
"""
)


@contextmanager
def child(code: str, db: Path) -> Iterator[tuple[subprocess.Popen[str], list[str], threading.Event]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    lines: list[str] = []
    first = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield proc, lines, first
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reader.join(10)


def run_until_killed(code: str, db: Path, delay: float) -> list[list[str]]:
    """Start the child, SIGKILL it ``delay`` s after its first acknowledgement; its complete lines."""
    with child(code, db) as (proc, lines, first):
        if not first.wait(30):
            assert proc.stderr is not None
            pytest.fail(f"child never acknowledged anything: {proc.stderr.read()}")
        time.sleep(delay)
        assert proc.poll() is None, "the child exited by itself"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    # a line cut by the kill has no newline: it was never acknowledged
    return [ln.split() for ln in lines if ln.endswith("\n")]


def reopen(db: Path) -> Store:
    store = Store(StoreSettings(path=db, synchronous="FULL", budget_bytes=1 << 30))
    assert not store.corrupt_reset
    assert store.stats().corrupt_resets == 0
    assert store.db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return store


def expected_features(index: int) -> bytes:
    return np.full(DIM, index, dtype="<f4").tobytes()


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_acknowledged_appends_survive_kill_9(tmp_path: Path, seed: int) -> None:
    delay = random.Random(seed).uniform(0.2, 1.0)
    db = tmp_path / "q.db"
    acked = [(int(a), int(b)) for a, b in run_until_killed(APPEND_LOOP, db, delay)]
    assert len(acked) >= 3, f"only {len(acked)} appends acknowledged in {delay:.2f} s"
    store = reopen(db)
    try:
        rows = [(seq, feats) for seq, _, _, _, feats, _ in store.records()]
        got = [seq for seq, _ in rows]
        first, last_acked = acked[0][0], acked[-1][1]
        assert got[0] == first
        assert got == list(range(first, got[-1] + 1)), "a hole in the sequence"
        assert got[-1] >= last_acked, "an acknowledged record was lost"
        # at most the one batch that committed just before the kill, not yet printed
        assert got[-1] - last_acked in (0, BATCH)
        for seq, feats in rows:
            assert feats == expected_features(seq - first), f"record {seq} damaged"
        nxt = store.append_many([(KIND, [NewRecord(expected_features(0), 0.5)])])[0]
        assert not isinstance(nxt, Exception)
        assert nxt.first_seq > got[-1]
    finally:
        store.close()


def _ranges(lines: list[list[str]], tag: str) -> list[tuple[int, ...]]:
    return [tuple(int(x) for x in ln[1:]) for ln in lines if ln[0] == tag]


@pytest.mark.parametrize("seed", [7])
def test_frames_and_receipts_survive_kill_9(tmp_path: Path, seed: int) -> None:
    delay = random.Random(seed).uniform(0.4, 1.0)
    db = tmp_path / "q.db"
    lines = run_until_killed(FRAME_LOOP, db, delay)
    appended = _ranges(lines, "A")
    framed = {f[0]: f for f in _ranges(lines, "F")}
    started = _ranges(lines, "X")
    done = _ranges(lines, "D")
    assert len(done) >= 2, f"only {len(done)} frames finished before the kill"
    # the one finish_frame that may have been running when the kill came
    pending = [x for x in started if (x[0], x[1]) not in {(d[0], d[1]) for d in done}]
    assert len(pending) <= 1
    store = reopen(db)
    try:
        present = {r[0] for r in store.records()}
        finished = {s for first, last, _ in done for s in range(first, last + 1)}
        maybe = {s for first, last in pending for s in range(first, last + 1)}
        assert not present & finished, "a receipted record came back"
        if maybe:
            assert maybe <= present or not maybe & present, "finish_frame was not atomic"
        for first, last in appended:
            for s in range(first, last + 1):
                assert s in present or s in finished or s in maybe, f"acknowledged record {s} lost"
        st = store.stats()
        assert st.delivered == sum(n for *_, n in done) + (len(maybe) if not maybe & present else 0)

        frames = store.db.execute(
            "SELECT first_seq, last_seq, prev_seq, n FROM frames ORDER BY first_seq"
        ).fetchall()
        chain_last = store.db.execute("SELECT value FROM meta WHERE key='chain_last'").fetchone()[0]
        covered: set[int] = set()
        for first, last, prev, n in frames:
            seqs = {s for s in present if first <= s <= last}
            assert len(seqs) == n == last - first + 1, f"frame {first}-{last} lost records"
            assert not seqs & covered
            covered |= seqs
            if first in framed:
                assert framed[first][1:] == (last, prev), "a frame changed across the kill"
            assert (first, last) not in {(d[0], d[1]) for d in done}
        for (_, last, _, _), (_, _, prev, _) in itertools.pairwise(frames):
            assert prev == last, "the frame chain is broken"
        # every printed frame that was not finished is still there
        finished_firsts = {d[0] for d in done} | {p[0] for p in pending}
        assert {f for f in framed if f not in finished_firsts} <= {f[0] for f in frames}
        # records up to chain_last are all in a frame; the rest are unframed, after it
        assert {s for s in present if s <= chain_last} == covered
        assert [(f.first_seq, f.last_seq, f.prev_seq) for f in store.open_frames()] == [
            (a, b, c) for a, b, c, _ in frames
        ]
        nxt = store.next_frame(1000, 1 << 30)
        if nxt is not None:
            assert nxt.prev_seq == chain_last and nxt.first_seq > chain_last
            assert nxt.seqs == sorted(s for s in present if s > chain_last)
    finally:
        store.close()
