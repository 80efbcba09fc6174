"""Rescue: what is still readable of a queue file that failed its integrity check.

A queue that fails ``PRAGMA quick_check`` at open is moved aside as
``queue.db.corrupt-<stamp>`` (with its ``-wal``) and a fresh queue starts (``edge_agent.store.file``).
Its records are not given up: the agent rescues them into the fresh queue right after
(``store.rescue``, on by default), and ``edge-agent recover`` does it for a file set aside
earlier. Records keep their seqs, their identity for the cloud:

- **reading.** The set-aside file is copied (the original stays as it is, for forensics),
  its WAL checkpointed into the copy, and every table leaf page read directly
  (``sqlite_pages.py``), so a damaged page above the leaves hides nothing. Each chunk row
  is checked: blob sizes, seqs strictly increasing within the row's range, finite scores,
  metadata of the right length, a known kind (from the file, or the ``.kinds`` copy set
  aside with it) and its CRC-32 (``row_crc``; rows of older versions have none). A row
  that fails is lost; as far as the file's index says how many records it held, they are
  counted, reason ``corrupt``, and reported upstream like any loss.
- **delivering.** Rescued records wait in the queue's ``rescued`` table and go in rescued
  frames (``FLAG_RESCUED``), one at a time, beside the chain. The cloud stores those it
  does not hold, once, and tells which it cannot vouch for (``cloud_ingest/rescued.py``),
  so a record that reached JetStream before the damage is not delivered again.
- **once per file.** A rescued file gets ``<file>.rescued.json`` with the tally;
  ``recover`` skips such files unless asked again, and rescuing a file twice adds nothing
  (rows are keyed by seq).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_agent.files import write_atomic
from edge_agent.sqlite_pages import Scan, Value, table_rows
from edge_agent.store import (
    F32,
    KINDS_SUFFIX,
    ROW_OVERHEAD,
    U64,
    Columns,
    RecordKind,
    Store,
    kinds_path,
    row_crc,
)
from edge_tier.wire import WireError

log = logging.getLogger(__name__)

SUFFIXES = ("", "-wal")  # what a set-aside queue consists of (the -shm is rebuilt)

# Each way of finding chunk keys: a damaged page stops one scan, not the others.
_KEY_SCANS = (
    "SELECT key, n FROM chunks INDEXED BY chunks_heads ORDER BY key",
    "SELECT key, n FROM chunks INDEXED BY chunks_heads ORDER BY key DESC",
    "SELECT key, n FROM chunks NOT INDEXED ORDER BY key",
    "SELECT key, n FROM chunks NOT INDEXED ORDER BY key DESC",
)


@dataclass(slots=True)
class RescueReport:
    """What one rescue read from one file."""

    source: str
    records: int = 0  # read and queued for delivery (or already queued by an earlier rescue)
    chunks: int = 0
    lost_records: int = 0  # in rows that could not be read, as far as the index tells
    lost_chunks: int = 0
    damage_unmeasured: bool = False  # some scan stopped early: rows it would have found are unknown
    problems: tuple[str, ...] = ()  # the first few, for the log and the report file
    finished_ms: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def pending(queue: Path) -> list[Path]:
    """Files set aside beside ``queue`` and not rescued yet, oldest first."""
    found = [
        p
        for p in queue.parent.glob(queue.name + ".corrupt-*")
        if not p.name.endswith(("-wal", "-shm", ".json", ".lock", KINDS_SUFFIX))
        and not report_path(p).exists()
    ]
    return sorted(found, key=lambda p: p.name)


def report_path(source: Path) -> Path:
    return source.with_name(source.name + ".rescued.json")


def rescue_file(store: Store, source: Path) -> RescueReport:
    """Read what can be read of ``source`` into ``store``'s rescued records; write the report."""
    report = RescueReport(source=str(source))
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".rescue-", dir=source.parent) as tmp:
        copy = Path(tmp) / "queue.db"
        for suffix in SUFFIXES:
            src = Path(str(source) + suffix)
            if src.exists():
                shutil.copyfile(src, str(copy) + suffix)
        groups, lost_bytes = _read(source, copy, report, problems)
    report.problems = tuple(problems[:20])
    added = store.add_rescued(groups, report.lost_records, lost_bytes)
    report.finished_ms = time.time_ns() // 1_000_000
    write_atomic(report_path(source), json.dumps(report.as_dict(), indent=2).encode())
    damaged = report.lost_records or report.lost_chunks or report.damage_unmeasured
    log_fn = log.warning if damaged else log.info
    log_fn(
        "rescued %d records (%d new) from %s; lost %d records in %d unreadable chunks%s",
        report.records,
        added,
        source,
        report.lost_records,
        report.lost_chunks,
        " (and an unknown number the damage hides)" if report.damage_unmeasured else "",
    )
    return report


