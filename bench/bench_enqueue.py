"""Durable enqueue throughput: our SQLite queue vs a naive one vs persist-queue.

Every contender writes the same records (128 float32 features = 512 bytes, a
float32 score, no metadata) into a SQLite WAL file with ``synchronous=FULL``
in a temp dir of its own on the same filesystem. A record counts only once
the commit that holds it has returned, so every figure is a *durable* rate.

Contenders, all in one run, each rate divided by the naive one:

* ``naive``: plain ``sqlite3``, ``INSERT`` + ``commit()`` per record, same columns as ours;
* ``persist-queue``: ``persistqueue.SQLiteAckQueue.put()`` per record (it commits per put);
* ``ours sync``: ``Store.append_many`` with batches of 1000 records, one producer;
* ``ours async xP``: ``AsyncQueue`` with P concurrent producers, each awaiting
  ``enqueue(kind, [one record])`` (durable) in a loop, so group commit has to do
  the batching; and the same with 32-record batches. Enqueue latency (call to
  durable return) is reported as p50/p99.

Per-record-commit contenders are fsync-bound, so they write fewer records
(``--baseline-records``) and their rate is what is compared: records/s does
not depend on N. Run as ``python -m bench.bench_enqueue``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.figures import save_json
from edge_agent.config import EvictionPolicy, StoreSettings
from edge_agent.store import AsyncQueue, NewRecord, RecordKind, Store
from edge_tier.wire import Dtype
from edge_tier_harness.testkit import temp_dir

DIM = 128
SYNC_BATCH = 1000
BUDGET_BYTES = 8 * 1024 * 1024 * 1024  # far above what any run writes: no eviction
KIND = RecordKind(stream="bench", dtype=Dtype.FLOAT32, dim=DIM, model="bench", model_version="1")
SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


@dataclass(slots=True)
class Result:
    contender: str
    records: int
    seconds: float
    synchronous: str  # read back from the connection, not assumed
    commits: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    note: str = ""
    ratio: float | None = None  # filled in against the naive rate

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


@dataclass(slots=True)
class Skipped:
    contender: str
    reason: str


@dataclass(slots=True)
class Workload:
    features: list[bytes]
    scores: list[float]
    records: list[NewRecord] = field(default_factory=list)

    @classmethod
    def make(cls, n: int, seed: int = 7) -> Workload:
        rng = np.random.default_rng(seed)
        feats = rng.standard_normal((n, DIM), dtype=np.float32)
        scores = rng.random(n, dtype=np.float32)
        features = [feats[i].tobytes() for i in range(n)]
        score_list = [float(s) for s in scores]
        recs = [NewRecord(features=f, score=s) for f, s in zip(features, score_list, strict=True)]
        return cls(features, score_list, recs)


# -- helpers -------------------------------------------------------------------


def sync_mode(db: sqlite3.Connection) -> str:
    return SYNC_NAMES.get(int(db.execute("PRAGMA synchronous").fetchone()[0]), "?")


def fs_type(path: Path) -> str:
    """The filesystem type of ``path`` (longest matching mount point in /proc/mounts)."""
    real = str(path.resolve())
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    return kind


def store_settings(path: Path, commit_window_ms: float) -> StoreSettings:
    return StoreSettings(
        path=path / "queue.db",
        budget_bytes=BUDGET_BYTES,
        policy=EvictionPolicy.OLDEST,
        synchronous="FULL",
        commit_window_ms=commit_window_ms,
    )


# -- contenders ----------------------------------------------------------------


RAW_INSERT = "INSERT INTO records(created_ms, kind, score, features, meta, nbytes) VALUES (?, 1, ?, ?, ?, ?)"


def raw_db(path: Path) -> sqlite3.Connection:
    """Plain sqlite3, WAL, synchronous=FULL, a row a record with the columns ours keeps."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        "CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, created_ms INTEGER NOT NULL, "
        "kind INTEGER NOT NULL, score REAL NOT NULL, features BLOB NOT NULL, meta TEXT, "
        "nbytes INTEGER NOT NULL)"
    )
    db.commit()
    return db


