"""The device's durable queue: SQLite in WAL mode, group-committed, byte-budgeted.

A record is one kept feature vector. Its sequence number is unique per device
forever: SQLite's AUTOINCREMENT never reuses one, a new queue file starts at
the current time in microseconds, and a small side file keeps a floor that
survives the queue file itself (a device without a real-time clock that loses
its queue to corruption must still not reuse a number the cloud has seen).

Records are grouped into *frames* (see ``uplink.py``) in sequence order. A
frame's rows are persisted before it is sent, so a restart re-sends exactly
the same uploads with the same upload ids; records in a frame are never
evicted. Records leave the queue only by a cloud receipt (delivered), by the
eviction policy, or by a rejection receipt; the last two are counted by reason.

``Store`` is synchronous and owns the connection; ``AsyncQueue`` runs it on one
thread of its own and batches producers' enqueues into one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.config import EvictionPolicy, StoreSettings
from edge_agent.errors import QueueFull, StoreError
from edge_tier.wire import Dtype, WireError, check_kind

log = logging.getLogger(__name__)

ROW_OVERHEAD = 64  # bytes charged per record on top of its payload: row header, index entries
SEQ_FLOOR_STEP = 1 << 20  # the side file is rewritten once per this many sequence numbers
CORRUPTION_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ms     INTEGER NOT NULL,
    kind           INTEGER NOT NULL REFERENCES kinds(id),
    score          REAL    NOT NULL,
    features       BLOB    NOT NULL,
    meta           TEXT,
    nbytes         INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kinds (
    id             INTEGER PRIMARY KEY,
    stream         TEXT NOT NULL,
    model          TEXT NOT NULL,
    model_version  TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    dtype          INTEGER NOT NULL,
    dim            INTEGER NOT NULL,
    scale          REAL NOT NULL,
    UNIQUE (stream, model, model_version, schema_version, dtype, dim, scale)
);
CREATE TABLE IF NOT EXISTS frames (
    first_seq      INTEGER PRIMARY KEY,
    last_seq       INTEGER NOT NULL,
    prev_seq       INTEGER NOT NULL,
    n              INTEGER NOT NULL,
    nbytes         INTEGER NOT NULL,
    created_ms     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS evictions (
    reason         TEXT PRIMARY KEY,
    records        INTEGER NOT NULL DEFAULT 0,
    bytes          INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (
    key            TEXT PRIMARY KEY,
    value          INTEGER
);
"""


def sqlite3_errorcode(e: sqlite3.Error) -> int:
    return getattr(e, "sqlite_errorcode", -1) & 0xFF


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class RecordKind:
    """What a frame's records have in common; a frame never mixes kinds."""

    stream: str
    dtype: Dtype
    dim: int
    model: str = ""
    model_version: str = ""
    schema_version: int = 1
    scale: float = 1.0

    @property
    def record_bytes(self) -> int:
        return self.dim * self.dtype.itemsize


@dataclass(slots=True)
class NewRecord:
    features: bytes  # ``kind.dim`` values of ``kind.dtype``, little-endian
    score: float
    meta: dict[str, Any] | None = None
    created_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Appended:
    first_seq: int
    last_seq: int
    evicted: int  # records of the queue (possibly of this batch) evicted to make room


@dataclass(slots=True)
class FrameRows:
    """A frame as stored: its chain position and its records, in seq order."""

    first_seq: int
    last_seq: int
    prev_seq: int
    kind: RecordKind
    seqs: list[int]
    scores: list[float]
    times_ms: list[int]
    features: list[bytes]
    meta: list[dict[str, Any]] | None
    nbytes: int


@dataclass(slots=True)
class QueueStats:
    records: int
    bytes: int
    budget_bytes: int
    oldest_created_ms: int | None
    frames_in_flight: int
    evictions: dict[str, int] = field(default_factory=dict)
    evicted_bytes: dict[str, int] = field(default_factory=dict)
    last_receipt_ms: int | None = None
    delivered: int = 0
    corrupt_resets: int = 0
    next_seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]
        d["oldest_age_s"] = (
            None if self.oldest_created_ms is None else max(0.0, (now_ms() - self.oldest_created_ms) / 1000)
        )
        return d


