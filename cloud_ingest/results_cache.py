"""Result messages as the result API serves them, kept in memory by stream sequence.

A page of results is then a join of bytes: no JetStream read, no model decode and no
JSON encode per request. Each message's records are encoded once, when first read,
byte for byte as ``json.dumps`` writes ``api.records`` (so a response is the same
document as before). The follower hands in every message it indexes as it came from
the stream (cheap: it has the bytes already); the decode waits for the first read.
Bounded by an estimate of the bytes held; the least recently used go first, and a
read of one that went reads it from the stream again.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii

from edge_tier.wire import ResultBatch, decode_results

# What a held entry costs beyond its bytes: the dict slot, the key, the objects around it.
_ENTRY_OVERHEAD = 120
_ROW_OVERHEAD = 56


@dataclass(frozen=True, slots=True)
class Rows:
    """One result message, decoded: its records' JSON objects and how many parts its upload has."""

    rows: tuple[str, ...]  # ASCII JSON objects
    parts: int

    @property
    def size(self) -> int:
        return _ENTRY_OVERHEAD + sum(len(r) + _ROW_OVERHEAD for r in self.rows)


def _numbers(xs: list[float]) -> list[str]:
    """Each number as ``json.dumps`` spells it: ``float.__repr__`` while all are finite (so is
    their sum, at C speed; one that overflows just takes the slow way), else json's NaN and
    Infinity from one dumps of the list (no number's text holds ", ": the split is exact)."""
    if math.isfinite(sum(xs)):
        return list(map(float.__repr__, xs))
    return json.dumps(xs)[1:-1].split(", ")


def encode_rows(b: ResultBatch, stream_seq: int) -> tuple[str, ...]:
    """The records of one result message as JSON objects: what ``json.dumps`` makes of each of
    ``api.records(b, stream_seq)``, the same keys in the same order with the same spelling.
    Text, all ASCII (``json.dumps`` escapes the rest): a page is joined, then encoded once."""
    dumps = encode_basestring_ascii  # json.dumps of a str, without its Python-level setup
    head = f'{{"device": {dumps(b.device)}, "seq": '
    tail = (
        f', "upload_id": {dumps(b.upload_id)}, "produced_ms": {b.produced_ms}, "model": {dumps(b.model)}, '
        f'"model_version": {dumps(b.model_version)}, "event_id": "{stream_seq}"'
    )
    labels = {label: dumps(label) for label in set(b.labels)}
    cols = zip(b.seqs, b.times_ms, _numbers(b.scores), b.labels, _numbers(b.confidences), strict=True)
    if b.values is None:
        return tuple(
            f'{head}{s}, "time_ms": {t}, "score": {score}, "label": {labels[label]}, '
            f'"confidence": {conf}{tail}}}'
            for s, t, score, label, conf in cols
        )
    return tuple(
        f'{head}{s}, "time_ms": {t}, "score": {score}, "label": {labels[label]}, '
        f'"confidence": {conf}{tail}, "value": {v}}}'
        for (s, t, score, label, conf), v in zip(cols, _numbers(b.values), strict=True)
    )


class ResultsCache:
    """Stream sequence -> the message (raw until first read, then :class:`Rows`), least recently
    used out once the estimate passes ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._held: OrderedDict[int, bytes | Rows] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def keep(self, seq: int, data: bytes) -> None:
        """Hold a message as it came from the stream; decoded when first read."""
        if seq not in self._held:
            self._hold(seq, data, len(data) + _ENTRY_OVERHEAD)

    def put(self, seq: int, data: bytes) -> Rows:
        """Decode a message read from the stream and hold it; WireError if it does not validate."""
        rows = self._decode(seq, data)
        self._drop(seq)
        self._hold(seq, rows, rows.size)
        return rows

    def get(self, seq: int) -> Rows | None:
        """The message at ``seq``, or None if not held; WireError (and no longer held) if it was
        held raw and does not validate."""
        got = self._held.get(seq)
        if got is None:
            return None
        self._held.move_to_end(seq)
        if isinstance(got, Rows):
            return got
        self._drop(seq)
        rows = self._decode(seq, got)
        self._hold(seq, rows, rows.size)
        return rows

    def drop_before(self, seq: int) -> None:
        """Forget every message before ``seq`` (the stream's first: retention removed the rest)."""
        for s in [s for s in self._held if s < seq]:
            self._drop(s)

    def clear(self) -> None:
        self._held.clear()
        self.bytes = 0

    @staticmethod
    def _decode(seq: int, data: bytes) -> Rows:
        b = decode_results(data)
        return Rows(encode_rows(b, seq), b.parts)

    def _size(self, v: bytes | Rows) -> int:
        return v.size if isinstance(v, Rows) else len(v) + _ENTRY_OVERHEAD

    def _hold(self, seq: int, v: bytes | Rows, size: int) -> None:
        self._held[seq] = v
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._held) > 1:
            _, old = self._held.popitem(last=False)
            self.bytes -= self._size(old)

    def _drop(self, seq: int) -> None:
        v = self._held.pop(seq, None)
        if v is not None:
            self.bytes -= self._size(v)
