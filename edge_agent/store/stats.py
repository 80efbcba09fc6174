"""Reading the queue back: ``QueueStats`` (metrics, the health endpoint, ``edge-agent status``)
and the queued records themselves (tools and tests).

Read-only and cheap: the stats come from the small columns and the books (``evictions``,
``meta``), and work on a file opened read-only, of an older version too, while its writer
has it open.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from edge_agent.store.chunks import CHUNK_COLUMNS, columns_of
from edge_agent.store.records import KindTable, RecordKind, now_ms


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
        d = {k: getattr(self, k) for k in self.__slots__}
        d["oldest_age_s"] = (
            None if self.oldest_created_ms is None else max(0.0, (now_ms() - self.oldest_created_ms) / 1000)
        )
        d["effective_budget_bytes"] = self.effective_budget_bytes
        d["disk_limited"] = self.disk_limited
        return d


def read_stats(
    db: sqlite3.Connection,
    budget_bytes: int,
    frame_max_bytes: int,
    disk_stats: Callable[[int], dict[str, Any]],
) -> QueueStats:
    """The queue's stats; ``disk_stats`` gives the filesystem's fields for the bytes queued
    (``Room.disk_stats``)."""
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
        budget_bytes=budget_bytes,
        oldest_created_ms=oldest,
        frames_in_flight=frames,
        evictions={r[0]: r[1] for r in ev},
        evicted_bytes={r[0]: r[2] for r in ev},
        last_receipt_ms=meta.get("last_receipt_ms"),
        delivered=int(meta.get("delivered") or 0),
        corrupt_resets=int(meta.get("corrupt_resets") or 0),
        next_seq=int(meta.get("next_seq") or 0),
        frame_max_bytes=frame_max_bytes,
        rescued_records=int(rescued_n),
        rescued_bytes=int(rescued_bytes),
        **disk_stats(int(nbytes)),
    )


def queued_records(
    db: sqlite3.Connection, kinds: KindTable
) -> Iterator[tuple[int, int, RecordKind, float, bytes, dict[str, Any] | None]]:
    """Every queued record, in seq order: (seq, created_ms, kind, score, features, meta)."""
    for row in db.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks ORDER BY key").fetchall():
        kind = kinds.by_id[row[3]]
        cols = columns_of(row)
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
