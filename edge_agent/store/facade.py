"""``Store``: the queue as the rest of the agent sees it, composed of the parts that do the work.

It opens the file (``file.py``), reads the ledger (``ledger.py``), and hands each call to
the part whose job it is: the writer (appends), the frame cutter and the receipts
(``frames.py``), the rescued records, eviction and the filesystem's room through them, and
the stats. It holds no logic of its own beyond wiring the parts to one another.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edge_agent.config import StoreSettings
from edge_agent.store.chunks import FrameLimits
from edge_agent.store.eviction import Evictor
from edge_agent.store.file import QueueFile
from edge_agent.store.frames import FrameCutter, FrameRows, Receipts
from edge_agent.store.ledger import Ledger
from edge_agent.store.records import (
    Appended,
    Columns,
    KindTable,
    NewRecord,
    RecordBatch,
    RecordKind,
    kinds_path,
)
from edge_agent.store.rescued import Rescued
from edge_agent.store.room import Room
from edge_agent.store.stats import QueueStats, queued_records, read_stats
from edge_agent.store.writer import Writer


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
        # Frames are cut to these, and chunks never outgrow a frame; the uplink lowers them
        # to what the cloud takes (``set_frame_limits``).
        self.limits = FrameLimits(frame_max_records, frame_max_bytes)
        self.kinds = KindTable(kinds_path(Path(settings.path)))
        self.file = QueueFile(settings, self.kinds, readonly=readonly)
        self.path, self.floor_path, self.kinds_path = self.file.path, self.file.floor_path, self.kinds.path
        self.readonly = readonly
        self.disk, self.wal_limit_bytes = self.file.disk, self.file.wal_limit_bytes
        # A read-only store writes nothing, so its ledger stays empty.
        self.ledger = Ledger(self.file, self.kinds) if readonly else Ledger.read(self.file, self.kinds)
        self.room = Room(self.file, self.limits)
        self.evictor = Evictor(self.file, self.kinds, self.ledger, self.room)
        self.writer = Writer(self.file, self.kinds, self.ledger, self.room, self.evictor, self.limits)
        self.cutter = FrameCutter(self.file, self.kinds, self.ledger, self.room)
        self.receipts = Receipts(self.file, self.ledger, self.room)
        self.rescued = Rescued(self.file, self.kinds, self.ledger, self.room)

    # -- the file ---------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        return self.file.db

    @property
    def corrupt_reset(self) -> bool:
        return self.file.corrupt_reset

    @property
    def quarantined(self) -> Path | None:
        """The file this open set aside (``edge_agent/rescue.py``)."""
        return self.file.quarantined

    def checkpoint(self) -> None:
        """Copy the WAL into the database without blocking the writer (any thread but the store's)."""
        self.file.checkpoint()

    def close(self) -> None:
        self.file.close()

    # -- frame limits -----------------------------------------------------

    @property
    def frame_max_records(self) -> int:
        return self.limits.max_records

    @frame_max_records.setter
    def frame_max_records(self, value: int) -> None:
        self.limits.max_records = value

    @property
    def frame_max_bytes(self) -> int:
        return self.limits.max_bytes

    @frame_max_bytes.setter
    def frame_max_bytes(self, value: int) -> None:
        self.limits.max_bytes = value

    @property
    def max_dim(self) -> int | None:
        """The cloud's, once known."""
        return self.limits.max_dim

    @max_dim.setter
    def max_dim(self, value: int | None) -> None:
        self.limits.max_dim = value

    def set_frame_limits(self, max_records: int, max_bytes: int, max_dim: int | None = None) -> None:
        """Frames (and so chunks) no larger than this from now on; what is queued is cut to fit
        when framed (``next_frames``, ``recut_frame``)."""
        self.limits.max_records, self.limits.max_bytes, self.limits.max_dim = max_records, max_bytes, max_dim

    def saved_limits(self) -> tuple[int, int, int] | None:
        """The cloud's frame limits as last told (max_frame_bytes, max_records, max_dim)."""
        return self.cutter.saved_limits()

    def save_limits(self, max_frame_bytes: int, max_records: int, max_dim: int) -> None:
        self.cutter.save_limits(max_frame_bytes, max_records, max_dim)

    # -- writing ----------------------------------------------------------

    @property
    def commits(self) -> int:
        """Group commits done (benchmarks and tests read it)."""
        return self.writer.commits

    def append_many(
        self,
        batches: Sequence[tuple[RecordKind, Sequence[NewRecord] | RecordBatch]],
        write_behind: Sequence[bool] | None = None,
    ) -> list[Appended | Exception]:
        """Append several producers' batches in ONE transaction (group commit): ``Writer.append_many``."""
        return self.writer.append_many(batches, write_behind)

    # -- frames and receipts ----------------------------------------------

    def next_frame(self, max_records: int, max_bytes: int) -> FrameRows | None:
        """Assign the oldest unframed chunks (whole, one kind) to a new frame and persist it."""
        frames = self.next_frames(1, max_records, max_bytes)
        return frames[0] if frames else None

    def next_frames(self, count: int, max_records: int, max_bytes: int) -> list[FrameRows]:
        """Cut up to ``count`` frames from the oldest unframed chunks, persisted in one commit
        (``FrameCutter.next_frames``)."""
        return self.cutter.next_frames(count, max_records, max_bytes)

    def recut_frame(self, first_seq: int, max_records: int, max_bytes: int) -> list[FrameRows]:
        """Cut a frame in flight again, smaller (``FrameCutter.recut_frame``)."""
        return self.cutter.recut_frame(first_seq, max_records, max_bytes)

    def open_frames(self) -> list[FrameRows]:
        """Frames assigned and not yet receipted, oldest first (to re-send after a restart)."""
        return self.cutter.open_frames()

    def set_frame_prev(self, first_seq: int, prev_seq: int) -> None:
        self.cutter.set_frame_prev(first_seq, prev_seq)

    def finish_frame(self, first_seq: int, last_seq: int, loss_reason: str | None = None) -> int:
        """Remove a frame's records: delivered (receipt) or, with a reason, counted as lost."""
        return self.finish_frames([(first_seq, last_seq, loss_reason)])[0]

    def finish_frames(self, done: Sequence[tuple[int, int, str | None]]) -> list[int]:
        """Remove frames' records in one commit (``Receipts.finish_frames``)."""
        return self.receipts.finish_frames(done)

    @property
    def has_unframed(self) -> bool:
        return self.ledger.has_unframed

    # -- rescued records (edge_agent/rescue.py) ---------------------------

    def add_rescued(self, groups: Sequence[tuple[RecordKind, Columns]], lost: int, lost_bytes: int) -> int:
        """Queue records read back from a set-aside file (``Rescued.add``); returns records added."""
        return self.rescued.add(groups, lost, lost_bytes)

    @property
    def has_rescued(self) -> bool:
        return self.rescued.waiting

    def next_rescued(self, max_records: int, max_bytes: int) -> FrameRows | None:
        """The oldest rescued records of one kind that fit a frame (``Rescued.next_frame``)."""
        return self.rescued.next_frame(max_records, max_bytes)

    def finish_rescued(self, first_seq: int, last_seq: int, loss_reason: str | None, lost: int = 0) -> int:
        """Remove rescued records in ``first_seq..last_seq`` (``Rescued.finish``)."""
        return self.rescued.finish(first_seq, last_seq, loss_reason, lost)

    # -- reading ----------------------------------------------------------

    def records(self) -> Iterator[tuple[int, int, RecordKind, float, bytes, dict[str, Any] | None]]:
        """Every queued record, in seq order: (seq, created_ms, kind, score, features, meta)."""
        return queued_records(self.file.db, self.kinds)

    def stats(self) -> QueueStats:
        return read_stats(
            self.file.db, self.settings.budget_bytes, self.limits.max_bytes, self.room.disk_stats
        )

    @property
    def bytes_used(self) -> int:
        return self.ledger.bytes
