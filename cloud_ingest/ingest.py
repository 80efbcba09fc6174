"""The cloud end of store-and-forward: MQTT uploads in, JetStream out, receipts back.

For each upload frame, in order:

1. decode it strictly and check that the tenant and device in the topic are
   the ones in the frame (a device may only speak for itself);
2. compare it with the device's committed high-water mark (the last seq of the
   last frame committed for that device): at or below it, it is a re-send, and
   gets a DUPLICATE receipt; a frame whose ``prev_seq`` is above it arrived
   before an older frame and gets a GAP receipt (the device re-sends in order);
3. publish it to JetStream with ``Nats-Msg-Id`` = upload id and
   ``Nats-Expected-Last-Subject-Sequence`` = the stream sequence of the
   device's last committed frame, so that two ingest processes (or one
   restarted after a crash) can never commit the same device out of order;
4. only after JetStream's PubAck: receipt to the device, then the MQTT ack.

The high-water mark's truth is the last message on the device's subject in the
stream; a KV bucket keeps a copy that outlives the stream's retention
(docs/guarantees.md). Frames of one device are handled one at a time; devices
proceed concurrently; MQTT acks go out in the order the messages came in.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from cloud_ingest import metrics
from cloud_ingest.config import IngestConfig
from cloud_ingest.nats_client import connect_nats
from cloud_ingest.rescued import sort_rescued, subset
from cloud_ingest.streams import clip_header, ensure_streams, publish_dead_letter
from edge_tier import topics
from edge_tier.http import OpsServer
from edge_tier.logs import context
from edge_tier.mqtt import Message, MqttBridge
from edge_tier.tasks import running
from edge_tier.wire import (
    CloudLimits,
    Frame,
    FrameHeader,
    FrameLimits,
    FrameTooLarge,
    Receipt,
    ReceiptStatus,
    WireError,
    decode_frame,
    decode_status,
    encode_frame,
    encode_receipt,
    peek_header,
)

log = logging.getLogger(__name__)

GAP_WAITS, GAP_WAIT_S = 4, 0.025  # look again for a missing predecessor, for up to ~75 ms
WRONG_LAST_SEQUENCE = 10071  # JetStream API error code for Nats-Expected-Last-Subject-Sequence
RESULTS_RELAY = "et-results-mqtt"  # the durable consumer ingest processes share to relay results
H_FIRST, H_LAST, H_PREV, H_RECORDS = topics.H_FIRST, topics.H_LAST, topics.H_PREV, topics.H_RECORDS


@dataclass(slots=True)
class Ledger:
    """What is committed for one device: its last seq and that message's stream sequence."""

    last_seq: int = 0
    stream_seq: int = 0  # 0: the stream holds no message of this device


def _told(limits: FrameLimits) -> CloudLimits:
    return CloudLimits(
        max_frame_bytes=limits.max_frame_bytes, max_records=limits.max_records, max_dim=limits.max_dim
    )


@dataclass(slots=True)
class _Entry:
    msg: Message
    done: bool = False


