"""The queue file: opening it, its schema and pragmas, setting a corrupt one aside, the seq floor.

Owns the SQLite connection (and the checkpointer's), the ``{queue}.lock`` that keeps one
writer per queue, the ``meta`` table's integers, write transactions, and the side file
``{queue}.seqfloor`` that keeps sequence numbers unique even when the file itself is lost.
Whatever reads or writes records goes through ``QueueFile.db``; nothing else here knows
what a record is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from edge_agent.config import EvictionPolicy, StoreSettings
from edge_agent.disk import DiskRoom, filesystem_bytes, is_disk_full
from edge_agent.errors import StoreError
from edge_agent.files import QueueLock, write_atomic
from edge_agent.store.records import KINDS_SUFFIX, KindTable

log = logging.getLogger(__package__)  # the package's one logger, "edge_agent.store"

SEQ_FLOOR_STEP = 1 << 20  # the side file is rewritten once per this many sequence numbers
CORRUPTION_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}

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


def sqlite3_errorcode(e: sqlite3.Error) -> int:
    return getattr(e, "sqlite_errorcode", -1) & 0xFF


class QueueFile:
    """The open queue file. Opening loads its kinds into ``kinds``; a writable open takes the
    lock and the disk reserve, checks the file, and sets it aside if it is corrupt."""

    db: sqlite3.Connection

    def __init__(self, settings: StoreSettings, kinds: KindTable, *, readonly: bool = False) -> None:
        self.settings = settings
        self.path = Path(settings.path)
        self.floor_path = self.path.with_name(self.path.name + ".seqfloor")
        self.kinds = kinds
        self.readonly = readonly
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
        self.page_size = 65536
        self.corrupt_reset = False
        self.quarantined: Path | None = None  # the file this open set aside (edge_agent/rescue.py)
        self.floor_written = 0
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
        self.page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        self.floor_written = self.read_floor()
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

    def _open_readonly(self) -> None:
        if not self.path.exists():
            raise StoreError(f"{self.path}: no queue file")
        try:
            self.db = sqlite3.connect(
                self.path.absolute().as_uri() + "?mode=ro", uri=True, isolation_level=None
            )
            self.kinds.load(self.db)
            self.db.execute("SELECT count(*) FROM chunks").fetchone()
            self.page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
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
                self.kinds.load(db)
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
        seed = max(time.time_ns() // 1000, self.read_floor(), top + 1)
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

    def _sync_score_index(self) -> None:
        # The index only pays for itself under the score policy.
        if self.settings.policy is EvictionPolicy.LOWEST_SCORE:
            self.db.execute("CREATE INDEX IF NOT EXISTS chunks_by_score ON chunks(min_score, key)")
        else:
            self.db.execute("DROP INDEX IF EXISTS chunks_by_score")

    # -- meta, transactions, the seq floor --------------------------------

    def meta(self, key: str, default: int) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None or row[0] is None else int(row[0])

    def set_meta(self, key: str, value: int) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @contextlib.contextmanager
    def txn(self) -> Iterator[None]:
        """One write transaction: committed at the end of the block, rolled back on any error."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                self.db.execute("ROLLBACK")
            raise

    def read_floor(self) -> int:
        try:
            return int(self.floor_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _write_floor(self, floor: int) -> None:
        write_atomic(self.floor_path, f"{floor}\n".encode())
        self.floor_written = floor

    def raise_floor(self, next_seq: int) -> None:
        """Keep the side file's floor above every seq this commit hands out (written before
        the commit, so a batch of any size is covered). A failure to write it (a full
        disk) must not fail the producers: it is retried at the next commit."""
        if next_seq + SEQ_FLOOR_STEP // 2 <= self.floor_written:
            return
        try:
            self._write_floor(next_seq + SEQ_FLOOR_STEP)
        except OSError as e:
            log.warning("could not write the sequence floor %s (will retry): %s", self.floor_path, e)

    # -- checkpoints and closing ------------------------------------------

    def checkpoint(self) -> None:
        """Copy the WAL into the database without blocking the writer (any thread but the store's)."""
        if self._ckpt_db is None:
            self._ckpt_db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._ckpt_db.execute(f"PRAGMA synchronous={self.settings.synchronous}")
        # On a full disk this fails until the store's own thread gives up the reserve, when one
        # of its writes fails: not from here, where another process still filling the disk
        # would take the room before the queue could use it.
        self._ckpt_db.execute("PRAGMA wal_checkpoint(PASSIVE)")

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