class Store:
    """The queue file. Not thread-safe: one thread uses it (``AsyncQueue`` sees to that)."""

    def __init__(self, settings: StoreSettings, *, readonly: bool = False) -> None:
        self.settings = settings
        self.path = Path(settings.path)
        self.floor_path = self.path.with_name(self.path.name + ".seqfloor")
        self.readonly = readonly
        self.corrupt_reset = False
        self.commits = 0  # group commits done (benchmarks and tests read it)
        self._kinds: dict[RecordKind, int] = {}
        self._kinds_by_id: dict[int, RecordKind] = {}
        if readonly:
            self._open_readonly()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = self._open_checked()
        self._bytes = int(self.db.execute("SELECT total(nbytes) FROM records").fetchone()[0])
        self._next_seq = self._read_next_seq()
        self._floor_written = self._read_floor()
        self._chain_last = self._meta("chain_last", 0)
        self._sync_score_index()

    # -- opening ----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.settings.synchronous}")
        db.execute("PRAGMA foreign_keys=OFF")
        # Keep the WAL from growing past a few MiB after a big burst.
        db.execute("PRAGMA journal_size_limit=4194304")
        return db

    def _open_readonly(self) -> None:
        if not self.path.exists():
            raise StoreError(f"{self.path}: no queue file")
        try:
            self.db = sqlite3.connect(
                self.path.absolute().as_uri() + "?mode=ro", uri=True, isolation_level=None
            )
            self._load_kinds()
            self.db.execute("SELECT count(*) FROM records").fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: cannot read the queue: {e}") from None

    def _open_checked(self) -> sqlite3.Connection:
        """Open the queue; move a corrupt file aside (never delete it) and start afresh."""
        if self.path.exists():
            db: sqlite3.Connection | None = None
            problem: str | None = None
            try:
                db = self._connect()
                rows = db.execute("PRAGMA quick_check").fetchall()
                if rows != [("ok",)]:
                    problem = "; ".join(str(r[0]) for r in rows[:5])
                else:
                    db.executescript(SCHEMA)
                    problem = self._schema_problem(db)
            except sqlite3.DatabaseError as e:
                if sqlite3_errorcode(e) not in CORRUPTION_CODES:
                    # Locked, unreadable, out of space...: not corruption. Refuse to
                    # start rather than set a healthy queue aside.
                    if db is not None:
                        db.close()
                    raise StoreError(f"{self.path}: cannot open the queue: {e}") from None
                problem = str(e)
            if problem is None and db is not None:
                self.db = db
                self._load_kinds()
                self._seed_sequence(db)
                return db
            if db is not None:
                db.close()
            self._quarantine(problem or "unknown")
        db = self._connect()
        db.executescript(SCHEMA)
        self.db = db
        self._seed_sequence(db)
        if self.corrupt_reset:
            db.execute("INSERT INTO meta(key, value) VALUES ('corrupt_resets', 1)")
        return db

    def _seed_sequence(self, db: sqlite3.Connection) -> None:
        """A queue without a sequence row (new, or emptied) starts above anything handed out."""
        if db.execute("SELECT 1 FROM sqlite_sequence WHERE name='records'").fetchone():
            return
        top = db.execute("SELECT max(seq) FROM records").fetchone()[0] or 0
        seed = max(time.time_ns() // 1000, self._read_floor(), top)
        db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('records', ?)", (seed,))

    def _schema_problem(self, db: sqlite3.Connection) -> str | None:
        cols = {r[1] for r in db.execute("PRAGMA table_info(records)")}
        return None if {"kind", "nbytes"} <= cols else "records table has an unknown layout"

    def _quarantine(self, problem: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        base = f"{self.path}.corrupt-{stamp}"
        n = 0
        while any(Path(base + s).exists() for s in ("", "-wal", "-shm")):
            n += 1
            base = f"{self.path}.corrupt-{stamp}-{n}"
        moved = []
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                dst = Path(base + suffix)
                os.replace(src, dst)
                moved.append(dst.name)
        self.corrupt_reset = True
        log.error(
            "queue %s failed its integrity check (%s); moved aside as %s and starting a fresh queue",
            self.path, problem, ", ".join(moved),
        )

    def _load_kinds(self) -> None:
        for row in self.db.execute(
            "SELECT id, stream, model, model_version, schema_version, dtype, dim, scale FROM kinds"
        ):
            k = RecordKind(row[1], Dtype(row[5]), row[6], row[2], row[3], row[4], row[7])
            self._kinds[k] = row[0]
            self._kinds_by_id[row[0]] = k

    def _sync_score_index(self) -> None:
        # The index only pays for itself under the score policy.
        if self.settings.policy is EvictionPolicy.LOWEST_SCORE:
            self.db.execute("CREATE INDEX IF NOT EXISTS records_by_score ON records(score, seq)")
        else:
            self.db.execute("DROP INDEX IF EXISTS records_by_score")

    def _meta(self, key: str, default: int) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None or row[0] is None else int(row[0])

    def _read_next_seq(self) -> int:
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
        top = self.db.execute("SELECT max(seq) FROM records").fetchone()[0]
        return max(row[0] if row else 0, top or 0) + 1

    def _read_floor(self) -> int:
        try:
            return int(self.floor_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _write_floor(self, floor: int) -> None:
        tmp = self.floor_path.with_name(self.floor_path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{floor}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.floor_path)
        self._floor_written = floor

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()

    # -- writing ----------------------------------------------------------

    def _kind_id(self, kind: RecordKind) -> int:
        kid = self._kinds.get(kind)
        if kid is None:
            cur = self.db.execute(
                "INSERT INTO kinds(stream, model, model_version, schema_version, dtype, dim, scale) "
                "VALUES (?,?,?,?,?,?,?)",
                (kind.stream, kind.model, kind.model_version, kind.schema_version,
                 int(kind.dtype), kind.dim, kind.scale),
            )
            kid = int(cur.lastrowid or 0)
            self._kinds[kind] = kid
            self._kinds_by_id[kid] = kind
        return kid

    def append_many(
        self,
        batches: Sequence[tuple[RecordKind, Sequence[NewRecord]]],
        write_behind: Sequence[bool] | None = None,
    ) -> list[Appended | Exception]:
        """Append several producers' batches in ONE transaction (group commit).

        Each batch gets its own result: its seq range, or the exception that
        refused it (``QueueFull`` under the block policy, ``StoreError`` when
        the disk is too full for it) without failing the others. A refused
        batch whose producer is not waiting (``write_behind``) is counted as
        lost, reason ``refused``: nobody else would hear of it.
        """
        failed: dict[int, Exception] = {}
        made_room = False
        while True:
            snapshot = self._snapshot()
            results: dict[int, Appended | Exception] = {}
            current: int | None = None
            try:
                self.db.execute("BEGIN IMMEDIATE")
                for i, (kind, records) in enumerate(batches):
                    if i not in failed:
                        current = i
                        results[i] = self._append_one(kind, records)
                current = None
                results.update(failed)
                for i, r in results.items():
                    if isinstance(r, Exception) and write_behind is not None and write_behind[i]:
                        kind, records = batches[i]
                        nbytes = len(records) * (kind.record_bytes + ROW_OVERHEAD)
                        self._count_loss("refused", len(records), nbytes)
                        log.error("write-behind batch of %d records refused: %s", len(records), r)
                self.db.execute("COMMIT")
                break
            except sqlite3.OperationalError as e:
                # SQLite may roll a transaction back by itself on SQLITE_FULL, so the
                # whole group is redone: once after making room, then without the
                # batch that still does not fit.
                self._rollback(snapshot)
                if sqlite3_errorcode(e) != sqlite3.SQLITE_FULL or current is None:
                    raise
                if not made_room:
                    need = sum(len(r) * (k.record_bytes + ROW_OVERHEAD) for k, r in batches) * 2
                    self._make_room_on_disk(max(need, 256 * 1024))
                    made_room = True
                else:
                    failed[current] = StoreError(
                        f"{self.path}: disk full: a batch of {len(batches[current][1])} records does not "
                        "fit even after evicting by policy"
                    )
            except BaseException:
                self._rollback(snapshot)
                raise
        self.commits += 1
        if self._next_seq + SEQ_FLOOR_STEP // 2 > self._floor_written:
            self._write_floor(self._next_seq + SEQ_FLOOR_STEP)
        return [results[i] for i in range(len(batches))]

    def _snapshot(self) -> tuple[int, int, dict[RecordKind, int]]:
        return self._next_seq, self._bytes, dict(self._kinds)

    def _rollback(self, snap: tuple[int, int, dict[RecordKind, int]]) -> None:
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
        self._next_seq, self._bytes, self._kinds = snap[0], snap[1], dict(snap[2])
        self._kinds_by_id = {v: k for k, v in self._kinds.items()}

    def _make_room_on_disk(self, nbytes: int) -> None:
        """The disk filled before the budget did: evict by policy (counted as ``disk_full``);
        SQLite reuses the freed pages."""
        snap = self._snapshot()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            freed = self._evict(nbytes, "disk_full")
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback(snap)
            raise
        log.error("disk full while writing %s; evicted %d records to make room", self.path, freed)

    def _append_one(self, kind: RecordKind, records: Sequence[NewRecord]) -> Appended | Exception:
        if not records:
            return Appended(0, 0, 0)
        if kind not in self._kinds:
            # Whatever is queued must encode as a frame later, or it would block the queue.
            try:
                check_kind(stream=kind.stream, model=kind.model, model_version=kind.model_version,
                           schema_version=kind.schema_version, dtype=kind.dtype, dim=kind.dim,
                           scale=kind.scale)
            except WireError as e:
                return StoreError(f"stream {kind.stream!r}: {e}")
        size = kind.record_bytes
        rows = []
        seq = self._next_seq
        added = 0
        ts = now_ms()
        for r in records:
            if len(r.features) != size:
                return StoreError(
                    f"record {len(rows)} of stream {kind.stream!r}: {len(r.features)} feature bytes, "
                    f"expected {size} ({kind.dim} x {kind.dtype.name.lower()})"
                )
            try:
                meta = json.dumps(r.meta, separators=(",", ":"), allow_nan=False) if r.meta else None
            except (TypeError, ValueError) as e:
                return StoreError(f"record {len(rows)} of stream {kind.stream!r}: metadata: {e}")
            nbytes = size + (len(meta) if meta else 0) + ROW_OVERHEAD
            added += nbytes
            rows.append((seq, r.created_ms or ts, r.score, r.features, meta, nbytes))
            seq += 1
        budget = self.settings.budget_bytes
        if self.settings.policy is EvictionPolicy.BLOCK and self._bytes + added > budget:
            return QueueFull(
                f"queue {self.path} is full ({self._bytes} of {budget} bytes) and the policy is "
                f"'block': {len(rows)} records refused"
            )
        kid = self._kind_id(kind)
        self.db.executemany(
            "INSERT INTO records(seq, created_ms, kind, score, features, meta, nbytes) "
            f"VALUES (?, ?, {kid}, ?, ?, ?, ?)",
            rows,
        )
        first = self._next_seq
        self._next_seq = seq
        self._bytes += added
        evicted = self._evict_to_budget() if self._bytes > budget else 0
        return Appended(first, seq - 1, evicted)

    def _evict_to_budget(self) -> int:
        """Delete unframed records by policy until the queue fits its budget; count them."""
        return self._evict(self._bytes - self.settings.budget_bytes, self.settings.policy.value)

    def _evict(self, excess: int, reason: str) -> int:
        """Delete at least ``excess`` bytes of unframed records, in policy order; count them."""
        policy = self.settings.policy
        order = "score ASC, seq ASC" if policy is EvictionPolicy.LOWEST_SCORE else "seq ASC"
        freed = count = 0
        while freed < excess:
            victims = self.db.execute(
                f"SELECT seq, nbytes FROM records WHERE seq > ? ORDER BY {order} LIMIT 512",
                (self._chain_last,),
            ).fetchall()
            if not victims:
                break
            doomed = []
            for seq, nbytes in victims:
                doomed.append((seq,))
                freed += nbytes
                count += 1
                if freed >= excess:
                    break
            self.db.executemany("DELETE FROM records WHERE seq = ?", doomed)
        if count:
            self._count_loss(reason, count, freed)
            self._bytes -= freed
            log.warning("queue: evicted %d records (%d bytes), reason %s", count, freed, reason)
        return count

    def _count_loss(self, reason: str, records: int, nbytes: int) -> None:
        self.db.execute(
            "INSERT INTO evictions(reason, records, bytes) VALUES (?, ?, ?) "
            "ON CONFLICT(reason) DO UPDATE SET records = records + excluded.records, "
            "bytes = bytes + excluded.bytes",
            (reason, records, nbytes),
        )

    # -- frames -----------------------------------------------------------

    def next_frame(self, max_records: int, max_bytes: int) -> FrameRows | None:
        """Assign the oldest unframed records to a new frame and persist it, or None."""
        rows = self.db.execute(
            "SELECT seq, created_ms, kind, score, features, meta, nbytes FROM records "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (self._chain_last, max_records),
        ).fetchall()
        if not rows:
            return None
        kid = rows[0][2]
        take = 0
        total = 0
        for r in rows:
            if r[2] != kid or (take and total + r[6] > max_bytes):
                break
            total += r[6]
            take += 1
        rows = rows[:take]
        frame = self._frame_from_rows(self._chain_last, rows)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT INTO frames(first_seq, last_seq, prev_seq, n, nbytes, created_ms) "
                "VALUES (?,?,?,?,?,?)",
                (frame.first_seq, frame.last_seq, frame.prev_seq, len(rows), total, now_ms()),
            )
            self.db.execute(
                "INSERT INTO meta(key, value) VALUES ('chain_last', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (frame.last_seq,),
            )
            self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                self.db.execute("ROLLBACK")
            raise
        self._chain_last = frame.last_seq
        return frame

    def _frame_from_rows(self, prev_seq: int, rows: list[tuple[Any, ...]]) -> FrameRows:
        kind = self._kinds_by_id[rows[0][2]]
        metas = [json.loads(r[5]) if r[5] else {} for r in rows]
        return FrameRows(
            first_seq=rows[0][0],
            last_seq=rows[-1][0],
            prev_seq=prev_seq,
            kind=kind,
            seqs=[r[0] for r in rows],
            scores=[r[3] for r in rows],
            times_ms=[r[1] for r in rows],
            features=[r[4] for r in rows],
            meta=metas if any(metas) else None,
            nbytes=sum(r[6] for r in rows),
        )

    def open_frames(self) -> list[FrameRows]:
        """Frames assigned and not yet receipted, oldest first (to re-send after a restart)."""
        frames = []
        for first, last, prev in self.db.execute(
            "SELECT first_seq, last_seq, prev_seq FROM frames ORDER BY first_seq"
        ).fetchall():
            rows = self.db.execute(
                "SELECT seq, created_ms, kind, score, features, meta, nbytes FROM records "
                "WHERE seq BETWEEN ? AND ? ORDER BY seq",
                (first, last),
            ).fetchall()
            if rows:
                frames.append(self._frame_from_rows(prev, rows))
        return frames

    def set_frame_prev(self, first_seq: int, prev_seq: int) -> None:
        self.db.execute("UPDATE frames SET prev_seq=? WHERE first_seq=?", (prev_seq, first_seq))

    def finish_frame(self, first_seq: int, last_seq: int, loss_reason: str | None = None) -> int:
        """Remove a frame's records: delivered (receipt) or, with a reason, counted as lost."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            freed = self.db.execute(
                "DELETE FROM records WHERE seq BETWEEN ? AND ? RETURNING nbytes", (first_seq, last_seq)
            ).fetchall()
            self.db.execute("DELETE FROM frames WHERE first_seq=?", (first_seq,))
            nbytes = sum(r[0] for r in freed)
            if loss_reason is not None:
                self._count_loss(loss_reason, len(freed), nbytes)
            else:
                self.db.execute(
                    "INSERT INTO meta(key, value) VALUES ('delivered', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                    (len(freed),),
                )
                self.db.execute(
                    "INSERT INTO meta(key, value) VALUES ('last_receipt_ms', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (now_ms(),),
                )
            self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                self.db.execute("ROLLBACK")
            raise
        self._bytes -= nbytes
        return len(freed)

    # -- reading ----------------------------------------------------------

    def stats(self) -> QueueStats:
        db = self.db
        count, nbytes = db.execute("SELECT count(*), total(nbytes) FROM records").fetchone()
        oldest = db.execute("SELECT created_ms FROM records ORDER BY seq LIMIT 1").fetchone()
        ev = db.execute("SELECT reason, records, bytes FROM evictions").fetchall()
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        frames = db.execute("SELECT count(*) FROM frames").fetchone()[0]
        seq_row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
        return QueueStats(
            records=count,
            bytes=int(nbytes),
            budget_bytes=self.settings.budget_bytes,
            oldest_created_ms=oldest[0] if oldest else None,
            frames_in_flight=frames,
            evictions={r[0]: r[1] for r in ev},
            evicted_bytes={r[0]: r[2] for r in ev},
            last_receipt_ms=meta.get("last_receipt_ms"),
            delivered=int(meta.get("delivered") or 0),
            corrupt_resets=int(meta.get("corrupt_resets") or 0),
            next_seq=(seq_row[0] + 1) if seq_row else 0,
        )

    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def has_unframed(self) -> bool:
        return self._next_seq - 1 > self._chain_last


T = TypeVar("T")


@dataclass(slots=True)
class _Pending:
    kind: RecordKind
    records: Sequence[NewRecord]
    future: asyncio.Future[Appended]
    write_behind: bool = False


class AsyncQueue:
    """``Store`` on a thread of its own, with group commit for producers.

    Enqueues that arrive within ``commit_window_ms`` (or until
    ``commit_max_records``) share one transaction, so the fsync is paid per
    batch. ``enqueue(durable=False)`` returns before the commit (write-behind),
    bounded by the same window.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.settings = store.settings
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edge-agent-sqlite")
        self._pending: list[_Pending] = []
        self._pending_records = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self.on_commit: list[Callable[[], None]] = []
        self._closed = False

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store operation on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def enqueue(
        self, kind: RecordKind, records: Sequence[NewRecord], *, durable: bool = True
    ) -> Appended | None:
        if self._closed:
            raise StoreError("queue is closed")
        deadline = time.monotonic() + self.settings.block_timeout_s
        while True:
            fut: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
            write_behind = not durable and self._pending_records < self.settings.commit_max_records
            self._pending.append(_Pending(kind, records, fut, write_behind))
            self._pending_records += len(records)
            self._wake.set()
            if write_behind:
                fut.add_done_callback(_log_write_behind_failure)
                return None
            try:
                return await fut
            except QueueFull:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                async with self._room:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._room.wait(), timeout=min(left, 0.5))

    async def notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    async def run(self) -> None:
        """The committer task: drains pending enqueues one transaction at a time."""
        try:
            while True:
                await self._wake.wait()
                window = self.settings.commit_window_ms / 1000
                if window and self._pending_records < self.settings.commit_max_records:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full(), timeout=window)
                await self._commit_pending()
        finally:
            await self.flush()

    async def _full(self) -> None:
        while self._pending_records < self.settings.commit_max_records:
            self._wake.clear()
            await self._wake.wait()

    async def _commit_pending(self) -> None:
        self._wake.clear()
        batch, self._pending, self._pending_records = self._pending, [], 0
        if not batch:
            return
        work = asyncio.ensure_future(
            self.call(
                self.store.append_many,
                [(p.kind, p.records) for p in batch],
                [p.write_behind for p in batch],
            )
        )
        try:
            try:
                results = await asyncio.shield(work)
            except asyncio.CancelledError:
                # The transaction runs to its end on the store's thread either
                # way; its producers must still hear how it went.
                results = await work
                self._resolve(batch, results)
                raise
        except Exception as e:
            log.error("queue commit of %d batches failed: %s", len(batch), e)
            err = StoreError(f"queue {self.store.path}: commit failed: {e}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        self._resolve(batch, results)

    def _resolve(self, batch: list[_Pending], results: list[Appended | Exception]) -> None:
        for p, r in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(r, Exception):
                p.future.set_exception(r)
            else:
                p.future.set_result(r)
        for cb in self.on_commit:
            cb()

    async def flush(self) -> None:
        """Commit whatever is pending (used at shutdown)."""
        while self._pending:
            await self._commit_pending()

    async def close(self) -> None:
        self._closed = True
        await self.flush()
        await self.call(self.store.close)
        self._executor.shutdown(wait=True)


def _log_write_behind_failure(fut: asyncio.Future[Appended]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("write-behind enqueue failed: %s", fut.exception())
