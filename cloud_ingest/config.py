"""The cloud services' config: one TOML file (``ingest.toml``), env overrides ``CLOUD_INGEST_…``."""

from __future__ import annotations

import base64
import ssl
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from edge_tier import topics
from edge_tier.config import ServiceSettings, load_config
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.mqtt import MqttSettings
from edge_tier.wire import FrameLimits, validate_id

DAY = 24 * 3600


# The directory relative paths in [nats] are resolved against: the config file's, while
# load_ingest_config validates one (None: the working directory, as for a path given in code).
_config_dir: ContextVar[Path | None] = ContextVar("cloud_ingest_config_dir", default=None)
_AUTH_FIELDS = ("user", "creds_file", "nkey_seed_file")  # one way to authenticate, at most


def _readable_file(field: str, value: Path) -> Path:
    """``value`` resolved against the config file's directory; it must be a readable file."""
    base = _config_dir.get()
    path = value if value.is_absolute() or base is None else base / value
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ValueError(f"{field} = {str(value)!r}: {path} {what}")
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise ValueError(f"{field} = {str(value)!r}: cannot read {path}: {e.strerror or e}") from None
    return path


def _check_user_seed(field: str, path: Path, seed: bytes) -> None:
    try:
        import nkeys
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise ValueError(f"{field}: NKey auth needs the nkeys package (pip install nkeys)") from None
    if not seed.startswith(b"SU"):
        raise ValueError(f"{field}: {path} does not hold an NKey user seed (one starts with SU)")
    try:
        raw = base64.b32decode(seed + b"=" * (-len(seed) % 8))
        if nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:  # nkeys.from_seed does not check it
            raise ValueError("checksum")
        nkeys.from_seed(bytearray(seed)).wipe()
    except (nkeys.NkeysError, ValueError):
        raise ValueError(f"{field}: {path} holds a malformed NKey user seed (encoding, checksum)") from None


def _creds_section(text: bytes, header: bytes) -> bytes | None:
    """The line after the ``-----BEGIN <header>-----`` line of a .creds file (where nats-py reads it)."""
    lines = text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if header in line and line.strip().startswith(b"-----BEGIN"):
            return lines[i + 1].strip() or None
    return None


