"""Splitting records into chunks a frame carries whole: the searched split is the greedy one."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.store.chunks import split_bounds
from edge_agent.store.records import ROW_OVERHEAD, WIRE_SAVING, Columns, RecordKind
from edge_tier.wire import Dtype


def greedy(sizes: list[int], most: int, room: int) -> list[int]:
    """The record-by-record loop the store used before: a new piece when the next record would
    pass ``most`` records or ``room`` bytes, never an empty one."""
    bounds, total = [0], 0
    for i, size in enumerate(s - WIRE_SAVING for s in sizes):
        if i > bounds[-1] and (i - bounds[-1] >= most or total + size > room):
            bounds.append(i)
            total = 0
        total += size
    return [*bounds, len(sizes)]


@settings(max_examples=300, deadline=None)
@given(
    meta=st.lists(st.integers(0, 3000), min_size=1, max_size=300),
    most=st.integers(1, 50),
    max_bytes=st.integers(200, 20000),
)
def test_the_split_is_the_greedy_split(meta: list[int], most: int, max_bytes: int) -> None:
    kind = RecordKind(stream="s", dtype=Dtype.FLOAT32, dim=4, model="", model_version="", schema_version=1)
    n = len(meta)
    sizes = np.array([kind.record_bytes + ROW_OVERHEAD + m for m in meta], dtype=np.int64)
    cols = Columns(np.arange(1, n + 1, dtype=np.uint64), np.zeros(n, np.float32), np.zeros(n, np.uint64),
                   bytes(n * kind.record_bytes), [{}] * n)  # fmt: skip
    room = max(1, max_bytes - kind.frame_overhead)
    assert split_bounds(cols, kind, sizes, most, max_bytes) == greedy(sizes.tolist(), most, room)
