"""The writer: producers' batches into chunk rows, many batches to one transaction (group commit).

Owns ``append_many`` and what it takes: checking each batch and giving it its seqs and its
charge (staging), writing runs of one kind as chunk rows that a frame always carries whole,
evicting by policy in the same transaction when the budget or the filesystem's ceiling is
passed, and, when the disk fills anyway, redoing the transaction until every batch that
fits is in and each one that does not has its own error.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.config import EvictionPolicy
from edge_agent.disk import is_disk_full
from edge_agent.errors import DiskFull, QueueFull, RecordTooLarge, StoreError
from edge_agent.store.chunks import FrameLimits, chunk_row, insert_sql, split_bounds
from edge_agent.store.eviction import Evictor
from edge_agent.store.file import QueueFile
from edge_agent.store.ledger import Ledger
from edge_agent.store.records import (
    F32,
    ROW_OVERHEAD,
    U64,
    Appended,
    Columns,
    KindTable,
    NewRecord,
    RecordBatch,
    RecordKind,
    compact_json,
    meta_sizes,
    now_ms,
)
from edge_agent.store.room import Room
from edge_tier.wire import RECORD_WIRE_OVERHEAD, WireError

log = logging.getLogger(__package__)  # the package's one logger, "edge_agent.store"

Batches = Sequence[tuple[RecordKind, Sequence[NewRecord] | RecordBatch]]


@dataclass(slots=True)
class _Staged:
    """A batch checked and given its seqs, waiting to be written in its transaction."""

    index: int
    kind: RecordKind
    first: int
    n: int
    records: Sequence[NewRecord] | RecordBatch
    nbytes: int
    meta_json: list[str] | None = None  # each record's metadata as compact JSON, made once


@dataclass(slots=True)
class _Tries:
    """Where ``append_many`` is in its retries after a full disk."""

    made_room: bool = False  # evicted (committed) to make room once
    merge: bool = True  # batches of one kind share chunk rows (off: one by one)
    current: int | None = None  # the batch being written alone, when one is


class _OverCeiling(Exception):
    """The append would take the database past the filesystem's ceiling and the policy
    forbids evicting: the transaction is undone and redone as on SQLITE_FULL."""


def _runs_of_one_kind(staged: list[_Staged]) -> list[list[_Staged]]:
    runs: list[list[_Staged]] = []
    for x in staged:
        if runs and runs[-1][-1].kind == x.kind:
            runs[-1].append(x)
        else:
            runs.append([x])
    return runs


class Writer:
    def __init__(
        self,
        file: QueueFile,
        kinds: KindTable,
        ledger: Ledger,
        room: Room,
        evictor: Evictor,
        limits: FrameLimits,
    ) -> None:
        self.file = file
        self.kinds = kinds
        self.ledger = ledger
        self.room = room
        self.evictor = evictor
        self.limits = limits
        self.commits = 0  # group commits done (benchmarks and tests read it)

    def append_many(
        self, batches: Batches, write_behind: Sequence[bool] | None = None
    ) -> list[Appended | Exception]:
        """Append several producers' batches in ONE transaction (group commit).

        Consecutive batches of one kind share chunk rows, so many small
        producers cost what one big one does. Each batch gets its own result:
        its seq range, or the exception that refused it (``QueueFull`` under the
        block policy, ``RecordTooLarge`` for a record no frame can carry,
        ``StoreError`` for a bad batch or one the full disk cannot take) without
        failing the others. A refused batch whose producer is not waiting
        (``write_behind``) is counted as lost, reason ``refused``: nobody else
        would hear of it.

        The filesystem bounds the queue as the budget does: past the ceiling of
        ``DiskRoom``, records are evicted by policy in the same transaction and
        counted as ``disk_full`` (see ``edge_agent/disk.py``).
        """
        failed: dict[int, Exception] = {}
        tries = _Tries()
        while True:
            snapshot = self.ledger.snapshot()
            tries.current = None
            try:
                results = self._commit(batches, write_behind, failed, tries)
                break
            except (sqlite3.OperationalError, _OverCeiling) as e:
                # SQLite may roll a transaction back by itself on SQLITE_FULL, so the
                # whole group is redone: once after making room, then batch by batch
                # to find the one that does not fit, then without it.
                self.ledger.rollback(snapshot)
                if not isinstance(e, _OverCeiling) and not is_disk_full(e):
                    raise
                self.room.lift_ceiling()  # making room rewrites chunks: it needs pages of its own
                if self._next_try(batches, failed, tries):
                    # Not even the bookkeeping of the refusals fits: answer without a commit.
                    log.error(
                        "disk full: %d batches refused, nothing written to %s", len(batches), self.file.path
                    )
                    return [failed[i] for i in range(len(batches))]
            except BaseException:
                self.ledger.rollback(snapshot)
                raise
            finally:
                self.room.lift_ceiling()
        self.commits += 1
        return [results[i] for i in range(len(batches))]

    def _commit(
        self,
        batches: Batches,
        write_behind: Sequence[bool] | None,
        failed: dict[int, Exception],
        tries: _Tries,
    ) -> dict[int, Appended | Exception]:
        """One try of ``append_many``: every batch not ``failed`` yet, in one transaction."""
        db = self.file.db
        results: dict[int, Appended | Exception] = dict(failed)
        self.room.set_ceiling()
        db.execute("BEGIN IMMEDIATE")
        staged = self._stage_all(batches, failed, results)
        groups = _runs_of_one_kind(staged) if tries.merge else [[x] for x in staged]
        for group in groups:
            tries.current = None if tries.merge else group[0].index
            self._write(group)
        tries.current = None
        evicted = 0
        excess = self.ledger.bytes - self.file.settings.budget_bytes
        if excess > 0:
            evicted = self.evictor.evict(excess, self.file.settings.policy.value)
        evicted += self._evict_to_ceiling()
        for x in staged:
            results[x.index] = Appended(x.first, x.first + x.n - 1, evicted)
        self._count_refused(batches, write_behind, results)
        self.file.set_meta("next_seq", self.ledger.next_seq)
        self.file.raise_floor(self.ledger.next_seq)
        db.execute("COMMIT")
        self.kinds.save()
        return results

    def _stage_all(
        self, batches: Batches, failed: dict[int, Exception], results: dict[int, Appended | Exception]
    ) -> list[_Staged]:
        """Stage every batch not ``failed``; the refused and the empty ones get their result now."""
        staged: list[_Staged] = []
        for i, (kind, records) in enumerate(batches):
            if i not in failed:
                r = self._stage(i, kind, records)
                if isinstance(r, Exception):
                    results[i] = r
                elif len(records):
                    staged.append(r)
                else:
                    results[i] = Appended(0, 0, 0)
        return staged

    def _count_refused(
        self,
        batches: Batches,
        write_behind: Sequence[bool] | None,
        results: dict[int, Appended | Exception],
    ) -> None:
        """A refused write-behind batch is lost (reason ``refused``): its producer is not waiting."""
        for i, res in results.items():
            if isinstance(res, Exception) and write_behind is not None and write_behind[i]:
                kind, records = batches[i]
                n = len(records)
                self.ledger.count_loss("refused", n, n * (kind.record_bytes + ROW_OVERHEAD))
                log.error("write-behind batch of %d records refused: %s", n, res)

    def _next_try(self, batches: Batches, failed: dict[int, Exception], tries: _Tries) -> bool:
        """After a full disk: what to try next, in order. True when there is nothing left to try
        (every batch has failed, and not even those refusals could be committed)."""
        if not tries.made_room:
            if self.room.fs_really_full():
                self.room.reclaim()
            need = sum(len(r) * (k.record_bytes + ROW_OVERHEAD) for k, r in batches) * 2
            self.evictor.make_room_on_disk(max(need, 256 * 1024))
            tries.made_room = True
        elif tries.merge:
            tries.merge = False
        elif tries.current is not None:
            failed[tries.current] = self._no_room(len(batches[tries.current][1]))
        elif len(failed) < len(batches):
            # What does not fit is not one batch: the queue holds only frames in flight.
            for i, (_kind, records) in enumerate(batches):
                failed.setdefault(i, self._no_room(len(records)))
        else:
            return True
        return False

    def _no_room(self, n: int) -> StoreError:
        path = self.file.path
        if self.file.settings.policy is EvictionPolicy.BLOCK:
            return QueueFull(
                f"queue {path}: the filesystem is full and the policy is 'block': {n} records refused"
            )
        return DiskFull(
            f"{path}: disk full: a batch of {n} records does not fit even after evicting by policy "
            "(what is left is in flight to the cloud)"
        )

    def _evict_to_ceiling(self) -> int:
        """Inside the append's transaction: evict by policy (``disk_full``) what takes the pages in
        use past the filesystem's ceiling (``Room.bytes_over_ceiling``)."""
        over = self.room.bytes_over_ceiling(self.ledger.bytes)
        if not over:
            return 0
        if self.file.settings.policy is EvictionPolicy.BLOCK:
            raise _OverCeiling
        return self.evictor.evict(over, "disk_full")

    # -- staging ----------------------------------------------------------

    def _stage(
        self, index: int, kind: RecordKind, records: Sequence[NewRecord] | RecordBatch
    ) -> _Staged | Exception:
        """Check one batch and give it its seqs and its share of the budget (written later)."""
        n = len(records)
        if kind not in self.kinds:
            # Whatever is queued must encode as a frame later, or it would block the queue.
            try:
                kind.check()
            except WireError as e:
                return StoreError(f"stream {kind.stream!r}: {e}")
        rb = kind.record_bytes
        where = f"stream {kind.stream!r}"
        try:
            if isinstance(records, RecordBatch):
                records = RecordBatch.of(records, rb)
                metas = records.meta
                if metas is not None and len(metas) != n:
                    raise StoreError(f"{len(metas)} metadata objects for {n} records")
            else:
                for i, r in enumerate(records):
                    if len(r.features) != rb:
                        raise StoreError(f"record {i}: {len(r.features)} feature bytes, expected {rb}")
                metas = [r.meta or {} for r in records] if any(r.meta for r in records) else None
            meta_json = [compact_json(m) for m in metas] if metas else None
            meta_lens = meta_sizes(metas, meta_json) if metas and meta_json else [0]
        except (StoreError, TypeError, ValueError) as e:
            return StoreError(f"{where}: {e} ({kind.dim} x {kind.dtype.name.lower()})")
        too_large = self._too_large(kind, max(meta_lens))
        if too_large is not None:
            return RecordTooLarge(f"{where}: {too_large}; none of the {n} records queued")
        nbytes = n * (rb + ROW_OVERHEAD) + (sum(meta_lens) if metas else 0)
        budget = self.file.settings.budget_bytes
        used = self.ledger.bytes
        if self.file.settings.policy is EvictionPolicy.BLOCK and used + nbytes > budget:
            return QueueFull(
                f"queue {self.file.path} is full ({used} of {budget} bytes) and the policy is "
                f"'block': {n} records refused"
            )
        staged = _Staged(index, kind, self.ledger.next_seq, n, records, nbytes, meta_json)
        self.ledger.next_seq += n
        self.ledger.bytes += nbytes
        return staged

    def _too_large(self, kind: RecordKind, meta_len: int) -> str | None:
        """Why one record of ``kind`` fits no frame, or None. A frame is what reaches the cloud
        whole, so a record that fits none would never leave the device."""
        max_dim, max_bytes = self.limits.max_dim, self.limits.max_bytes
        if max_dim is not None and kind.dim > max_dim:
            return f"a record of dim {kind.dim} is wider than the cloud takes (max_dim {max_dim})"
        alone = kind.frame_overhead + kind.record_bytes + RECORD_WIRE_OVERHEAD + meta_len
        if alone > max_bytes:
            return (
                f"a record of {kind.record_bytes} feature bytes and {meta_len} bytes of metadata makes a "
                f"{alone}-byte frame, over the frame limit of {max_bytes} bytes"
            )
        return None

    # -- writing ----------------------------------------------------------

    def _write(self, group: list[_Staged]) -> None:
        """Insert staged batches of one kind, with consecutive seqs, as chunk rows."""
        kind = group[0].kind
        rb = kind.record_bytes
        cols = _columns(group, rb)
        kid = self.kinds.id_for(self.file.db, kind)
        # Split into chunks that a frame can always carry whole.
        sizes = None if cols.meta is None else cols.sizes(rb)
        bounds = split_bounds(cols, kind, sizes, self.limits.max_records, self.limits.max_bytes)
        rows = [
            chunk_row(
                kid,
                cols.slice(lo, hi, rb),
                (hi - lo) * (rb + ROW_OVERHEAD) if sizes is None else int(sizes[lo:hi].sum()),
            )
            for lo, hi in itertools.pairwise(bounds)
        ]
        self.file.db.executemany(insert_sql("chunks"), rows)


