"""Telling devices what to do: config changes and signed model updates (``edge_tier/control.py``).

The desired state of each device is kept in the registry (table ``control``) and
published as one retained document per device, so a change to one part keeps the
others, ``--all`` reaches every registered device of a tenant, and a device that is
offline gets it when it comes back. A model's chunks are published (retained) before
the documents that point at them. Generations only grow (never below the wall clock in
ms), so a device ignores an older document, even one from a registry restored from backup.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_tier import topics
from edge_tier.control import (
    DEFAULT_CHUNK_BYTES,
    ControlConfig,
    ControlDoc,
    decode_control,
    encode_control,
    load_signing_key,
    model_update,
    sign_model,
)
from edge_tier.mqtt import MqttBridge, MqttSettings
from provisioning.fleet import Fleet, FleetError

SCHEMA = """
CREATE TABLE IF NOT EXISTS control (
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (tenant, device)
);
"""

_UNSET: Any = object()


@dataclass(frozen=True)
class Published:
    documents: int
    chunks: int


class ControlPlane:
    def __init__(self, fleet: Fleet, mqtt: MqttSettings) -> None:
        self.fleet = fleet
        self.mqtt = mqtt
        fleet.db.executescript(SCHEMA)

    def targets(self, tenant: str, device: str | None) -> list[str]:
        """``device``, or every registered device of ``tenant`` (None); revoked ones never."""
        live = [d.device for d in self.fleet.devices(tenant) if d.revoked_ms is None]
        if device is None:
            if not live:
                raise FleetError(f"tenant {tenant!r} has no registered devices")
            return live
        if device not in live:
            raise FleetError(f"device {tenant}/{device}: not registered, or revoked")
        return [device]

    def desired(self, tenant: str, device: str) -> ControlDoc | None:
        row = self.fleet.db.execute(
            "SELECT doc FROM control WHERE tenant = ? AND device = ?", (tenant, device)
        ).fetchone()
        return None if row is None else decode_control(row[0])

    def _next(self, tenant: str, device: str, **change: Any) -> ControlDoc:
        old = self.desired(tenant, device)
        now = time.time_ns() // 1_000_000
        generation = max(now, old.generation + 1) if old is not None else now
        kept = {"config": ControlConfig(), "model": None} if old is None else dict(old)
        kept.update(change, generation=generation, issued_ms=now)
        return ControlDoc.model_validate(kept)

    def set_config(
        self,
        tenant: str,
        device: str | None,
        *,
        threshold: float | None = _UNSET,
        upload_bytes_per_s: int | None = _UNSET,
        paused: bool = _UNSET,
    ) -> Published:
        """Change the named settings (others stay as they were) and publish."""
        docs = []
        for d in self.targets(tenant, device):
            doc = self._next(tenant, d)
            change = {
                k: v
                for k, v in (
                    ("threshold", threshold),
                    ("upload_bytes_per_s", upload_bytes_per_s),
                    ("paused", paused),
                )
                if v is not _UNSET
            }
            docs.append((d, doc.model_copy(update={"config": doc.config.model_copy(update=change)})))
        return self._publish(tenant, docs, [])

    def push_model(
        self, tenant: str, device: str | None, manifest: Path, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Published:
        """Sign the prefilter named by ``manifest`` with the fleet key; publish chunks, then documents."""
        update, chunks = model_update(tenant, manifest, chunk_bytes=chunk_bytes)
        signed = sign_model(load_signing_key(self.fleet.root / "signing.key"), update)
        docs = [(d, self._next(tenant, d, model=signed)) for d in self.targets(tenant, device)]
        retained = [(topics.model_chunk_topic(tenant, update.sha256, i), c) for i, c in enumerate(chunks)]
        return self._publish(tenant, docs, retained)

    def _publish(
        self, tenant: str, docs: list[tuple[str, ControlDoc]], retained: list[tuple[str, bytes]]
    ) -> Published:
        messages = retained + [
            (topics.mqtt_topic(tenant, d, "control"), encode_control(doc)) for d, doc in docs
        ]
        asyncio.run(publish_retained(self.mqtt, messages))
        with self.fleet.db:  # recorded once the broker has it: the registry never runs ahead
            self.fleet.db.executemany(
                "INSERT OR REPLACE INTO control (tenant, device, doc) VALUES (?, ?, ?)",
                [(tenant, d, encode_control(doc).decode()) for d, doc in docs],
            )
        return Published(len(docs), len(retained))


async def publish_retained(
    settings: MqttSettings, messages: list[tuple[str, bytes]], within: float = 15.0
) -> None:
    """Publish retained QoS 1 messages, in order, and return once the broker acknowledged each."""
    client_id = settings.client_id or f"edge-provision-{time.time_ns()}"
    bridge = MqttBridge(settings, client_id=client_id, clean=True, name="edge-provision")
    await bridge.start()
    where = f"{settings.host}:{settings.port}"
    try:
        try:
            await asyncio.wait_for(bridge.connected.wait(), within)
        except TimeoutError:
            raise FleetError(f"cannot reach the MQTT broker at {where} (or it refused our login)") from None
        for topic, payload in messages:
            if not await bridge.publish_confirmed(topic, payload, within, retain=True):
                raise FleetError(
                    f"the broker at {where} did not take {topic} (no PUBACK, or not authorized); "
                    "nothing was recorded"
                )
    finally:
        await bridge.stop()
