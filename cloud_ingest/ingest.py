"""The ingest service (``cloud-ingest run``): MQTT uploads in, JetStream out, receipts back.

A small composition; the design of the commit itself is in ``commit.py``'s docstring.
This module owns the service: its connections and lifecycle, the ordering, and the
routing of each message to its part:

- ``commit.py``: the commit protocol for one upload frame (validate, dedupe, publish on
  condition, receipt) and the dead letters;
- ``hwm.py``: the high-water marks (in-memory ledgers, the KV copy, batched CAS writes);
- ``device_status.py``: each device's last status into the devices bucket;
- ``relay.py``: the results relay, ET_RESULTS to MQTT.

Frames of one device are handled one at a time (a lane per device, so its chain is
committed in order); devices proceed concurrently; MQTT acks go out in the order the
messages came in, each only once its message was answered. A JetStream error keeps the
message unacked and retries it: nothing is receipted until it is durably stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from cloud_ingest import metrics
from cloud_ingest.commit import CommitProtocol
from cloud_ingest.config import IngestConfig
from cloud_ingest.device_status import StatusRecorder
from cloud_ingest.hwm import HighWaterMarks
from cloud_ingest.nats_client import connect_nats
from cloud_ingest.publisher import Publisher
from cloud_ingest.relay import ResultsRelay
from cloud_ingest.streams import ensure_streams
from edge_tier import topics
from edge_tier.http import OpsServer
from edge_tier.mqtt import Message, MqttBridge
from edge_tier.tasks import running

__all__ = ["Ingest"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    msg: Message
    channel: str = ""  # "up", "status", or "" for a topic that did not parse
    done: bool = False


class Ingest:
    """The service: MQTT bridge and NATS connection, per-device lanes, ordered MQTT acks,
    and its parts (``commits``, ``marks``, ``statuses``, ``relay``)."""

    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg
        ing = cfg.ingest
        group = ing.shared_group if cfg.mqtt.version == "5" else None
        up = topics.INGEST_UPLOADS
        self.subscription = topics.shared_subscription(group, up) if group else up
        # Not shared: retained statuses are not sent to shared subscriptions, and every
        # ingest process writing the same status to the bucket is harmless.
        subscriptions = [(self.subscription, 1), (topics.INGEST_STATUSES, 1)]
        self.mqtt = MqttBridge(
            cfg.mqtt,
            client_id=cfg.mqtt.client_id or topics.service_client_id("ingest", ing.instance),
            subscriptions=subscriptions,
            manual_ack=True,
            clean=False,
            name="ingest-mqtt",
        )
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.publisher: Publisher | None = None
        self.marks = HighWaterMarks(ing.hwm_flush_s)
        self.commits = CommitProtocol(cfg, self.mqtt, self.marks)
        self.statuses = StatusRecorder()
        self.relay = ResultsRelay(self.mqtt)
        self._order: collections.deque[_Entry] = collections.deque()
        self._lanes: dict[tuple[str, str], collections.deque[_Entry]] = {}
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

    async def _connect(self) -> NatsClient:
        """NATS, the streams and buckets; every part bound to what it uses."""
        ing = self.cfg.ingest
        nc = self.nc = await connect_nats(self.cfg, topics.service_client_id("ingest", ing.instance))
        js = self.js = nc.jetstream(timeout=ing.publish_timeout_s)
        self.publisher = Publisher(nc, ing.publish_timeout_s)
        await self.publisher.start()
        self.commits.bind(nc, js, self.publisher)
        self.commits.fit_limits()
        self.marks.bind(js, await ensure_streams(js, self.cfg.streams))
        await self.marks.share(nc, ing.instance)
        self.statuses.bind(await js.key_value(topics.DEVICES_BUCKET))
        self.relay.bind(js)
        return nc

    async def _run(self) -> None:
        nc = await self._connect()
        await self.mqtt.start()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._dispatch(), name="ingest-dispatch")
                tg.create_task(self.marks.flush_loop(), name="ingest-hwm")
                tg.create_task(self.marks.tell_loop(), name="ingest-hwm-share")
                assert self.publisher is not None
                tg.create_task(self.publisher.run(), name="ingest-publish-timeouts")
                if self.cfg.ingest.relay_results:
                    tg.create_task(self.relay.run(), name="ingest-results-relay")
                # Ready means an upload sent now is received: a first session's messages
                # published before the SUBACK would never reach us.
                await self.mqtt.subscribed.wait()
                self.ready.set()
                log.info("ingest ready: %s -> JetStream %s", self.subscription, topics.FEATURES_STREAM)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.marks.flush())
            await self.mqtt.stop()
            # flush, then close: a drain would wait on the results relay's pull request
            with contextlib.suppress(Exception):
                await nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await nc.close()

    # -- ordering ---------------------------------------------------------

    async def _dispatch(self) -> None:
        assert self._tg is not None
        messages = self.mqtt.messages
        while running():
            msg = await messages.get()
            while True:  # the whole burst paho delivered, without a check or a wait between
                self._route(msg)
                if messages.empty():
                    break
                msg = messages.get_nowait()

    def _route(self, msg: Message) -> None:
        entry = _Entry(msg)
        self._order.append(entry)
        try:
            tenant, device, channel = topics.parse_mqtt_topic(msg.topic)
        except ValueError:
            tenant, device, channel = topics.UNKNOWN, topics.UNKNOWN, ""
        entry.channel = channel
        key = (tenant, device)
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(entry)  # the device's lane task takes it after the frame before
            return
        self._lanes[key] = collections.deque((entry,))
        assert self._tg is not None
        self._tg.create_task(self._lane(key))  # unnamed: a name is a string built per frame

    async def _lane(self, key: tuple[str, str]) -> None:
        """One device's frames, one at a time, so its chain is committed in order; the task
        ends when the lane is empty (a device with one frame in flight has a task a frame)."""
        lane = self._lanes[key]
        try:
            while lane:
                entry = lane[0]
                await self._handle_with_retry(entry, *key)
                lane.popleft()
                entry.done = True
                self._ack_ready()
        finally:
            del self._lanes[key]

    def _ack_ready(self) -> None:
        # MQTT wants PUBACKs in the order the PUBLISHes arrived.
        while self._order and self._order[0].done:
            self.mqtt.ack(self._order.popleft().msg)

    async def _handle_with_retry(self, entry: _Entry, tenant: str, device: str) -> None:
        delay = 0.1
        while True:
            try:
                await self.handle(entry.msg, tenant, device, entry.channel)
                self.jetstream_ok = True
                return
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as e:
                self.jetstream_ok = False
                # JetStream unreachable or slow: keep the message unacked and try
                # again; nothing is receipted until it is durably stored.
                log.warning(
                    "JetStream unavailable while handling %s (%s); retrying in %.1fs",
                    entry.msg.topic,
                    e,
                    delay,
                )
                metrics.JS_RETRIES.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                running()  # cancelled meanwhile (the sleep may not have said so): stop

    # -- one message, to its part ---------------------------------------------

    async def handle(self, msg: Message, tenant: str, device: str, channel: str) -> None:
        """One message, its topic parsed (``channel`` "" where it did not parse)."""
        if channel not in ("up", "status"):
            try:
                topics.parse_mqtt_topic(msg.topic)
                why = f"topic {msg.topic!r} is not an upload or status topic"
            except ValueError as e:
                why = str(e)
            await self.commits.dead_letter(msg, why, None, None)
            return
        if channel == "status":
            await self.statuses.record(msg, tenant, device)
            return
        await self.commits.upload(msg, tenant, device)
