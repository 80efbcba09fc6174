"""The device's durable queue: SQLite in WAL mode, group-committed, byte-budgeted.

A record is one kept feature vector. Records are stored column-wise in
*chunks*: one row holds one producer batch (up to a frame's worth) with its
seqs, scores, times, features and metadata as blobs, so the per-record cost of
SQLite (row headers, index entries, per-row Python) is paid per batch. A chunk
row's key is the seq of its first record when it was written; eviction may
later remove records from inside a chunk, so its ``seqs`` blob is the truth.

A record's sequence number is unique per device forever: it only grows, is
persisted in the same transaction as the records, a new queue file starts at
the current time in microseconds, and a side file keeps a floor that survives
the queue file itself (a device without a real-time clock that loses its queue
to corruption must still not reuse a number the cloud has seen).

Chunks are grouped into *frames* (see ``uplink.py``) in seq order, whole
chunks only. A frame is persisted before it is sent, so a restart re-sends the
same uploads with the same upload ids; records in a frame are never evicted.
Records leave the queue only by a cloud receipt (delivered), by the eviction
policy, or by a rejection; the last two are counted by reason.

A queue that fails its integrity check at open is set aside whole (never deleted) and a
fresh one starts; what the old file still holds comes back into the ``rescued`` table
(``rescue.py``) and goes outside the chain. One process writes a queue: ``{queue}.lock``.

``Store`` is synchronous and owns the connection; ``AsyncQueue`` runs it on one
thread of its own and batches producers' enqueues into one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edge_agent.config import EvictionPolicy, StoreSettings
from edge_agent.disk import DiskRoom, filesystem_bytes, is_disk_full
from edge_agent.errors import DiskFull, QueueFull, RecordTooLarge, StoreError
from edge_agent.files import QueueLock, write_atomic
from edge_tier.wire import RECORD_WIRE_OVERHEAD, Dtype, Frame, WireError, check_kind, frame_overhead

log = logging.getLogger(__name__)

ROW_OVERHEAD = 64  # bytes charged per record on top of its payload (seq, score, time, row share)
# A record's charge less this is at least what it takes in a frame (the charge counts its
# metadata as ASCII JSON, never less than the frame's UTF-8).
WIRE_SAVING = ROW_OVERHEAD - RECORD_WIRE_OVERHEAD
MAX_PAGES = 4294967294  # SQLite's own ceiling: what max_page_count is outside an append
SEQ_FLOOR_STEP = 1 << 20  # the side file is rewritten once per this many sequence numbers
CORRUPTION_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
U64, F32 = np.dtype("<u8"), np.dtype("<f4")

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    key            INTEGER PRIMARY KEY,  -- seq of the first record when written
    last_seq       INTEGER NOT NULL,     -- seq of the last record still held
    n              INTEGER NOT NULL,
    kind           INTEGER NOT NULL REFERENCES kinds(id),
    created_ms     INTEGER NOT NULL,     -- oldest record's creation time
    min_score      REAL    NOT NULL,
    nbytes         INTEGER NOT NULL,     -- charged to the budget
    seqs           BLOB    NOT NULL,     -- u64[n]
    scores         BLOB    NOT NULL,     -- f32[n]
    times          BLOB    NOT NULL,     -- u64[n], ms since the epoch
    features       BLOB    NOT NULL,     -- n x kind's record bytes
    meta           TEXT,                 -- JSON list of n objects, or NULL
    crc            INTEGER               -- CRC-32 of the blobs and meta (row_crc); NULL in old rows
);
-- A chunk row keeps a large part of its blobs in its b-tree leaf; this index lets the
-- frame cutter and the stats read the small columns without touching the blobs.
CREATE INDEX IF NOT EXISTS chunks_heads ON chunks(key, n, kind, nbytes, created_ms);
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
    chunk_lo       INTEGER NOT NULL,     -- key of its first chunk
    n              INTEGER NOT NULL,
    nbytes         INTEGER NOT NULL,
    created_ms     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS evictions (
    reason         TEXT PRIMARY KEY,
    records        INTEGER NOT NULL DEFAULT 0,
    bytes          INTEGER NOT NULL DEFAULT 0
);
-- Records rescued from a queue file that failed its integrity check (edge_agent/rescue.py),
-- laid out as chunks; outside the chain, sent in rescued frames, beside the budget.
CREATE TABLE IF NOT EXISTS rescued (
    key            INTEGER PRIMARY KEY,  -- seq of its first record
    last_seq       INTEGER NOT NULL,
    n              INTEGER NOT NULL,
    kind           INTEGER NOT NULL REFERENCES kinds(id),
    created_ms     INTEGER NOT NULL,
    min_score      REAL    NOT NULL,
    nbytes         INTEGER NOT NULL,
    seqs           BLOB    NOT NULL,
    scores         BLOB    NOT NULL,
    times          BLOB    NOT NULL,
    features       BLOB    NOT NULL,
    meta           TEXT,
    crc            INTEGER
);
CREATE TABLE IF NOT EXISTS meta (
    key            TEXT PRIMARY KEY,
    value          INTEGER
);
"""

CHUNK_COLUMNS = (
    "key, last_seq, n, kind, created_ms, min_score, nbytes, seqs, scores, times, features, meta, crc"
)
_SET_CHUNK = f"UPDATE chunks SET ({CHUNK_COLUMNS}) = ({','.join('?' * 13)}) WHERE key=?"


KINDS_SUFFIX = ".kinds"


def kinds_path(queue: Path) -> Path:
    """Where a queue's kinds are kept beside it (set aside with it, too)."""
    return queue.with_name(queue.name + KINDS_SUFFIX)


def kind_doc(k: RecordKind) -> dict[str, Any]:
    return {
        "stream": k.stream,
        "model": k.model,
        "model_version": k.model_version,
        "schema_version": k.schema_version,
        "dtype": int(k.dtype),
        "dim": k.dim,
        "scale": k.scale,
    }


def row_crc(seqs: bytes, scores: bytes, times: bytes, features: bytes, meta: str | None) -> int:
    """A chunk row's checksum: SQLite pages have none, and a rescue must tell a damaged
    value from a good one (``rescue.py``)."""
    crc = 0
    for part in (seqs, scores, times, features, (meta or "").encode()):
        crc = zlib.crc32(part, crc)
    return crc


def _insert(table: str, conflict: str = "") -> str:
    """An INSERT of one chunk row (``Store._chunk_row``) into ``chunks`` or ``rescued``."""
    return f"INSERT {conflict} INTO {table}({CHUNK_COLUMNS}) VALUES ({','.join('?' * 13)})"


def sqlite3_errorcode(e: sqlite3.Error) -> int:
    return getattr(e, "sqlite_errorcode", -1) & 0xFF


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


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

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> RecordKind:
        """A ``kinds`` row: (id, stream, model, model_version, schema_version, dtype, dim, scale)."""
        return cls(str(r[1]), Dtype(r[5]), int(r[6]), str(r[2]), str(r[3]), int(r[4]), float(r[7]))

    @property
    def record_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    @property
    def frame_overhead(self) -> int:
        return frame_overhead(stream=self.stream, model=self.model, model_version=self.model_version)

    def check(self) -> None:
        """WireError unless a frame header can carry this kind: what is queued must encode."""
        check_kind(
            stream=self.stream,
            model=self.model,
            model_version=self.model_version,
            schema_version=self.schema_version,
            dtype=self.dtype,
            dim=self.dim,
            scale=self.scale,
        )


@dataclass(slots=True)
class NewRecord:
    features: bytes  # ``kind.dim`` values of ``kind.dtype``, little-endian
    score: float
    meta: dict[str, Any] | None = None
    created_ms: int | None = None


