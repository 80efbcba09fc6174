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
  written is kept for the next flush;
- the marks shared between ingest processes: with a shared subscription a device's next
  frame often goes to another process, whose ledger is then stale (a JetStream read or
  two for every frame). Each process publishes the marks it commits, in one core NATS
  message per burst on ``_et.ingest.marks.{instance}``, and takes the others' into its
  ledgers as *heard*: a heard mark names the stream sequence a publish expects (which
  JetStream checks), but before a frame is answered DUPLICATE or refused on a heard
  mark alone, the ledger is read again from the stream (``Ledger.heard``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
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
    heard: bool = False  # told by another ingest process, not read or committed here


class HighWaterMarks:
    """Per-device ledgers, and their marks' copy in the ``et_hwm`` bucket."""

    def __init__(self, flush_s: float) -> None:
        self.flush_s = flush_s
        self.ledgers: dict[DeviceKey, Ledger] = {}
        self.dirty: dict[DeviceKey, int] = {}  # marks not yet in the bucket
        self.js: JetStreamContext | None = None
        self.kv: KeyValue | None = None
        self.nc: NatsClient | None = None
        self._own_subject = ""
        self._told: list[str] = []  # "tenant device last_seq stream_seq" lines to publish
        self._tell = asyncio.Event()
        self._hoping: dict[DeviceKey, list[tuple[int, asyncio.Future[None]]]] = {}

    def bind(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js, self.kv = js, kv

    async def share(self, nc: NatsClient, instance: str) -> None:
        """Publish this process's marks to the others and take theirs (see the docstring)."""
        self.nc = nc
        self._own_subject = topics.ingest_marks_subject(instance)
        await nc.subscribe(topics.INGEST_MARKS_FILTER, cb=self._hear)

    async def tell_loop(self) -> None:
        """One message per burst of commits (the loop's turn), not one per frame."""
        while running():
            await self._tell.wait()
            self._tell.clear()
            lines, self._told = self._told, []
            if lines and self.nc is not None:
                try:
                    await self.nc.publish(self._own_subject, "\n".join(lines).encode())
                except nats.errors.Error as e:  # only an optimisation: the stream stays the truth
                    log.debug("could not share %d marks: %s", len(lines), e)

    async def _hear(self, msg: Msg) -> None:
        if msg.subject == self._own_subject:
            return
        ledgers = self.ledgers
        for line in msg.data.decode("ascii", "replace").splitlines():
            try:
                tenant, device, last_text, seq_text = line.split(" ")
                last, stream_seq = int(last_text), int(seq_text)
            except ValueError:
                log.debug("ignoring a shared mark %r from %s", line[:200], msg.subject)
                continue
            key = (tenant, device)
            led = ledgers.get(key)
            if led is None or led.last_seq < last:
                ledgers[key] = Ledger(last, stream_seq, heard=True)
                for seq, fut in self._hoping.pop(key, ()):
                    if fut.done():
                        continue
                    if seq <= last:
                        fut.set_result(None)
                    else:
                        self._hope(key, seq, fut)  # a mark, but not yet the one it waits for

    def _hope(self, key: DeviceKey, seq: int, fut: asyncio.Future[None]) -> None:
        self._hoping.setdefault(key, []).append((seq, fut))

    async def hear(self, key: DeviceKey, seq: int, within: float) -> bool:
        """Wait up to ``within`` s for another process to tell a mark of at least ``seq``
        for the device; True if the ledger holds one now. A frame whose predecessor another
        process committed often arrives before that process's word: a short wait here
        costs less than reading the stream and the bucket again."""
        led = self.ledgers.get(key)
        if led is not None and led.last_seq >= seq:
            return True
        if self.nc is None:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hope(key, seq, fut)
        try:
            await asyncio.wait_for(fut, within)
            return True
        except TimeoutError:
            return False
        finally:
            left = [(s, f) for s, f in self._hoping.get(key, ()) if f is not fut]
            if left:
                self._hoping[key] = left
            else:
                self._hoping.pop(key, None)

    async def ledger(self, tenant: str, device: str) -> Ledger:
        """The device's ledger: cached, or read from the stream's last chain message and the
        bucket (whichever mark is higher: the stream may have aged that message out)."""
        key = (tenant, device)
        led = self.ledgers.get(key)
        if led is not None:
            return led
        led = await self._stream_ledger(key)
        kv_mark = await self._kv_mark(key)
        if led.last_seq > kv_mark:
            # A commit whose KV update never happened (a crash in between): repair it.
            self.mark_dirty(key, led.last_seq)
        led.last_seq = max(led.last_seq, kv_mark)
        self.ledgers[key] = led
        return led

    async def _stream_ledger(self, key: DeviceKey) -> Ledger:
        assert self.js is not None
        try:
            last = await self.js.get_last_msg(topics.FEATURES_STREAM, topics.features_subject(*key))
        except nats.js.errors.NotFoundError:
            return Ledger()
        return Ledger(int((last.headers or {}).get(topics.H_LAST, 0)), int(last.seq or 0))

    async def _kv_mark(self, key: DeviceKey) -> int:
        """The bucket's mark: the stream may have aged the device's last frame out."""
        assert self.kv is not None
        try:
            entry = await self.kv.get(topics.hwm_key(*key))
        except nats.js.errors.KeyNotFoundError:
            return 0
        return int(entry.value or b"0")

    def forget(self, key: DeviceKey) -> None:
        """Read the device's ledger afresh next time (someone else may have committed)."""
        self.ledgers.pop(key, None)

    def committed(self, key: DeviceKey, last_seq: int, stream_seq: int) -> None:
        """A frame up to ``last_seq`` is stored at ``stream_seq``: the new mark."""
        self.ledgers[key] = Ledger(last_seq, stream_seq)
        self.mark_dirty(key, last_seq)
        if self.nc is not None:
            self._told.append(f"{key[0]} {key[1]} {last_seq} {stream_seq}")
            self._tell.set()

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
