"""The agent process: queue, uplink and enqueue endpoint under one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from pathlib import Path

from edge_agent import metrics
from edge_agent.config import AgentConfig
from edge_agent.control import Controller, saved_thresholds
from edge_agent.endpoint import Endpoint
from edge_agent.errors import StoreError
from edge_agent.notify import Notifier
from edge_agent.prefilter import Prefilter
from edge_agent.store import AsyncQueue, Store
from edge_agent.stream_models import StreamModels
from edge_agent.uplink import Uplink
from edge_tier import topics
from edge_tier.mqtt import MqttBridge

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        dev = cfg.device
        # The integrity check happens here, before anything runs. Chunks never
        # outgrow a frame, so frames are always made of whole chunks.
        self.store = Store(
            cfg.store,
            frame_max_records=cfg.uplink.frame_max_records,
            frame_max_bytes=cfg.uplink.frame_max_bytes,
        )
        if self.store.quarantined is not None and cfg.store.rescue:
            self._rescue(self.store.quarantined)
        self.queue = AsyncQueue(self.store)
        receipt = topics.mqtt_topic(dev.tenant, dev.device, "receipt")
        self.mqtt = MqttBridge(
            cfg.mqtt,
            client_id=cfg.mqtt.client_id or topics.agent_client_id(dev.tenant, dev.device),
            subscriptions=[(receipt, 1)],
            clean=False,  # receipts sent while we are away wait at the broker
            name=f"agent-mqtt[{dev.tenant}/{dev.device}]",
        )
        self.uplink = Uplink(cfg, self.queue, self.mqtt)
        # An installed model update wins over the configured model; one that no longer
        # loads is rolled back here, before anything runs.
        self.models = StreamModels(cfg)
        self.models.start(saved_thresholds(cfg))
        self._show_models()
        self.mqtt.client.will_set(self.uplink.status_topic, self.uplink.offline_status(), 1, True)
        self.endpoint = Endpoint(cfg, self.queue, self.models)
        self.control = Controller(
            cfg,
            self.mqtt,
            self.models,
            swap=self._swap_model,
            limit=lambda c: self.uplink.limit(paused=c.paused, bytes_per_s=c.upload_bytes_per_s),
            publish_status=self.uplink.publish_status,
        )
        self.uplink.control = self.control.state
        self.endpoint.status_fields = lambda: {
            "model_version": self.uplink.model_version,
            "models": self.models.status(),
            "control": self.control.state().model_dump(exclude_none=True),
        }
        self.endpoint.checks = self.checks
        self.notifier = Notifier()
        self.ready = asyncio.Event()

    async def checks(self) -> dict[str, bool]:
        return {"queue": not self.queue.closed, "started": self.ready.is_set()}

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
                tg.create_task(self.control.run(), name="control")
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

    def _rescue(self, source: Path) -> None:
        from edge_agent.rescue import rescue_file  # only after a failed integrity check

        try:
            rescue_file(self.store, source)
        except (sqlite3.Error, OSError, StoreError) as e:
            # The file stays set aside: ``edge-agent recover`` can try again.
            log.error("could not rescue the records of %s (%s); run edge-agent recover", source, e)

    def _swap_model(self, key: str, pf: Prefilter) -> None:
        self._show_models()  # the endpoint looks each stream's model up in self.models per request

    def _show_models(self) -> None:
        default = self.models.default
        self.uplink.model_version = default.version if default else None
        metrics.MODEL_INFO.clear()
        for key, pf in self.models.running.items():
            if pf is not None:
                metrics.MODEL_INFO.labels(pf.version, key).set(1)