@dataclass(slots=True)
class RecordBatch:
    """Records column-wise, as producers in a hurry hand them over (no object per record)."""

    features: bytes  # n x record bytes
    scores: np.ndarray  # float32[n]
    meta: list[dict[str, Any]] | None = None
    created_ms: np.ndarray | None = None  # uint64[n]; None: now

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def of(cls, records: Sequence[NewRecord] | RecordBatch, record_bytes: int) -> RecordBatch:
        if isinstance(records, RecordBatch):
            if len(records.features) != len(records) * record_bytes:
                raise StoreError(
                    f"{len(records.features)} feature bytes for {len(records)} records of "
                    f"{record_bytes} bytes"
                )
            return records
        for i, r in enumerate(records):
            if len(r.features) != record_bytes:
                raise StoreError(f"record {i}: {len(r.features)} feature bytes, expected {record_bytes}")
        metas = [r.meta or {} for r in records]
        created = [r.created_ms for r in records]
        return cls(
            features=b"".join(r.features for r in records),
            scores=np.array([r.score for r in records], dtype=F32),
            meta=metas if any(metas) else None,
            created_ms=None
            if all(c is None for c in created)
            else np.array([c if c is not None else now_ms() for c in created], dtype=U64),
        )


@dataclass(frozen=True, slots=True)
class Appended:
    first_seq: int
    last_seq: int
    evicted: int  # records of the queue (possibly of this batch) evicted to make room


@dataclass(slots=True)
class Columns:
    """Records of one kind, column-wise: what a chunk row or a frame holds."""

    seqs: np.ndarray  # uint64[n]
    scores: np.ndarray  # float32[n]
    times: np.ndarray  # uint64[n]
    features: bytes
    meta: list[dict[str, Any]] | None

    def __len__(self) -> int:
        return len(self.seqs)

    def sizes(self, record_bytes: int) -> np.ndarray:
        """What each record is charged against the budget."""
        base = np.full(len(self), record_bytes + ROW_OVERHEAD, dtype=np.int64)
        if self.meta is not None:
            base += np.array([len(_json(m)) if m else 0 for m in self.meta], dtype=np.int64)
        return base

    def take(self, keep: np.ndarray, record_bytes: int) -> Columns:
        feats = np.frombuffer(self.features, dtype=np.uint8).reshape(len(self), record_bytes)
        return Columns(
            self.seqs[keep],
            self.scores[keep],
            self.times[keep],
            feats[keep].tobytes(),
            None if self.meta is None else [m for m, k in zip(self.meta, keep, strict=True) if k],
        )

    def slice(self, lo: int, hi: int, record_bytes: int) -> Columns:
        if (lo, hi) == (0, len(self)):
            return self
        return Columns(
            self.seqs[lo:hi],
            self.scores[lo:hi],
            self.times[lo:hi],
            self.features[lo * record_bytes : hi * record_bytes],
            None if self.meta is None else self.meta[lo:hi],
        )

    @classmethod
    def concat(cls, parts: list[Columns]) -> Columns:
        if len(parts) == 1:
            return parts[0]
        metas = None
        if any(p.meta is not None for p in parts):
            metas = [m for p in parts for m in (p.meta if p.meta is not None else [{}] * len(p))]
        return cls(
            np.concatenate([p.seqs for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.times for p in parts]),
            b"".join(p.features for p in parts),
            metas,
        )


@dataclass(slots=True)
class FrameRows:
    """A frame as stored: its chain position and its records, in seq order."""

    first_seq: int
    last_seq: int
    prev_seq: int
    kind: RecordKind
    records: Columns
    nbytes: int
    rescued: bool = False  # records of a set-aside queue file: sent outside the chain

    @property
    def n(self) -> int:
        return len(self.records)

    def to_frame(self, tenant: str, device: str, created_ms: int) -> Frame:
        """The upload frame of these records (what ``encode_frame`` takes)."""
        k, r = self.kind, self.records
        return Frame(
            tenant=tenant,
            device=device,
            prev_seq=self.prev_seq,
            stream=k.stream,
            model=k.model,
            model_version=k.model_version,
            schema_version=k.schema_version,
            created_ms=created_ms,
            seqs=r.seqs,
            scores=r.scores,
            times_ms=r.times,
            features=np.frombuffer(r.features, dtype=k.dtype.np_dtype).reshape(len(r), k.dim),
            scale=k.scale,
            meta=None if r.meta is None else tuple(r.meta),
            rescued=self.rescued,
        )

    # Per-record views, for diagnostics and tests; the uplink encodes ``records`` directly.
    @property
    def seqs(self) -> list[int]:
        return self.records.seqs.tolist()

    @property
    def scores(self) -> list[float]:
        return self.records.scores.tolist()

    @property
    def times_ms(self) -> list[int]:
        return self.records.times.tolist()

    @property
    def features(self) -> list[bytes]:
        rb, f = self.kind.record_bytes, self.records.features
        return [f[i * rb : (i + 1) * rb] for i in range(self.n)]

    @property
    def meta(self) -> list[dict[str, Any]] | None:
        return self.records.meta


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
    disk_budget_bytes: int | None = None  # what the filesystem can give the queue, in budget bytes
    disk_free_bytes: int | None = None
    disk_reserve_held: bool = False
    frame_max_bytes: int = 0  # frames are cut to this: min(uplink.frame_max_bytes, the cloud's limit)
    rescued_records: int = 0  # rescued from a set-aside queue file, not yet delivered
    rescued_bytes: int = 0

    @property
    def effective_budget_bytes(self) -> int:
        """The budget that binds now: min(configured, what the filesystem can give)."""
        if self.disk_budget_bytes is None:
            return self.budget_bytes
        return min(self.budget_bytes, self.disk_budget_bytes)

    @property
    def disk_limited(self) -> bool:
        return self.effective_budget_bytes < self.budget_bytes

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]
        d["oldest_age_s"] = (
            None if self.oldest_created_ms is None else max(0.0, (now_ms() - self.oldest_created_ms) / 1000)
        )
        d["effective_budget_bytes"] = self.effective_budget_bytes
        d["disk_limited"] = self.disk_limited
        return d


@dataclass(slots=True)
class _Staged:
    """A batch checked and given its seqs, waiting to be written in its transaction."""

    index: int
    kind: RecordKind
    first: int
    n: int
    records: Sequence[NewRecord] | RecordBatch
    nbytes: int


class _OverCeiling(Exception):
    """The append would take the database past the filesystem's ceiling and the policy
    forbids evicting: the transaction is undone and redone as on SQLITE_FULL."""


def _runs_of_one_kind(staged: list[_Staged]) -> list[list[_Staged]]:
    runs: list[list[_Staged]] = []
    for x in staged:
        if runs and runs[-1][-1].kind == x.kind:
            runs[-1].append(x)
        else:
            runs.append([x])
    return runs


