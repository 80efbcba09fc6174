"""Rescued records: what ``rescue.py`` read back from a set-aside queue file, queued outside the chain.

They keep their own seqs, sit in the ``rescued`` table laid out as chunks (beside the
budget: nothing evicts them), and go out in rescued frames that are never persisted (the
same rows and limits always give the same frame, and the cloud tells repeats by seq). What
could not be read back, and what the cloud sets aside, is counted as lost.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_agent.store.chunks import CHUNK_COLUMNS, chunk_row, columns_of, insert_sql
from edge_agent.store.file import QueueFile
from edge_agent.store.frames import FrameRows
from edge_agent.store.ledger import Ledger
from edge_agent.store.records import WIRE_SAVING, Columns, KindTable, RecordKind
from edge_agent.store.room import Room


class Rescued:
    def __init__(self, file: QueueFile, kinds: KindTable, ledger: Ledger, room: Room) -> None:
        self.file = file
        self.kinds = kinds
        self.ledger = ledger
        self.room = room

    @property
    def waiting(self) -> bool:
        return self.ledger.rescued_rows > 0

    def add(self, groups: Sequence[tuple[RecordKind, Columns]], lost: int, lost_bytes: int) -> int:
        """Queue records read back from a set-aside file, with their own seqs, and count what
        could not be read (``lost``) as lost, reason ``corrupt``; one transaction. A group
        already here (the same file rescued again) is left as it is. Returns records added."""

        def add() -> int:
            added = 0
            with self.file.txn():
                for kind, cols in groups:
                    kid = self.kinds.id_for(self.file.db, kind)
                    nbytes = int(cols.sizes(kind.record_bytes).sum())
                    cur = self.file.db.execute(
                        insert_sql("rescued", "OR IGNORE"),
                        chunk_row(kid, cols, nbytes),
                    )
                    added += len(cols) if cur.rowcount else 0
                if lost:
                    self.ledger.count_loss("corrupt", lost, lost_bytes)
            return added

        snapshot = self.ledger.snapshot()
        try:
            added = self.room.roomy(add)
        except BaseException:
            self.ledger.rollback(snapshot)
            raise
        self.kinds.save()
        self.ledger.count_rescued()
        return added

    def next_frame(self, max_records: int, max_bytes: int) -> FrameRows | None:
        """The oldest rescued records of one kind that fit a frame (not persisted: the same
        rows and limits always give the same frame, and the cloud tells repeats by seq)."""
        parts: list[Columns] = []
        kid: int | None = None
        n = size = 0
        for row in self.file.db.execute(f"SELECT {CHUNK_COLUMNS} FROM rescued ORDER BY key"):
            if kid is not None and row[3] != kid:
                break
            kid = row[3]
            kind = self.kinds.by_id[kid]
            cols = columns_of(row)
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
        kind = self.kinds.by_id[kid]
        return FrameRows(
            first_seq=int(recs.seqs[0]),
            last_seq=int(recs.seqs[-1]),
            prev_seq=0,
            kind=kind,
            records=recs,
            nbytes=int(recs.sizes(kind.record_bytes).sum()),
            rescued=True,
        )

    def finish(self, first_seq: int, last_seq: int, loss_reason: str | None, lost: int = 0) -> int:
        """Remove rescued records in ``first_seq..last_seq``: delivered, or with a reason
        counted as lost; of delivered ones, ``lost`` were set aside by the cloud (counted as
        ``unverifiable``). Returns records removed."""
        removed = self.room.roomy(self._finish, first_seq, last_seq, loss_reason, lost)
        self.ledger.count_rescued()
        return removed

    def _finish(self, first_seq: int, last_seq: int, loss_reason: str | None, lost: int) -> int:
        db = self.file.db
        removed = 0
        with self.file.txn():
            rows = db.execute(
                f"SELECT {CHUNK_COLUMNS} FROM rescued WHERE key <= ? AND last_seq >= ? ORDER BY key",
                (last_seq, first_seq),
            ).fetchall()
            nbytes = 0
            for row in rows:
                kind = self.kinds.by_id[row[3]]
                cols = columns_of(row)
                gone = (cols.seqs >= first_seq) & (cols.seqs <= last_seq)
                removed += int(gone.sum())
                sizes = cols.sizes(kind.record_bytes)
                nbytes += int(sizes[gone].sum())
                db.execute("DELETE FROM rescued WHERE key=?", (row[0],))
                if not gone.all():
                    rest = cols.take(~gone, kind.record_bytes)
                    db.execute(insert_sql("rescued"), chunk_row(row[3], rest, int(sizes[~gone].sum())))
            per = nbytes // removed if removed else 0
            if loss_reason is not None:
                self.ledger.count_loss(loss_reason, removed, nbytes)
            else:
                if lost:
                    self.ledger.count_loss("unverifiable", lost, lost * per)
                if removed - lost:
                    self.ledger.count_delivered(removed - lost)
        return removed
