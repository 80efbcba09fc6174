"""The agent process: queue, uplink and enqueue endpoint under one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from edge_agent.config import AgentConfig
from edge_agent.endpoint import Endpoint
from edge_agent.notify import Notifier
from edge_agent.store import AsyncQueue, Store
from edge_agent.uplink import Uplink
from edge_tier import topics
from edge_tier.mqtt import MqttBridge
from edge_tier.wire import Dtype

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        dev = cfg.device
        # The integrity check happens here, before anything runs. Chunks never
        # outgrow a frame, so frames are always made of whole chunks.
        self.store = Store(
            cfg.store,
            chunk_max_records=cfg.uplink.frame_max_records,
            chunk_max_bytes=cfg.uplink.frame_max_bytes,
        )
        self.queue = AsyncQueue(self.store)
        receipt = topics.mqtt_topic(dev.tenant, dev.device, "receipt")
        self.mqtt = MqttBridge(
            cfg.mqtt,
            client_id=cfg.mqtt.client_id or f"et-{dev.tenant}-{dev.device}",
            subscriptions=[(receipt, 1)],
            clean=False,  # receipts sent while we are away wait at the broker
            name=f"agent-mqtt[{dev.tenant}/{dev.device}]",
        )
        self.uplink = Uplink(cfg, self.queue, self.mqtt)
        self.prefilter = None
        if cfg.prefilter.manifest is not None:
            from edge_agent.prefilter import Prefilter

            self.prefilter = Prefilter(
                cfg.prefilter.manifest,
                threshold=cfg.prefilter.threshold,
                threads=cfg.prefilter.threads,
                upload_dtype=Dtype[cfg.prefilter.upload_dtype.upper()],
            )
            self.uplink.model_version = self.prefilter.version
        self.mqtt.client.will_set(self.uplink.status_topic, self.uplink.offline_status(), 1, True)
        self.endpoint = Endpoint(cfg, self.queue, self.prefilter)
        self.notifier = Notifier()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        dev = self.cfg.device
        log.info("edge agent %s/%s starting; queue %s", dev.tenant, dev.device, self.store.path)
        await self.mqtt.start()
        await self.endpoint.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.queue.run(), name="queue-commit")
                tg.create_task(self.queue.checkpoints(), name="queue-checkpoint")
                tg.create_task(self.uplink.run(), name="uplink")
                tg.create_task(self.notifier.watchdog(), name="watchdog")
                self.ready.set()
                self.notifier.notify("READY=1", f"STATUS=serving {dev.tenant}/{dev.device}")
                log.info("agent ready: %s/%s", dev.tenant, dev.device)
        finally:
            self.notifier.notify("STOPPING=1")
            await self.endpoint.stop()
            with contextlib.suppress(Exception):
                await self.queue.close()
            await self.mqtt.stop(final=(self.uplink.status_topic, self.uplink.offline_status(), True))
            log.info("edge agent %s/%s stopped", dev.tenant, dev.device)