Groups = list[tuple[RecordKind, Columns]]


def _read(source: Path, copy: Path, report: RescueReport, problems: list[str]) -> tuple[Groups, int]:
    """Rows from every intact leaf page; counts of lost rows from the index (SQL)."""
    kinds, indexed = _read_index(copy, report, problems)
    for kid, k in _saved_kinds(source, problems).items():
        kinds.setdefault(kid, k)
    candidates = _scan_pages(copy, kinds, report, problems)
    found: dict[int, tuple[RecordKind, Columns]] = {}
    for rowid, values in candidates:
        try:
            found.setdefault(rowid, _check_row((rowid, *values[1:]), kinds))
        except (ValueError, WireError) as e:
            problems.append(f"chunk {rowid}: {e}")
            if rowid not in indexed:
                report.lost_chunks += 1  # a row whose records are unknown in number
                report.damage_unmeasured = True
    lost_bytes = 0
    for key, n in indexed.items():
        if key not in found:
            report.lost_chunks += 1
            report.lost_records += n or 0
            lost_bytes += (n or 0) * ROW_OVERHEAD
            if n is None:
                report.damage_unmeasured = True
    groups = [found[k] for k in sorted(found)]
    report.chunks = len(groups)
    report.records = sum(len(c) for _, c in groups)
    return groups, lost_bytes


def _read_index(
    copy: Path, report: RescueReport, problems: list[str]
) -> tuple[dict[int, RecordKind], dict[int, int | None]]:
    """The kinds and the chunk keys (with their record counts) as SQL still reads them."""
    try:
        db = sqlite3.connect(copy, isolation_level=None)
        try:
            # The WAL's pages into the file, so the page scan reads the newest of each.
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return _kinds(db, problems), _keys(db, report, problems)
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        problems.append(f"cannot read it as a database: {e}")
        report.damage_unmeasured = True
        return {}, {}


def _scan_pages(
    copy: Path, kinds: dict[int, RecordKind], report: RescueReport, problems: list[str]
) -> list[tuple[int, tuple[Value, ...]]]:
    """The chunk rows of every intact leaf page (kinds rows found on the way go to ``kinds``)."""
    candidates: list[tuple[int, tuple[Value, ...]]] = []
    scan = Scan()
    try:
        for rowid, values in table_rows(copy, scan):
            if _is_kind_row(values) and rowid not in kinds:
                with contextlib.suppress(ValueError, TypeError, WireError):
                    kinds[rowid] = _kind((rowid, *values[1:]))
            elif len(values) in (12, 13) and values[0] is None:  # a chunk row (13: with its crc)
                candidates.append((rowid, values))
    except (OSError, ValueError) as e:
        problems.append(f"page scan: {e}")
        report.damage_unmeasured = True
    if scan.bad_cells:
        problems.append(f"{scan.bad_cells} cells on leaf pages could not be read")
        report.damage_unmeasured = True
    return candidates


def _saved_kinds(source: Path, problems: list[str]) -> dict[int, RecordKind]:
    """The kinds the store kept beside the file (``store.records.KindTable.save``), if it is there."""
    path = kinds_path(source)
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        problems.append(f"{path.name}: {e}")
        return {}
    kinds = {}
    for kid, d in doc.items() if isinstance(doc, dict) else ():
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError, WireError):
            r = (
                kid,
                d["stream"],
                d["model"],
                d["model_version"],
                d["schema_version"],
                d["dtype"],
                d["dim"],
                d["scale"],
            )
            kinds[int(kid)] = _kind(r)
    return kinds