class Ingest:
    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg
        self.limits = cfg.ingest.limits
        self.cloud_limits = _told(self.limits)
        self._max_payload: int | None = None
        ing = cfg.ingest
        up = topics.mqtt_filter("up")
        shared = ing.shared_group and cfg.mqtt.version == "5"
        self.subscription = f"$share/{ing.shared_group}/{up}" if shared else up
        # Not shared: retained statuses are not sent to shared subscriptions, and every
        # ingest process writing the same status to the bucket is harmless.
        subscriptions = [(self.subscription, 1), (topics.mqtt_filter("status"), 1)]
        self.mqtt = MqttBridge(
            cfg.mqtt,
            client_id=cfg.mqtt.client_id or f"et-ingest-{ing.instance}",
            subscriptions=subscriptions,
            manual_ack=True,
            clean=False,
            name="ingest-mqtt",
        )
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.kv: KeyValue | None = None
        self.devices: KeyValue | None = None
        self.ledgers: dict[tuple[str, str], Ledger] = {}
        self._order: collections.deque[_Entry] = collections.deque()
        self._lanes: dict[tuple[str, str], asyncio.Queue[_Entry]] = {}
        self._hwm_dirty: dict[tuple[str, str], int] = {}
        self._tg: asyncio.TaskGroup | None = None
        self.ready = asyncio.Event()
        self.jetstream_ok = True

    # -- lifecycle --------------------------------------------------------

    async def checks(self) -> dict[str, bool]:
        return {
            "nats": bool(self.nc and self.nc.is_connected),
            "jetstream": self.jetstream_ok,  # the last publish went through (no quorum: False)
            "mqtt": self.mqtt.connected.is_set(),
            "subscribed": self.mqtt.subscribed.is_set(),
            "started": self.ready.is_set(),
        }

    async def run(self) -> None:
        async with OpsServer(self.checks).serving(self.cfg.ingest.metrics_host, self.cfg.ingest.metrics_port):
            await self._run()

    async def _run(self) -> None:
        self.nc = await connect_nats(self.cfg, f"et-ingest-{self.cfg.ingest.instance}")
        self._fit_limits()
        self.js = self.nc.jetstream(timeout=self.cfg.ingest.publish_timeout_s)
        self.kv = await ensure_streams(self.js, self.cfg.streams)
        self.devices = await self.js.key_value(topics.DEVICES_BUCKET)
        await self.mqtt.start()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._dispatch(), name="ingest-dispatch")
                tg.create_task(self._flush_hwm_loop(), name="ingest-hwm")
                if self.cfg.ingest.relay_results:
                    tg.create_task(self._relay_results(), name="ingest-results-relay")
                # Ready means an upload sent now is received: a first session's messages
                # published before the SUBACK would never reach us.
                await self.mqtt.subscribed.wait()
                self.ready.set()
                log.info("ingest ready: %s -> JetStream %s", self.subscription, topics.FEATURES_STREAM)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flush_hwm())
            await self.mqtt.stop()
            # flush, then close: a drain would wait on the results relay's pull request
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self.nc.close()

    def _fit_limits(self) -> None:
        """Frames no larger than the NATS server takes (headers ride in the same message).

        Checked per frame, since a reconnect may land on a server with another
        ``max_payload``; the limit goes to the devices in every receipt, and a frame over
        it gets TOO_LARGE (the device cuts it smaller) instead of being stored or dropped."""
        assert self.nc is not None
        if self.nc.max_payload == self._max_payload:
            return
        self._max_payload = self.nc.max_payload
        room = self._max_payload - 4096
        wanted = self.cfg.ingest.max_frame_bytes
        if wanted > room:
            log.info(
                "frames are limited to %d bytes by the NATS server's max_payload (%d); "
                "ingest.max_frame_bytes is %d. Devices are told in their receipts and cut to fit.",
                room,
                self._max_payload,
                wanted,
            )
        self.limits = dataclasses.replace(self.limits, max_frame_bytes=max(1024, min(wanted, room)))
        self.cloud_limits = _told(self.limits)

    async def _dispatch(self) -> None:
        assert self._tg is not None
        while running():
            msg = await self.mqtt.messages.get()
            entry = _Entry(msg)
            self._order.append(entry)
            try:
                tenant, device, _ = topics.parse_mqtt_topic(msg.topic)
            except ValueError:
                tenant, device = "_", "_"
            key = (tenant, device)
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = asyncio.Queue()
                self._tg.create_task(self._lane(key, lane), name=f"lane-{tenant}-{device}")
            lane.put_nowait(entry)

    async def _lane(self, key: tuple[str, str], lane: asyncio.Queue[_Entry]) -> None:
        """One device's frames, one at a time, so its chain is committed in order."""
        while running():
            entry = lane.get_nowait() if not lane.empty() else None
            if entry is None:
                del self._lanes[key]
                return
            await self._handle_with_retry(entry.msg)
            entry.done = True
            self._ack_ready()

    def _ack_ready(self) -> None:
        # MQTT wants PUBACKs in the order the PUBLISHes arrived.
        while self._order and self._order[0].done:
            self.mqtt.ack(self._order.popleft().msg)

    async def _handle_with_retry(self, msg: Message) -> None:
        delay = 0.1
        while running():
            try:
                await self.handle(msg)
                self.jetstream_ok = True
                return
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as e:
                self.jetstream_ok = False
                # JetStream unreachable or slow: keep the message unacked and try
                # again; nothing is receipted until it is durably stored.
                log.warning(
                    "JetStream unavailable while handling %s (%s); retrying in %.1fs", msg.topic, e, delay
                )
                metrics.JS_RETRIES.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- one frame --------------------------------------------------------

    async def handle(self, msg: Message) -> None:
        try:
            tenant, device, channel = topics.parse_mqtt_topic(msg.topic)
            if channel not in ("up", "status"):
                raise ValueError(f"topic {msg.topic!r} is not an upload or status topic")
        except ValueError as e:
            await self.dead_letter(msg, str(e), None, None)
            return
        if channel == "status":
            await self.record_status(msg, tenant, device)
            return
        self._fit_limits()
        try:
            frame = decode_frame(msg.payload, limits=self.limits)
        except FrameTooLarge as e:
            if not await self._too_large(msg, tenant, device, e):
                await self._reject_undecodable(msg, tenant, device, e)
            return
        except WireError as e:
            await self._reject_undecodable(msg, tenant, device, e)
            return
        if frame.tenant != tenant or frame.device != device:
            # No receipt: the frame's ids are not this sender's to use.
            await self.dead_letter(
                msg,
                f"topic {msg.topic} carries a frame of tenant {frame.tenant!r} device {frame.device!r}",
                tenant,
                device,
            )
            return
        if frame.rescued:
            await self.commit_rescued(frame, peek_header(msg.payload).compression)
            return
        await self.commit(frame, msg.payload)

    async def commit(self, frame: Frame, payload: bytes) -> None:
        assert self.js is not None
        key = (frame.tenant, frame.device)
        waits = 0
        for _ in range(5 + GAP_WAITS):
            ledger = await self.ledger(*key)
            if frame.last_seq <= ledger.last_seq:
                metrics.FRAMES.labels("duplicate").inc()
                log.info("upload %s is a re-send (committed up to %d)", frame.upload_id, ledger.last_seq,
                         extra=context(frame.upload_id))  # fmt: skip
                self.receipt(frame, ReceiptStatus.DUPLICATE)
                return
            if frame.prev_seq > ledger.last_seq:
                if waits < GAP_WAITS:
                    # With a shared subscription the predecessor is often being committed
                    # by another ingest process right now: look again before answering
                    # GAP (marks only rise, so DUPLICATE above needs no second look).
                    self.ledgers.pop(key, None)
                    if waits:
                        await asyncio.sleep(GAP_WAIT_S)
                    waits += 1
                    continue
                metrics.FRAMES.labels("gap").inc()
                log.info(
                    "upload %s arrived before its predecessor (prev %d, committed %d)",
                    frame.upload_id,
                    frame.prev_seq,
                    ledger.last_seq,
                    extra=context(frame.upload_id),
                )
                self.receipt(frame, ReceiptStatus.GAP, expected_prev=ledger.last_seq)
                return
            if frame.first_seq <= ledger.last_seq:
                await self._reject(frame, payload, f"overlaps the committed range (up to {ledger.last_seq})")
                return
            headers = {
                "Nats-Msg-Id": frame.upload_id,
                "Nats-Expected-Last-Subject-Sequence": str(ledger.stream_seq),
                H_FIRST: str(frame.first_seq),
                H_LAST: str(frame.last_seq),
                H_PREV: str(frame.prev_seq),
                H_RECORDS: str(frame.n),
            }
            t0 = time.perf_counter()
            try:
                ack = await self.js.publish(
                    topics.features_subject(*key),
                    payload,
                    headers=headers,
                    timeout=self.cfg.ingest.publish_timeout_s,
                )
            except nats.js.errors.APIError as e:
                if e.err_code == WRONG_LAST_SEQUENCE:
                    # Someone else (or our own past self) committed for this device.
                    self.ledgers.pop(key, None)
                    continue
                raise
            metrics.PUBLISH_SECONDS.observe(time.perf_counter() - t0)
            if ack.duplicate:
                # Inside the duplicate window: already stored (say, a publish that timed
                # out had in fact landed). Re-read the truth, and make sure the KV copy
                # of the mark catches up.
                self.ledgers.pop(key, None)
                self._mark_dirty(key, frame.last_seq)
                metrics.FRAMES.labels("duplicate").inc()
                self.receipt(frame, ReceiptStatus.DUPLICATE, stream_seq=ack.seq)
                return
            self.ledgers[key] = Ledger(frame.last_seq, ack.seq)
            self._mark_dirty(key, frame.last_seq)
            metrics.FRAMES.labels("committed").inc()
            metrics.RECORDS.inc(frame.n)
            self.receipt(frame, ReceiptStatus.COMMITTED, stream_seq=ack.seq)
            return
        raise nats.errors.Error(f"upload {frame.upload_id}: the device's chain kept moving under us")

    async def commit_rescued(self, frame: Frame, compression: str | None) -> None:
        """Records rescued from a set-aside queue file (``cloud_ingest/rescued.py``): those the
        stream does not hold are stored once, on the device's ``.rescued`` subject, under the
        frame's upload id; those it cannot vouch for go to ET_DEADLETTER, counted in the
        receipt (``set_aside``); the chain and its mark are not touched."""
        assert self.js is not None
        key = (frame.tenant, frame.device)
        for _ in range(5):
            ledger = await self.ledger(*key)
            sorted_ = await sort_rescued(self.js, frame, ledger.last_seq)
            set_aside = int(sorted_.unknown.sum())
            if set_aside:
                await self._set_aside(frame, subset(frame, sorted_.unknown), compression)
            status, stream_seq = ReceiptStatus.DUPLICATE, None
            if sorted_.new.any():
                part = subset(frame, sorted_.new)
                headers = {
                    # never the id of a chain frame with the same seq range
                    "Nats-Msg-Id": f"rescued.{frame.upload_id}",
                    "Nats-Expected-Last-Subject-Sequence": str(sorted_.rescued_last),
                    H_FIRST: str(part.first_seq),
                    H_LAST: str(part.last_seq),
                    H_PREV: "0",
                    H_RECORDS: str(part.n),
                }
                payload = encode_frame(part, compress=compression)
                try:
                    ack = await self.js.publish(
                        topics.features_subject(*key, rescued=True),
                        payload,
                        headers=headers,
                        timeout=self.cfg.ingest.publish_timeout_s,
                    )
                except nats.js.errors.APIError as e:
                    if e.err_code == WRONG_LAST_SEQUENCE:
                        continue  # another ingest stored rescued records of this device: sort again
                    raise
                stream_seq = ack.seq
                if not ack.duplicate:
                    status = ReceiptStatus.COMMITTED
                    metrics.RECORDS.inc(part.n)
            metrics.FRAMES.labels("rescued" if status is ReceiptStatus.COMMITTED else "duplicate").inc()
            log.info(
                "rescued upload %s: %d records stored, %d already held, %d set aside",
                frame.upload_id,
                int(sorted_.new.sum()) if status is ReceiptStatus.COMMITTED else 0,
                int(sorted_.held.sum()),
                set_aside,
                extra=context(frame.upload_id),
            )
            self.receipt(frame, status, stream_seq=stream_seq, set_aside=set_aside or None)
            return
        raise nats.errors.Error(f"rescued upload {frame.upload_id}: the device's rescues kept changing")

    async def _set_aside(self, frame: Frame, part: Frame, compression: str | None) -> None:
        reason = (
            f"{part.n} rescued records ({part.first_seq}-{part.last_seq}) lie below the oldest message "
            f"{topics.FEATURES_STREAM} keeps of this device: it cannot tell whether they were stored"
        )
        up = topics.mqtt_topic(frame.tenant, frame.device, "up")
        msg = Message(up, encode_frame(part, compress=compression), 1, 0, False)
        await self.dead_letter(msg, reason, frame.tenant, frame.device, upload_id=frame.upload_id)

    async def ledger(self, tenant: str, device: str) -> Ledger:
        key = (tenant, device)
        led = self.ledgers.get(key)
        if led is not None:
            return led
        assert self.js is not None and self.kv is not None
        led = Ledger()
        try:
            last = await self.js.get_last_msg(topics.FEATURES_STREAM, topics.features_subject(*key))
            led = Ledger(int((last.headers or {}).get(H_LAST, 0)), int(last.seq or 0))
        except nats.js.errors.NotFoundError:
            pass
        # The stream may have aged the device's last frame out; the bucket keeps the mark.
        kv_mark = 0
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            entry = await self.kv.get(topics.hwm_key(*key))
            kv_mark = int(entry.value or b"0")
        if led.last_seq > kv_mark:
            # A commit whose KV update never happened (a crash in between): repair it.
            self._mark_dirty(key, led.last_seq)
        led.last_seq = max(led.last_seq, kv_mark)
        self.ledgers[key] = led
        return led

    # -- answers ----------------------------------------------------------

    def receipt(
        self,
        frame: Frame,
        status: ReceiptStatus,
        *,
        stream_seq: int | None = None,
        expected_prev: int | None = None,
        reason: str | None = None,
        set_aside: int | None = None,
    ) -> None:
        r = Receipt(
            v=3 if set_aside else 2,
            set_aside=set_aside,
            upload_id=frame.upload_id,
            status=status,
            first_seq=frame.first_seq,
            last_seq=frame.last_seq,
            stream_seq=stream_seq,
            expected_prev=expected_prev,
            reason=reason,
            limits=self.cloud_limits,
        )
        self.mqtt.publish(topics.mqtt_topic(frame.tenant, frame.device, "receipt"), encode_receipt(r), qos=1)

    async def _too_large(self, msg: Message, tenant: str, device: str, err: FrameTooLarge) -> bool:
        """A frame over the limits that more, smaller frames would carry: not stored and not
        dead-lettered, the device is told to cut it smaller. False: that would not help (a
        record wider than ``max_dim``), or the frame is not this sender's."""
        if err.field == "dim":
            return False
        try:
            hdr = peek_header(msg.payload)
        except WireError:
            return False
        if (hdr.tenant, hdr.device) != (tenant, device):
            return False
        metrics.FRAMES.labels("too_large").inc()
        log.info("upload %s is over the limits (%s); the device cuts it smaller", hdr.upload_id, err,
                 extra=context(hdr.upload_id, tenant=tenant, device=device))  # fmt: skip
        self._answer_header(hdr, ReceiptStatus.TOO_LARGE, str(err))
        return True

    def _answer_header(self, hdr: FrameHeader, status: ReceiptStatus, reason: str) -> None:
        """A receipt for a frame known only by its header (it did not decode)."""
        r = Receipt(
            upload_id=hdr.upload_id,
            status=status,
            first_seq=hdr.first_seq,
            last_seq=hdr.last_seq,
            reason=reason[:500],
            limits=self.cloud_limits,
        )
        self.mqtt.publish(topics.mqtt_topic(hdr.tenant, hdr.device, "receipt"), encode_receipt(r), qos=1)

    async def _reject(self, frame: Frame, payload: bytes, reason: str) -> None:
        msg = Message(topics.mqtt_topic(frame.tenant, frame.device, "up"), payload, 1, 0, False)
        await self.dead_letter(msg, reason, frame.tenant, frame.device, upload_id=frame.upload_id)
        self.receipt(frame, ReceiptStatus.REJECTED, reason=reason)

    async def _reject_undecodable(self, msg: Message, tenant: str, device: str, err: WireError) -> None:
        upload = None
        try:
            hdr = peek_header(msg.payload)
            if hdr.tenant == tenant and hdr.device == device:
                upload = hdr
        except WireError:
            pass
        await self.dead_letter(
            msg, f"bad frame: {err}", tenant, device, upload_id=upload.upload_id if upload else None
        )
        if upload is not None:
            # The device can be told which upload failed, so it stops re-sending it.
            self._answer_header(upload, ReceiptStatus.REJECTED, str(err))

    async def dead_letter(
        self,
        msg: Message,
        reason: str,
        tenant: str | None,
        device: str | None,
        upload_id: str | None = None,
    ) -> None:
        assert self.js is not None and self.nc is not None
        log.warning("dead-lettering a message on %s (%d bytes): %s", msg.topic, len(msg.payload), reason,
                    extra=context(upload_id, tenant=tenant, device=device, topic=msg.topic))  # fmt: skip
        metrics.DEADLETTERED.inc()
        metrics.FRAMES.labels("deadletter").inc()
        headers = {
            "Et-Reason": clip_header(reason, 2000),
            "Et-Topic": clip_header(msg.topic, 500),
            "Et-Source": "ingest",
            # A redelivered bad message (crash before the MQTT ack) is stored once.
            "Nats-Msg-Id": "dlq." + hashlib.sha256(msg.topic.encode() + msg.payload).hexdigest(),
        }
        if upload_id:
            headers["Et-Upload-Id"] = upload_id
        safe = [t if t and t.replace("-", "").replace("_", "").isalnum() else None for t in (tenant, device)]
        await publish_dead_letter(self.nc, self.js, topics.dlq_subject("ingest", *safe), msg.payload, headers)

    # -- device status and results to MQTT ---------------------------------

    async def record_status(self, msg: Message, tenant: str, device: str) -> None:
        """Keep the device's last status in the devices bucket, for the result API."""
        assert self.devices is not None
        if not msg.payload:
            return  # a cleared retained message
        try:
            status = decode_status(msg.payload)
        except WireError as e:
            log.warning("device %s/%s sent a status that is not one (%s); ignored", tenant, device, e)
            return
        doc = {**status.model_dump(), "seen_ms": int(time.time() * 1000)}
        await self.devices.put(topics.device_key(tenant, device), json.dumps(doc).encode())

    async def _relay_results(self) -> None:
        """Every tier-two result also to MQTT ``et/{tenant}/{device}/results`` (QoS 1), acked in
        JetStream after the broker's PUBACK: at least once (subscribers tell repeats apart by
        upload id and part). Ingest processes share one durable consumer."""
        assert self.js is not None
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=30.0,
            max_deliver=-1,
            max_ack_pending=1000,
            description="results to MQTT (cloud-ingest)",
        )
        while running():
            try:
                sub = await self.js.pull_subscribe(
                    topics.RESULTS_SUBJECTS,
                    durable=RESULTS_RELAY,
                    stream=topics.RESULTS_STREAM,
                    config=config,
                )
                break
            except (nats.errors.Error, TimeoutError) as e:
                log.warning("results relay: cannot bind its consumer (%r); retrying", e)
                await asyncio.sleep(1.0)
        while running():
            await self.mqtt.connected.wait()
            try:
                msgs = await sub.fetch(64, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.Error as e:
                log.warning("results relay: fetch failed (%r); retrying", e)
                await asyncio.sleep(0.5)
                continue
            sent = await asyncio.gather(*(self._relay_one(m) for m in msgs))
            metrics.RESULTS_RELAYED.inc(sum(sent))

    async def _relay_one(self, m: Msg) -> bool:
        parts = m.subject.split(".")
        if len(parts) != 4:
            await m.term()
            return False
        topic = topics.mqtt_topic(parts[2], parts[3], "results")
        if await self.mqtt.publish_confirmed(topic, m.data):
            await m.ack()
            return True
        with contextlib.suppress(nats.errors.Error):
            await m.nak(delay=1.0)
        return False

    # -- high-water marks -------------------------------------------------

    async def _flush_hwm_loop(self) -> None:
        while running():
            await asyncio.sleep(self.cfg.ingest.hwm_flush_s)
            try:
                await self._flush_hwm()
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
                log.warning("could not update high-water marks (%s); will retry", e)

    def _mark_dirty(self, key: tuple[str, str], last: int) -> None:
        self._hwm_dirty[key] = max(last, self._hwm_dirty.get(key, 0))

    async def _flush_hwm(self) -> None:
        assert self.kv is not None
        dirty, self._hwm_dirty = self._hwm_dirty, {}
        pending = dict(dirty)
        try:
            for key, last in dirty.items():
                if await self._raise_hwm(topics.hwm_key(*key), last):
                    del pending[key]
        finally:
            # Whatever was not written (an error, or too many conflicts) is tried again.
            for key, last in pending.items():
                self._mark_dirty(key, last)

    async def _raise_hwm(self, key: str, last: int) -> bool:
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
