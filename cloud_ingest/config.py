"""The cloud services' config: one TOML file (``ingest.toml``), env overrides ``CLOUD_INGEST_…``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import SettingsConfigDict

from edge_tier.config import ServiceSettings, load_config
from edge_tier.mqtt import MqttSettings
from edge_tier.wire import FrameLimits, validate_id
from models.manifest import DEFAULT_MANIFEST

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
    results_max_age_s: int = Field(30 * DAY, ge=60)
    results_max_bytes: int = Field(-1, ge=-1)
    # A worker that dies after writing a result and before acking its features message
    # writes it again on redelivery; inside this window JetStream drops the copy.
    results_duplicate_window_s: int = Field(2 * 3600, ge=1)


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
    # /metrics, /healthz and /readyz (None: not served)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Also publish each tier-two result to MQTT et/{tenant}/{device}/results.
    relay_results: bool = True

    @property
    def limits(self) -> FrameLimits:
        return FrameLimits(
            max_frame_bytes=self.max_frame_bytes, max_records=self.max_records, max_dim=self.max_dim
        )


class WorkerSettings(BaseModel):
    """Tier-two workers (``cloud-ingest worker``): JetStream features in, results out."""

    model_config = {"extra": "forbid"}
    instance: str = "0"
    manifest: Path = DEFAULT_MANIFEST
    # onnxruntime execution providers, in order of preference; those this host's
    # onnxruntime build lacks are skipped (CUDA needs the onnxruntime-gpu extra).
    providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"], min_length=1
    )
    io_binding: bool | None = None  # None: on where the model runs on a GPU
    # intra-op threads: 1 = the calling thread only, as fast for the shipped model and with
    # no pool busy-waiting between calls; 0 = onnxruntime's choice (one per core)
    threads: int = Field(1, ge=0, le=256)
    # let a thread pool (threads != 1) busy-wait between calls: a little lower latency in
    # tight loops, at the cost of whole cores even when the worker is nearly idle
    spin: bool = False
    # Dynamic batching: records from many messages go into one inference call,
    # cut at max_batch records or max_wait_ms after the first one arrived.
    max_batch: int = Field(512, ge=1, le=65536)
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    # Fetched per tenant and held locally at most (messages); bounds what a crash redelivers.
    prefetch: int = Field(64, ge=1, le=10_000)
    consumer_prefix: str = "et-tier2"
    ack_wait_s: float = Field(30.0, gt=0)
    # A message that fails (undecodable, wrong shape, inference error) is nak'ed with
    # these delays, and dead-lettered when it fails on delivery max_deliveries.
    max_deliveries: int = Field(5, ge=1, le=1000)
    backoff_s: list[float] = Field(default_factory=lambda: [1.0, 5.0, 15.0, 60.0], min_length=1)
    # Fairness: features per second per tenant (0 = unlimited; tenants still take turns).
    tenant_rate: float = Field(0.0, ge=0)
    tenant_burst: float | None = Field(None, gt=0, description="bucket size; default 2 s of rate")
    tenant_rates: dict[str, float] = Field(default_factory=dict, description="per-tenant overrides")
    # Tenants with features: found in the stream every discover_s, or a fixed list.
    tenants: list[str] | None = None
    discover_s: float = Field(2.0, gt=0)
    results_max_records: int = Field(4096, ge=1, description="records per result message")
    # /metrics, /healthz and /readyz (None: not served)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @field_validator("instance", "consumer_prefix")
    @classmethod
    def _valid_name(cls, v: str, info) -> str:  # type: ignore[no-untyped-def]
        return validate_id(info.field_name, v)

    @field_validator("tenants")
    @classmethod
    def _valid_tenants(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [validate_id("tenant", t) for t in v]


class ApiSettings(BaseModel):
    """The result API (``cloud-ingest api``)."""

    model_config = {"extra": "forbid"}
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # The fleet registry with the API tokens (edge-provision --fleet DIR token add TENANT).
    registry: Path | None = None
    token_cache_s: float = Field(5.0, ge=0, description="a revoked token works at most this long")
    # Per token: requests per second and bucket size (429 + Retry-After beyond).
    rate_per_token: float = Field(50.0, gt=0)
    burst_per_token: float = Field(100.0, ge=1)
    page_default: int = Field(100, ge=1)
    page_max: int = Field(1000, ge=1)
    keepalive_s: float = Field(15.0, gt=0, description="SSE comment interval, so proxies keep it open")
    # The rebuildable view of ET_RESULTS (docs/operations.md); in memory by default.
    index_path: str = ":memory:"
    stream_queue: int = Field(10_000, ge=10, description="events buffered per SSE client")


class IngestConfig(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CLOUD_INGEST_", env_nested_delimiter="__", extra="forbid")

    mqtt: MqttSettings = MqttSettings()
    nats: NatsSettings = NatsSettings()
    streams: StreamSettings = StreamSettings()
    ingest: IngestSettings = IngestSettings()
    worker: WorkerSettings = WorkerSettings()
    api: ApiSettings = ApiSettings()
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object a line, with tenant/device/seq/upload_id


def load_ingest_config(path: str | Path | None) -> IngestConfig:
    return load_config(IngestConfig, path)