def _is_kind_row(values: tuple[Value, ...]) -> bool:
    """The shape of a ``kinds`` row: id (the rowid), three names, three integers, a scale."""
    return (
        len(values) == 8
        and values[0] is None
        and all(isinstance(v, str) for v in values[1:4])
        and all(isinstance(v, int) for v in values[4:7])
        and isinstance(values[7], int | float)
    )


def _kind(r: tuple[Value, ...]) -> RecordKind:
    """A ``kinds`` row (id, stream, model, model_version, schema_version, dtype, dim, scale)."""
    k = RecordKind.from_row(r)
    k.check()
    return k


def _kinds(db: sqlite3.Connection, problems: list[str]) -> dict[int, RecordKind]:
    kinds: dict[int, RecordKind] = {}
    try:
        rows = db.execute(
            "SELECT id, stream, model, model_version, schema_version, dtype, dim, scale FROM kinds"
        ).fetchall()
    except sqlite3.DatabaseError as e:
        problems.append(f"kinds: {e}")
        return kinds
    for r in rows:
        try:
            kinds[int(r[0])] = _kind(tuple(r))
        except (ValueError, TypeError, WireError) as e:
            problems.append(f"kind {r[0]}: {e}")
    return kinds


def _keys(db: sqlite3.Connection, report: RescueReport, problems: list[str]) -> dict[int, int | None]:
    found: dict[int, int | None] = {}
    for sql in _KEY_SCANS:
        try:
            for key, n in db.execute(sql):
                if isinstance(key, int):
                    known = n if isinstance(n, int) and n > 0 else None
                    if found.get(key) is None:
                        found[key] = known
        except sqlite3.DatabaseError as e:
            report.damage_unmeasured = True
            problems.append(f"scan stopped ({sql.split(' BY ')[1]}...): {e}")
    return found


def _check_row(row: Sequence[object], kinds: dict[int, RecordKind]) -> tuple[RecordKind, Columns]:
    """A chunk row back into columns, or ValueError saying what does not hold."""
    key, last_seq, n, kid = row[0], row[1], row[2], row[3]
    if not all(isinstance(v, int) for v in (key, last_seq, n, kid)):
        raise ValueError("key, last_seq, n or kind is not an integer")
    assert isinstance(key, int) and isinstance(last_seq, int) and isinstance(n, int) and isinstance(kid, int)
    kind = kinds.get(kid)
    if kind is None:
        raise ValueError(f"unknown kind {kid}")
    if n < 1:
        raise ValueError(f"n = {n}")
    blobs = row[7:11]
    want = (8 * n, 4 * n, 8 * n, n * kind.record_bytes)
    for name, blob, size in zip(("seqs", "scores", "times", "features"), blobs, want, strict=True):
        if not isinstance(blob, bytes) or len(blob) != size:
            got = len(blob) if isinstance(blob, bytes) else type(blob).__name__
            raise ValueError(f"{name}: {got} bytes, {n} records need {size}")
    seq_b, score_b, time_b, feat_b = (b if isinstance(b, bytes) else b"" for b in blobs)
    crc = row[12] if len(row) > 12 else None
    if crc is not None and crc != row_crc(seq_b, score_b, time_b, feat_b, row[11]):  # type: ignore[arg-type]
        raise ValueError("its checksum does not match: a value in it was damaged")
    seqs = np.frombuffer(seq_b, dtype=U64)
    if seqs[0] < key or int(seqs[-1]) != last_seq or (n > 1 and not (seqs[1:] > seqs[:-1]).all()):
        raise ValueError(f"seqs do not run strictly from {key} to {last_seq}")
    scores = np.frombuffer(score_b, dtype=F32)
    if not np.isfinite(scores).all():
        raise ValueError("a score is not finite")
    meta = None
    if row[11] is not None:
        try:
            meta = json.loads(str(row[11]))
        except ValueError as e:
            raise ValueError(f"meta: {e}") from None
        if not isinstance(meta, list) or len(meta) != n or not all(isinstance(m, dict) for m in meta):
            raise ValueError(f"meta: not a list of {n} objects")
    times = np.frombuffer(time_b, dtype=U64).copy()
    return kind, Columns(seqs.copy(), scores.copy(), times, feat_b, meta)
