"""Chunk rows: how ``Columns`` sit in a row of ``chunks`` (or ``rescued``), and how big one may be.

A chunk row holds one producer batch column-wise, as blobs with a CRC (``row_crc``: SQLite
pages have none). Whole chunks go into frames, so a chunk never outgrows a frame: the
limits it is cut to (``FrameLimits``) and where to cut (``split_bounds``) live here, shared
by the writer that makes chunks and the frame cutter that splits old ones.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.store.records import F32, U64, WIRE_SAVING, Columns, RecordKind
from edge_tier.wire import RECORD_WIRE_OVERHEAD

CHUNK_COLUMNS = (
    "key, last_seq, n, kind, created_ms, min_score, nbytes, seqs, scores, times, features, meta, crc"
)
SET_CHUNK = f"UPDATE chunks SET ({CHUNK_COLUMNS}) = ({','.join('?' * 13)}) WHERE key=?"


@dataclass(slots=True)
class FrameLimits:
    """What frames are cut to, and so what a chunk may hold: the uplink lowers them to what
    the cloud takes (``Store.set_frame_limits``)."""

    max_records: int
    max_bytes: int  # the encoded frame
    max_dim: int | None = None  # the cloud's, once known


def insert_sql(table: str, conflict: str = "") -> str:
    """An INSERT of one chunk row (``chunk_row``) into ``chunks`` or ``rescued``."""
    return f"INSERT {conflict} INTO {table}({CHUNK_COLUMNS}) VALUES ({','.join('?' * 13)})"


def row_crc(seqs: bytes, scores: bytes, times: bytes, features: bytes, meta: str | None) -> int:
    """A chunk row's checksum: SQLite pages have none, and a rescue must tell a damaged
    value from a good one (``rescue.py``)."""
    crc = 0
    for part in (seqs, scores, times, features, (meta or "").encode()):
        crc = zlib.crc32(part, crc)
    return crc


def chunk_row(kid: int, c: Columns, nbytes: int, key: int | None = None) -> tuple[Any, ...]:
    """A chunk row's values, in ``CHUNK_COLUMNS`` order; its key is its first seq unless given."""
    seqs, scores, times = (
        c.seqs.astype(U64).tobytes(),
        c.scores.astype(F32).tobytes(),
        c.times.astype(U64).tobytes(),
    )
    meta = c.meta_column()
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


def columns_of(row: Sequence[Any]) -> Columns:
    """A chunk row (``CHUNK_COLUMNS`` order) back into columns."""
    return Columns(
        np.frombuffer(row[7], dtype=U64),
        np.frombuffer(row[8], dtype=F32),
        np.frombuffer(row[9], dtype=U64),
        row[10],
        None if row[11] is None else json.loads(row[11]),
    )


def split_bounds(
    cols: Columns, kind: RecordKind, sizes: np.ndarray | None, most: int, max_bytes: int
) -> list[int]:
    """Where to split records into pieces that a frame of these limits carries whole (at
    least one record each)."""
    n, rb = len(cols), kind.record_bytes
    room = max(1, max_bytes - kind.frame_overhead)
    if sizes is None:
        per = max(1, min(most, room // (rb + RECORD_WIRE_OVERHEAD)))
        return [*range(0, n, per), n]
    # Greedy, as many records a piece as fit: with the running total of wire sizes, each piece
    # ends at the last record whose total from the piece's start is within room (one search a
    # piece, not a step a record), at most ``most`` records, and never empty.
    total = np.concatenate([[0], np.cumsum(sizes - WIRE_SAVING)])
    bounds = [0]
    while bounds[-1] < n:
        start = bounds[-1]
        end = int(np.searchsorted(total, total[start] + room, side="right")) - 1
        bounds.append(min(n, start + most, max(start + 1, end)))
    return bounds
