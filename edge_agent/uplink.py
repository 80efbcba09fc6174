"""Frames out, receipts in: the device end of store-and-forward.

The uplink packs the oldest queued records into frames (persisted before they
are sent, so a restart re-sends the same upload ids), keeps up to ``window``
frames in flight, and deletes a frame's records only when the cloud's receipt
says they are durably in JetStream. A broker's PUBACK is not enough: a broker
may PUBACK and later drop the message when a subscriber's queue overflows.

Re-sends: a frame without a receipt after ``receipt_timeout_s`` is sent again,
with every later frame (the cloud commits one device's frames in chain order);
after a reconnect everything in flight is sent again, oldest first.

The control channel may pause uploads (receipts still count) or cap them in bytes per
second; a frame held by either waits, already framed, and goes when allowed.

Frame size: every receipt says what the cloud takes (``CloudLimits``: bytes, records,
dim). Frames are cut to min(``uplink.frame_max_*``, that), remembered across restarts;
a frame the cloud calls TOO_LARGE (it stored none of it) is cut again, smaller, into
frames with the same chain ends, so a limit that shrinks loses nothing. A record that no
frame can carry is refused at enqueue (413); one already queued when the limit fell
below it is counted as lost, reason ``too_large``.

A full disk (``edge_agent/disk.py``) never ends these loops: a store call that fails
for space is logged and tried again.

Rescued records (``edge_agent/rescue.py``) go beside the chain, one rescued frame in
flight at a time, re-sent like any frame; the cloud answers for each record by seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent import metrics
from edge_agent.config import AgentConfig
from edge_agent.errors import StoreError
from edge_agent.store import AsyncQueue, FrameRows
from edge_tier import topics
from edge_tier.control import ControlState
from edge_tier.logs import context
from edge_tier.mqtt import Message, MqttBridge
from edge_tier.ratelimit import TokenBucket
from edge_tier.tasks import running
from edge_tier.wire import (
    CloudLimits,
    DeviceStatus,
    Receipt,
    ReceiptStatus,
    WireError,
    decode_receipt,
    encode_frame,
    encode_status,
    upload_id,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class InFlight:
    frame: FrameRows
    payload: bytes
    upload_id: str
    sent_at: float | None = None  # monotonic; None = (re)send due
    first_sent_at: float | None = None
    hold: bool = False  # the cloud said GAP: wait for an older frame's receipt
    sends: int = 0


@dataclass
class _SortedReceipts:
    """One batch of receipts by what each asks of the uplink: frames finished (with the
    reason they count as lost, None if delivered), frames to cut smaller, gaps, rescues."""

    finished: list[tuple[InFlight, str | None]] = field(default_factory=list)
    gaps: list[tuple[InFlight, Receipt]] = field(default_factory=list)
    too_large: list[InFlight] = field(default_factory=list)
    rescued: list[Receipt] = field(default_factory=list)

    def add(self, f: InFlight, r: Receipt) -> None:
        if r.status is ReceiptStatus.TOO_LARGE:
            if f.frame.n > 1:
                self.too_large.append(f)
                return
            log.error(
                "cloud takes no frame of upload %s's one record (%s); it is dropped and counted as "
                "'too_large'",
                r.upload_id,
                r.reason,
                extra=context(r.upload_id),
            )
            self.finished.append((f, "too_large"))
        elif r.status in (ReceiptStatus.COMMITTED, ReceiptStatus.DUPLICATE):
            self.finished.append((f, None))
        elif r.status is ReceiptStatus.REJECTED:
            log.error(
                "cloud rejected upload %s (%s); its %d records are dropped and counted as 'rejected'",
                r.upload_id,
                r.reason,
                f.frame.n,
                extra=context(r.upload_id),
            )
            self.finished.append((f, "rejected"))
        elif r.status is ReceiptStatus.GAP:
            self.gaps.append((f, r))


class Uplink:
    def __init__(self, config: AgentConfig, queue: AsyncQueue, mqtt: MqttBridge) -> None:
        self.cfg = config.uplink
        self.tenant = config.device.tenant
        self.device = config.device.device
        self.queue = queue
        self.store = queue.store
        self.mqtt = mqtt
        self.up_topic = topics.mqtt_topic(self.tenant, self.device, "up")
        self.receipt_topic = topics.mqtt_topic(self.tenant, self.device, "receipt")
        self.status_topic = topics.mqtt_topic(self.tenant, self.device, "status")
        self.in_flight: dict[int, InFlight] = {}
        self.rescue: InFlight | None = None  # the rescued frame in flight, outside the chain
        self._wake = asyncio.Event()
        self._session = 0
        self.model_version: str | None = None
        self.control: Callable[[], ControlState | None] = lambda: None  # the control channel's state
        self.paused = False
        self._rate = TokenBucket(0)
        self.cloud_limits: CloudLimits | None = None  # as the last receipt told
        queue.on_commit.append(self._wake.set)
        saved = self.store.saved_limits()
        if saved is not None:
            self.cloud_limits = CloudLimits(max_frame_bytes=saved[0], max_records=saved[1], max_dim=saved[2])
        self._apply_limits()

    # -- frame limits -------------------------------------------------------

    @property
    def frame_limits(self) -> tuple[int, int]:
        """(records, bytes) a frame may have now: the config's, within the cloud's."""
        records, nbytes = self.cfg.frame_max_records, self.cfg.frame_max_bytes
        if self.cloud_limits is not None:
            records = min(records, self.cloud_limits.max_records)
            nbytes = min(nbytes, self.cloud_limits.max_frame_bytes)
        return records, nbytes

    def _apply_limits(self) -> None:
        records, nbytes = self.frame_limits
        self.store.set_frame_limits(records, nbytes, self.cloud_limits.max_dim if self.cloud_limits else None)

    async def _learn(self, limits: CloudLimits) -> None:
        if limits == self.cloud_limits:
            return
        log.info(
            "the cloud takes frames of up to %d bytes, %d records, dim %d; cutting to fit",
            limits.max_frame_bytes,
            limits.max_records,
            limits.max_dim,
        )
        self.cloud_limits = limits
        await self.queue.call(self._save_limits, limits)
        # Frames in flight cut for a larger limit are cut again now, not one TOO_LARGE each.
        for f in list(self.in_flight.values()):
            if self.in_flight.get(f.frame.first_seq) is f:
                await self._fit(f)

    def _save_limits(self, limits: CloudLimits) -> None:
        self._apply_limits()  # on the store's thread, between its transactions
        self.store.save_limits(limits.max_frame_bytes, limits.max_records, limits.max_dim)

    async def _fit(self, f: InFlight, *, refused: bool = False) -> None:
        """Replace ``f`` in flight by frames within the limits: itself if it fits, else its
        records cut again (each cut at least halves a frame, so this ends; a frame of one
        record goes as it is, and if the cloud refuses it, that is counted)."""
        todo, fitted = [f], []
        records, nbytes = self.frame_limits
        while todo:
            x = todo.pop(0)
            if x.frame.n == 1 or (not refused and len(x.payload) <= nbytes):
                fitted.append(x)
                continue
            refused = False
            most = min(records, max(1, x.frame.n // 2))
            parts = await self.queue.call(self.store.recut_frame, x.frame.first_seq, most, nbytes)
            prepared = [p for p in [await self._prepare(fr) for fr in parts] if p is not None]
            log.info("upload %s cut again into %d frames of at most %d bytes", x.upload_id, len(prepared),
                     nbytes, extra=context(x.upload_id))  # fmt: skip
            todo = prepared + todo
        if fitted == [f]:
            return
        rest = [(k, v) for k, v in self.in_flight.items() if v is not f]
        self.in_flight = dict(sorted([*rest, *((x.frame.first_seq, x) for x in fitted)]))
        self._wake.set()

    def limit(self, *, paused: bool, bytes_per_s: int | None) -> None:
        """Hold uploads, or cap them (None: no cap); frames already in flight still get receipts."""
        self.paused = paused
        if bytes_per_s != (self._rate.rate or None):
            # a second's worth of burst; a bigger frame still goes, and the debt is waited off
            self._rate = TokenBucket(bytes_per_s or 0, bytes_per_s or 0)
        self._wake.set()

    # -- tasks ------------------------------------------------------------

    async def run(self) -> None:
        for frame in await self.queue.call(self.store.open_frames):
            prepared = await self._prepare(frame)
            if prepared is not None:
                self.in_flight[frame.first_seq] = prepared
        for f in list(self.in_flight.values()):
            await self._fit(f)  # cut before a restart that brought smaller limits
        if self.in_flight:
            log.info("resuming %d frames that were in flight before the restart", len(self.in_flight))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._send_loop(), name="uplink-send")
            tg.create_task(self._receipt_loop(), name="uplink-receipts")
            tg.create_task(self._status_loop(), name="uplink-status")

    async def _send_loop(self) -> None:
        while running():
            if not self.mqtt.connected.is_set():
                await self.mqtt.connected.wait()
            try:
                await self._send_round()
            except StoreError as e:
                # A full disk: the store gives up its reserve and evicts; try again soon.
                log.error("uplink: %s (retrying in 1s)", e)
                await asyncio.sleep(1.0)
                continue
            metrics.FRAMES_IN_FLIGHT.set(len(self.in_flight))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._next_deadline())

    async def _send_round(self) -> None:
        if self.mqtt.connections != self._session:
            self._session = self.mqtt.connections
            for f in self._sending():
                f.sent_at = None
                f.hold = False
            await self.publish_status()
        self._send_due()
        while len(self.in_flight) < self.cfg.window and self.store.has_unframed:
            records, nbytes = self.frame_limits
            frames = await self.queue.call(
                self.store.next_frames, self.cfg.window - len(self.in_flight), records, nbytes
            )
            if not frames:
                break
            for frame in frames:
                new = await self._prepare(frame)
                if new is not None:
                    self.in_flight[frame.first_seq] = new
                    await self._fit(new)  # an encoding larger than its estimate (zlib on noise)
                    # oldest first: a frame held by the rate cap must not be overtaken
                    self._send_due()
        if self.rescue is None and self.store.has_rescued:
            rescued: FrameRows | None = await self.queue.call(self.store.next_rescued, *self.frame_limits)
            if rescued is not None:
                self.rescue = await self._prepare(rescued)
                self._send_due()
        self._expire()

    async def _receipt_loop(self) -> None:
        while running():
            # Whatever receipts have arrived are handled together: one commit for all.
            msgs: list[Message] = [await self.mqtt.messages.get()]
            while not self.mqtt.messages.empty():
                msgs.append(self.mqtt.messages.get_nowait())
            receipts = []
            for msg in msgs:
                if msg.topic != self.receipt_topic:
                    continue
                try:
                    receipts.append(decode_receipt(msg.payload))
                except WireError as e:
                    log.warning("ignoring a malformed receipt on %s: %s", msg.topic, e)
            if receipts:
                try:
                    await self.handle_receipts(receipts)
                except StoreError as e:
                    # Not deleted now, so re-sent later and answered DUPLICATE: nothing lost.
                    log.error("uplink: could not take %d receipts: %s", len(receipts), e)

    async def _status_loop(self) -> None:
        # The re-announce, not the retained copy, is what brings a device back into et_devices
        # on a broker that sends no retained messages on ingest's wildcard (RabbitMQ 3.10):
        # tests/system/test_status_converges.py.
        while running():
            await asyncio.sleep(self.cfg.status_interval_s)
            if self.mqtt.connected.is_set():
                await self.publish_status()

    # -- frames -----------------------------------------------------------

    async def _prepare(self, frame: FrameRows) -> InFlight | None:
        uid = upload_id(self.tenant, self.device, frame.first_seq, frame.last_seq)
        try:
            payload = await asyncio.to_thread(self._encode, frame)
        except WireError as e:
            # The endpoint refuses what cannot be encoded, so this is a bug or a damaged
            # queue; dropping the frame (counted) beats blocking the queue behind it.
            log.error(
                "upload %s cannot be encoded (%s); its %d records are dropped as 'unencodable'",
                uid,
                e,
                frame.n,
                extra=context(uid),
            )
            if frame.rescued:
                await self.queue.call(
                    self.store.finish_rescued, frame.first_seq, frame.last_seq, "unencodable"
                )
            else:
                await self.queue.call(self.store.finish_frame, frame.first_seq, frame.last_seq, "unencodable")
            return None
        return InFlight(frame, payload, uid)

    def _encode(self, frame: FrameRows) -> bytes:
        return encode_frame(
            frame.to_frame(self.tenant, self.device, time.time_ns() // 1_000_000), compress=self.cfg.compress
        )

    def _send(self, f: InFlight) -> None:
        if self.paused or self._rate.wait_s() > 0:
            f.sent_at = None  # due: sent when allowed (the send loop wakes for it)
            return
        if not self.mqtt.publish(self.up_topic, f.payload, qos=1):
            f.sent_at = None  # no session right now; the reconnect re-sends it
            return
        self._rate.take(len(f.payload))
        now = time.monotonic()
        f.sent_at = now
        f.first_sent_at = f.first_sent_at or now
        f.sends += 1
        metrics.FRAMES_SENT.inc()
        metrics.BYTES_SENT.inc(len(f.payload))
        if f.sends > 1:
            metrics.FRAMES_RESENT.inc()
            log.info("re-sent upload %s (send %d)", f.upload_id, f.sends, extra=context(f.upload_id))

    def _sending(self) -> list[InFlight]:
        """Frames in flight: the chain's, oldest first, then the rescued one."""
        return [*self.in_flight.values(), *([self.rescue] if self.rescue else [])]

    def _send_due(self) -> None:
        for f in self._sending():
            if f.sent_at is None and not f.hold:
                self._send(f)

    def _expire(self) -> None:
        """No receipt in time: send that frame and every later one again, in order."""
        now = time.monotonic()
        expired = False
        for f in self.in_flight.values():
            if f.sent_at is not None and now - f.sent_at > self.cfg.receipt_timeout_s:
                expired = True
            if expired:
                f.sent_at = None
                f.hold = False
        r = self.rescue
        if r is not None and r.sent_at is not None and now - r.sent_at > self.cfg.receipt_timeout_s:
            r.sent_at = None
            expired = True
        if expired:
            log.warning("no receipt within %.1fs; re-sending", self.cfg.receipt_timeout_s)
            self._send_due()

    def _next_deadline(self) -> float:
        sent = [f.sent_at for f in self._sending() if f.sent_at is not None]
        deadline = self.cfg.receipt_timeout_s
        if sent:
            deadline = min(sent) + self.cfg.receipt_timeout_s - time.monotonic()
        if not self.paused and any(f.sent_at is None and not f.hold for f in self._sending()):
            deadline = min(deadline, self._rate.wait_s())  # a frame waits for the rate limit
        return max(0.01, deadline)

    # -- receipts ---------------------------------------------------------

    async def handle_receipt(self, r: Receipt) -> None:
        await self.handle_receipts([r])

    async def handle_receipts(self, receipts: list[Receipt]) -> None:
        sorted_ = _SortedReceipts()
        for r in receipts:
            if r.limits is not None:
                await self._learn(r.limits)
            if self.rescue is not None and r.upload_id == self.rescue.upload_id:
                sorted_.rescued.append(r)
                continue
            f = self.in_flight.get(r.first_seq)
            if f is None or f.frame.last_seq != r.last_seq or any(f is g for g, _ in sorted_.finished):
                log.debug("receipt for %s matches nothing in flight (already done)", r.upload_id)
                continue
            sorted_.add(f, r)
        if sorted_.finished:
            await self._finish(sorted_.finished)
        for f in sorted_.too_large:
            if self.in_flight.get(f.frame.first_seq) is f:
                await self._fit(f, refused=True)
        # GAPs after the finished frames are gone: what is oldest now decides re-chaining.
        for f, r in sorted_.gaps:
            if self.in_flight.get(f.frame.first_seq) is f:
                await self._on_gap(f, r)
        for r in sorted_.rescued:
            await self._on_rescued_receipt(r)
        await self.queue.notify_room()

    async def _finish(self, finished: list[tuple[InFlight, str | None]]) -> None:
        """Delete (or count as lost, with the reason) the frames their receipts finished."""
        counts = await self.queue.call(
            self.store.finish_frames, [(f.frame.first_seq, f.frame.last_seq, why) for f, why in finished]
        )
        now = time.monotonic()
        for (f, why), n in zip(finished, counts, strict=True):
            self._done(f.frame.first_seq)
            if why is None:
                metrics.DELIVERED.inc(n)
                if f.first_sent_at is not None:
                    metrics.RECEIPT_LATENCY.observe(now - f.first_sent_at)

    async def _on_rescued_receipt(self, r: Receipt) -> None:
        f = self.rescue
        if f is None or r.upload_id != f.upload_id:
            return  # a repeat of a receipt already taken
        why: str | None = None
        if r.status is ReceiptStatus.TOO_LARGE and f.frame.n > 1:
            self.rescue = None  # cut again, to the limits this receipt brought
            self._wake.set()
            return
        if r.status is ReceiptStatus.GAP:
            f.sent_at = None  # not a rescued frame's answer: ask again
            self._wake.set()
            return
        if r.status is ReceiptStatus.TOO_LARGE:
            why = "too_large"
        elif r.status is ReceiptStatus.REJECTED:
            why = "rejected"
        if why:
            log.error("rescued upload %s: %s (%s); its %d records are counted as %r", f.upload_id,
                      r.status, r.reason, f.frame.n, why, extra=context(f.upload_id))  # fmt: skip
        elif r.set_aside:
            log.error("rescued upload %s: the cloud set %d records aside (counted as 'unverifiable')",
                      f.upload_id, r.set_aside, extra=context(f.upload_id))  # fmt: skip
        n = await self.queue.call(
            self.store.finish_rescued, f.frame.first_seq, f.frame.last_seq, why, r.set_aside or 0
        )
        if why is None:
            metrics.DELIVERED.inc(n - (r.set_aside or 0))
        self.rescue = None
        self._wake.set()

    def _done(self, first_seq: int) -> None:
        self.in_flight.pop(first_seq, None)
        for other in self.in_flight.values():
            if other.hold:
                other.hold = False
                other.sent_at = None
        self._wake.set()

    async def _on_gap(self, f: InFlight, r: Receipt) -> None:
        oldest = next(iter(self.in_flight.values()))
        expected = r.expected_prev or 0
        if f is oldest:
            # The oldest frame is never held: nothing older will come to release it.
            if expected < f.frame.prev_seq:
                # Nothing older is left here (it was receipted, rejected or dropped),
                # so join the cloud's chain where it is.
                log.warning(
                    "cloud expects prev %d for %s but our chain says %d; re-chaining",
                    expected,
                    f.upload_id,
                    f.frame.prev_seq,
                    extra=context(f.upload_id),
                )
                await self.queue.call(self.store.set_frame_prev, f.frame.first_seq, expected)
                f.frame.prev_seq = expected
                f.payload = await asyncio.to_thread(self._encode, f.frame)
            f.hold = False
            f.sent_at = None  # (a GAP for a frame already re-chained is stale: just send again)
        else:
            # Wait for an older frame's receipt, but not forever: the receipt timeout
            # still runs, so a lost re-send of the older frame cannot stall the window.
            f.hold = True
            f.sent_at = time.monotonic()
        self._wake.set()

    # -- status -----------------------------------------------------------

    async def publish_status(self, state: str = "online") -> None:
        st = await self.queue.call(self.store.stats)
        metrics.observe_queue(st)
        status = DeviceStatus(
            state=state,  # type: ignore[arg-type]
            ts_ms=time.time_ns() // 1_000_000,
            backlog_records=st.records,
            backlog_bytes=st.bytes,
            oldest_age_s=st.as_dict()["oldest_age_s"],
            evictions=st.evictions,
            budget_bytes=st.effective_budget_bytes,
            disk_limited=st.disk_limited,
            last_receipt_ms=st.last_receipt_ms,
            model_version=self.model_version,
            control=self.control(),
        )
        self.mqtt.publish(self.status_topic, encode_status(status), qos=1, retain=True)

    def offline_status(self) -> bytes:
        return encode_status(DeviceStatus(state="offline", ts_ms=time.time_ns() // 1_000_000))
