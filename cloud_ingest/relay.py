"""The results relay: every tier-two result in ET_RESULTS also to MQTT, at least once.

Each result message goes, as it is, to ``et/{tenant}/{device}/results`` (QoS 1) and is
acked in JetStream only after the broker's PUBACK; a message the broker did not confirm
is nak'ed and comes back. Subscribers tell repeats apart by upload id and part
(docs/wire-format.md). Ingest processes share one durable consumer
(``et-results-mqtt``), so each result is relayed by one of them; it is separate from the
commit protocol because nothing of a device's chain waits on it (``ingest.relay_results``
turns it off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cloud_ingest import metrics
from edge_tier import topics
from edge_tier.mqtt import MqttBridge
from edge_tier.tasks import running

log = logging.getLogger("cloud_ingest.ingest")  # the ingest service's logger, as before the split


class ResultsRelay:
    """ET_RESULTS -> MQTT ``et/{tenant}/{device}/results``, through the shared durable consumer."""

    def __init__(self, mqtt: MqttBridge) -> None:
        self.mqtt = mqtt
        self.js: JetStreamContext | None = None

    def bind(self, js: JetStreamContext) -> None:
        self.js = js

    async def _subscribe(self) -> JetStreamContext.PullSubscription | None:
        """Bind the shared consumer (creating it), retrying until JetStream answers; None
        if the service stops first."""
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
                return await self.js.pull_subscribe(
                    topics.RESULTS_SUBJECTS,
                    durable=topics.RESULTS_RELAY_CONSUMER,
                    stream=topics.RESULTS_STREAM,
                    config=config,
                )
            except (nats.errors.Error, TimeoutError) as e:
                log.warning("results relay: cannot bind its consumer (%r); retrying", e)
                await asyncio.sleep(1.0)
        return None

    async def run(self) -> None:
        sub = await self._subscribe()
        while sub is not None and running():
            await self.mqtt.connected.wait()
            try:
                msgs = await sub.fetch(64, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.Error as e:
                log.warning("results relay: fetch failed (%r); retrying", e)
                await asyncio.sleep(0.5)
                continue
            sent = await asyncio.gather(*(self.relay_one(m) for m in msgs))
            metrics.RESULTS_RELAYED.inc(sum(sent))

    async def relay_one(self, m: Msg) -> bool:
        """One result to MQTT; True once the broker confirmed it (and JetStream has the ack)."""
        try:
            tenant, device = topics.parse_results_subject(m.subject)
        except topics.TopicError:
            await m.term()
            return False
        if await self.mqtt.publish_confirmed(topics.mqtt_topic(tenant, device, "results"), m.data):
            await m.ack()
            return True
        with contextlib.suppress(nats.errors.Error):
            await m.nak(delay=1.0)
        return False
