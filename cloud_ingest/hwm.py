"""The high-water marks: what is committed for each device, in memory and in the KV bucket.

A device's mark is the last seq of the last frame committed for it. Its truth is the last
message on the device's chain subject in ET_FEATURES (``Et-Last-Seq``, and that message's
stream sequence, which the next commit names in ``Nats-Expected-Last-Subject-Sequence``);
the ``et_hwm`` bucket keeps a copy that outlives the stream's retention
(docs/guarantees.md). This module owns

- the in-memory :class:`Ledger` of each device: read once from the stream and the bucket,
  then kept by the commit protocol (``committed``), dropped when it may be stale (``forget``);
- the bucket's copy: a commit only marks the device dirty (no KV round trip on the hot
  path); the marks are written every ``ingest.hwm_flush_s``, by compare-and-set that
  never lowers a mark (several ingest processes write it), and a mark that could not be
  written is kept for the next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from edge_tier import topics
from edge_tier.tasks import running

log = logging.getLogger("cloud_ingest.ingest")  # the ingest service's logger, as before the split

DeviceKey = tuple[str, str]  # (tenant, device)


@dataclass(slots=True)
class Ledger:
    """What is committed for one device: its last seq and that message's stream sequence."""

    last_seq: int = 0
    stream_seq: int = 0  # 0: the stream holds no message of this device


class HighWaterMarks:
    """Per-device ledgers, and their marks' copy in the ``et_hwm`` bucket."""

    def __init__(self, flush_s: float) -> None:
        self.flush_s = flush_s
        self.ledgers: dict[DeviceKey, Ledger] = {}
        self.dirty: dict[DeviceKey, int] = {}  # marks not yet in the bucket
        self.js: JetStreamContext | None = None
        self.kv: KeyValue | None = None

    def bind(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js, self.kv = js, kv

    async def ledger(self, tenant: str, device: str) -> Ledger:
        """The device's ledger: cached, or read from the stream's last chain message and the
        bucket (whichever mark is higher: the stream may have aged that message out)."""
        key = (tenant, device)
        led = self.ledgers.get(key)
        if led is not None:
            return led
        assert self.js is not None and self.kv is not None
        led = Ledger()
        try:
            last = await self.js.get_last_msg(topics.FEATURES_STREAM, topics.features_subject(*key))
            led = Ledger(int((last.headers or {}).get(topics.H_LAST, 0)), int(last.seq or 0))
        except nats.js.errors.NotFoundError:
            pass
        # The stream may have aged the device's last frame out; the bucket keeps the mark.
        kv_mark = 0
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            entry = await self.kv.get(topics.hwm_key(*key))
            kv_mark = int(entry.value or b"0")
        if led.last_seq > kv_mark:
            # A commit whose KV update never happened (a crash in between): repair it.
            self.mark_dirty(key, led.last_seq)
        led.last_seq = max(led.last_seq, kv_mark)
        self.ledgers[key] = led
        return led

    def forget(self, key: DeviceKey) -> None:
        """Read the device's ledger afresh next time (someone else may have committed)."""
        self.ledgers.pop(key, None)

    def committed(self, key: DeviceKey, last_seq: int, stream_seq: int) -> None:
        """A frame up to ``last_seq`` is stored at ``stream_seq``: the new mark."""
        self.ledgers[key] = Ledger(last_seq, stream_seq)
        self.mark_dirty(key, last_seq)

    def mark_dirty(self, key: DeviceKey, last: int) -> None:
        """The bucket's copy of the device's mark is to rise to ``last`` at the next flush."""
        self.dirty[key] = max(last, self.dirty.get(key, 0))

    async def flush_loop(self) -> None:
        while running():
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
                log.warning("could not update high-water marks (%s); will retry", e)

    async def flush(self) -> None:
        """Write every dirty mark; whatever was not written is kept for the next flush."""
        assert self.kv is not None
        dirty, self.dirty = self.dirty, {}
        pending = dict(dirty)
        try:
            for key, last in dirty.items():
                if await self.raise_mark(topics.hwm_key(*key), last):
                    del pending[key]
        finally:
            # Whatever was not written (an error, or too many conflicts) is tried again.
            for key, last in pending.items():
                self.mark_dirty(key, last)

    async def raise_mark(self, key: str, last: int) -> bool:
        """Compare-and-set, never lowering the mark (several ingest processes write it).
        False if other writers kept winning; the caller tries again later."""
        assert self.kv is not None
        for _ in range(10):
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                try:
                    await self.kv.create(key, str(last).encode())
                    return True
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            if int(entry.value or b"0") >= last:
                return True
            try:
                await self.kv.update(key, str(last).encode(), last=entry.revision)
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        return False
