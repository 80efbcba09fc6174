"""Eviction: which unframed records go when the queue is over its budget or the disk is full.

Both policies live here: ``oldest`` (lowest seqs first) and ``lowest_score`` (lowest
(score, seq) first, across chunks; on a full disk, whole chunks by their best score, since
rewriting a chunk needs the disk that is missing). Records in a frame are never evicted.
``block`` evicts nothing: the writer refuses instead. Whatever is evicted is counted in the
ledger's books by reason, in the transaction that removes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from edge_agent.config import EvictionPolicy
from edge_agent.errors import DiskFull
from edge_agent.store.chunks import CHUNK_COLUMNS, SET_CHUNK, chunk_row, columns_of
from edge_agent.store.file import QueueFile
from edge_agent.store.ledger import Ledger
from edge_agent.store.records import F32, KindTable
from edge_agent.store.room import Room

log = logging.getLogger(__package__)  # the package's one logger, "edge_agent.store"

Picked = list[tuple[tuple[Any, ...], np.ndarray]]  # chunk rows, each with its records to drop


class Evictor:
    def __init__(self, file: QueueFile, kinds: KindTable, ledger: Ledger, room: Room) -> None:
        self.file = file
        self.kinds = kinds
        self.ledger = ledger
        self.room = room

    def evict(self, excess: int, reason: str) -> int:
        """Remove at least ``excess`` bytes of unframed records, in policy order; count them."""
        if excess <= 0:
            return 0
        if self.file.settings.policy is EvictionPolicy.LOWEST_SCORE:
            if reason == "disk_full":
                return self._evict_chunks(self._pick_chunks_by_top_score(excess), reason)
            doomed = self._pick_lowest_scores(excess)
        else:
            doomed = self._pick_oldest(excess)
        db = self.file.db
        count = freed = 0
        for row, drop in doomed:
            kind = self.kinds.by_id[row[3]]
            cols = columns_of(row)
            sizes = cols.sizes(kind.record_bytes)
            count += int(drop.sum())
            freed += int(sizes[drop].sum())
            if drop.all():
                db.execute("DELETE FROM chunks WHERE key=?", (row[0],))
                continue
            keep = ~drop
            rest = cols.take(keep, kind.record_bytes)
            new = chunk_row(row[3], rest, int(sizes[keep].sum()), key=row[0])
            db.execute(SET_CHUNK, (*new, row[0]))
        if count:
            self.ledger.count_loss(reason, count, freed)
            self.ledger.bytes -= freed
            log.warning("queue: evicted %d records (%d bytes), reason %s", count, freed, reason)
        return count

    def make_room_on_disk(self, nbytes: int) -> None:
        """The disk filled during an append: evict by policy (counted as ``disk_full``); SQLite
        reuses the freed pages. Another process filling the filesystem leaves the WAL no
        room even for that: then the reserve is given up for it."""
        if self.file.settings.policy is EvictionPolicy.BLOCK:
            return
        try:
            freed = self.room.roomy(self._evict_committed, nbytes)
        except DiskFull as e:
            log.error("disk full while writing %s, and no room even to evict: %s", self.file.path, e)
            return  # the batches are refused (DiskFull): the producers try again later
        log.error("disk full while writing %s; evicted %d records to make room", self.file.path, freed)

    def _evict_committed(self, nbytes: int) -> int:
        snap = self.ledger.snapshot()
        try:
            self.file.db.execute("BEGIN IMMEDIATE")
            freed = self.evict(nbytes, "disk_full")
            self.file.db.execute("COMMIT")
        except BaseException:
            self.ledger.rollback(snap)
            raise
        return freed

    # -- the policies' picks ----------------------------------------------

    def _unframed(self, order: str) -> Iterator[tuple[Any, ...]]:
        yield from self.file.db.execute(
            f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE key > ? ORDER BY {order}", (self.ledger.chain_last,)
        )

    def _pick_oldest(self, excess: int) -> Picked:
        picked = []
        for row in self._unframed("key"):
            sizes = columns_of(row).sizes(self.kinds.by_id[row[3]].record_bytes)
            drop = np.cumsum(sizes) - sizes < excess  # records until the excess is covered
            picked.append((row, drop))
            excess -= int(sizes[drop].sum())
            if excess <= 0:
                break
        return picked

    def _pick_chunks_by_top_score(self, excess: int) -> list[tuple[int, int, int]]:
        """Whole unframed chunks, those whose best record scores lowest first, covering ``excess``:
        (key, records, bytes) each. The lowest-score policy on a full disk: picking records one
        by one rewrites every chunk they sit in, and rewriting needs the disk that is missing;
        deleting whole chunks needs next to none. A chunk with a high-scoring record is kept."""
        heads = self.file.db.execute(
            "SELECT key, n, nbytes, scores FROM chunks WHERE key > ?", (self.ledger.chain_last,)
        ).fetchall()
        ranked = sorted((float(np.frombuffer(sc, dtype=F32).max()), key, n, nb) for key, n, nb, sc in heads)
        picked: list[tuple[int, int, int]] = []
        for _top, key, n, nb in ranked:
            if excess <= 0:
                break
            picked.append((key, n, nb))
            excess -= nb
        return picked

    def _evict_chunks(self, chunks: list[tuple[int, int, int]], reason: str) -> int:
        if not chunks:
            return 0
        self.file.db.executemany("DELETE FROM chunks WHERE key=?", [(key,) for key, _, _ in chunks])
        count, freed = sum(c[1] for c in chunks), sum(c[2] for c in chunks)
        self.ledger.count_loss(reason, count, freed)
        self.ledger.bytes -= freed
        log.warning("queue: evicted %d records (%d bytes, whole chunks), reason %s", count, freed, reason)
        return count

    def _pick_lowest_scores(self, excess: int) -> Picked:
        """The records with the lowest (score, seq) whose sizes cover ``excess``, across chunks."""
        rows: list[tuple[Any, ...]] = []
        scores: list[np.ndarray] = []
        seqs: list[np.ndarray] = []
        sizes: list[np.ndarray] = []
        for row in self._unframed("min_score, key"):
            if rows:
                # Enough already among records scoring below anything not yet loaded?
                s, z = np.concatenate(scores), np.concatenate(sizes)
                if int(z[s < row[5]].sum()) >= excess:
                    break
            cols = columns_of(row)
            rows.append(row)
            scores.append(cols.scores)
            seqs.append(cols.seqs)
            sizes.append(cols.sizes(self.kinds.by_id[row[3]].record_bytes))
        if not rows:
            return []
        all_scores, all_seqs, all_sizes = np.concatenate(scores), np.concatenate(seqs), np.concatenate(sizes)
        order = np.lexsort((all_seqs, all_scores))
        covered = np.cumsum(all_sizes[order])
        k = int(np.searchsorted(covered, excess)) + 1
        drop_all = np.zeros(len(all_scores), dtype=bool)
        drop_all[order[:k]] = True
        picked = []
        at = 0
        for row, sc in zip(rows, scores, strict=True):
            drop = drop_all[at : at + len(sc)]
            at += len(sc)
            if drop.any():
                picked.append((row, drop))
        return picked
