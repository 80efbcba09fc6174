"""Records and their columns: what producers hand the queue and what a chunk or a frame holds.

Owns the record types (``RecordKind``, ``NewRecord``, ``RecordBatch``, ``Appended``), the
column-wise ``Columns`` every other part moves records in, what a record is charged against
the budget (``ROW_OVERHEAD``), and the kinds table as the store keeps it in memory and beside
the queue file (``KindTable``, ``kinds_path``). It is the bottom of the package: it knows
nothing of SQLite beyond the ``kinds`` table, so the rescue (``rescue.py``) can read records
with it from a file the store itself refuses.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import StoreError
from edge_agent.files import write_atomic
from edge_tier.wire import RECORD_WIRE_OVERHEAD, Dtype, check_kind, frame_overhead

log = logging.getLogger(__package__)  # the package's one logger, "edge_agent.store"

ROW_OVERHEAD = 64  # bytes charged per record on top of its payload (seq, score, time, row share)
# A record's charge less this is at least what it takes in a frame (the charge counts its
# metadata as ASCII JSON, never less than the frame's UTF-8).
WIRE_SAVING = ROW_OVERHEAD - RECORD_WIRE_OVERHEAD
U64, F32 = np.dtype("<u8"), np.dtype("<f4")

KINDS_SUFFIX = ".kinds"


def kinds_path(queue: Path) -> Path:
    """Where a queue's kinds are kept beside it (set aside with it, too)."""
    return queue.with_name(queue.name + KINDS_SUFFIX)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def meta_sizes(metas: Sequence[dict[str, Any] | None], strings: Sequence[str]) -> list[int]:
    """What each record's metadata is charged: its JSON's length, nothing for none."""
    return [len(j) if m else 0 for m, j in zip(metas, strings, strict=True)]


_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # one encoder, not one a call


def compact_json(value: Any) -> str:
    """Metadata as stored and as charged: compact, ASCII, no NaN (json.dumps' output, made by
    one encoder: ``dumps`` with options builds a new one per call, the cost of small objects)."""
    return _COMPACT.encode(value)


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
    # each record's metadata as compact JSON, made once (staging makes it) and reused for the
    # budget, the split into chunks and the chunk row; None: made here when first asked for
    meta_json: list[str] | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    def meta_strings(self) -> list[str] | None:
        if self.meta is not None and self.meta_json is None:
            self.meta_json = [compact_json(m) for m in self.meta]
        return self.meta_json

    def sizes(self, record_bytes: int) -> np.ndarray:
        """What each record is charged against the budget."""
        base = np.full(len(self), record_bytes + ROW_OVERHEAD, dtype=np.int64)
        strings = self.meta_strings()
        if self.meta is not None and strings is not None:
            base += np.array(meta_sizes(self.meta, strings), dtype=np.int64)
        return base

    def meta_column(self) -> str | None:
        """The chunk row's ``meta``: the records' metadata as one JSON array."""
        strings = self.meta_strings()
        return None if strings is None else "[" + ",".join(strings) + "]"

    def take(self, keep: np.ndarray, record_bytes: int) -> Columns:
        feats = np.frombuffer(self.features, dtype=np.uint8).reshape(len(self), record_bytes)
        return Columns(
            self.seqs[keep],
            self.scores[keep],
            self.times[keep],
            feats[keep].tobytes(),
            None if self.meta is None else [m for m, k in zip(self.meta, keep, strict=True) if k],
            None if self.meta_json is None else [m for m, k in zip(self.meta_json, keep, strict=True) if k],
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
            None if self.meta_json is None else self.meta_json[lo:hi],
        )

    @classmethod
    def concat(cls, parts: list[Columns]) -> Columns:
        if len(parts) == 1:
            return parts[0]
        metas = strings = None
        if any(p.meta is not None for p in parts):
            metas = [m for p in parts for m in (p.meta if p.meta is not None else [{}] * len(p))]
            strings = [j for p in parts for j in (p.meta_strings() or ["{}"] * len(p))]
        return cls(
            np.concatenate([p.seqs for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.times for p in parts]),
            b"".join(p.features for p in parts),
            metas,
            strings,
        )


class KindTable:
    """The ``kinds`` table in memory (both ways), and its copy beside the queue file.

    A transaction that adds a kind and is rolled back takes it out again (``snapshot``,
    ``restore``); the copy is written only after a commit (``save``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path  # the side file (``kinds_path``)
        self.by_kind: dict[RecordKind, int] = {}
        self.by_id: dict[int, RecordKind] = {}
        self._saved = -1

    def __contains__(self, kind: RecordKind) -> bool:
        return kind in self.by_kind

    def load(self, db: sqlite3.Connection) -> None:
        for row in db.execute(
            "SELECT id, stream, model, model_version, schema_version, dtype, dim, scale FROM kinds"
        ):
            k = RecordKind.from_row(row)
            self.by_kind[k] = row[0]
            self.by_id[row[0]] = k

    def id_for(self, db: sqlite3.Connection, kind: RecordKind) -> int:
        """The kind's row id, inserted into ``kinds`` (in the caller's transaction) if new."""
        kid = self.by_kind.get(kind)
        if kid is None:
            cur = db.execute(
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
            self.by_kind[kind] = kid
            self.by_id[kid] = kind
        return kid

    def snapshot(self) -> dict[RecordKind, int]:
        return dict(self.by_kind)

    def restore(self, snap: dict[RecordKind, int]) -> None:
        self.by_kind = dict(snap)
        self.by_id = {v: k for k, v in self.by_kind.items()}

    def save(self) -> None:
        """The kinds beside the queue, after a commit that added one: a rescue needs them to
        read the records of a file whose ``kinds`` page is damaged (``rescue.py``)."""
        if len(self.by_id) == self._saved:
            return
        doc = {str(kid): kind_doc(k) for kid, k in sorted(self.by_id.items())}
        try:
            write_atomic(self.path, json.dumps(doc).encode())
        except OSError as e:
            log.warning(
                "could not write %s (%s); a rescue of this queue would need its kinds table",
                self.path,
                e,
            )
            return
        self._saved = len(self.by_id)
