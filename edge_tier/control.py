"""The control channel's wire format: what the cloud asks of one device.

One retained JSON document per device on ``et/{tenant}/{device}/control``, holding the
whole desired state (as a device twin's desired properties do), so the broker's one
retained message per topic is always enough: a ``generation`` that only grows, the
runtime config (prefilter threshold, upload rate, pause) and, optionally, a model
update. The device acknowledges in its status (``wire.ControlState``).

A model update is a statement signed with the fleet's Ed25519 key: the manifest the
device will load, the file's sha256 and size, and the sha256 of every chunk. The
chunks are retained on ``et/{tenant}/_models/{sha256}/{index}``, shared by a tenant's
devices; a device checks each chunk as it arrives, keeps it on disk, and asks only for
the chunks it lacks, so a transfer cut by a reconnect or a restart resumes. The config
part is not signed: who may write a control topic is the broker's ACL's business.
"""

from __future__ import annotations

import base64
import hashlib
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_tier.wire import WireError, _decode_json_model, validate_id

MAX_MODEL_BYTES = 16 * 1024 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
DEFAULT_CHUNK_BYTES = 64 * 1024
MAX_CONTROL_BYTES = 1024 * 1024  # a document lists one sha256 per chunk

_Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ModelRefused(WireError):
    """A model update that must not be installed: bad signature, wrong tenant, bad chunk."""


class ControlConfig(BaseModel):
    """Runtime settings the cloud may change without a restart."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: Annotated[float, Field(ge=0, le=1)] | None = None  # None: the model's own
    upload_bytes_per_s: Annotated[int, Field(ge=1)] | None = None  # None: as fast as the link goes
    paused: bool = False  # uploads held; the queue keeps taking records within its budget


class ModelUpdate(BaseModel):
    """The signed statement of one model update."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    tenant: str
    name: Literal["prefilter"] = "prefilter"
    version: Annotated[str, Field(min_length=1, max_length=64)]
    sha256: _Sha256
    bytes: Annotated[int, Field(ge=1, le=MAX_MODEL_BYTES)]
    chunk_bytes: Annotated[int, Field(ge=1024, le=MAX_CHUNK_BYTES)]
    chunks: list[_Sha256]
    manifest: dict[str, Any]  # what the device writes as manifest.json beside the model file

    @model_validator(mode="after")
    def _consistent(self) -> ModelUpdate:
        validate_id("tenant", self.tenant)
        if len(self.chunks) != math.ceil(self.bytes / self.chunk_bytes):
            raise ValueError(f"{len(self.chunks)} chunk hashes for {self.bytes} bytes in {self.chunk_bytes}")
        entry = self.manifest.get(self.name)
        if not isinstance(entry, dict) or entry.get("sha256") != self.sha256:
            raise ValueError(f"manifest.{self.name}.sha256 must be the update's sha256")
        return self

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_bytes
        return start, min(self.bytes, start + self.chunk_bytes)


class SignedModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    update: Annotated[str, Field(max_length=MAX_CONTROL_BYTES)]  # the exact JSON that was signed
    signature: Annotated[str, Field(max_length=128)]  # base64 Ed25519


class ControlDoc(BaseModel):
    """The retained document on et/{tenant}/{device}/control."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    generation: Annotated[int, Field(ge=1, le=2**63 - 1)]
    issued_ms: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    config: ControlConfig = ControlConfig()
    model: SignedModel | None = None


def encode_control(doc: ControlDoc) -> bytes:
    return doc.model_dump_json(exclude_none=True).encode()


def decode_control(data: bytes | bytearray | memoryview | str) -> ControlDoc:
    return _decode_json_model(ControlDoc, data, MAX_CONTROL_BYTES)


# -- signing -------------------------------------------------------------------------------


def load_signing_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ModelRefused(f"{path}: not an Ed25519 private key")
    return key


def load_verify_key(path: str | Path) -> ed25519.Ed25519PublicKey:
    """The fleet's public signing key (``signing.pub`` in a device bundle)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise ModelRefused(f"{path}: cannot read the model-signing key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ModelRefused(f"{path}: not an Ed25519 public key")
    return key


def sign_model(key: ed25519.Ed25519PrivateKey, update: ModelUpdate) -> SignedModel:
    text = update.model_dump_json()
    return SignedModel(update=text, signature=base64.b64encode(key.sign(text.encode())).decode())


def verify_model(key: ed25519.Ed25519PublicKey, signed: SignedModel, tenant: str) -> ModelUpdate:
    """The update, if the fleet key signed exactly these bytes for this tenant; else ModelRefused."""
    try:
        key.verify(base64.b64decode(signed.signature, validate=True), signed.update.encode())
    except (InvalidSignature, ValueError):
        raise ModelRefused("model update: the signature does not match the fleet's signing key") from None
    try:
        update = ModelUpdate.model_validate_json(signed.update)
    except ValueError as e:
        raise ModelRefused(f"model update: signed, but not a valid update ({e})") from None
    if update.tenant != tenant:
        raise ModelRefused(f"model update: signed for tenant {update.tenant!r}, this device is in {tenant!r}")
    return update


# -- building an update ----------------------------------------------------------------------


def model_update(
    tenant: str, manifest_path: str | Path, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[ModelUpdate, list[bytes]]:
    """The update for the prefilter named by ``manifest_path``, and its chunks."""
    from models.manifest import load_model  # the same check both tiers load models with

    m = load_model(manifest_path, "prefilter")
    data = m.data
    if len(data) > MAX_MODEL_BYTES:
        raise ModelRefused(f"{m.path}: {len(data)} bytes, the limit for a model update is {MAX_MODEL_BYTES}")
    chunks = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    manifest = {k: v for k, v in m.manifest.items() if k in ("version", "labels", "signal")}
    manifest["prefilter"] = {**m.entry, "file": "prefilter.tflite"}
    update = ModelUpdate(
        tenant=tenant,
        version=m.version,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        chunk_bytes=chunk_bytes,
        chunks=[hashlib.sha256(c).hexdigest() for c in chunks],
        manifest=manifest,
    )
    return update, chunks
