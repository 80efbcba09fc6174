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

This module owns steps 1 to 4 for one frame (:class:`CommitProtocol`): validation, the
dedupe against the mark, the conditional publish, rescued frames (``rescued.py``), and
every answer (receipts, and dead letters for what cannot be answered). The marks
themselves are ``hwm.py``'s; the per-device ordering and the MQTT acks are the service's
(``ingest.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from cloud_ingest import metrics
from cloud_ingest.config import IngestConfig
from cloud_ingest.hwm import HighWaterMarks
from cloud_ingest.publisher import Publisher
from cloud_ingest.rescued import sort_rescued, subset
from cloud_ingest.streams import clip_header, publish_dead_letter
from edge_tier import topics
from edge_tier.logs import context
from edge_tier.mqtt import Message, MqttBridge
from edge_tier.topics import (
    H_EXPECTED_LAST_SUBJECT_SEQ,
    H_FIRST,
    H_LAST,
    H_MSG_ID,
    H_PREV,
    H_RECORDS,
)
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
    encode_frame,
    encode_receipt,
    encode_stored_receipt,
    peek_header,
)

log = logging.getLogger("cloud_ingest.ingest")  # the ingest service's logger, as before the split

GAP_WAITS, GAP_WAIT_S = 4, 0.025  # look again for a missing predecessor, for up to ~75 ms
HEAR_WAIT_S = 0.1  # first, wait this long for another ingest process to tell its commit of it
WRONG_LAST_SEQUENCE = 10071  # JetStream API error code for Nats-Expected-Last-Subject-Sequence
_COMMITTED = metrics.FRAMES.labels("committed")  # the one counted per frame: looked up once


def told(limits: FrameLimits) -> CloudLimits:
    """The limits as receipts tell them to the devices."""
    return CloudLimits(
        max_frame_bytes=limits.max_frame_bytes, max_records=limits.max_records, max_dim=limits.max_dim
    )


