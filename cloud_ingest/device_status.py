"""Status recording: each device's last status, kept in the ``et_devices`` bucket.

Ingest subscribes (never shared: a broker sends retained messages to no shared
subscription) to ``et/+/+/status`` and writes the device's last status, with the time it
was seen (``seen_ms``), under ``{tenant}.{device}``: the result API's ``/v1/devices``
reads it from there. Every ingest process writing the same status is harmless. Apart from
the commit protocol because nothing is receipted: a status that does not decode is logged
and ignored, never dead-lettered.
"""

from __future__ import annotations

import json
import logging
import time

from nats.js.kv import KeyValue

from edge_tier import topics
from edge_tier.mqtt import Message
from edge_tier.wire import WireError, decode_status

log = logging.getLogger("cloud_ingest.ingest")  # the ingest service's logger, as before the split


class StatusRecorder:
    """Device statuses from MQTT into the devices bucket."""

    def __init__(self) -> None:
        self.devices: KeyValue | None = None

    def bind(self, devices: KeyValue) -> None:
        self.devices = devices

    async def record(self, msg: Message, tenant: str, device: str) -> None:
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
