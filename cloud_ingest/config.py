"""The cloud services' config: one TOML file (``ingest.toml``), env overrides ``CLOUD_INGEST_…``."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from edge_tier.config import ServiceSettings, load_config
from edge_tier.mqtt import MqttSettings
from edge_tier.wire import FrameLimits

DAY = 24 * 3600


class NatsSettings(BaseModel):
    model_config = {"extra": "forbid"}
    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    user: str | None = None
    password: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0)


class StreamSettings(BaseModel):
    model_config = {"extra": "forbid"}
    replicas: int = Field(1, ge=1, le=5)
    features_max_age_s: int = Field(7 * DAY, ge=60)
    features_max_bytes: int = Field(-1, ge=-1)
    # JetStream drops a re-sent upload by its Nats-Msg-Id inside this window;
    # the per-device high-water mark catches re-sends after it (docs/guarantees.md).
    duplicate_window_s: int = Field(2 * 3600, ge=1)
    deadletter_max_age_s: int = Field(30 * DAY, ge=60)


class IngestSettings(BaseModel):
    model_config = {"extra": "forbid"}
    # MQTT 5 shared subscription group; several ingest processes split the load.
    # None (or an MQTT 3.1.1 broker) subscribes plainly.
    shared_group: str | None = "et-ingest"
    instance: str = "0"
    publish_timeout_s: float = Field(10.0, gt=0)
    hwm_flush_s: float = Field(0.2, gt=0)
    max_frame_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_records: int = Field(65536, ge=1)
    max_dim: int = Field(65536, ge=1)
    metrics_port: int | None = Field(None, ge=0, le=65535)

    @property
    def limits(self) -> FrameLimits:
        return FrameLimits(
            max_frame_bytes=self.max_frame_bytes, max_records=self.max_records, max_dim=self.max_dim
        )


class IngestConfig(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CLOUD_INGEST_", env_nested_delimiter="__", extra="forbid")

    mqtt: MqttSettings = MqttSettings()
    nats: NatsSettings = NatsSettings()
    streams: StreamSettings = StreamSettings()
    ingest: IngestSettings = IngestSettings()
    log_level: str = "INFO"


def load_ingest_config(path: str | Path | None) -> IngestConfig:
    return load_config(IngestConfig, path)
