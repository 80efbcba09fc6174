"""The control document: what the cloud asks of one device, signed, and the checks on it.

``SignedControl`` is the retained envelope and ``ControlDoc`` the statement it carries (the
config and a model update); signing and verifying with the fleet's Ed25519 key; the rules a
device applies before it takes a document (``check_fresh``, ``check_model``); and
``model_update``, which cuts a prefilter into the chunks an update names.
"""

from __future__ import annotations

import base64
import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_tier.errors import ControlRefused, ManifestError, ModelRefused, WireError
from edge_tier.model.schema import parse_manifest
from edge_tier.wire.ids import validate_id
from edge_tier.wire.jsonmodel import decode_json_model

if TYPE_CHECKING:  # cryptography (~8 MB resident) is imported by the functions that sign or verify
    from cryptography.hazmat.primitives.asymmetric import ed25519

MAX_MODEL_BYTES = 16 * 1024 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
DEFAULT_CHUNK_BYTES = 64 * 1024
DEFAULT_MODEL = "prefilter"  # a model update's name for the agent's [prefilter] model
MAX_CONTROL_BYTES = 1024 * 1024  # a document lists one sha256 per chunk
# how far a device's clock may be ahead of the signer's before a fresh document looks expired
CLOCK_SKEW_MS = 5 * 60 * 1000
DEFAULT_VALID_MS = 30 * 24 * 3600 * 1000  # edge-provision's default lifetime of a document

_Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_Ms = Annotated[int, Field(ge=0, le=2**63 - 1)]


class ControlConfig(BaseModel):
    """Runtime settings the cloud may change without a restart."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # in the score's own range (a reconstruction error is not <= 1); None: the model's own
    threshold: Annotated[float, Field(allow_inf_nan=False)] | None = None  # the default model's
    thresholds: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=dict
    )  # by stream
    upload_bytes_per_s: Annotated[int, Field(ge=1)] | None = None  # None: as fast as the link goes
    paused: bool = False  # uploads held; the queue keeps taking records within its budget


class ModelUpdate(BaseModel):
    """One model update, as a signed control document states it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str
    # whose model: DEFAULT_MODEL ("prefilter") is the [prefilter] one, any other name a stream's
    # ([streams.NAME]); counters are per name
    name: str = DEFAULT_MODEL
    # the order of this tenant's models of this name (edge-provision counts them): a device
    # takes none below the installed one unless the document says rollback
    counter: Annotated[int, Field(ge=1, le=2**63 - 1)]
    version: Annotated[str, Field(min_length=1, max_length=64)]
    sha256: _Sha256
    bytes: Annotated[int, Field(ge=1, le=MAX_MODEL_BYTES)]
    chunk_bytes: Annotated[int, Field(ge=1024, le=MAX_CHUNK_BYTES)]
    chunks: list[_Sha256]
    manifest: dict[str, Any]  # what the device writes as manifest.json beside the model file

    @model_validator(mode="after")
    def _consistent(self) -> ModelUpdate:
        validate_id("tenant", self.tenant)
        validate_id("stream", self.name)
        if len(self.chunks) != math.ceil(self.bytes / self.chunk_bytes):
            raise ValueError(f"{len(self.chunks)} chunk hashes for {self.bytes} bytes in {self.chunk_bytes}")
        try:
            spec = parse_manifest(self.manifest, "model update").prefilter
        except ManifestError as e:
            raise ValueError(str(e)) from None
        if spec is None or spec.sha256 != self.sha256:
            raise ValueError("manifest.prefilter.sha256 must be the update's sha256")
        return self

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_bytes
        return start, min(self.bytes, start + self.chunk_bytes)


class ControlDoc(BaseModel):
    """The signed statement of one device's desired state (``SignedControl.signed``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[2] = 2
    tenant: str
    device: str
    generation: Annotated[int, Field(ge=1, le=2**63 - 1)]  # only grows, per device
    issued_ms: _Ms
    expires_ms: _Ms  # a device refuses the document after this (CLOCK_SKEW_MS allowed)
    config: ControlConfig = ControlConfig()
    model: ModelUpdate | None = None
    rollback: bool = False  # the operator allows a model counter below the installed one

    @model_validator(mode="after")
    def _consistent(self) -> ControlDoc:
        validate_id("tenant", self.tenant)
        validate_id("device", self.device)
        if self.expires_ms <= self.issued_ms:
            raise ValueError(f"expires_ms {self.expires_ms} is not after issued_ms {self.issued_ms}")
        if self.model is not None and self.model.tenant != self.tenant:
            raise ValueError(f"model.tenant {self.model.tenant!r} is not the document's {self.tenant!r}")
        return self


class SignedControl(BaseModel):
    """The retained message on et/{tenant}/{device}/control."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[2] = 2
    signed: Annotated[str, Field(max_length=MAX_CONTROL_BYTES)]  # the exact JSON of a ControlDoc
    signature: Annotated[str, Field(max_length=128)]  # base64 Ed25519 over the UTF-8 bytes of signed

    def unverified(self) -> ControlDoc:
        """The document as it says, signature unchecked: for display only; WireError if invalid."""
        try:
            return ControlDoc.model_validate_json(self.signed)
        except ValueError as e:
            raise WireError(f"SignedControl.signed: not a valid ControlDoc ({e})") from None


