"""The ledger: what the store keeps in memory of the file, and the books of what left the queue.

The next sequence number, the bytes charged against the budget, where the chain of frames
ends and how many rescued rows wait: read from the file at open, moved by every write,
and put back (with the kinds) when a transaction is rolled back (``snapshot``,
``rollback``). Every record that leaves the queue is counted here, in the same transaction
that removes it: delivered (``meta``) or lost by reason (``evictions``); ``stats.py``
reads the books back.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass

from edge_agent.store.file import QueueFile
from edge_agent.store.records import KindTable, RecordKind, now_ms


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The ledger and the kinds before a transaction, to put back if it is rolled back."""

    next_seq: int
    bytes: int
    kinds: dict[RecordKind, int]


class Ledger:
    def __init__(self, file: QueueFile, kinds: KindTable) -> None:
        self.file = file
        self.kinds = kinds
        self.next_seq = 0
        self.bytes = 0  # charged to the budget, all chunks (framed or not)
        self.chain_last = 0  # last seq of the newest frame: records above it are unframed
        self.rescued_rows = 0

    @classmethod
    def read(cls, file: QueueFile, kinds: KindTable) -> Ledger:
        """The ledger of a writable file, as it was committed."""
        ledger = cls(file, kinds)
        db = file.db
        ledger.bytes = int(db.execute("SELECT total(nbytes) FROM chunks").fetchone()[0])
        ledger.next_seq = file.meta("next_seq", 1)
        ledger.chain_last = file.meta("chain_last", 0)
        ledger.count_rescued()
        return ledger

    @property
    def has_unframed(self) -> bool:
        return self.next_seq - 1 > self.chain_last

    def count_rescued(self) -> None:
        self.rescued_rows = int(self.file.db.execute("SELECT count(*) FROM rescued").fetchone()[0])

    def snapshot(self) -> Snapshot:
        return Snapshot(self.next_seq, self.bytes, self.kinds.snapshot())

    def rollback(self, snap: Snapshot) -> None:
        """Roll back the open transaction, if any, and put the ledger back as it was."""
        db = self.file.db
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        self.next_seq, self.bytes = snap.next_seq, snap.bytes
        self.kinds.restore(snap.kinds)

    # -- the books (inside the caller's transaction) ----------------------

    def count_delivered(self, records: int) -> None:
        self.file.db.execute(
            "INSERT INTO meta(key, value) VALUES ('delivered', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (records,),
        )
        self.file.set_meta("last_receipt_ms", now_ms())

    def count_loss(self, reason: str, records: int, nbytes: int) -> None:
        self.file.db.execute(
            "INSERT INTO evictions(reason, records, bytes) VALUES (?, ?, ?) "
            "ON CONFLICT(reason) DO UPDATE SET records = records + excluded.records, "
            "bytes = bytes + excluded.bytes",
            (reason, records, nbytes),
        )
