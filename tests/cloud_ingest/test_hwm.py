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