def _columns(group: list[_Staged], rb: int) -> Columns:
    """Staged batches of one kind as columns, with their seqs (consecutive from the first)."""
    # Producers' record lists become one column batch each run (no numpy call per batch).
    parts: list[RecordBatch] = []
    loose: list[NewRecord] = []
    for x in group:
        if isinstance(x.records, RecordBatch):
            if loose:
                parts.append(RecordBatch.of(loose, rb))
                loose = []
            parts.append(x.records)
        else:
            loose.extend(x.records)
    if loose:
        parts.append(RecordBatch.of(loose, rb))
    n = sum(x.n for x in group)
    now = now_ms()
    metas = strings = None
    if any(p.meta is not None for p in parts):
        metas = [m for p in parts for m in (p.meta if p.meta is not None else [{}] * len(p))]
        strings = [j for x in group for j in (x.meta_json or ["{}"] * x.n)]
    return Columns(
        seqs=np.arange(group[0].first, group[0].first + n, dtype=U64),
        scores=np.concatenate([np.asarray(p.scores, dtype=F32) for p in parts]),
        times=np.concatenate(
            [
                np.full(len(p), now, dtype=U64) if p.created_ms is None else np.asarray(p.created_ms, U64)
                for p in parts
            ]
        ),
        features=b"".join(p.features for p in parts) if len(parts) > 1 else parts[0].features,
        meta=metas,
        meta_json=strings,
    )