def encode_control(signed: SignedControl) -> bytes:
    return signed.model_dump_json().encode()


def decode_control(data: bytes | bytearray | memoryview | str) -> SignedControl:
    """The envelope, unverified (``verify_control`` says whether to believe it); else WireError."""
    return decode_json_model(SignedControl, data, MAX_CONTROL_BYTES)


# -- signing -------------------------------------------------------------------------------


def load_signing_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ModelRefused(f"{path}: not an Ed25519 private key")
    return key


def load_verify_key(path: str | Path) -> ed25519.Ed25519PublicKey:
    """The fleet's public signing key (``signing.pub`` in a device bundle)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise ModelRefused(f"{path}: cannot read the fleet's signing key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ModelRefused(f"{path}: not an Ed25519 public key")
    return key


def sign_control(key: ed25519.Ed25519PrivateKey, doc: ControlDoc) -> SignedControl:
    text = doc.model_dump_json(exclude_none=True)
    return SignedControl(signed=text, signature=base64.b64encode(key.sign(text.encode())).decode())


def verify_control(
    key: ed25519.Ed25519PublicKey, signed: SignedControl, tenant: str, device: str
) -> ControlDoc:
    """The document, if the fleet key signed exactly these bytes for this device; else ControlRefused."""
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(base64.b64decode(signed.signature, validate=True), signed.signed.encode())
    except (InvalidSignature, ValueError):
        raise ControlRefused("the signature does not match the fleet's signing key") from None
    try:
        doc = ControlDoc.model_validate_json(signed.signed)
    except ValueError as e:
        raise ControlRefused(f"signed, but not a valid document ({e})") from None
    if (doc.tenant, doc.device) != (tenant, device):
        raise ControlRefused(f"signed for {doc.tenant}/{doc.device}, this device is {tenant}/{device}")
    return doc


# -- freshness -----------------------------------------------------------------------------


def check_fresh(
    doc: ControlDoc, signed: SignedControl, applied: tuple[ControlDoc, SignedControl] | None, now_ms: int
) -> bool:
    """Whether a verified ``doc`` is new (True) or the applied one again (False); ControlRefused
    for a replay of an older document, another one with the same generation, or an expired one.

    The device's notion of now never goes below the ``issued_ms`` it last applied, so a device
    without a real-time clock that boots in 1970 still refuses what expired before that."""
    if applied is not None:
        old, old_signed = applied
        if doc.generation == old.generation:
            if signed.signed == old_signed.signed:
                return False  # the retained document again, after a reconnect
            raise ControlRefused(f"generation {doc.generation} is applied already, with other contents")
        if doc.generation < old.generation:
            raise ControlRefused(
                f"generation {doc.generation} is older than the applied {old.generation} (a replay)"
            )
        now_ms = max(now_ms, old.issued_ms)
    if doc.expires_ms + CLOCK_SKEW_MS < now_ms:
        raise ControlRefused(f"generation {doc.generation} expired at {doc.expires_ms} "
                             f"(the device's clock says {now_ms}; ms since 1970)")  # fmt: skip
    return True


def check_model(update: ModelUpdate, rollback: bool, installed: tuple[int, str] | None) -> None:
    """ModelRefused if ``update`` would replace the installed model (counter, sha256) with an older
    one (unless the operator signed a rollback) or with another one of the same counter."""
    if installed is None:
        return
    counter, sha = installed
    if update.counter == counter and update.sha256 != sha:
        raise ModelRefused(f"model update: {update.version} has counter {update.counter}, as the "
                           f"installed {sha[:12]}, but another sha256")  # fmt: skip
    if update.counter < counter and not rollback:
        raise ModelRefused(
            f"model update: {update.version} has counter {update.counter}, below the installed "
            f"{counter}; only a document signed with rollback may go back"
        )


# -- building an update ----------------------------------------------------------------------


def model_update(
    tenant: str,
    manifest_path: str | Path,
    *,
    counter: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    stream: str = DEFAULT_MODEL,
) -> tuple[ModelUpdate, list[bytes]]:
    """The update of ``stream``'s model to the prefilter named by ``manifest_path`` (its whole
    manifest entry: window, preprocessing, tensors, score, embedding), and its chunks."""
    from edge_tier.model.manifest import load_model  # the same check both tiers load models with

    m = load_model(manifest_path, "prefilter")
    data = m.data
    if len(data) > MAX_MODEL_BYTES:
        raise ModelRefused(f"{m.path}: {len(data)} bytes, the limit for a model update is {MAX_MODEL_BYTES}")
    chunks = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    entry = m.spec.model_dump(mode="json", exclude_none=True)
    manifest = {
        "schema_version": m.manifest.schema_version,
        "version": m.manifest.version,
        "labels": m.manifest.labels,
        "prefilter": {**entry, "labels": m.labels, "file": "prefilter.tflite"},
    }
    update = ModelUpdate(
        tenant=tenant,
        name=stream,
        counter=counter,
        version=m.version,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        chunk_bytes=chunk_bytes,
        chunks=[hashlib.sha256(c).hexdigest() for c in chunks],
        manifest=manifest,
    )
    return update, chunks