class Store:
    """The queue file. Not thread-safe: one thread uses it (``AsyncQueue`` sees to that).

    ``frame_max_records`` / ``frame_max_bytes`` (the encoded frame) cap a chunk so that
    whole chunks always fit a frame: pass the uplink's frame limits.
    """

    def __init__(
        self,
        settings: StoreSettings,
        *,
        readonly: bool = False,
        frame_max_records: int = 1024,
        frame_max_bytes: int = 1024 * 1024,
    ) -> None:
        self.settings = settings
        self.path = Path(settings.path)
        self.floor_path = self.path.with_name(self.path.name + ".seqfloor")
        self.kinds_path = kinds_path(self.path)
        self.readonly = readonly
        # Frames are cut to these, and chunks never outgrow a frame; the uplink lowers them
        # to what the cloud takes (``set_frame_limits``).
        self.frame_max_records = frame_max_records
        self.frame_max_bytes = frame_max_bytes
        self.max_dim: int | None = None  # the cloud's, once known
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fs_bytes = filesystem_bytes(self.path.parent)
        # The WAL's share of the disk: an eighth of the budget and a sixteenth of the
        # filesystem, within 1..8 MiB.
        self.wal_limit_bytes = min(8 << 20, max(1 << 20, min(settings.budget_bytes // 8, fs_bytes // 16)))
        reserve = settings.reserve_bytes
        if reserve is None:
            reserve = min(8 << 20, max(1 << 20, fs_bytes // 16))
        # The WAL reaches its limit, plus the commit that crosses it before a checkpoint.
        self.disk = DiskRoom(self.path, reserve_bytes=reserve, wal_allowance_bytes=2 * self.wal_limit_bytes)
        self._page_size = 65536
        self._soft_cap_pages = MAX_PAGES  # used pages past this are evicted as disk_full
        self.corrupt_reset = False
        self.quarantined: Path | None = None  # the file this open set aside (edge_agent/rescue.py)
        self.commits = 0  # group commits done (benchmarks and tests read it)
        self._kinds: dict[RecordKind, int] = {}
        self._kinds_by_id: dict[int, RecordKind] = {}
        self._kinds_saved = -1
        self._ckpt_db: sqlite3.Connection | None = None
        if readonly:
            self._open_readonly()
            return
        self._lock = QueueLock(self.path)
        try:
            self.disk.ensure_reserve()
            self.db = self._open_checked()
        except BaseException:
            self._lock.close()
            raise
        self._page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        self._bytes = int(self.db.execute("SELECT total(nbytes) FROM chunks").fetchone()[0])
        self._next_seq = self._meta("next_seq", 1)
        self._floor_written = self._read_floor()
        self._chain_last = self._meta("chain_last", 0)
        self._rescued_rows = int(self.db.execute("SELECT count(*) FROM rescued").fetchone()[0])
        self._sync_score_index()

    # -- opening ----------------------------------------------------------

    def _connect(self, *, new: bool = False) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        if new:
            # Chunks are blobs of up to a frame: big pages mean short overflow chains,
            # which is what inserting and deleting a chunk costs (only settable at creation).
            db.execute("PRAGMA page_size=65536")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.settings.synchronous}")
        db.execute("PRAGMA foreign_keys=OFF")
        # Truncate the WAL back to its limit after a burst.
        db.execute(f"PRAGMA journal_size_limit={self.wal_limit_bytes}")
        # Checkpoints run on a connection of their own (``checkpoint``), so commits
        # rarely stop to copy the WAL into the database; past ``wal_limit_bytes`` a
        # commit checkpoints itself, so the WAL stays bounded without that task too.
        page = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA wal_autocheckpoint={max(4, self.wal_limit_bytes // page)}")
        return db

    def checkpoint(self) -> None:
        """Copy the WAL into the database without blocking the writer (any thread but the store's)."""
        if self._ckpt_db is None:
            self._ckpt_db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._ckpt_db.execute(f"PRAGMA synchronous={self.settings.synchronous}")
        # On a full disk this fails until the store's own thread gives up the reserve, when one
        # of its writes fails: not from here, where another process still filling the disk
        # would take the room before the queue could use it.
        self._ckpt_db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _open_readonly(self) -> None:
        if not self.path.exists():
            raise StoreError(f"{self.path}: no queue file")
        try:
            self.db = sqlite3.connect(
                self.path.absolute().as_uri() + "?mode=ro", uri=True, isolation_level=None
            )
            self._load_kinds()
            self.db.execute("SELECT count(*) FROM chunks").fetchone()
            self._page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
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
                    if is_disk_full(e) and self.disk.release():
                        return self._open_checked()  # the reserve is there for this
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
        db = self._connect(new=True)
        db.executescript(SCHEMA)
        self.db = db
        self._seed_sequence(db)
        if self.corrupt_reset:
            db.execute("INSERT INTO meta(key, value) VALUES ('corrupt_resets', 1)")
        return db

    def _seed_sequence(self, db: sqlite3.Connection) -> None:
        """A queue without a sequence (new, or emptied) starts above anything handed out."""
        if db.execute("SELECT 1 FROM meta WHERE key='next_seq'").fetchone():
            return
        top = db.execute("SELECT max(last_seq) FROM chunks").fetchone()[0] or 0
        seed = max(time.time_ns() // 1000, self._read_floor(), top + 1)
        db.execute("INSERT INTO meta(key, value) VALUES ('next_seq', ?)", (seed,))

    def _schema_problem(self, db: sqlite3.Connection) -> str | None:
        cols = {r[1] for r in db.execute("PRAGMA table_info(chunks)")}
        if not {"seqs", "features", "nbytes"} <= cols:
            return "chunks table has an unknown layout"
        if "crc" not in cols:  # a queue of an earlier version: its rows keep crc NULL
            db.execute("ALTER TABLE chunks ADD COLUMN crc INTEGER")
        return None

    def _quarantine(self, problem: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        base = f"{self.path}.corrupt-{stamp}"
        n = 0
        while any(Path(base + s).exists() for s in ("", "-wal", "-shm")):
            n += 1
            base = f"{self.path}.corrupt-{stamp}-{n}"
        moved = []
        for suffix in ("", "-wal", "-shm", KINDS_SUFFIX):
            src = Path(str(self.path) + suffix)
            if src.exists():
                dst = Path(base + suffix)
                os.replace(src, dst)
                moved.append(dst.name)
        self.corrupt_reset = True
        self.quarantined = Path(base)
        log.error(
            "queue %s failed its integrity check (%s); moved aside as %s and starting a fresh queue",
            self.path,
            problem,
            ", ".join(moved),
        )

    def _save_kinds(self) -> None:
        """The kinds beside the queue, after a commit that added one: a rescue needs them to
        read the records of a file whose ``kinds`` page is damaged (``rescue.py``)."""
        if len(self._kinds_by_id) == self._kinds_saved:
            return
        doc = {str(kid): kind_doc(k) for kid, k in sorted(self._kinds_by_id.items())}
        try:
            write_atomic(self.kinds_path, json.dumps(doc).encode())
        except OSError as e:
            log.warning(
                "could not write %s (%s); a rescue of this queue would need its kinds table",
                self.kinds_path,
                e,
            )
            return
        self._kinds_saved = len(self._kinds_by_id)

    def _load_kinds(self) -> None:
        for row in self.db.execute(
            "SELECT id, stream, model, model_version, schema_version, dtype, dim, scale FROM kinds"
        ):
            k = RecordKind.from_row(row)
            self._kinds[k] = row[0]
            self._kinds_by_id[row[0]] = k

    def _sync_score_index(self) -> None:
        # The index only pays for itself under the score policy.
        if self.settings.policy is EvictionPolicy.LOWEST_SCORE:
            self.db.execute("CREATE INDEX IF NOT EXISTS chunks_by_score ON chunks(min_score, key)")
        else:
            self.db.execute("DROP INDEX IF EXISTS chunks_by_score")

    def _meta(self, key: str, default: int) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None or row[0] is None else int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _read_floor(self) -> int:
        try:
            return int(self.floor_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _write_floor(self, floor: int) -> None:
        write_atomic(self.floor_path, f"{floor}\n".encode())
        self._floor_written = floor

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._ckpt_db is not None:
                self._ckpt_db.close()
        with contextlib.suppress(Exception):
            if not self.readonly:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.close()
        if not self.readonly:
            self._lock.close()

    # -- writing ----------------------------------------------------------

    @contextlib.contextmanager
    def _txn(self) -> Iterator[None]:
        """One write transaction: committed at the end of the block, rolled back on any error."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                self.db.execute("ROLLBACK")
            raise

    def _kind_id(self, kind: RecordKind) -> int:
        kid = self._kinds.get(kind)
        if kid is None:
            cur = self.db.execute(
                "INSERT INTO kinds(stream, model, model_version, schema_version, dtype, dim, scale) "
                "VALUES (?,?,?,?,?,?,?)",
                (
                    kind.stream,
                    kind.model,
                    kind.model_version,
                    kind.schema_version,
                    int(kind.dtype),
                    kind.dim,
                    kind.scale,
                ),
            )
            kid = int(cur.lastrowid or 0)
            self._kinds[kind] = kid
            self._kinds_by_id[kid] = kind
        return kid

    def append_many(
        self,
        batches: Sequence[tuple[RecordKind, Sequence[NewRecord] | RecordBatch]],
        write_behind: Sequence[bool] | None = None,
    ) -> list[Appended | Exception]:
        """Append several producers' batches in ONE transaction (group commit).

        Consecutive batches of one kind share chunk rows, so many small
        producers cost what one big one does. Each batch gets its own result:
        its seq range, or the exception that refused it (``QueueFull`` under the
        block policy, ``RecordTooLarge`` for a record no frame can carry,
        ``StoreError`` for a bad batch or one the full disk cannot take) without
        failing the others. A refused batch whose producer is not waiting
        (``write_behind``) is counted as lost, reason ``refused``: nobody else
        would hear of it.

        The filesystem bounds the queue as the budget does: past the ceiling of
        ``DiskRoom``, records are evicted by policy in the same transaction and
        counted as ``disk_full`` (see ``edge_agent/disk.py``).
        """
        failed: dict[int, Exception] = {}
        made_room = False
        merge = True
        while True:
            snapshot = self._snapshot()
            results: dict[int, Appended | Exception] = dict(failed)
            current: int | None = None
            try:
                self._set_ceiling()
                self.db.execute("BEGIN IMMEDIATE")
                staged: list[_Staged] = []
                for i, (kind, records) in enumerate(batches):
                    if i not in failed:
                        r = self._stage(i, kind, records)
                        if isinstance(r, Exception):
                            results[i] = r
                        elif len(records):
                            staged.append(r)
                        else:
                            results[i] = Appended(0, 0, 0)
                groups = _runs_of_one_kind(staged) if merge else [[x] for x in staged]
                for group in groups:
                    current = None if merge else group[0].index
                    self._write(group)
                current = None
                evicted = 0
                excess = self._bytes - self.settings.budget_bytes
                if excess > 0:
                    evicted = self._evict(excess, self.settings.policy.value)
                evicted += self._evict_to_ceiling()
                for x in staged:
                    results[x.index] = Appended(x.first, x.first + x.n - 1, evicted)
                for i, res in results.items():
                    if isinstance(res, Exception) and write_behind is not None and write_behind[i]:
                        kind, records = batches[i]
                        n = len(records)
                        self._count_loss("refused", n, n * (kind.record_bytes + ROW_OVERHEAD))
                        log.error("write-behind batch of %d records refused: %s", n, res)
                self._set_meta("next_seq", self._next_seq)
                self._raise_floor()
                self.db.execute("COMMIT")
                self._save_kinds()
                break
            except (sqlite3.OperationalError, _OverCeiling) as e:
                # SQLite may roll a transaction back by itself on SQLITE_FULL, so the
                # whole group is redone: once after making room, then batch by batch
                # to find the one that does not fit, then without it.
                self._rollback(snapshot)
                if not isinstance(e, _OverCeiling) and not is_disk_full(e):
                    raise
                self._lift_ceiling()  # making room rewrites chunks: it needs pages of its own
                if not made_room:
                    if self._fs_really_full():
                        self._rescue()
                    need = sum(len(r) * (k.record_bytes + ROW_OVERHEAD) for k, r in batches) * 2
                    self._make_room_on_disk(max(need, 256 * 1024))
                    made_room = True
                elif merge:
                    merge = False
                elif current is not None:
                    failed[current] = self._no_room(len(batches[current][1]))
                elif len(failed) < len(batches):
                    # What does not fit is not one batch: the queue holds only frames in flight.
                    for i, (_kind, records) in enumerate(batches):
                        failed.setdefault(i, self._no_room(len(records)))
                else:
                    # Not even the bookkeeping of the refusals fits: answer without a commit.
                    log.error("disk full: %d batches refused, nothing written to %s", len(batches), self.path)
                    return [failed[i] for i in range(len(batches))]
            except BaseException:
                self._rollback(snapshot)
                raise
            finally:
                self._lift_ceiling()
        self.commits += 1
        return [results[i] for i in range(len(batches))]

    def _fs_really_full(self) -> bool:
        """Not our ceiling but the filesystem itself: another process may have filled it."""
        return self._free_bytes() < self.wal_limit_bytes

    def _no_room(self, n: int) -> StoreError:
        if self.settings.policy is EvictionPolicy.BLOCK:
            return QueueFull(
                f"queue {self.path}: the filesystem is full and the policy is 'block': {n} records refused"
            )
        return DiskFull(
            f"{self.path}: disk full: a batch of {n} records does not fit even after evicting by policy "
            "(what is left is in flight to the cloud)"
        )

    # -- the filesystem's ceiling (edge_agent/disk.py) ----------------------

    def _set_ceiling(self) -> None:
        """Before an append: how many pages the filesystem lets the database hold (soft: past
        it, evict by policy), and a hard cap a transaction's slack above it."""
        try:
            cap = self.disk.capacity_bytes()
        except OSError as e:
            log.warning("cannot read the filesystem of %s: %s", self.path, e)
            return
        self._soft_cap_pages = self._soft_cap(cap)
        self.db.execute(f"PRAGMA max_page_count={max(1, cap // self._page_size)}")

    def _soft_cap(self, capacity_bytes: int) -> int:
        """Pages in use past which appends evict: a transaction's slack under the hard cap."""
        # an append's own pages, and a chunk that eviction rewrites before it frees the old one
        slack = max(2 * self._page_size, min(self.wal_limit_bytes // 2, capacity_bytes // 8))
        slack += self.frame_max_bytes
        return max(0, capacity_bytes - slack) // self._page_size

    def _lift_ceiling(self) -> None:
        # Evicting, cutting frames and deleting receipted records must never hit the cap.
        with contextlib.suppress(sqlite3.Error):
            self.db.execute(f"PRAGMA max_page_count={MAX_PAGES}")

    def _pages_used(self) -> int:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        return int(pages) - int(self.db.execute("PRAGMA freelist_count").fetchone()[0])

    def _evict_to_ceiling(self) -> int:
        """Inside the append's transaction: evict by policy (``disk_full``) what takes the pages in
        use past the filesystem's ceiling, in budget bytes at the rate the queue fills pages now
        (evicting frees room inside pages before it frees whole pages, and that rate shows it)."""
        used = self._pages_used()
        over = used - self._soft_cap_pages
        if over <= 0:
            return 0
        if self.settings.policy is EvictionPolicy.BLOCK:
            raise _OverCeiling
        ratio = max(1.0, used * self._page_size / self._bytes) if self._bytes else 1.0
        return self._evict(int(over * self._page_size / ratio) + 1, "disk_full")

    def _make_room_on_disk(self, nbytes: int) -> None:
        """The disk filled during an append: evict by policy (counted as ``disk_full``); SQLite
        reuses the freed pages. Another process filling the filesystem leaves the WAL no
        room even for that: then the reserve is given up for it."""
        if self.settings.policy is EvictionPolicy.BLOCK:
            return
        try:
            freed = self._roomy(self._evict_committed, nbytes)
        except DiskFull as e:
            log.error("disk full while writing %s, and no room even to evict: %s", self.path, e)
            return  # the batches are refused (DiskFull): the producers try again later
        log.error("disk full while writing %s; evicted %d records to make room", self.path, freed)

    def _evict_committed(self, nbytes: int) -> int:
        snap = self._snapshot()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            freed = self._evict(nbytes, "disk_full")
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback(snap)
            raise
        return freed

    def _rescue(self) -> bool:
        """The filesystem is full: hand the WAL's blocks back to it (a checkpoint that truncates
        the WAL needs no room unless the database must grow), and if the filesystem is still
        full, the reserve. False if neither gave anything back."""
        before = self._free_bytes()
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError as e:
            if not is_disk_full(e):
                raise
        gained = self._free_bytes() > before
        if gained and not self._fs_really_full():
            log.warning("the filesystem of %s is full: truncated the WAL to make room", self.path)
            return True
        return self.disk.release() or gained

    def _free_bytes(self) -> int:
        """What the filesystem has free (0 if it cannot be read: take it as full)."""
        try:
            return self.disk.view().free_bytes
        except OSError:
            return 0

    def _roomy(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a write that must not fail for space (eviction, frames, receipts): if the
        filesystem is full, give back the WAL's blocks or the reserve and try again."""
        for _ in range(3):
            try:
                return fn(*args)
            except sqlite3.OperationalError as e:
                if not is_disk_full(e):
                    raise
                if not self._rescue():
                    raise DiskFull(f"{self.path}: the filesystem is full, the reserve spent: {e}") from e
        try:
            return fn(*args)
        except sqlite3.OperationalError as e:
            if is_disk_full(e):
                raise DiskFull(f"{self.path}: the filesystem is full, the reserve spent: {e}") from e
            raise

    def _raise_floor(self) -> None:
        """Keep the side file's floor above every seq this commit hands out (written before
        the commit, so a batch of any size is covered). A failure to write it (a full
        disk) must not fail the producers: it is retried at the next commit."""
        if self._next_seq + SEQ_FLOOR_STEP // 2 <= self._floor_written:
            return
        try:
            self._write_floor(self._next_seq + SEQ_FLOOR_STEP)
        except OSError as e:
            log.warning("could not write the sequence floor %s (will retry): %s", self.floor_path, e)

    def _snapshot(self) -> tuple[int, int, dict[RecordKind, int]]:
        return self._next_seq, self._bytes, dict(self._kinds)

    def _rollback(self, snap: tuple[int, int, dict[RecordKind, int]]) -> None:
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
        self._next_seq, self._bytes, self._kinds = snap[0], snap[1], dict(snap[2])
        self._kinds_by_id = {v: k for k, v in self._kinds.items()}

    def _stage(
        self, index: int, kind: RecordKind, records: Sequence[NewRecord] | RecordBatch
    ) -> _Staged | Exception:
        """Check one batch and give it its seqs and its share of the budget (written later)."""
        n = len(records)
        if kind not in self._kinds:
            # Whatever is queued must encode as a frame later, or it would block the queue.
            try:
                kind.check()
            except WireError as e:
                return StoreError(f"stream {kind.stream!r}: {e}")
        rb = kind.record_bytes
        where = f"stream {kind.stream!r}"
        try:
            if isinstance(records, RecordBatch):
                records = RecordBatch.of(records, rb)
                metas = records.meta
                if metas is not None and len(metas) != n:
                    raise StoreError(f"{len(metas)} metadata objects for {n} records")
            else:
                for i, r in enumerate(records):
                    if len(r.features) != rb:
                        raise StoreError(f"record {i}: {len(r.features)} feature bytes, expected {rb}")
                metas = [r.meta or {} for r in records] if any(r.meta for r in records) else None
            meta_lens = [len(_json(m)) if m else 0 for m in metas] if metas else [0]
        except (StoreError, TypeError, ValueError) as e:
            return StoreError(f"{where}: {e} ({kind.dim} x {kind.dtype.name.lower()})")
        too_large = self._too_large(kind, max(meta_lens))
        if too_large is not None:
            return RecordTooLarge(f"{where}: {too_large}; none of the {n} records queued")
        nbytes = n * (rb + ROW_OVERHEAD) + (sum(meta_lens) if metas else 0)
        budget = self.settings.budget_bytes
        if self.settings.policy is EvictionPolicy.BLOCK and self._bytes + nbytes > budget:
            return QueueFull(
                f"queue {self.path} is full ({self._bytes} of {budget} bytes) and the policy is "
                f"'block': {n} records refused"
            )
        staged = _Staged(index, kind, self._next_seq, n, records, nbytes)
        self._next_seq += n
        self._bytes += nbytes
        return staged

    def _too_large(self, kind: RecordKind, meta_len: int) -> str | None:
        """Why one record of ``kind`` fits no frame, or None. A frame is what reaches the cloud
        whole, so a record that fits none would never leave the device."""
        if self.max_dim is not None and kind.dim > self.max_dim:
            return f"a record of dim {kind.dim} is wider than the cloud takes (max_dim {self.max_dim})"
        alone = kind.frame_overhead + kind.record_bytes + RECORD_WIRE_OVERHEAD + meta_len
        if alone > self.frame_max_bytes:
            return (
                f"a record of {kind.record_bytes} feature bytes and {meta_len} bytes of metadata makes a "
                f"{alone}-byte frame, over the frame limit of {self.frame_max_bytes} bytes"
            )
        return None

    def set_frame_limits(self, max_records: int, max_bytes: int, max_dim: int | None = None) -> None:
        """Frames (and so chunks) no larger than this from now on; what is queued is cut to fit
        when framed (``next_frames``, ``recut_frame``)."""
        self.frame_max_records, self.frame_max_bytes, self.max_dim = max_records, max_bytes, max_dim

    def _bounds(
        self, cols: Columns, kind: RecordKind, sizes: np.ndarray | None, most: int, max_bytes: int
    ) -> list[int]:
        """Where to split records into pieces that a frame of these limits carries whole (at
        least one record each)."""
        n, rb = len(cols), kind.record_bytes
        room = max(1, max_bytes - kind.frame_overhead)
        if sizes is None:
            per = max(1, min(most, room // (rb + RECORD_WIRE_OVERHEAD)))
            return [*range(0, n, per), n]
        wire = (sizes - WIRE_SAVING).tolist()
        bounds = [0]
        total = 0
        for i, size in enumerate(wire):
            if i > bounds[-1] and (i - bounds[-1] >= most or total + size > room):
                bounds.append(i)
                total = 0
            total += size
        bounds.append(n)
        return bounds

    def _write(self, group: list[_Staged]) -> None:
        """Insert staged batches of one kind, with consecutive seqs, as chunk rows."""
        kind = group[0].kind
        rb = kind.record_bytes
        # Producers' record lists become one column batch each run (no numpy call per batch).
        parts: list[RecordBatch] = []
        loose: list[NewRecord] = []
        for x in group:
            if isinstance(x.records, RecordBatch):
                if loose:
                    parts.append(RecordBatch.of(loose, rb))
                    loose = []
                parts.append(x.records)
            else:
                loose.extend(x.records)
        if loose:
            parts.append(RecordBatch.of(loose, rb))
        n = sum(x.n for x in group)
        now = now_ms()
        metas = None
        if any(p.meta is not None for p in parts):
            metas = [m for p in parts for m in (p.meta if p.meta is not None else [{}] * len(p))]
        cols = Columns(
            seqs=np.arange(group[0].first, group[0].first + n, dtype=U64),
            scores=np.concatenate([np.asarray(p.scores, dtype=F32) for p in parts]),
            times=np.concatenate(
                [
                    np.full(len(p), now, dtype=U64) if p.created_ms is None else np.asarray(p.created_ms, U64)
                    for p in parts
                ]
            ),
            features=b"".join(p.features for p in parts) if len(parts) > 1 else parts[0].features,
            meta=metas,
        )
        kid = self._kind_id(kind)
        # Split into chunks that a frame can always carry whole.
        sizes = None if metas is None else cols.sizes(rb)
        rows = [
            self._chunk_row(
                kid,
                cols.slice(lo, hi, rb),
                (hi - lo) * (rb + ROW_OVERHEAD) if sizes is None else int(sizes[lo:hi].sum()),
            )
            for lo, hi in itertools.pairwise(
                self._bounds(cols, kind, sizes, self.frame_max_records, self.frame_max_bytes)
            )
        ]
        self.db.executemany(_insert("chunks"), rows)

    @staticmethod
    def _chunk_row(kid: int, c: Columns, nbytes: int, key: int | None = None) -> tuple[Any, ...]:
        seqs, scores, times = (
            c.seqs.astype(U64).tobytes(),
            c.scores.astype(F32).tobytes(),
            c.times.astype(U64).tobytes(),
        )
        meta = None if c.meta is None else _json(c.meta)
        return (
            int(c.seqs[0]) if key is None else key,
            int(c.seqs[-1]),
            len(c),
            kid,
            int(c.times.min()),
            float(c.scores.min()),
            nbytes,
            seqs,
            scores,
            times,
            c.features,
            meta,
            row_crc(seqs, scores, times, c.features, meta),
        )

    @staticmethod
    def _columns(row: Sequence[Any]) -> Columns:
        """A chunk row (``CHUNK_COLUMNS`` order) back into columns."""
        return Columns(
            np.frombuffer(row[7], dtype=U64),
            np.frombuffer(row[8], dtype=F32),
            np.frombuffer(row[9], dtype=U64),
            row[10],
            None if row[11] is None else json.loads(row[11]),
        )

    # -- eviction ---------------------------------------------------------

    def _evict(self, excess: int, reason: str) -> int:
        """Remove at least ``excess`` bytes of unframed records, in policy order; count them."""
        if excess <= 0:
            return 0
        if self.settings.policy is EvictionPolicy.LOWEST_SCORE:
            if reason == "disk_full":
                return self._evict_chunks(self._pick_chunks_by_top_score(excess), reason)
            doomed = self._pick_lowest_scores(excess)
        else:
            doomed = self._pick_oldest(excess)
        count = freed = 0
        for row, drop in doomed:
            kind = self._kinds_by_id[row[3]]
            cols = self._columns(row)
            sizes = cols.sizes(kind.record_bytes)
            count += int(drop.sum())
            freed += int(sizes[drop].sum())
            if drop.all():
                self.db.execute("DELETE FROM chunks WHERE key=?", (row[0],))
                continue
            keep = ~drop
            rest = cols.take(keep, kind.record_bytes)
            new = self._chunk_row(row[3], rest, int(sizes[keep].sum()), key=row[0])
            self.db.execute(_SET_CHUNK, (*new, row[0]))
        if count:
            self._count_loss(reason, count, freed)
            self._bytes -= freed
            log.warning("queue: evicted %d records (%d bytes), reason %s", count, freed, reason)
        return count

    def _unframed(self, order: str) -> Iterator[tuple[Any, ...]]:
        yield from self.db.execute(
            f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE key > ? ORDER BY {order}", (self._chain_last,)
        )

    def _pick_oldest(self, excess: int) -> list[tuple[tuple[Any, ...], np.ndarray]]:
        picked = []
        for row in self._unframed("key"):
            sizes = self._columns(row).sizes(self._kinds_by_id[row[3]].record_bytes)
            drop = np.cumsum(sizes) - sizes < excess  # records until the excess is covered
            picked.append((row, drop))
            excess -= int(sizes[drop].sum())
            if excess <= 0:
                break
        return picked

    def _pick_chunks_by_top_score(self, excess: int) -> list[tuple[int, int, int]]:
        """Whole unframed chunks, those whose best record scores lowest first, covering ``excess``:
        (key, records, bytes) each. The lowest-score policy on a full disk: picking records one
        by one rewrites every chunk they sit in, and rewriting needs the disk that is missing;
        deleting whole chunks needs next to none. A chunk with a high-scoring record is kept."""
        heads = self.db.execute(
            "SELECT key, n, nbytes, scores FROM chunks WHERE key > ?", (self._chain_last,)
        ).fetchall()
        ranked = sorted((float(np.frombuffer(sc, dtype=F32).max()), key, n, nb) for key, n, nb, sc in heads)
        picked: list[tuple[int, int, int]] = []
        for _top, key, n, nb in ranked:
            if excess <= 0:
                break
            picked.append((key, n, nb))
            excess -= nb
        return picked

    def _evict_chunks(self, chunks: list[tuple[int, int, int]], reason: str) -> int:
        if not chunks:
            return 0
        self.db.executemany("DELETE FROM chunks WHERE key=?", [(key,) for key, _, _ in chunks])
        count, freed = sum(c[1] for c in chunks), sum(c[2] for c in chunks)
        self._count_loss(reason, count, freed)
        self._bytes -= freed
        log.warning("queue: evicted %d records (%d bytes, whole chunks), reason %s", count, freed, reason)
        return count

    def _pick_lowest_scores(self, excess: int) -> list[tuple[tuple[Any, ...], np.ndarray]]:
        """The records with the lowest (score, seq) whose sizes cover ``excess``, across chunks."""
        rows: list[tuple[Any, ...]] = []
        scores: list[np.ndarray] = []
        seqs: list[np.ndarray] = []
        sizes: list[np.ndarray] = []
        for row in self._unframed("min_score, key"):
            if rows:
                # Enough already among records scoring below anything not yet loaded?
                s, z = np.concatenate(scores), np.concatenate(sizes)
                if int(z[s < row[5]].sum()) >= excess:
                    break
            cols = self._columns(row)
            rows.append(row)
            scores.append(cols.scores)
            seqs.append(cols.seqs)
            sizes.append(cols.sizes(self._kinds_by_id[row[3]].record_bytes))
        if not rows:
            return []
        all_scores, all_seqs, all_sizes = np.concatenate(scores), np.concatenate(seqs), np.concatenate(sizes)
        order = np.lexsort((all_seqs, all_scores))
        covered = np.cumsum(all_sizes[order])
        k = int(np.searchsorted(covered, excess)) + 1
        drop_all = np.zeros(len(all_scores), dtype=bool)
        drop_all[order[:k]] = True
        picked = []
        at = 0
        for row, sc in zip(rows, scores, strict=True):
            drop = drop_all[at : at + len(sc)]
            at += len(sc)
            if drop.any():
                picked.append((row, drop))
        return picked

    def _count_delivered(self, records: int) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES ('delivered', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (records,),
        )
        self._set_meta("last_receipt_ms", now_ms())

    def _count_loss(self, reason: str, records: int, nbytes: int) -> None:
        self.db.execute(
            "INSERT INTO evictions(reason, records, bytes) VALUES (?, ?, ?) "
            "ON CONFLICT(reason) DO UPDATE SET records = records + excluded.records, "
            "bytes = bytes + excluded.bytes",
            (reason, records, nbytes),
        )

    # -- frames -----------------------------------------------------------

    def next_frame(self, max_records: int, max_bytes: int) -> FrameRows | None:
        """Assign the oldest unframed chunks (whole, one kind) to a new frame and persist it."""
        frames = self.next_frames(1, max_records, max_bytes)
        return frames[0] if frames else None

    def next_frames(self, count: int, max_records: int, max_bytes: int) -> list[FrameRows]:
        """Cut up to ``count`` frames from the oldest unframed chunks, persisted in one commit
        (the frames must be durable before they are sent: a re-send must be the same upload).

        ``max_bytes`` bounds the encoded frame; a chunk written under a larger limit is split
        first, so a frame always fits the limits it was cut for."""
        return self._roomy(self._next_frames, count, max_records, max_bytes)

    def _next_frames(self, count: int, max_records: int, max_bytes: int) -> list[FrameRows]:
        with self._txn():
            cuts = self._plan_splitting(self._chain_last, None, count, max_records, max_bytes)
            frames = self._insert_frames(self._chain_last, cuts)
            if frames:
                self._set_meta("chain_last", frames[-1].last_seq)
        if frames:
            self._chain_last = frames[-1].last_seq
        return frames

    def recut_frame(self, first_seq: int, max_records: int, max_bytes: int) -> list[FrameRows]:
        """Cut a frame in flight again, smaller (the cloud said TOO_LARGE, so it stored none of
        it): the same records, the same chain ends, more frames. [] if there is no such frame."""
        return self._roomy(self._recut_frame, first_seq, max_records, max_bytes)

    def _recut_frame(self, first_seq: int, max_records: int, max_bytes: int) -> list[FrameRows]:
        frames: list[FrameRows] = []
        with self._txn():
            row = self.db.execute(
                "SELECT last_seq, prev_seq, chunk_lo FROM frames WHERE first_seq=?", (first_seq,)
            ).fetchone()
            if row is not None:
                last, prev, lo = row
                cuts = self._plan_splitting(lo - 1, last, 1 << 30, max_records, max_bytes)
                self.db.execute("DELETE FROM frames WHERE first_seq=?", (first_seq,))
                frames = self._insert_frames(prev, cuts)
        return frames

    def _plan_splitting(
        self, after: int, upto: int | None, count: int, max_records: int, max_bytes: int
    ) -> list[tuple[int, int, int, int]]:
        """``_plan``, splitting the chunks no frame can carry whole (inside the caller's
        transaction) until there are none."""
        while True:
            cuts, oversized = self._plan(after, upto, count, max_records, max_bytes)
            if oversized is None:
                return cuts
            self._split_chunk(oversized, max_records, max_bytes)

    def _plan(
        self, after: int, upto: int | None, count: int, max_records: int, max_bytes: int
    ) -> tuple[list[tuple[int, int, int, int]], int | None]:
        """Group the chunks with keys in (after, upto] into at most ``count`` frames of whole
        chunks of one kind, in seq order: (first key, last key, records, charged bytes) each.
        Or, second, the key of the first chunk that no frame of these limits carries whole."""
        cuts: list[tuple[int, int, int, int]] = []
        cur: list[int] | None = None  # [first key, last key, records, charged, wire bytes, kind]
        sql = "SELECT key, n, kind, nbytes FROM chunks WHERE key > ?"
        args: tuple[int, ...] = (after,)
        if upto is not None:
            sql, args = sql + " AND key <= ?", (after, upto)
        # Walk the covering index only as far as needed.
        rows = self.db.execute(sql + " ORDER BY key", args)
        try:
            for key, cn, ck, cb in rows:
                room = max_bytes - self._kinds_by_id[ck].frame_overhead
                wire = cb - cn * WIRE_SAVING
                if cn > 1 and (cn > max_records or wire > room):
                    return cuts, key
                if cur is not None and (ck != cur[5] or cur[2] + cn > max_records or cur[4] + wire > room):
                    cuts.append((cur[0], cur[1], cur[2], cur[3]))
                    cur = None
                    if len(cuts) == count:
                        break
                if cur is None:
                    cur = [key, key, 0, 0, 0, ck]
                cur[1], cur[2], cur[3], cur[4] = key, cur[2] + cn, cur[3] + cb, cur[4] + wire
        finally:
            rows.close()
        if cur is not None and len(cuts) < count:
            cuts.append((cur[0], cur[1], cur[2], cur[3]))
        return cuts, None

    def _split_chunk(self, key: int, max_records: int, max_bytes: int) -> None:
        """One chunk row into several that frames of these limits carry whole (keys: the
        first seq of each; seqs of a chunk belong to no other, so the keys are free)."""
        row = self.db.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE key=?", (key,)).fetchone()
        kind = self._kinds_by_id[row[3]]
        cols = self._columns(row)
        sizes = cols.sizes(kind.record_bytes)
        bounds = self._bounds(cols, kind, sizes, max_records, max_bytes)
        pieces = [
            self._chunk_row(row[3], cols.slice(lo, hi, kind.record_bytes), int(sizes[lo:hi].sum()))
            for lo, hi in itertools.pairwise(bounds)
        ]
        first = (key, *pieces[0][1:])
        self.db.execute(_SET_CHUNK, (*first, key))
        self.db.executemany(_insert("chunks"), pieces[1:])
        log.info("queue: split a chunk of %d records into %d to fit frames of %d bytes", len(cols),
                 len(pieces), max_bytes)  # fmt: skip

    def _insert_frames(self, prev: int, cuts: list[tuple[int, int, int, int]]) -> list[FrameRows]:
        """Persist frames over these cuts, chained from ``prev`` (inside the caller's transaction)."""
        frames: list[FrameRows] = []
        rows_out = []
        for lo, hi, n, total in cuts:
            rows = self.db.execute(
                f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE key BETWEEN ? AND ? ORDER BY key", (lo, hi)
            ).fetchall()
            frame = self._frame(prev, rows)
            frames.append(frame)
            rows_out.append((frame.first_seq, frame.last_seq, frame.prev_seq, lo, n, total, now_ms()))
            prev = frame.last_seq
        self.db.executemany(
            "INSERT INTO frames(first_seq, last_seq, prev_seq, chunk_lo, n, nbytes, created_ms) "
            "VALUES (?,?,?,?,?,?,?)",
            rows_out,
        )
        return frames

    def _frame(self, prev_seq: int, rows: list[tuple[Any, ...]]) -> FrameRows:
        cols = Columns.concat([self._columns(r) for r in rows])
        return FrameRows(
            first_seq=int(cols.seqs[0]),
            last_seq=int(cols.seqs[-1]),
            prev_seq=prev_seq,
            kind=self._kinds_by_id[rows[0][3]],
            records=cols,
            nbytes=sum(r[6] for r in rows),
        )

    def open_frames(self) -> list[FrameRows]:
        """Frames assigned and not yet receipted, oldest first (to re-send after a restart)."""
        frames = []
        for _first, last, prev, lo in self.db.execute(
            "SELECT first_seq, last_seq, prev_seq, chunk_lo FROM frames ORDER BY first_seq"
        ).fetchall():
            rows = self.db.execute(
                f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE key BETWEEN ? AND ? ORDER BY key", (lo, last)
            ).fetchall()
            if rows:
                frames.append(self._frame(prev, rows))
        return frames

    def set_frame_prev(self, first_seq: int, prev_seq: int) -> None:
        self._roomy(self.db.execute, "UPDATE frames SET prev_seq=? WHERE first_seq=?", (prev_seq, first_seq))

    def saved_limits(self) -> tuple[int, int, int] | None:
        """The cloud's frame limits as last told (max_frame_bytes, max_records, max_dim)."""
        got = [self._meta(k, 0) for k in ("cloud_max_frame_bytes", "cloud_max_records", "cloud_max_dim")]
        return (got[0], got[1], got[2]) if all(got) else None

    def save_limits(self, max_frame_bytes: int, max_records: int, max_dim: int) -> None:
        def save() -> None:
            with self._txn():
                for k, v in (
                    ("cloud_max_frame_bytes", max_frame_bytes),
                    ("cloud_max_records", max_records),
                    ("cloud_max_dim", max_dim),
                ):
                    self._set_meta(k, v)

        self._roomy(save)

    def finish_frame(self, first_seq: int, last_seq: int, loss_reason: str | None = None) -> int:
        """Remove a frame's records: delivered (receipt) or, with a reason, counted as lost."""
        return self.finish_frames([(first_seq, last_seq, loss_reason)])[0]

    def finish_frames(self, done: Sequence[tuple[int, int, str | None]]) -> list[int]:
        """Remove frames' records in one commit; each (first_seq, last_seq, loss reason or None).

        No fsync of its own: if a crash forgets these deletes, the frames are sent
        again and the cloud answers DUPLICATE. The next synced commit makes them
        durable (the WAL is written in order).
        """
        return self._roomy(self._finish_frames, done)

    def _finish_frames(self, done: Sequence[tuple[int, int, str | None]]) -> list[int]:
        self.db.execute("PRAGMA synchronous=NORMAL")
        freed_total = 0
        counts: list[int] = []
        try:
            with self._txn():
                delivered = 0
                for first_seq, last_seq, loss_reason in done:
                    row = self.db.execute(
                        "SELECT chunk_lo FROM frames WHERE first_seq=?", (first_seq,)
                    ).fetchone()
                    lo = row[0] if row else first_seq
                    freed = self.db.execute(
                        "DELETE FROM chunks WHERE key BETWEEN ? AND ? RETURNING n, nbytes", (lo, last_seq)
                    ).fetchall()
                    self.db.execute("DELETE FROM frames WHERE first_seq=?", (first_seq,))
                    n = sum(r[0] for r in freed)
                    nbytes = sum(r[1] for r in freed)
                    freed_total += nbytes
                    counts.append(n)
                    if loss_reason is not None:
                        self._count_loss(loss_reason, n, nbytes)
                    else:
                        delivered += n
                if delivered:
                    self._count_delivered(delivered)
        finally:
            self.db.execute(f"PRAGMA synchronous={self.settings.synchronous}")
        self._bytes -= freed_total
        return counts

    # -- rescued records (edge_agent/rescue.py) --------------------------------

    def add_rescued(self, groups: Sequence[tuple[RecordKind, Columns]], lost: int, lost_bytes: int) -> int:
        """Queue records read back from a set-aside file, with their own seqs, and count what
        could not be read (``lost``) as lost, reason ``corrupt``; one transaction. A group
        already here (the same file rescued again) is left as it is. Returns records added."""

        def add() -> int:
            added = 0
            with self._txn():
                for kind, cols in groups:
                    kid = self._kind_id(kind)
                    nbytes = int(cols.sizes(kind.record_bytes).sum())
                    cur = self.db.execute(
                        _insert("rescued", "OR IGNORE"),
                        self._chunk_row(kid, cols, nbytes),
                    )
                    added += len(cols) if cur.rowcount else 0
                if lost:
                    self._count_loss("corrupt", lost, lost_bytes)
            return added

        snapshot = self._snapshot()
        try:
            added = self._roomy(add)
        except BaseException:
            self._rollback(snapshot)
            raise
        self._save_kinds()
        self._rescued_rows = int(self.db.execute("SELECT count(*) FROM rescued").fetchone()[0])
        return added

    @property
    def has_rescued(self) -> bool:
        return self._rescued_rows > 0

    def next_rescued(self, max_records: int, max_bytes: int) -> FrameRows | None:
        """The oldest rescued records of one kind that fit a frame (not persisted: the same
        rows and limits always give the same frame, and the cloud tells repeats by seq)."""
        parts: list[Columns] = []
        kid: int | None = None
        n = size = 0
        for row in self.db.execute(f"SELECT {CHUNK_COLUMNS} FROM rescued ORDER BY key"):
            if kid is not None and row[3] != kid:
                break
            kid = row[3]
            kind = self._kinds_by_id[kid]
            cols = self._columns(row)
            sizes = cols.sizes(kind.record_bytes) - WIRE_SAVING
            room = max_bytes - kind.frame_overhead - size
            take = min(len(cols), max_records - n, int(np.searchsorted(np.cumsum(sizes), room, side="right")))
            if take <= 0:
                if not parts:  # one record always goes; the cloud says if it is too large
                    parts.append(cols.slice(0, 1, kind.record_bytes))
                break
            parts.append(cols.slice(0, take, kind.record_bytes))
            n += take
            size += int(sizes[:take].sum())
            if take < len(cols) or n >= max_records:
                break
        if kid is None:
            return None
        recs = Columns.concat(parts)
        kind = self._kinds_by_id[kid]
        return FrameRows(
            first_seq=int(recs.seqs[0]),
            last_seq=int(recs.seqs[-1]),
            prev_seq=0,
            kind=kind,
            records=recs,
            nbytes=int(recs.sizes(kind.record_bytes).sum()),
            rescued=True,
        )

    def finish_rescued(self, first_seq: int, last_seq: int, loss_reason: str | None, lost: int = 0) -> int:
        """Remove rescued records in ``first_seq..last_seq``: delivered, or with a reason
        counted as lost; of delivered ones, ``lost`` were set aside by the cloud (counted as
        ``unverifiable``). Returns records removed."""

        def finish() -> int:
            removed = 0
            with self._txn():
                rows = self.db.execute(
                    f"SELECT {CHUNK_COLUMNS} FROM rescued WHERE key <= ? AND last_seq >= ? ORDER BY key",
                    (last_seq, first_seq),
                ).fetchall()
                nbytes = 0
                for row in rows:
                    kind = self._kinds_by_id[row[3]]
                    cols = self._columns(row)
                    gone = (cols.seqs >= first_seq) & (cols.seqs <= last_seq)
                    removed += int(gone.sum())
                    sizes = cols.sizes(kind.record_bytes)
                    nbytes += int(sizes[gone].sum())
                    self.db.execute("DELETE FROM rescued WHERE key=?", (row[0],))
                    if not gone.all():
                        rest = cols.take(~gone, kind.record_bytes)
                        self.db.execute(
                            _insert("rescued"),
                            self._chunk_row(row[3], rest, int(sizes[~gone].sum())),
                        )
                per = nbytes // removed if removed else 0
                if loss_reason is not None:
                    self._count_loss(loss_reason, removed, nbytes)
                else:
                    if lost:
                        self._count_loss("unverifiable", lost, lost * per)
                    if removed - lost:
                        self._count_delivered(removed - lost)
            return removed

        removed = self._roomy(finish)
        self._rescued_rows = int(self.db.execute("SELECT count(*) FROM rescued").fetchone()[0])
        return removed

    # -- reading ----------------------------------------------------------

    def records(self) -> Iterator[tuple[int, int, RecordKind, float, bytes, dict[str, Any] | None]]:
        """Every queued record, in seq order: (seq, created_ms, kind, score, features, meta)."""
        for row in self.db.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks ORDER BY key").fetchall():
            kind = self._kinds_by_id[row[3]]
            cols = self._columns(row)
            rb = kind.record_bytes
            for i in range(len(cols)):
                yield (
                    int(cols.seqs[i]),
                    int(cols.times[i]),
                    kind,
                    float(cols.scores[i]),
                    cols.features[i * rb : (i + 1) * rb],
                    cols.meta[i] or None if cols.meta else None,
                )

    def stats(self) -> QueueStats:
        db = self.db
        count, nbytes, oldest = db.execute(
            "SELECT total(n), total(nbytes), min(created_ms) FROM chunks"
        ).fetchone()
        ev = db.execute("SELECT reason, records, bytes FROM evictions").fetchall()
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        frames = db.execute("SELECT count(*) FROM frames").fetchone()[0]
        try:
            rescued_n, rescued_bytes = db.execute("SELECT total(n), total(nbytes) FROM rescued").fetchone()
        except sqlite3.OperationalError:  # a file of an older version, opened read-only
            rescued_n = rescued_bytes = 0
        return QueueStats(
            records=int(count),
            bytes=int(nbytes),
            budget_bytes=self.settings.budget_bytes,
            oldest_created_ms=oldest,
            frames_in_flight=frames,
            evictions={r[0]: r[1] for r in ev},
            evicted_bytes={r[0]: r[2] for r in ev},
            last_receipt_ms=meta.get("last_receipt_ms"),
            delivered=int(meta.get("delivered") or 0),
            corrupt_resets=int(meta.get("corrupt_resets") or 0),
            next_seq=int(meta.get("next_seq") or 0),
            frame_max_bytes=self.frame_max_bytes,
            rescued_records=int(rescued_n),
            rescued_bytes=int(rescued_bytes),
            **self._disk_stats(int(nbytes)),
        )

    def _disk_stats(self, nbytes: int) -> dict[str, Any]:
        """What the filesystem can give the queue, in budget bytes: what it holds, plus the
        pages it may still fill at the rate the queue uses pages now."""
        try:
            view = self.disk.view()
        except OSError:
            return {}
        used = self._pages_used()
        page = self._page_size
        ratio = max(1.0, used * page / nbytes) if nbytes >= 16 * page else 1.0
        room = self._soft_cap(self.disk.capacity_bytes(view)) - used
        return {
            "disk_budget_bytes": max(0, int(nbytes + room * page / ratio)),
            "disk_free_bytes": view.free_bytes,
            "disk_reserve_held": view.reserve_bytes >= self.disk.reserve_bytes,
        }

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
    records: Sequence[NewRecord] | RecordBatch
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

    @property
    def closed(self) -> bool:
        return self._closed

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store operation on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def enqueue(
        self, kind: RecordKind, records: Sequence[NewRecord] | RecordBatch, *, durable: bool = True
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

    async def checkpoints(self, interval_s: float = 0.2, reserve_every_s: float = 5.0) -> None:
        """The checkpointer task: keeps the WAL short, off the committer's thread, and takes the
        disk reserve back once a full filesystem has room again."""
        ticks = max(1, round(reserve_every_s / interval_s))
        for tick in itertools.count(1):
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.store.checkpoint)
            except sqlite3.Error as e:
                log.warning("queue checkpoint failed (will retry): %s", e)
            if tick % ticks == 0 and not self.store.disk.held:
                await asyncio.to_thread(self.store.disk.ensure_reserve)

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