class CommitProtocol:
    """One upload frame at a time: validated, deduplicated, stored once, answered."""

    def __init__(self, cfg: IngestConfig, mqtt: MqttBridge, marks: HighWaterMarks) -> None:
        self.cfg = cfg
        self.mqtt = mqtt
        self.marks = marks
        self.limits = cfg.ingest.limits
        self.cloud_limits = told(self.limits)
        self._max_payload: int | None = None
        self.receipt_qos = cfg.ingest.receipt_qos
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.publisher: Publisher | None = None

    def bind(self, nc: NatsClient, js: JetStreamContext, publisher: Publisher) -> None:
        self.nc, self.js, self.publisher = nc, js, publisher

    def fit_limits(self) -> None:
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
        self.cloud_limits = told(self.limits)

    # -- one frame --------------------------------------------------------

    async def upload(self, msg: Message, tenant: str, device: str) -> None:
        """Step 1 for a message on ``et/{tenant}/{device}/up``, then the commit."""
        self.fit_limits()
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
        """Steps 2 to 4: against the mark, published on condition, receipted."""
        assert self.publisher is not None
        marks = self.marks
        key = (frame.tenant, frame.device)
        first, last = frame.first_seq, frame.last_seq  # read from the arrays once
        waits = 0
        for _ in range(5 + GAP_WAITS):
            ledger = await marks.ledger(*key)
            if ledger.heard and first <= ledger.last_seq:
                # another process's word is checked by JetStream on a publish, not here:
                # read the truth before answering DUPLICATE (the device would delete) or REJECTED
                marks.forget(key)
                ledger = await marks.ledger(*key)
            if last <= ledger.last_seq:
                metrics.FRAMES.labels("duplicate").inc()
                log.info("upload %s is a re-send (committed up to %d)", frame.upload_id, ledger.last_seq,
                         extra=context(frame.upload_id))  # fmt: skip
                self.receipt(frame, ReceiptStatus.DUPLICATE)
                return
            if frame.prev_seq > ledger.last_seq:
                if waits < GAP_WAITS:
                    # With a shared subscription the predecessor is often being committed
                    # by another ingest process right now: hear it from that process, or
                    # look again, before answering GAP (marks only rise, so DUPLICATE
                    # above needs no second look).
                    waits += 1
                    if waits == 1 and await marks.hear(key, frame.prev_seq, HEAR_WAIT_S):
                        continue
                    marks.forget(key)
                    if waits > 1:
                        await asyncio.sleep(GAP_WAIT_S)
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
            if first <= ledger.last_seq:
                await self._reject(frame, payload, f"overlaps the committed range (up to {ledger.last_seq})")
                return
            headers = {
                H_MSG_ID: frame.upload_id,
                H_EXPECTED_LAST_SUBJECT_SEQ: str(ledger.stream_seq),
                H_FIRST: str(first),
                H_LAST: str(last),
                H_PREV: str(frame.prev_seq),
                H_RECORDS: str(frame.n),
            }
            t0 = time.perf_counter()
            try:
                ack = await self.publisher.publish(topics.features_subject(*key), payload, headers)
            except nats.js.errors.APIError as e:
                if e.err_code == WRONG_LAST_SEQUENCE:
                    # Someone else (or our own past self) committed for this device.
                    marks.forget(key)
                    continue
                raise
            metrics.PUBLISH_SECONDS.observe(time.perf_counter() - t0)
            if ack.duplicate:
                # Inside the duplicate window: already stored (say, a publish that timed
                # out had in fact landed). Re-read the truth, and make sure the KV copy
                # of the mark catches up.
                marks.forget(key)
                marks.mark_dirty(key, frame.last_seq)
                metrics.FRAMES.labels("duplicate").inc()
                self.receipt(frame, ReceiptStatus.DUPLICATE, stream_seq=ack.seq)
                return
            marks.committed(key, last, ack.seq)
            _COMMITTED.inc()
            metrics.RECORDS.inc(frame.n)
            self.receipt(frame, ReceiptStatus.COMMITTED, stream_seq=ack.seq)
            return
        raise nats.errors.Error(f"upload {frame.upload_id}: the device's chain kept moving under us")

    async def commit_rescued(self, frame: Frame, compression: str | None) -> None:
        """Records rescued from a set-aside queue file (``cloud_ingest/rescued.py``): those the
        stream does not hold are stored once, on the device's ``.rescued`` subject, under the
        frame's upload id; those it cannot vouch for go to ET_DEADLETTER, counted in the
        receipt (``set_aside``); the chain and its mark are not touched."""
        assert self.js is not None and self.publisher is not None
        key = (frame.tenant, frame.device)
        for _ in range(5):
            ledger = await self.marks.ledger(*key)
            sorted_ = await sort_rescued(self.js, frame, ledger.last_seq)
            set_aside = int(sorted_.unknown.sum())
            if set_aside:
                await self._set_aside(frame, subset(frame, sorted_.unknown), compression)
            status, stream_seq = ReceiptStatus.DUPLICATE, None
            if sorted_.new.any():
                part = subset(frame, sorted_.new)
                headers = {
                    H_MSG_ID: topics.rescued_msg_id(frame.upload_id),
                    H_EXPECTED_LAST_SUBJECT_SEQ: str(sorted_.rescued_last),
                    H_FIRST: str(part.first_seq),
                    H_LAST: str(part.last_seq),
                    H_PREV: "0",
                    H_RECORDS: str(part.n),
                }
                payload = encode_frame(part, compress=compression)
                try:
                    subject = topics.features_subject(*key, rescued=True)
                    ack = await self.publisher.publish(subject, payload, headers)
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
        topic = topics.mqtt_topic(frame.tenant, frame.device, "receipt")
        if stream_seq is not None and expected_prev is None and reason is None and set_aside is None:
            # nearly every frame's answer: encoded without building a model
            data = encode_stored_receipt(
                frame.upload_id, status, frame.first_seq, frame.last_seq, stream_seq, self.cloud_limits
            )
            self.mqtt.publish(topic, data, qos=self.receipt_qos)
            return
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
        self.mqtt.publish(topic, encode_receipt(r), qos=self.receipt_qos)

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
        topic = topics.mqtt_topic(hdr.tenant, hdr.device, "receipt")
        self.mqtt.publish(topic, encode_receipt(r), qos=self.receipt_qos)

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
        """Store refused input in ET_DEADLETTER with its reason; no receipt."""
        assert self.js is not None and self.nc is not None
        log.warning("dead-lettering a message on %s (%d bytes): %s", msg.topic, len(msg.payload), reason,
                    extra=context(upload_id, tenant=tenant, device=device, topic=msg.topic))  # fmt: skip
        metrics.DEADLETTERED.inc()
        metrics.FRAMES.labels("deadletter").inc()
        headers = {
            topics.H_REASON: clip_header(reason, 2000),
            topics.H_TOPIC: clip_header(msg.topic, 500),
            topics.H_SOURCE: topics.SOURCE_INGEST,
            # A redelivered bad message (crash before the MQTT ack) is stored once.
            H_MSG_ID: topics.ingest_dlq_msg_id(msg.topic, msg.payload),
        }
        if upload_id:
            headers[topics.H_UPLOAD_ID] = upload_id
        safe = [t if t and t.replace("-", "").replace("_", "").isalnum() else None for t in (tenant, device)]
        subject = topics.dlq_subject(topics.SOURCE_INGEST, *safe)
        await publish_dead_letter(self.nc, self.js, subject, msg.payload, headers)
