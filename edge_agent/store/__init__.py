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

Modules
-------

- ``records.py``: the record types, ``Columns``, the budget charge, the kinds table.
- ``chunks.py``: how columns sit in a chunk row (layout, CRC) and the limits that cut them.
- ``file.py``: the queue file: opening, schema and pragmas, setting it aside, the seq floor.
- ``ledger.py``: the in-memory ledger (next seq, bytes, chain end) and the books of losses.
- ``room.py``: the filesystem's ceiling, and making room when it is full.
- ``eviction.py``: the eviction policies, ``oldest`` and ``lowest_score``.
- ``writer.py``: ``append_many``, the group commit of producers' batches.
- ``frames.py``: ``FrameRows``, cutting frames, finishing them on receipts.
- ``rescued.py``: records rescued from a set-aside file, sent outside the chain.
- ``stats.py``: ``QueueStats`` and reading the records back.
- ``facade.py``: ``Store``, composing the parts.
- ``queue.py``: ``AsyncQueue``, the store's thread and the committer.
"""

from edge_agent.store.chunks import CHUNK_COLUMNS, row_crc
from edge_agent.store.facade import Store
from edge_agent.store.file import CORRUPTION_CODES, SCHEMA, SEQ_FLOOR_STEP, sqlite3_errorcode
from edge_agent.store.frames import FrameRows
from edge_agent.store.queue import AsyncQueue
from edge_agent.store.records import (
    F32,
    KINDS_SUFFIX,
    ROW_OVERHEAD,
    U64,
    WIRE_SAVING,
    Appended,
    Columns,
    NewRecord,
    RecordBatch,
    RecordKind,
    kind_doc,
    kinds_path,
    now_ms,
)
from edge_agent.store.room import MAX_PAGES
from edge_agent.store.stats import QueueStats

__all__ = [
    "CHUNK_COLUMNS",
    "CORRUPTION_CODES",
    "F32",
    "KINDS_SUFFIX",
    "MAX_PAGES",
    "ROW_OVERHEAD",
    "SCHEMA",
    "SEQ_FLOOR_STEP",
    "U64",
    "WIRE_SAVING",
    "Appended",
    "AsyncQueue",
    "Columns",
    "FrameRows",
    "NewRecord",
    "QueueStats",
    "RecordBatch",
    "RecordKind",
    "Store",
    "kind_doc",
    "kinds_path",
    "now_ms",
    "row_crc",
    "sqlite3_errorcode",
]
