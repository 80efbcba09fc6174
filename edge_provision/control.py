"""Telling devices what to do: config changes and model updates, signed (``edge_tier.control``).

The desired state of each device is kept in the registry (table ``control``: the last
document issued to it) and published as one retained document per device, signed whole
with the fleet key, so a change to one part keeps the others, ``--all`` reaches every
registered device of a tenant, and a device that is offline gets it when it comes back.
A model's chunks are published (retained) before the documents that point at them.

Generations only grow per device (never below the wall clock in ms, so a registry restored
from backup still issues higher ones). Model counters grow per tenant and stream (table
``models``: one per model file, the same file keeps its counter), so a device can tell an
older model from a newer one; sending one below what a device was told last needs
``rollback``. Each document expires (``valid_ms``, 30 days by default): re-sign the
desired state with ``refresh`` before then, for devices that are away long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_provision.fleet import Fleet, FleetError
from edge_tier import topics
from edge_tier.control import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MODEL,
    DEFAULT_VALID_MS,
    ControlConfig,
    ControlDoc,
    encode_control,
    load_signing_key,
    model_update,
    sign_control,
)
from edge_tier.mqtt import MqttBridge, MqttSettings

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS control (
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (tenant, device)
);
CREATE TABLE IF NOT EXISTS models (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    counter INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    version TEXT NOT NULL,
    pushed_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, name, counter),
    UNIQUE (tenant, name, sha256)
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
        if row is None:
            return None
        try:
            return ControlDoc.model_validate_json(row[0])
        except ValueError:  # a v1 document (unsigned format): start over from the defaults
            log.warning("%s/%s: the registry's control document is of an old format; starting anew",
                        tenant, device)  # fmt: skip
            return None

    def _next(self, tenant: str, device: str, valid_ms: int, **change: Any) -> ControlDoc:
        old = self.desired(tenant, device)
        now = time.time_ns() // 1_000_000
        generation = max(now, old.generation + 1) if old is not None else now
        kept: dict[str, Any] = {"config": ControlConfig(), "model": None, "rollback": False}
        if old is not None:
            kept.update(config=old.config, model=old.model, rollback=old.rollback)
        kept.update(change)
        return ControlDoc(
            tenant=tenant, device=device, generation=generation, issued_ms=now, expires_ms=now + valid_ms,
            **kept,
        )  # fmt: skip

    def set_config(
        self,
        tenant: str,
        device: str | None,
        *,
        threshold: float | None = _UNSET,
        upload_bytes_per_s: int | None = _UNSET,
        paused: bool = _UNSET,
        valid_ms: int = DEFAULT_VALID_MS,
        stream: str = DEFAULT_MODEL,
    ) -> Published:
        """Change the named settings (others stay as they were) and publish; ``threshold`` is
        ``stream``'s model's (``prefilter``: the agent's [prefilter] model)."""
        change: dict[str, object] = {
            k: v
            for k, v in (
                ("threshold", threshold),
                ("upload_bytes_per_s", upload_bytes_per_s),
                ("paused", paused),
            )
            if v is not _UNSET
        }
        if stream != DEFAULT_MODEL and "threshold" in change:
            change["thresholds"] = change.pop("threshold")
        docs = []
        for d in self.targets(tenant, device):
            doc = self._next(tenant, d, valid_ms)
            update = dict(change)
            if "thresholds" in update:  # this stream's, the others' as they were
                others: dict[str, object] = {k: v for k, v in doc.config.thresholds.items() if k != stream}
                t = update.pop("thresholds")
                update["thresholds"] = others if t is None else {**others, stream: t}
            docs.append((d, doc.model_copy(update={"config": doc.config.model_copy(update=update)})))
        return self._publish(tenant, docs, [])

    def refresh(self, tenant: str, device: str | None, *, valid_ms: int = DEFAULT_VALID_MS) -> Published:
        """The desired state again, with a new generation and expiry (before the old one expires)."""
        return self._publish(
            tenant, [(d, self._next(tenant, d, valid_ms)) for d in self.targets(tenant, device)], []
        )

    def model_counter(self, tenant: str, name: str, sha256: str) -> int:
        """The counter of this model file: its own if it was pushed before, else the next one."""
        db = self.fleet.db
        row = db.execute(
            "SELECT counter FROM models WHERE tenant = ? AND name = ? AND sha256 = ?", (tenant, name, sha256)
        ).fetchone()
        if row is not None:
            return int(row[0])
        top = db.execute("SELECT MAX(counter) FROM models WHERE tenant = ? AND name = ?", (tenant, name))
        return int(top.fetchone()[0] or 0) + 1

    def push_model(
        self,
        tenant: str,
        device: str | None,
        manifest: Path,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        rollback: bool = False,
        valid_ms: int = DEFAULT_VALID_MS,
        stream: str = DEFAULT_MODEL,
    ) -> Published:
        """Publish the prefilter named by ``manifest`` as ``stream``'s model (chunks, then
        documents); one older than what a target was told last for that stream only with
        ``rollback``, which the documents then say, signed."""
        update, chunks = model_update(tenant, manifest, chunk_bytes=chunk_bytes, stream=stream)
        update = update.model_copy(update={"counter": self.model_counter(tenant, update.name, update.sha256)})
        targets = self.targets(tenant, device)
        if not rollback:
            newer = []
            for d in targets:
                old = self.desired(tenant, d)
                if (
                    old is not None
                    and old.model is not None
                    and old.model.name == update.name
                    and old.model.counter > update.counter
                ):
                    newer.append(f"{d} (counter {old.model.counter}, {old.model.version})")
            if newer:
                raise FleetError(
                    f"model {update.version} is counter {update.counter} of {tenant}'s {update.name} models, "
                    f"older than what {', '.join(newer)} was sent: give --rollback to go back"
                )
        docs = [(d, self._next(tenant, d, valid_ms, model=update, rollback=rollback)) for d in targets]
        retained = [(topics.model_chunk_topic(tenant, update.sha256, i), c) for i, c in enumerate(chunks)]
        published = self._publish(tenant, docs, retained)
        with self.fleet.db:
            self.fleet.db.execute(
                "INSERT OR IGNORE INTO models (tenant, name, counter, sha256, version, pushed_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    tenant,
                    update.name,
                    update.counter,
                    update.sha256,
                    update.version,
                    time.time_ns() // 1_000_000,
                ),
            )
        return published

    def _publish(
        self, tenant: str, docs: list[tuple[str, ControlDoc]], retained: list[tuple[str, bytes]]
    ) -> Published:
        key = load_signing_key(self.fleet.root / "signing.key")
        messages = retained + [
            (topics.mqtt_topic(tenant, d, "control"), encode_control(sign_control(key, doc)))
            for d, doc in docs
        ]
        asyncio.run(publish_retained(self.mqtt, messages))
        with self.fleet.db:  # recorded once the broker has it: the registry never runs ahead
            self.fleet.db.executemany(
                "INSERT OR REPLACE INTO control (tenant, device, doc) VALUES (?, ?, ?)",
                [(tenant, d, doc.model_dump_json(exclude_none=True)) for d, doc in docs],
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
