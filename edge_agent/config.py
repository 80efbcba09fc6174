"""The agent's config: one TOML file (``agent.toml``), env overrides ``EDGE_AGENT_…``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from edge_tier.config import ServiceSettings, load_config
from edge_tier.mqtt import MqttSettings
from edge_tier.wire import Dtype, validate_id


class EvictionPolicy(StrEnum):
    LOWEST_SCORE = "lowest_score"  # lowest prefilter score first, then oldest
    OLDEST = "oldest"
    BLOCK = "block"  # refuse new records until the cloud drains the queue


class DeviceSettings(BaseModel):
    model_config = {"extra": "forbid"}
    tenant: str = "demo"
    device: str = "device-1"

    @field_validator("tenant", "device")
    @classmethod
    def _valid_id(cls, v: str, info) -> str:  # type: ignore[no-untyped-def]
        return validate_id(info.field_name, v)


class StoreSettings(BaseModel):
    model_config = {"extra": "forbid"}
    path: Path = Path("edge-agent-queue.db")
    budget_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024)
    policy: EvictionPolicy = EvictionPolicy.LOWEST_SCORE
    # Group commit: enqueues that arrive while a commit runs share the next one.
    # A window > 0 also waits that long for more before committing (rarely worth it:
    # the fsync of the running commit is the natural window).
    commit_window_ms: float = Field(0.0, ge=0, le=1000)
    commit_max_records: int = Field(8192, ge=1)
    # FULL survives power loss; NORMAL only process crashes (WAL).
    synchronous: str = "FULL"
    # How long a producer waits for room under the "block" policy.
    block_timeout_s: float = Field(5.0, ge=0)
    # Preallocated beside the queue and given up when the filesystem fills anyway, so
    # eviction, checkpoints and receipts always have room (edge_agent/disk.py).
    # None: a sixteenth of the filesystem, within 1..8 MiB; 0: no reserve.
    reserve_bytes: int | None = Field(None, ge=0)
    # A queue that fails its integrity check is set aside; rescue what it still holds into
    # the fresh queue right away (edge_agent/rescue.py). Off: ``edge-agent recover`` later.
    rescue: bool = True

    @field_validator("synchronous")
    @classmethod
    def _sync(cls, v: str) -> str:
        if v.upper() not in {"FULL", "NORMAL", "EXTRA"}:
            raise ValueError("must be FULL, EXTRA or NORMAL")
        return v.upper()


class UplinkSettings(BaseModel):
    model_config = {"extra": "forbid"}
    frame_max_records: int = Field(4096, ge=1, le=65536)
    # At most this, and at most what the cloud says it takes (in every receipt). The default
    # fits a NATS server's default max_payload (1 MiB) with room for the headers.
    frame_max_bytes: int = Field(1024 * 1024 - 8192, ge=1024, le=16 * 1024 * 1024)
    window: int = Field(8, ge=1, le=256, description="frames sent and not yet receipted")
    receipt_timeout_s: float = Field(15.0, gt=0)
    compress: str | None = None
    status_interval_s: float = Field(10.0, gt=0)

    @field_validator("compress")
    @classmethod
    def _compress(cls, v: str | None) -> str | None:
        if v not in (None, "zlib"):
            raise ValueError("must be unset or 'zlib'")
        return v


class PrefilterSettings(BaseModel):
    """The on-device model. Without a manifest the agent takes feature vectors only."""

    model_config = {"extra": "forbid"}
    manifest: Path | None = None
    # overrides the manifest's; in the score's own range (a reconstruction error is not <= 1)
    threshold: float | None = Field(None, allow_inf_nan=False)
    threads: int = Field(1, ge=1, le=64)
    # What leaves the device: int8 (x the manifest's embedding.scale, or an int8 tensor's own)
    # is a quarter of float32 and scores the same in tier two (models/REPORT.md); "auto" is
    # int8 where such a scale is known, else float16.
    upload_dtype: Literal["auto", "float32", "float16", "int8"] = "auto"

    def dtype(self) -> Dtype | None:
        return None if self.upload_dtype == "auto" else Dtype[self.upload_dtype.upper()]


class StreamSettings(PrefilterSettings):
    """One of the device's streams (``[streams.NAME]``): its own model, or none (features only)."""


class EndpointSettings(BaseModel):
    """The local enqueue endpoint for producers on the device."""

    model_config = {"extra": "forbid"}
    host: str = "127.0.0.1"
    port: int = Field(7781, ge=0, le=65535)
    unix_socket: Path | None = None
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    metadata_allow: list[str] = Field(default_factory=lambda: ["site", "sensor", "label"])


class ControlSettings(BaseModel):
    """The control channel: config changes and signed model updates from the cloud."""

    model_config = {"extra": "forbid"}
    # the fleet's Ed25519 public key (signing.pub in a device bundle); without it, every
    # control document is refused, config changes and model updates alike
    signing_key: Path | None = None
    # where model updates and the last control document live (default: beside the queue)
    dir: Path | None = None


class AgentConfig(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_AGENT_", env_nested_delimiter="__", extra="forbid")

    device: DeviceSettings = DeviceSettings()
    mqtt: MqttSettings = MqttSettings()
    store: StoreSettings = StoreSettings()
    uplink: UplinkSettings = UplinkSettings()
    endpoint: EndpointSettings = EndpointSettings()
    # the model of every stream [streams] does not name
    prefilter: PrefilterSettings = PrefilterSettings()
    # streams with their own model (or none): POST /v1/windows?stream=NAME
    streams: dict[str, StreamSettings] = Field(default_factory=dict)
    control: ControlSettings = ControlSettings()
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object a line, with tenant/device/seq/upload_id

    def control_path(self, name: str) -> Path:
        """``name`` in the control directory (the agent makes it at start)."""
        return (self.control.dir or self.store.path.with_name(self.store.path.stem + ".control")) / name

    @field_validator("streams")
    @classmethod
    def _stream_names(cls, v: dict[str, StreamSettings]) -> dict[str, StreamSettings]:
        for name in v:
            validate_id("stream", name)
        return v

    @model_validator(mode="after")
    def _budget_holds_window(self) -> AgentConfig:
        # Frames in flight cannot be evicted, so the budget must hold them with room to spare.
        need = 2 * self.uplink.window * self.uplink.frame_max_bytes
        if self.store.budget_bytes < need:
            raise ValueError(
                f"store.budget_bytes ({self.store.budget_bytes}) must be at least "
                f"2 x uplink.window x uplink.frame_max_bytes ({need})"
            )
        return self


def load_agent_config(path: str | Path | None) -> AgentConfig:
    return load_config(AgentConfig, path)
