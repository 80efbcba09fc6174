"""Frames and receipts: cutting chunks into frames that are persisted before they are sent, and
removing a frame's records when the cloud's receipt (or a rejection) comes back.

Frames take whole chunks of one kind, in seq order, chained by ``prev_seq``; a chunk
written under a larger limit is split first, so a frame always fits the limits it was cut
for, and a frame the cloud found too large is cut again (``recut_frame``) with the same
records and the same chain ends. ``FrameRows`` is a frame as stored, and what the uplink
encodes. The cloud's limits, as its receipts last told them, are kept in ``meta`` here too.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.store.chunks import CHUNK_COLUMNS, SET_CHUNK, chunk_row, columns_of, insert_sql, split_bounds
from edge_agent.store.file import QueueFile
from edge_agent.store.ledger import Ledger
from edge_agent.store.records import WIRE_SAVING, Columns, KindTable, RecordKind, now_ms
from edge_agent.store.room import Room
from edge_tier.wire import Frame

log = logging.getLogger(__package__)  # the package's one logger, "edge_agent.store"

Cut = tuple[int, int, int, int]  # a frame's chunks: first key, last key, records, charged bytes
CLOUD_LIMITS = ("cloud_max_frame_bytes", "cloud_max_records", "cloud_max_dim")  # meta keys


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


class FrameCutter:
    """Unframed chunks into persisted frames (and frames in flight into smaller ones)."""

    def __init__(self, file: QueueFile, kinds: KindTable, ledger: Ledger, room: Room) -> None:
        self.file = file
        self.kinds = kinds
        self.ledger = ledger
        self.room = room

    def next_frames(self, count: int, max_records: int, max_bytes: int) -> list[FrameRows]:
        """Cut up to ``count`` frames from the oldest unframed chunks, persisted in one commit
        (the frames must be durable before they are sent: a re-send must be the same upload).

        ``max_bytes`` bounds the encoded frame; a chunk written under a larger limit is split
        first, so a frame always fits the limits it was cut for."""
        return self.room.roomy(self._next_frames, count, max_records, max_bytes)

    def _next_frames(self, count: int, max_records: int, max_bytes: int) -> list[FrameRows]:
        chain_last = self.ledger.chain_last
        with self.file.txn():
            cuts = self._plan_splitting(chain_last, None, count, max_records, max_bytes)
            frames = self._insert_frames(chain_last, cuts)
            if frames:
                self.file.set_meta("chain_last", frames[-1].last_seq)
        if frames:
            self.ledger.chain_last = frames[-1].last_seq
        return frames

    def recut_frame(self, first_seq: int, max_records: int, max_bytes: int) -> list[FrameRows]:
        """Cut a frame in flight again, smaller (the cloud said TOO_LARGE, so it stored none of
        it): the same records, the same chain ends, more frames. [] if there is no such frame."""
        return self.room.roomy(self._recut_frame, first_seq, max_records, max_bytes)

    def _recut_frame(self, first_seq: int, max_records: int, max_bytes: int) -> list[FrameRows]:
        frames: list[FrameRows] = []
        db = self.file.db
        with self.file.txn():
            row = db.execute(
                "SELECT last_seq, prev_seq, chunk_lo FROM frames WHERE first_seq=?", (first_seq,)
            ).fetchone()
            if row is not None:
                last, prev, lo = row
                cuts = self._plan_splitting(lo - 1, last, 1 << 30, max_records, max_bytes)
                db.execute("DELETE FROM frames WHERE first_seq=?", (first_seq,))
                frames = self._insert_frames(prev, cuts)
        return frames

    def open_frames(self) -> list[FrameRows]:
        """Frames assigned and not yet receipted, oldest first (to re-send after a restart)."""
        db = self.file.db
        frames = []
        for _first, last, prev, lo in db.execute(
            "SELECT first_seq, last_seq, prev_seq, chunk_lo FROM frames ORDER BY first_seq"
        ).fetchall():
            rows = db.execute(
                f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE key BETWEEN ? AND ? ORDER BY key", (lo, last)
            ).fetchall()
            if rows:
                frames.append(self._frame(prev, rows))
        return frames

    def set_frame_prev(self, first_seq: int, prev_seq: int) -> None:
        self.room.roomy(
            self.file.db.execute, "UPDATE frames SET prev_seq=? WHERE first_seq=?", (prev_seq, first_seq)
        )

    def saved_limits(self) -> tuple[int, int, int] | None:
        """The cloud's frame limits as last told (max_frame_bytes, max_records, max_dim)."""
        got = [self.file.meta(k, 0) for k in CLOUD_LIMITS]
        return (got[0], got[1], got[2]) if all(got) else None

    def save_limits(self, max_frame_bytes: int, max_records: int, max_dim: int) -> None:
        def save() -> None:
            with self.file.txn():
                for k, v in zip(CLOUD_LIMITS, (max_frame_bytes, max_records, max_dim), strict=True):
                    self.file.set_meta(k, v)

        self.room.roomy(save)

    # -- planning (inside the caller's transaction) -----------------------

    def _plan_splitting(
        self, after: int, upto: int | None, count: int, max_records: int, max_bytes: int
    ) -> list[Cut]:
        """``_plan``, splitting the chunks no frame can carry whole (inside the caller's
        transaction) until there are none."""
        while True:
            cuts, oversized = self._plan(after, upto, count, max_records, max_bytes)
            if oversized is None:
                return cuts
            self._split_chunk(oversized, max_records, max_bytes)

    def _plan(
        self, after: int, upto: int | None, count: int, max_records: int, max_bytes: int
    ) -> tuple[list[Cut], int | None]:
        """Group the chunks with keys in (after, upto] into at most ``count`` frames of whole
        chunks of one kind, in seq order: (first key, last key, records, charged bytes) each.
        Or, second, the key of the first chunk that no frame of these limits carries whole."""
        cuts: list[Cut] = []
        cur: list[int] | None = None  # [first key, last key, records, charged, wire bytes, kind]
        sql = "SELECT key, n, kind, nbytes FROM chunks WHERE key > ?"
        args: tuple[int, ...] = (after,)
        if upto is not None:
            sql, args = sql + " AND key <= ?", (after, upto)
        # Walk the covering index only as far as needed.
        rows = self.file.db.execute(sql + " ORDER BY key", args)
        try:
            for key, cn, ck, cb in rows:
                room = max_bytes - self.kinds.by_id[ck].frame_overhead
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
        db = self.file.db
        row = db.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE key=?", (key,)).fetchone()
        kind = self.kinds.by_id[row[3]]
        cols = columns_of(row)
        sizes = cols.sizes(kind.record_bytes)
        bounds = split_bounds(cols, kind, sizes, max_records, max_bytes)
        pieces = [
            chunk_row(row[3], cols.slice(lo, hi, kind.record_bytes), int(sizes[lo:hi].sum()))
            for lo, hi in itertools.pairwise(bounds)
        ]
        first = (key, *pieces[0][1:])
        db.execute(SET_CHUNK, (*first, key))
        db.executemany(insert_sql("chunks"), pieces[1:])
        log.info("queue: split a chunk of %d records into %d to fit frames of %d bytes", len(cols),
                 len(pieces), max_bytes)  # fmt: skip

    def _insert_frames(self, prev: int, cuts: list[Cut]) -> list[FrameRows]:
        """Persist frames over these cuts, chained from ``prev`` (inside the caller's transaction)."""
        db = self.file.db
        frames: list[FrameRows] = []
        rows_out = []
        for lo, hi, n, total in cuts:
            rows = db.execute(
                f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE key BETWEEN ? AND ? ORDER BY key", (lo, hi)
            ).fetchall()
            frame = self._frame(prev, rows)
            frames.append(frame)
            rows_out.append((frame.first_seq, frame.last_seq, frame.prev_seq, lo, n, total, now_ms()))
            prev = frame.last_seq
        db.executemany(
            "INSERT INTO frames(first_seq, last_seq, prev_seq, chunk_lo, n, nbytes, created_ms) "
            "VALUES (?,?,?,?,?,?,?)",
            rows_out,
        )
        return frames

    def _frame(self, prev_seq: int, rows: list[tuple[Any, ...]]) -> FrameRows:
        cols = Columns.concat([columns_of(r) for r in rows])
        return FrameRows(
            first_seq=int(cols.seqs[0]),
            last_seq=int(cols.seqs[-1]),
            prev_seq=prev_seq,
            kind=self.kinds.by_id[rows[0][3]],
            records=cols,
            nbytes=sum(r[6] for r in rows),
        )


