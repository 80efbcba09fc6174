"""The KV copy of the high-water marks: no mark is dropped when a write fails, none is lowered.

A scripted bucket stands in for JetStream KV so that failures land exactly where wanted;
the real bucket is exercised by tests/cloud_ingest/test_ingest.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import pytest

from cloud_ingest.hwm import HighWaterMarks


@dataclass
class Entry:
    value: bytes
    revision: int


class ScriptedBucket:
    def __init__(self, fail_once: set[str]) -> None:
        self.data: dict[str, Entry] = {}
        self.fail_once = set(fail_once)
        self.rev = 0

    def _maybe_fail(self, key: str) -> None:
        if key in self.fail_once:
            self.fail_once.discard(key)
            raise nats.errors.TimeoutError

    async def get(self, key: str) -> Entry:
        self._maybe_fail(key)
        if key not in self.data:
            raise nats.js.errors.KeyNotFoundError
        return self.data[key]

    async def create(self, key: str, value: bytes) -> int:
        if key in self.data:
            raise nats.js.errors.KeyWrongLastSequenceError
        self.rev += 1
        self.data[key] = Entry(value, self.rev)
        return self.rev

    async def update(self, key: str, value: bytes, last: int) -> int:
        if self.data[key].revision != last:
            raise nats.js.errors.KeyWrongLastSequenceError
        self.rev += 1
        self.data[key] = Entry(value, self.rev)
        return self.rev


def test_a_failed_flush_keeps_every_unwritten_mark() -> None:
    async def scenario() -> dict[str, int]:
        marks = HighWaterMarks(flush_s=0.2)
        bucket = ScriptedBucket(fail_once={"t.a"})
        marks.kv = bucket  # type: ignore[assignment]
        for device, last in (("a", 10), ("b", 20), ("c", 30)):
            marks.mark_dirty(("t", device), last)
        with pytest.raises(nats.errors.TimeoutError):
            await marks.flush()
        marks.mark_dirty(("t", "b"), 15)  # a lower mark arriving meanwhile must not win
        await marks.flush()
        assert marks.dirty == {}
        return {k: int(e.value) for k, e in bucket.data.items()}

    assert asyncio.run(scenario()) == {"t.a": 10, "t.b": 20, "t.c": 30}


def test_the_mark_in_the_bucket_never_goes_down() -> None:
    async def scenario() -> int:
        marks = HighWaterMarks(flush_s=0.2)
        bucket = ScriptedBucket(fail_once=set())
        marks.kv = bucket  # type: ignore[assignment]
        assert await marks.raise_mark("t.a", 50)
        assert await marks.raise_mark("t.a", 40)  # another process's older mark
        return int(bucket.data["t.a"].value)

    assert asyncio.run(scenario()) == 50


def test_the_service_is_composed_of_its_parts() -> None:
    """``Ingest`` composes its parts: the commit protocol shares the service's marks."""
    from cloud_ingest.config import IngestConfig
    from cloud_ingest.ingest import Ingest

    async def scenario() -> None:
        ingest = Ingest(IngestConfig())
        assert ingest.commits.marks is ingest.marks
        assert ingest.subscription == "$share/et-ingest/et/+/+/up"

    asyncio.run(scenario())


@dataclass
class HeardMsg:
    subject: str
    data: bytes


def test_marks_told_by_other_processes_only_rise_and_bad_lines_are_skipped() -> None:
    async def go() -> None:
        marks = HighWaterMarks(0.2)
        marks._own_subject = "_et.ingest.marks.0"
        marks.committed(("t", "mine"), 50, 7)
        await marks._hear(HeardMsg("_et.ingest.marks.0", b"t mine 999 1"))  # our own word: ignored
        assert marks.ledgers[("t", "mine")].last_seq == 50
        lines = b"t d1 10 3\nt d1 oops\nnot a line\nt d2 5 4 extra\nt mine 60 9\nt mine 55 8\n\xff\xfe"
        await marks._hear(HeardMsg("_et.ingest.marks.1", lines))
        assert (marks.ledgers[("t", "d1")].last_seq, marks.ledgers[("t", "d1")].heard) == (10, True)
        assert ("t", "d2") not in marks.ledgers  # five fields: not a mark
        mine = marks.ledgers[("t", "mine")]
        assert (mine.last_seq, mine.stream_seq, mine.heard) == (60, 9, True)  # 55 came after: lower, dropped
        marks.committed(("t", "mine"), 70, 12)
        assert not marks.ledgers[("t", "mine")].heard  # our own commit is not hearsay

    asyncio.run(go())


def test_a_frame_waits_for_the_word_of_its_predecessor_and_gives_up_in_time() -> None:
    async def go() -> None:
        marks = HighWaterMarks(0.2)
        marks._own_subject = "_et.ingest.marks.0"
        marks.nc = object()  # type: ignore[assignment]  # sharing on; nothing is published here
        key = ("t", "d")
        waiting = asyncio.ensure_future(marks.hear(key, 20, 5.0))
        await asyncio.sleep(0)
        await marks._hear(HeardMsg("_et.ingest.marks.1", b"t d 10 1"))  # not yet the one it waits for
        await asyncio.sleep(0)
        assert not waiting.done()
        await marks._hear(HeardMsg("_et.ingest.marks.1", b"t d 20 2"))
        assert await asyncio.wait_for(waiting, 1.0) is True
        assert await marks.hear(key, 15, 0.01) is True  # already held
        assert await marks.hear(key, 30, 0.05) is False  # nobody says so: the caller reads the stream
        assert not marks._hoping

    asyncio.run(go())
