"""The rows of an SQLite file read page by page, without its b-trees (for ``rescue.py``).

When a page of a table's b-tree above the leaves is damaged, SQLite cannot reach the rows
below it, though their leaf pages are intact. Reading every leaf page of the file finds
them. This follows the documented file format (https://www.sqlite.org/fileformat2.html):

- the header gives the page size and the reserved bytes per page; the freelist's pages
  are skipped (they may hold rows deleted long ago);
- a table leaf page (type 0x0D) lists its cells; a cell is the payload size, the rowid and
  the payload, whose tail may run on in a chain of overflow pages;
- a payload is a record: a header of serial types, then the values.

Which table a leaf belongs to is not known here; callers tell their rows by shape and check
every value. A malformed cell or chain is skipped, never guessed at. Python's sqlite3 has
no binding of SQLite's recovery extension, and the ``sqlite3`` shell's ``.recover`` (3.40)
fails on 64 KiB pages, the queue's page size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

Value = int | float | bytes | str | None
LEAF_TABLE = 0x0D


@dataclass(slots=True)
class Scan:
    """What a page scan saw, for the rescue's report."""

    pages: int = 0
    leaf_pages: int = 0
    bad_cells: int = 0


class _Bad(Exception):
    pass


def _varint(buf: bytes | memoryview, off: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        if off + i >= len(buf):
            raise _Bad("varint runs off the page")
        b = buf[off + i]
        if i == 8:
            return (value << 8) | b, off + 9
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, off + i + 1
    raise _Bad("unreachable")


_INT_SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def _record(payload: bytes) -> tuple[Value, ...]:
    header_len, off = _varint(payload, 0)
    if not 1 <= header_len <= len(payload):
        raise _Bad("record header length")
    types = []
    while off < header_len:
        t, off = _varint(payload, off)
        types.append(t)
    if off != header_len:
        raise _Bad("record header overruns")
    values: list[Value] = []
    pos = header_len
    for t in types:
        value, pos = _value(t, payload, pos)
        values.append(value)
    if pos != len(payload):
        raise _Bad("record shorter than its payload")
    return tuple(values)


def _value(t: int, payload: bytes, pos: int) -> tuple[Value, int]:
    """The value of serial type ``t`` at ``pos`` of a record's body, and the offset after it."""
    if t == 0:
        return None, pos
    if t in _INT_SIZES:
        n = _INT_SIZES[t]
        if pos + n > len(payload):
            raise _Bad("integer past the record")
        return int.from_bytes(payload[pos : pos + n], "big", signed=True), pos + n
    if t == 7:
        if pos + 8 > len(payload):
            raise _Bad("real past the record")
        return struct.unpack_from(">d", payload, pos)[0], pos + 8
    if t in (8, 9):
        return t - 8, pos
    if t < 12:
        raise _Bad(f"serial type {t}")
    n = (t - 12) // 2
    if pos + n > len(payload):
        raise _Bad("blob or text past the record")
    raw = payload[pos : pos + n]
    if t % 2 == 0:
        return raw, pos + n
    try:
        return raw.decode("utf-8"), pos + n
    except UnicodeDecodeError:
        raise _Bad("text is not UTF-8") from None


class _File:
    def __init__(self, data: bytes) -> None:
        if len(data) < 100 or data[:16] != b"SQLite format 3\0":
            raise ValueError("not an SQLite file (its header is gone)")
        size = struct.unpack_from(">H", data, 16)[0]
        self.page_size = 65536 if size == 1 else size
        if self.page_size < 512 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page size {self.page_size} in the header")
        self.usable = self.page_size - data[20]
        self.data = data
        self.pages = len(data) // self.page_size

    def page(self, n: int) -> memoryview:
        if not 1 <= n <= self.pages:
            raise _Bad(f"page {n} is not in the file")
        lo = (n - 1) * self.page_size
        return memoryview(self.data)[lo : lo + self.page_size]

    def free_pages(self) -> set[int]:
        free: set[int] = set()
        trunk = struct.unpack_from(">I", self.data, 32)[0]
        try:
            while trunk and trunk not in free and len(free) <= self.pages:
                free.add(trunk)
                p = self.page(trunk)
                nxt, count = struct.unpack_from(">II", p, 0)
                if count > (self.usable - 8) // 4:
                    break
                free.update(struct.unpack_from(f">{count}I", p, 8))
                trunk = nxt
        except (_Bad, struct.error):
            pass  # a damaged freelist: scan those pages too (rows in them are checked as any)
        return free

    def payload(self, page: memoryview, off: int) -> tuple[int, bytes]:
        size, off = _varint(page, off)
        rowid, off = _varint(page, off)
        if rowid >= 1 << 63:
            rowid -= 1 << 64
        u = self.usable
        x = u - 35
        if size <= x:
            if off + size > len(page):
                raise _Bad("cell past the page")
            return rowid, bytes(page[off : off + size])
        m = ((u - 12) * 32 // 255) - 23
        k = m + (size - m) % (u - 4)
        local = k if k <= x else m
        if off + local + 4 > len(page):
            raise _Bad("cell past the page")
        parts = [bytes(page[off : off + local])]
        got = local
        nxt = struct.unpack_from(">I", page, off + local)[0]
        seen: set[int] = set()
        while got < size:
            if nxt == 0 or nxt in seen:
                raise _Bad("overflow chain ends early or loops")
            seen.add(nxt)
            ov = self.page(nxt)
            nxt = struct.unpack_from(">I", ov, 0)[0]
            take = min(u - 4, size - got)
            parts.append(bytes(ov[4 : 4 + take]))
            got += take
        return rowid, b"".join(parts)


def table_rows(path: Path, scan: Scan | None = None) -> Iterator[tuple[int, tuple[Value, ...]]]:
    """(rowid, values) of every cell on every table leaf page not on the freelist."""
    scan = scan if scan is not None else Scan()
    f = _File(path.read_bytes())
    free = f.free_pages()
    scan.pages = f.pages
    for n in range(1, f.pages + 1):
        if n in free:
            continue
        page = f.page(n)
        hdr = 100 if n == 1 else 0
        if page[hdr] != LEAF_TABLE:
            continue
        scan.leaf_pages += 1
        cells = struct.unpack_from(">H", page, hdr + 3)[0]
        for i in range(cells):
            ptr_at = hdr + 8 + 2 * i
            if ptr_at + 2 > len(page):
                scan.bad_cells += cells - i
                break
            ptr = struct.unpack_from(">H", page, ptr_at)[0]
            try:
                rowid, payload = f.payload(page, ptr)
                values = _record(payload)
            except (_Bad, struct.error):
                scan.bad_cells += 1
                continue
            yield rowid, values