class NatsSettings(BaseModel):
    """How the cloud services reach NATS: the servers, TLS and one way to authenticate.

    Authentication is at most one of: ``user`` + ``password``, ``creds_file`` (a ``.creds``
    file, decentralised JWT auth: the user JWT and its NKey seed) or ``nkey_seed_file`` (a
    file with an NKey user seed, ``SU…``, for a server that lists the user's public key).
    A CA file (``tls_ca``) or ``tls://`` server URLs turn TLS on; ``tls_cert`` + ``tls_key``
    add a client certificate (mutual TLS). Relative paths are relative to the config file.
    """

    model_config = {"extra": "forbid"}
    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"], min_length=1)
    user: str | None = None
    password: str | None = None
    creds_file: Path | None = None
    nkey_seed_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = Field(None, validate_default=True)
    # the name the server's certificate must carry (default: each server URL's host)
    tls_hostname: str | None = None
    # TLS before the server's INFO (the server has `tls { handshake_first: true }`)
    tls_handshake_first: bool = Field(False, validate_default=True)
    connect_timeout_s: float = Field(5.0, gt=0)

    @field_validator("password")
    @classmethod
    def _password_needs_user(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("user") is None:
            raise ValueError("password is set without user")
        return v

    @field_validator("creds_file", "nkey_seed_file")
    @classmethod
    def _one_auth(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return None
        field = str(info.field_name)
        others = [f for f in _AUTH_FIELDS if f != field and info.data.get(f) is not None]
        if others:
            named = " and ".join(("user/password" if f == "user" else f) for f in others)
            raise ValueError(
                f"{field} and {named} are both set: give one way to authenticate "
                "(user/password, creds_file or nkey_seed_file)"
            )
        path = _readable_file(field, v)
        text = path.read_bytes()
        if field == "nkey_seed_file":
            _check_user_seed(field, path, text.strip())
        else:
            if not _creds_section(text, b"NATS USER JWT"):
                raise ValueError(
                    f"{field}: {path} is not a NATS .creds file (no '-----BEGIN NATS USER JWT-----' section)"
                )
            seed = _creds_section(text, b"USER NKEY SEED")
            if not seed:
                raise ValueError(f"{field}: {path} has no '-----BEGIN USER NKEY SEED-----' section")
            _check_user_seed(field, path, seed)
        return path

    @field_validator("tls_ca")
    @classmethod
    def _ca_file(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        path = _readable_file("tls_ca", v)
        try:
            ssl.create_default_context(cafile=str(path))
        except (ssl.SSLError, ValueError) as e:
            raise ValueError(f"tls_ca: {path} holds no usable PEM CA certificate: {e}") from None
        return path

    @field_validator("tls_cert")
    @classmethod
    def _cert_file(cls, v: Path | None) -> Path | None:
        return None if v is None else _readable_file("tls_cert", v)

    @field_validator("tls_key")
    @classmethod
    def _key_file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        cert = info.data.get("tls_cert")
        if v is None:
            if cert is not None:
                raise ValueError("tls_cert is set without tls_key: a client certificate needs its key")
            return None
        path = _readable_file("tls_key", v)
        if cert is None:
            if "tls_cert" in info.data:  # not just invalid itself
                raise ValueError("tls_key is set without tls_cert: mutual TLS needs the certificate too")
            return path
        try:
            ssl.create_default_context().load_cert_chain(str(cert), str(path))
        except (ssl.SSLError, ValueError) as e:
            raise ValueError(
                f"tls_key: {path} is not the PEM private key of tls_cert {cert} (or either is not PEM): {e}"
            ) from None
        return path

    @field_validator("tls_handshake_first")
    @classmethod
    def _handshake_needs_tls(cls, v: bool, info: ValidationInfo) -> bool:
        if v and not (info.data.get("tls_ca") or info.data.get("tls_cert") or cls._tls_urls(info)):
            raise ValueError("tls_handshake_first needs TLS: set tls_ca or use tls:// server URLs")
        return v

    @staticmethod
    def _tls_urls(info: ValidationInfo) -> bool:
        return any(s.startswith("tls://") for s in info.data.get("servers") or [])

    @property
    def tls(self) -> bool:
        """TLS is wanted: a CA or client certificate is given, or a server URL is ``tls://``."""
        return bool(self.tls_ca or self.tls_cert or any(s.startswith("tls://") for s in self.servers))


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
    shared_group: str | None = topics.INGEST_SHARED_GROUP
    instance: str = "0"
    publish_timeout_s: float = Field(10.0, gt=0)
    # Receipts at QoS 0: a receipt is an idempotent answer, and one lost (the device was
    # offline, the broker restarted) costs a re-send answered DUPLICATE; at QoS 1 every
    # receipt costs a PUBACK more at the broker, ingest and the device.
    receipt_qos: Literal[0, 1] = 0
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


class ModelRoute(BaseModel):
    """One tier-two model and the features it answers (``[[worker.models]]``).

    A frame is answered by the first route whose every given list holds its tenant, its
    stream and its prefilter model's name (a list left out matches all); a frame no route
    takes goes to ``worker.manifest``, or, where that is unset too, to the dead letters.
    """

    model_config = {"extra": "forbid"}
    manifest: Path
    tenants: list[str] | None = Field(None, min_length=1)
    streams: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(None, min_length=1)
    prefilters: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, min_length=1, description="the prefilter model names frames carry (Frame.model)"
    )

    @field_validator("tenants")
    @classmethod
    def _valid_tenants(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [validate_id("tenant", t) for t in v]

    def takes(self, tenant: str, stream: str, prefilter: str) -> bool:
        return (
            (self.tenants is None or tenant in self.tenants)
            and (self.streams is None or stream in self.streams)
            and (self.prefilters is None or prefilter in self.prefilters)
        )


class WorkerSettings(BaseModel):
    """Tier-two workers (``cloud-ingest worker``): JetStream features in, results out."""

    model_config = {"extra": "forbid"}
    instance: str = "0"
    # The model for features no route in ``models`` takes. Default: the packaged models when
    # ``models`` is empty, none (such features are dead-lettered) when it is not; "" = none.
    manifest: Path | None = None
    # Tier-two models by tenant, stream and prefilter model: the first route that matches wins.
    models: list[ModelRoute] = Field(default_factory=list)
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
    consumer_prefix: str = topics.WORKER_CONSUMER_PREFIX
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

    @field_validator("manifest", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _some_model(self) -> WorkerSettings:
        if self.manifest is None and not self.models:
            if "manifest" in self.model_fields_set:
                raise ValueError("manifest is unset and models is empty: the worker would answer nothing")
            self.manifest = DEFAULT_MANIFEST
        return self


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
    token = _config_dir.set(None if path is None else Path(path).parent)
    try:
        return load_config(IngestConfig, path)
    finally:
        _config_dir.reset(token)