class Receipts:
    """Frames' records out of the queue: delivered (a receipt) or lost with a reason."""

    def __init__(self, file: QueueFile, ledger: Ledger, room: Room) -> None:
        self.file = file
        self.ledger = ledger
        self.room = room

    def finish_frames(self, done: Sequence[tuple[int, int, str | None]]) -> list[int]:
        """Remove frames' records in one commit; each (first_seq, last_seq, loss reason or None).

        No fsync of its own: if a crash forgets these deletes, the frames are sent
        again and the cloud answers DUPLICATE. The next synced commit makes them
        durable (the WAL is written in order).
        """
        return self.room.roomy(self._finish_frames, done)

    def _finish_frames(self, done: Sequence[tuple[int, int, str | None]]) -> list[int]:
        db = self.file.db
        db.execute("PRAGMA synchronous=NORMAL")
        freed_total = 0
        counts: list[int] = []
        try:
            with self.file.txn():
                delivered = 0
                for first_seq, last_seq, loss_reason in done:
                    row = db.execute("SELECT chunk_lo FROM frames WHERE first_seq=?", (first_seq,)).fetchone()
                    lo = row[0] if row else first_seq
                    freed = db.execute(
                        "DELETE FROM chunks WHERE key BETWEEN ? AND ? RETURNING n, nbytes", (lo, last_seq)
                    ).fetchall()
                    db.execute("DELETE FROM frames WHERE first_seq=?", (first_seq,))
                    n = sum(r[0] for r in freed)
                    nbytes = sum(r[1] for r in freed)
                    freed_total += nbytes
                    counts.append(n)
                    if loss_reason is not None:
                        self.ledger.count_loss(loss_reason, n, nbytes)
                    else:
                        delivered += n
                if delivered:
                    self.ledger.count_delivered(delivered)
        finally:
            db.execute(f"PRAGMA synchronous={self.file.settings.synchronous}")
        self.ledger.bytes -= freed_total
        return counts
