"""et_devices converges after an ingest restart on a broker that does not hand it the
retained statuses (RabbitMQ 3.10 sends none on ingest's ``et/+/+/status`` wildcard).

The agent re-announces its status every ``uplink.status_interval_s``; that period, not the
retained message, is what brings a device back. The broker here is mosquitto, which does
deliver retained statuses, so the test takes away what such a broker would never give:
ingest comes back with the device's retained status cleared and its et_devices entry gone,
as a new instance (a fresh MQTT session: the old one's queued statuses are not a way back).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import nats
import nats.js.errors
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_tier import topics
from tests.support import DEVICE, TENANT, Pipeline, wait_until

INTERVAL = 4.0  # the agent's status period: long enough to tell "retained" from "re-announced"
KEY = topics.device_key(TENANT, DEVICE)
STATUS = topics.mqtt_topic(TENANT, DEVICE, "status")


class StatusSpy:
    """Records the device's statuses as the broker delivers them: (monotonic, retained, payload)."""

    def __init__(self, port: int) -> None:
        self.got: list[tuple[float, bool, bytes]] = []
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="status-spy")
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(STATUS, 1)
        self.c.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.got.append((time.monotonic(), bool(msg.retain), bytes(msg.payload)))

    def live(self) -> list[tuple[float, bool, bytes]]:
        with self.lock:
            return [g for g in self.got if not g[1] and g[2]]

    def clear_retained(self) -> None:
        """What a broker without retained delivery gives a new subscriber: nothing."""
        self.c.publish(STATUS, b"", qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


async def _devices(url: str, fn: Callable[[Any], Any]) -> Any:
    nc = await nats.connect(url)
    try:
        return await fn(await nc.jetstream().key_value(topics.DEVICES_BUCKET))
    finally:
        await nc.close()


def device_doc(url: str) -> dict[str, Any] | None:
    async def get(kv: Any) -> dict[str, Any] | None:
        try:
            entry = await kv.get(KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return json.loads(entry.value) if entry.value else None

    return asyncio.run(_devices(url, get))


def forget_device(url: str) -> None:
    async def delete(kv: Any) -> None:
        await kv.delete(KEY)

    asyncio.run(_devices(url, delete))


def test_et_devices_converges_after_an_ingest_restart_without_retained_statuses(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    p = make_pipeline(agent={"uplink": {"status_interval_s": INTERVAL}})
    url = p.nats.url
    wait_until(lambda: (device_doc(url) or {}).get("state") == "online", 20, "the device in et_devices")
    p.ingest.stop()

    spy = StatusSpy(p.mosquitto.port)
    try:
        # Right after a live status, so the next one is a whole period away (an agent that
        # never re-announces sends none: go on, and fail below where it matters).
        deadline = time.monotonic() + INTERVAL + 2
        while not spy.live() and time.monotonic() < deadline:
            time.sleep(0.02)
        announced = spy.live()[-1][0] if spy.live() else 0.0
        spy.clear_retained()
        forget_device(url)
        assert device_doc(url) is None
        p.ingest.config["ingest"]["instance"] = "1"  # a replacement with a session of its own
        p.ingest.start(timeout=20)  # ready: subscribed, so a retained status would be in by now
        up = time.monotonic()
        if up - announced < INTERVAL - 1.0 or not spy.live():
            time.sleep(0.3)
            # nothing retained came: only the re-announce can bring the device back
            assert device_doc(url) is None, "a retained status reached ingest: the test proves nothing"
        wait_until(
            lambda: device_doc(url) is not None,
            INTERVAL + 6,
            f"the device back in et_devices within a status period ({INTERVAL}s) of the restart",
        )
        doc = device_doc(url)
        assert doc is not None and doc["state"] == "online", doc
        assert time.monotonic() - up <= INTERVAL + 6
    finally:
        spy.close()
