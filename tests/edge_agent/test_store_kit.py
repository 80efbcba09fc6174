"""What the tests of edge_agent.store share: kinds, record makers, a store opened and closed,
the bookkeeping every test checks, and patching a module the package's parts all import.

No tests here; the tests are in the other ``test_store_*.py`` files, one per part of the
store (``edge_agent/store/``).
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.config import StoreSettings
from edge_agent.store import ROW_OVERHEAD, Appended, NewRecord, RecordKind, Store
from edge_tier.wire import Dtype

K4 = RecordKind("vib", Dtype.FLOAT32, 4)
K4B = RecordKind("cam", Dtype.FLOAT32, 4)
BIG = RecordKind("vib", Dtype.FLOAT32, 1024)  # 4096 feature bytes + 64 overhead = 4160 per record
BIG_NBYTES = 1024 * 4 + ROW_OVERHEAD
MIN_BUDGET = 64 * 1024  # 15 BIG records fit (62400 bytes), 16 do not


def settings(tmp_path: Path, name: str = "q.db", **kw: Any) -> StoreSettings:
    kw.setdefault("synchronous", "NORMAL")
    return StoreSettings(path=tmp_path / name, **kw)


def feats(value: float, kind: RecordKind = K4) -> bytes:
    return np.full(kind.dim, value, dtype=kind.dtype.np_dtype).tobytes()


def recs(n: int, start: int = 0, kind: RecordKind = K4, scores: list[float] | None = None) -> list[NewRecord]:
    return [NewRecord(feats(start + i, kind), scores[i] if scores is not None else 0.5) for i in range(n)]


def ok(result: Appended | Exception) -> Appended:
    assert isinstance(result, Appended), f"batch refused: {result!r}"
    return result


@contextmanager
def opened(s: StoreSettings, **kw: Any) -> Iterator[Store]:
    store = Store(s, **kw)
    try:
        yield store
    finally:
        store.close()


def rows(store: Store) -> list[tuple[int, float, bytes]]:
    return [(seq, score, feats) for seq, _, _, score, feats, _ in store.records()]


def seqs(store: Store) -> list[int]:
    return [r[0] for r in rows(store)]


def fake_time(**overrides: Any) -> types.ModuleType:
    """A stand-in for the ``time`` module as edge_agent.store sees it, with some functions replaced."""
    fake = types.ModuleType("time")
    fake.__dict__.update({k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    fake.__dict__.update(overrides)
    return fake


def patch_store(monkeypatch: pytest.MonkeyPatch, name: str, fake: types.ModuleType) -> list[str]:
    """Replace the module ``name`` (``time``, ``sqlite3``) with ``fake`` in every module of
    edge_agent.store that imports it, as the tests did when the store was one module: a part
    that moves to another module is still patched. Returns the modules patched."""
    real = sys.modules[name]
    patched = [
        mod_name
        for mod_name, mod in list(sys.modules.items())
        if mod_name.startswith("edge_agent.store.") and getattr(mod, name, None) is real
    ]
    for mod_name in patched:
        monkeypatch.setattr(sys.modules[mod_name], name, fake)
    assert "edge_agent.store.file" in patched, patched  # the file opens, seeds and sets aside
    return patched


def bookkeeping(store: Store, enqueued: int) -> None:
    """Every record ever enqueued is in the queue, delivered, or counted as lost."""
    st = store.stats()
    assert enqueued == st.records + st.delivered + sum(st.evictions.values()), st
    assert store.bytes_used == st.bytes
    assert set(st.evictions) == set(st.evicted_bytes)
