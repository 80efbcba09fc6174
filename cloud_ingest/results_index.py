"""A rebuildable view of ET_RESULTS: which stream message answers which device and upload.

JetStream stays the source of truth: the index holds only each result message's
stream sequence and what the worker put in its headers (tenant, device, upload
id, part, record count, seq range, when it was produced). Pages and lookups find
message sequences here and read the messages themselves from the stream (direct
get). The view is rebuilt by replaying the stream from the last sequence it
holds: delete the file (or keep the default, in memory) and the result API
rebuilds it at start (docs/operations.md). Messages the stream no longer holds
(retention) are dropped from the view as the API sees the stream's first
sequence move (``forget_before``), or when a read finds them gone.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    stream_seq INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    records INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    produced_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS results_device ON results (tenant, device, stream_seq);
CREATE INDEX IF NOT EXISTS results_tenant ON results (tenant, stream_seq);
CREATE INDEX IF NOT EXISTS results_upload ON results (upload_id);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    stream_seq: int
    tenant: str
    device: str
    upload_id: str
    part: int
    records: int
    first_seq: int
    last_seq: int
    produced_ms: int


class ResultsIndex:
    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        # Rebuildable from the stream, so durability buys nothing here.
        self._db.execute(
            "PRAGMA journal_mode=WAL" if self.path != ":memory:" else "PRAGMA journal_mode=MEMORY"
        )
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def last_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(stream_seq), 0) FROM results").fetchone()[0])

    def add(self, entries: list[Entry]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        e.stream_seq,
                        e.tenant,
                        e.device,
                        e.upload_id,
                        e.part,
                        e.records,
                        e.first_seq,
                        e.last_seq,
                        e.produced_ms,
                    )
                    for e in entries
                ],
            )

    def forget(self, stream_seqs: list[int]) -> None:
        with self._db:
            self._db.executemany("DELETE FROM results WHERE stream_seq = ?", [(s,) for s in stream_seqs])

    def forget_before(self, stream_seq: int) -> None:
        """Drop every message before ``stream_seq``: the stream's first, retention took the rest."""
        with self._db:
            self._db.execute("DELETE FROM results WHERE stream_seq < ?", (stream_seq,))

    def page(
        self, tenant: str, device: str, *, start: int, newest_first: bool, since_ms: int, limit: int
    ) -> list[tuple[int, int]]:
        """(stream_seq, records) of up to ``limit`` messages of the device, from ``start``
        (inclusive) on in the given order, produced at or after ``since_ms``."""
        op, order = ("<=", "DESC") if newest_first else (">=", "ASC")
        rows = self._db.execute(
            f"SELECT stream_seq, records FROM results WHERE tenant = ? AND device = ? "
            f"AND stream_seq {op} ? AND produced_ms >= ? ORDER BY stream_seq {order} LIMIT ?",
            (tenant, device, start, since_ms, limit),
        ).fetchall()
        return [(int(s), int(n)) for s, n in rows]

    def after(self, tenant: str, device: str | None, after_seq: int, limit: int) -> list[int]:
        """Stream sequences of the tenant's (or one device's) results after ``after_seq``."""
        if device is None:
            q = (
                "SELECT stream_seq FROM results WHERE tenant = ? AND stream_seq > ? "
                "ORDER BY stream_seq LIMIT ?"
            )
            rows = self._db.execute(q, (tenant, after_seq, limit)).fetchall()
        else:
            q = (
                "SELECT stream_seq FROM results WHERE tenant = ? AND device = ? AND stream_seq > ? "
                "ORDER BY stream_seq LIMIT ?"
            )
            rows = self._db.execute(q, (tenant, device, after_seq, limit)).fetchall()
        return [int(r[0]) for r in rows]

    def upload(self, upload_id: str) -> list[int]:
        rows = self._db.execute(
            "SELECT stream_seq FROM results WHERE upload_id = ? ORDER BY part, stream_seq", (upload_id,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def devices(self, tenant: str) -> dict[str, tuple[int, int]]:
        """device -> (result records, last produced_ms) for the tenant's devices with results."""
        rows = self._db.execute(
            "SELECT device, SUM(records), MAX(produced_ms) FROM results WHERE tenant = ? GROUP BY device",
            (tenant,),
        ).fetchall()
        return {str(d): (int(n), int(t)) for d, n, t in rows}

    def has_device(self, tenant: str, device: str) -> bool:
        q = "SELECT 1 FROM results WHERE tenant = ? AND device = ? LIMIT 1"
        return self._db.execute(q, (tenant, device)).fetchone() is not None