def bench_naive(work: Workload, n: int, base: Path | None, keep: bool) -> Result:
    """One transaction per record: plain sqlite3, WAL, synchronous=FULL, same columns as ours."""
    with temp_dir(base, "bench-enqueue-naive", keep) as d:
        db = raw_db(d / "naive.db")
        nbytes = DIM * 4 + 64
        sql = RAW_INSERT
        feats, scores = work.features, work.scores
        t0 = time.perf_counter()
        for i in range(n):
            db.execute(sql, (time.time_ns() // 1_000_000, scores[i], feats[i], None, nbytes))
            db.commit()
        secs = time.perf_counter() - t0
        mode = sync_mode(db)
        count = db.execute("SELECT count(*) FROM records").fetchone()[0]
        db.close()
    assert count == n, f"naive: {count} rows, expected {n}"
    return Result("naive (commit per record)", n, secs, mode, commits=n)


def bench_persist_queue(work: Workload, n: int, base: Path | None, keep: bool) -> Result | Skipped:
    """``persistqueue.SQLiteAckQueue.put`` per record: auto_commit (its default), one commit per put."""
    name = "persist-queue SQLiteAckQueue"
    try:
        import persistqueue  # type: ignore[import-untyped]
    except ImportError as e:
        return Skipped(name, f"persist-queue not importable ({e}); pip install persist-queue")
    with temp_dir(base, "bench-enqueue-pq", keep) as d:
        # multithreading=False: one producer thread, one connection; auto_commit=True
        # is the default and the only mode the ack queue supports.
        q = persistqueue.SQLiteAckQueue(str(d / "q"), multithreading=False, auto_commit=True)
        # It opens WAL and leaves synchronous at SQLite's default; make FULL explicit
        # (on its single connection) so the comparison is like for like.
        q._putter.execute("PRAGMA synchronous=FULL")
        mode = sync_mode(q._putter)
        feats, scores = work.features, work.scores
        t0 = time.perf_counter()
        for i in range(n):
            q.put((feats[i], scores[i]))
        secs = time.perf_counter() - t0
        count = q.qsize()
        q.close()
    assert count == n, f"persist-queue: {count} items, expected {n}"
    version = getattr(persistqueue, "__version__", "?")
    return Result(name, n, secs, mode, commits=n, note=f"v{version}, pickled (bytes, score) tuple")


def append_in_batches(store: Store, recs: list[NewRecord], n: int) -> float:
    """Seconds to append ``recs[:n]`` with ``Store.append_many``, SYNC_BATCH records a transaction."""
    t0 = time.perf_counter()
    for i in range(0, n, SYNC_BATCH):
        (res,) = store.append_many([(KIND, recs[i : i + SYNC_BATCH])])
        if isinstance(res, Exception):
            raise res
    return time.perf_counter() - t0


def bench_ours_sync(work: Workload, n: int, base: Path | None, keep: bool) -> Result:
    """``Store.append_many`` with one 1000-record batch per transaction, one producer."""
    with temp_dir(base, "bench-enqueue-sync", keep) as d:
        store = Store(store_settings(d, 0))
        secs = append_in_batches(store, work.records, n)
        mode = sync_mode(store.db)
        stats = store.stats()
        commits = store.commits
        store.close()
    assert stats.records == n and not stats.evictions, f"ours sync: {stats}"
    return Result(f"ours sync (append_many x{SYNC_BATCH})", n, secs, mode, commits=commits)


async def _run_async(
    store: Store, n: int, recs: list[NewRecord], producers: int, batch: int
) -> tuple[float, list[float]]:
    queue = AsyncQueue(store)
    committer = asyncio.create_task(queue.run(), name="queue-commit")
    chunks = [recs[i : i + batch] for i in range(0, n, batch)]
    latencies: list[float] = []

    async def producer(mine: list[list[NewRecord]]) -> None:
        for chunk in mine:
            t = time.perf_counter()
            await queue.enqueue(KIND, chunk, durable=True)
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(producer(chunks[p::producers]) for p in range(producers)))
    secs = time.perf_counter() - t0
    committer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await committer
    await queue.close(close_store=False)  # the caller closes the store, after its stats
    return secs, latencies


def bench_ours_async(
    work: Workload,
    n: int,
    base: Path | None,
    keep: bool,
    *,
    producers: int,
    batch: int,
    commit_window_ms: float,
) -> Result:
    """``AsyncQueue``: ``producers`` tasks, each awaiting durable ``enqueue`` of ``batch`` records."""
    with temp_dir(base, f"bench-enqueue-async{batch}", keep) as d:
        store = Store(store_settings(d, commit_window_ms))
        secs, lat = asyncio.run(_run_async(store, n, work.records, producers, batch))
        mode = sync_mode(store.db)
        stats = store.stats()
        commits = store.commits
        store.close()
    assert stats.records == n and not stats.evictions, f"ours async: {stats}"
    p50, p99 = (float(x) * 1000 for x in np.percentile(np.array(lat), [50, 99]))
    return Result(
        f"ours async, {producers} producers x {batch} rec/enqueue",
        n,
        secs,
        mode,
        commits=commits,
        p50_ms=p50,
        p99_ms=p99,
        note=f"window {commit_window_ms:g} ms, {n / max(commits, 1):.0f} rec/commit",
    )


# -- report --------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: list[Result | Skipped]) -> str:
    lines = [
        "| contender | records | seconds | records/s | x naive | commits | p50 ms | p99 ms | sync | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        if isinstance(r, Skipped):
            lines.append(f"| {r.contender} | - | - | - | - | - | - | - | - | SKIPPED: {r.reason} |")
            continue
        lines.append(
            f"| {r.contender} | {r.records} | {r.seconds:.2f} | {r.rate:,.0f} | {_fmt(r.ratio, '.1f')} | "
            f"{_fmt(r.commits, 'd')} | {_fmt(r.p50_ms, '.1f')} | {_fmt(r.p99_ms, '.1f')} | "
            f"{r.synchronous} | {r.note} |"
        )
    return "\n".join(lines)


META = {"site": "a1", "sensor": 7}  # 27 bytes of compact JSON a record


def bench_meta(work: Workload, n: int, base: Path | None, keep: bool) -> list[Result]:
    """Records with metadata: raw SQLite batched (``executemany`` of SYNC_BATCH rows a
    transaction, one row a record, the metadata as JSON text) against ``Store.append_many``."""
    recs = [NewRecord(features=r.features, score=r.score, meta=dict(META)) for r in work.records[:n]]
    with temp_dir(base, "bench-enqueue-meta-raw", keep) as d:
        db = raw_db(d / "raw.db")
        sql = RAW_INSERT
        t0 = time.perf_counter()
        for i in range(0, n, SYNC_BATCH):
            now = time.time_ns() // 1_000_000
            rows = []
            for r in recs[i : i + SYNC_BATCH]:
                m = json.dumps(r.meta, separators=(",", ":"))
                rows.append((now, r.score, r.features, m, DIM * 4 + 64 + len(m)))
            db.executemany(sql, rows)
            db.commit()
        raw_secs = time.perf_counter() - t0
        mode = sync_mode(db)
        db.close()
    with temp_dir(base, "bench-enqueue-meta-ours", keep) as d:
        store = Store(store_settings(d, 0))
        our_secs = append_in_batches(store, recs, n)
        stats = store.stats()
        store.close()
    assert stats.records == n, f"ours with metadata: {stats}"
    raw = Result(
        f"raw SQLite batched (executemany x{SYNC_BATCH}), metadata",
        n,
        raw_secs,
        mode,
        commits=n // SYNC_BATCH,
    )
    ours = Result(f"ours sync (append_many x{SYNC_BATCH}), metadata", n, our_secs, mode)
    raw.ratio, ours.ratio = 1.0, ours.rate / raw.rate
    return [raw, ours]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_enqueue", description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=50_000, help="records for our contenders (50000)")
    ap.add_argument(
        "--baseline-records",
        type=int,
        default=10_000,
        help="records for naive and persist-queue, which commit per record (10000)",
    )
    ap.add_argument("--producers", type=int, default=64, help="concurrent producers for ours async (64)")
    ap.add_argument("--batch", type=int, default=32, help="records per enqueue in the batched async variant")
    ap.add_argument("--commit-window-ms", type=float, default=StoreSettings().commit_window_ms)
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temp dirs (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    args = ap.parse_args(argv)

    n_ours, n_base = args.records, min(args.baseline_records, args.records)
    probe = Path(args.dir or tempfile.gettempdir())
    fstype = fs_type(probe)
    print(
        f"# durable enqueue: {DIM}-dim float32 records ({DIM * 4} B) + score, WAL, synchronous=FULL\n"
        f"# dir {probe} ({fstype}), python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    if fstype in {"tmpfs", "ramfs", "overlay"}:
        print(f"# WARNING: {fstype} may make fsync free; figures will not reflect a disk", file=sys.stderr)

    work = Workload.make(n_ours)
    runs: list[tuple[str, Callable[[], Result | Skipped]]] = [
        ("naive", lambda: bench_naive(work, n_base, args.dir, args.keep)),
        ("persist-queue", lambda: bench_persist_queue(work, n_base, args.dir, args.keep)),
        ("ours sync", lambda: bench_ours_sync(work, n_ours, args.dir, args.keep)),
        (
            "ours async x1",
            lambda: bench_ours_async(
                work,
                n_ours,
                args.dir,
                args.keep,
                producers=args.producers,
                batch=1,
                commit_window_ms=args.commit_window_ms,
            ),
        ),
        (
            f"ours async x{args.batch}",
            lambda: bench_ours_async(
                work,
                n_ours,
                args.dir,
                args.keep,
                producers=args.producers,
                batch=args.batch,
                commit_window_ms=args.commit_window_ms,
            ),
        ),
    ]
    results: list[Result | Skipped] = []
    for label, fn in runs:
        print(f"# running {label} ...", file=sys.stderr, flush=True)
        r = fn()
        if isinstance(r, Skipped):
            print(f"# SKIP {r.contender}: {r.reason}", file=sys.stderr)
        results.append(r)

    naive = results[0]
    assert isinstance(naive, Result)
    for r in results:
        if isinstance(r, Result):
            r.ratio = r.rate / naive.rate

    print(markdown_table(results))
    print(
        f"# running metadata ({len(json.dumps(META, separators=(',', ':')))} bytes a record) ...",
        file=sys.stderr,
    )
    meta = bench_meta(work, n_ours, args.dir, args.keep)
    print(
        "\nWith metadata (" + json.dumps(META, separators=(",", ":")) + " on every record), "
        "against raw SQLite batched in the same run:\n"
    )
    print(markdown_table(list(meta)).replace("x naive", "x raw batched"))
    results.extend(meta)
    print(
        f"\nnaive and persist-queue wrote {n_base} records, ours {n_ours}: rates (records/s) are "
        "compared, not totals. Every contender ran in this process, one after another; compare the "
        "'x naive' column, absolute figures drift on a shared machine."
    )

    if args.json:
        payload: dict[str, Any] = {
            "benchmark": "enqueue",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "cpus": os.cpu_count(),
            "dir": str(probe),
            "fs_type": fstype,
            "record_bytes": DIM * 4,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": [
                {**asdict(r), "records_per_s": r.rate}
                if isinstance(r, Result)
                else {**asdict(r), "skipped": True}
                for r in results
            ],
        }
        save_json(args.json, payload)
        print(f"# figures written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
