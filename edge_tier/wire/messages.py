"""The JSON messages: the receipt, the device status and the tier-two results.

* the **receipt** (cloud -> device, ``et/{tenant}/{device}/receipt``) says whether a frame is
  durably in JetStream, so the device may delete it;
* the device **status** (retained, ``.../status``) reports its health and, in ``control``, how
  it applied its control document (``edge_tier.control.ControlState``);
* the **results** (``ResultBatch``) are tier two's answers for one upload, as columns.

All are pydantic models that forbid extra fields; they decode through
:func:`~edge_tier.wire.jsonmodel.decode_json_model`, so any input either validates or
raises :class:`WireError`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_tier.control.state import ControlState
from edge_tier.wire.frame import Frame
from edge_tier.wire.ids import U64_MAX, parse_upload_id
from edge_tier.wire.jsonmodel import U64, decode_json_model

__all__ = [
    "RESULT_MAX_BYTES",
    "CloudLimits",
    "DeviceStatus",
    "Receipt",
    "ReceiptStatus",
    "ResultBatch",
    "decode_receipt",
    "decode_results",
    "decode_status",
    "encode_receipt",
    "encode_results",
    "encode_status",
    "encode_stored_receipt",
]


class ReceiptStatus(StrEnum):
    COMMITTED = "committed"  # durably in JetStream: delete
    DUPLICATE = "duplicate"  # already in JetStream (earlier attempt): delete
    GAP = "gap"  # cloud has committed up to expected_prev; resend from there
    REJECTED = "rejected"  # dead-lettered: drop these records and count them
    TOO_LARGE = "too_large"  # over ``limits`` and not stored: cut it smaller and send again


class CloudLimits(BaseModel):
    """What the cloud accepts in one upload frame, told to the device in every receipt (v2),
    so the device cuts frames to fit, also after the limit changes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_frame_bytes: Annotated[int, Field(strict=True, ge=1024, le=U64_MAX)]
    max_records: Annotated[int, Field(strict=True, ge=1, le=U64_MAX)]
    max_dim: Annotated[int, Field(strict=True, ge=1, le=U64_MAX)]


class Receipt(BaseModel):
    """Cloud -> device answer to one upload frame (topic et/{tenant}/{device}/receipt)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1, 2, 3] = 2  # 2: ``limits`` and the too_large status; 3: ``set_aside``
    upload_id: str
    status: ReceiptStatus
    first_seq: U64
    last_seq: U64
    stream_seq: U64 | None = None  # JetStream stream sequence when committed/duplicate
    expected_prev: U64 | None = None  # GAP: the last seq the cloud has committed for the device
    reason: Annotated[str, Field(max_length=4096)] | None = None  # REJECTED, TOO_LARGE: why
    limits: CloudLimits | None = None  # v2: what the cloud accepts now
    # v3, rescued frames: records the cloud could not tell whether it already holds (its
    # history of the device has aged out), kept in ET_DEADLETTER instead of stored.
    set_aside: Annotated[int, Field(strict=True, ge=1, le=U64_MAX)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Receipt:
        # The device matches receipts to in-flight frames by upload id; a receipt whose
        # id and seq range disagree would delete the wrong records.
        _, _, first, last = parse_upload_id(self.upload_id)
        if (first, last) != (self.first_seq, self.last_seq):
            raise ValueError(
                f"upload_id range {first}-{last} != first_seq/last_seq {self.first_seq}-{self.last_seq}"
            )
        if self.status is ReceiptStatus.GAP and self.expected_prev is None:
            raise ValueError("a gap receipt needs expected_prev")
        if self.status is ReceiptStatus.REJECTED and not self.reason:
            raise ValueError("a rejected receipt needs a reason")
        if self.status is ReceiptStatus.TOO_LARGE and self.limits is None:
            raise ValueError("a too_large receipt needs limits")
        if self.v == 1 and (self.limits is not None or self.status is ReceiptStatus.TOO_LARGE):
            raise ValueError("limits and too_large are v2")
        if self.set_aside is not None:
            if self.v < 3:
                raise ValueError("set_aside is v3")
            if self.set_aside > self.last_seq - self.first_seq + 1:
                raise ValueError(f"set_aside {self.set_aside} is more records than the upload's range holds")
        return self


class DeviceStatus(BaseModel):
    """Device health, retained on et/{tenant}/{device}/status (last will: offline)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    state: Literal["online", "offline"]
    ts_ms: U64
    backlog_records: U64 = 0
    backlog_bytes: U64 = 0
    oldest_age_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    evictions: dict[Annotated[str, Field(max_length=64)], U64] = Field(default_factory=dict)
    # the queue's budget now: min(configured, what the filesystem can give), and whether
    # the filesystem is what bounds it
    budget_bytes: U64 | None = None
    disk_limited: bool | None = None
    last_receipt_ms: U64 | None = None
    model_version: Annotated[str, Field(max_length=64)] | None = None
    control: ControlState | None = None


def encode_receipt(r: Receipt) -> bytes:
    return r.model_dump_json(exclude_none=True).encode("utf-8")


def encode_stored_receipt(
    upload_id: str, status: ReceiptStatus, first_seq: int, last_seq: int, stream_seq: int, limits: CloudLimits
) -> bytes:
    """``encode_receipt`` of a v2 COMMITTED or DUPLICATE receipt, byte for byte, at a tenth
    of the cost: the receipt ingest sends for nearly every frame (no model built and
    validated per frame; the caller's frame was decoded strictly, so the fields hold)."""
    return (
        f'{{"v":2,"upload_id":{json.dumps(upload_id)},"status":"{status.value}","first_seq":{first_seq},'
        f'"last_seq":{last_seq},"stream_seq":{stream_seq},"limits":{_limits_json(limits)}}}'
    ).encode()


@functools.lru_cache(maxsize=16)
def _limits_json(limits: CloudLimits) -> str:
    return limits.model_dump_json()


def decode_receipt(b: bytes | bytearray | memoryview | str) -> Receipt:
    return decode_json_model(Receipt, b)


def encode_status(s: DeviceStatus) -> bytes:
    return s.model_dump_json(exclude_none=True).encode("utf-8")


def decode_status(b: bytes | bytearray | memoryview | str) -> DeviceStatus:
    return decode_json_model(DeviceStatus, b)


# -- tier-two results ----------------------------------------------------------------------

RESULT_MAX_BYTES = 8 * 1024 * 1024
_Confidence = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
_Label = Annotated[str, Field(max_length=64)]
_Value = Annotated[float, Field(allow_inf_nan=False)]


class ResultBatch(BaseModel):
    """Tier-two answers for one upload (or one part of a large one), as columns.

    Stream ET_RESULTS, subject ``et.results.{tenant}.{device}``, ``Nats-Msg-Id`` = the upload
    id (``upload_id#part`` for parts after the first); also what applications read on MQTT
    ``et/{tenant}/{device}/results``. Row ``i`` of every column is record ``seqs[i]``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1, 2] = 1  # 2: carries ``values`` (a regressor's answers)
    upload_id: str
    tenant: str
    device: str
    stream: Annotated[str, Field(max_length=64)]
    part: Annotated[int, Field(strict=True, ge=0)] = 0
    parts: Annotated[int, Field(strict=True, ge=1)] = 1
    model: Annotated[str, Field(max_length=64)]
    model_version: Annotated[str, Field(max_length=64)]
    worker: Annotated[str, Field(max_length=64)]
    produced_ms: U64
    seqs: list[U64]
    times_ms: list[U64]  # when the device created each record
    scores: list[float]  # the prefilter's anomaly score
    labels: list[_Label]
    confidences: list[_Confidence]
    # a regressor's answer per record (v 2); its labels are then the quantity's name (or
    # empty) and its confidences 0: a regressor states no class probability
    values: list[_Value] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ResultBatch:
        t, d, first, last = parse_upload_id(self.upload_id)
        if (t, d) != (self.tenant, self.device):
            raise ValueError(f"upload_id {self.upload_id!r} is not of {self.tenant}/{self.device}")
        n = len(self.seqs)
        if not n or any(len(c) != n for c in (self.times_ms, self.scores, self.labels, self.confidences)):
            raise ValueError("seqs, times_ms, scores, labels and confidences must be equally long, n >= 1")
        if (self.values is not None) != (self.v >= 2):
            raise ValueError("values come with v 2 (a regressor's results), and only with it")
        if self.values is not None and len(self.values) != n:
            raise ValueError(f"values has {len(self.values)} entries, seqs {n}: they must be equally long")
        if not first <= self.seqs[0] or not self.seqs[-1] <= last:
            raise ValueError(f"seqs {self.seqs[0]}-{self.seqs[-1]} are outside the upload {first}-{last}")
        if self.part >= self.parts:
            raise ValueError(f"part {self.part} of {self.parts}")
        return self


def encode_results(
    frame: Frame,
    rows: slice,
    labels: Sequence[str],
    label_index: np.ndarray,
    confidences: np.ndarray,
    *,
    part: int,
    parts: int,
    model: str,
    model_version: str,
    worker: str,
    produced_ms: int,
    values: np.ndarray | None = None,
) -> bytes:
    """One ResultBatch as JSON, straight from numpy columns (per-record objects would cost
    more than the inference). ``values``: a regressor's answers for these rows (then v 2)."""
    doc: dict[str, object] = {
        "v": 1 if values is None else 2,
        "upload_id": frame.upload_id,
        "tenant": frame.tenant,
        "device": frame.device,
        "stream": frame.stream,
        "part": part,
        "parts": parts,
        "model": model,
        "model_version": model_version,
        "worker": worker,
        "produced_ms": produced_ms,
        "seqs": frame.seqs[rows].tolist(),
        "times_ms": frame.times_ms[rows].tolist(),
        "scores": np.round(frame.scores[rows].astype(np.float64), 5).tolist(),
        "labels": [labels[i] for i in label_index.tolist()],
        "confidences": np.round(np.clip(confidences.astype(np.float64), 0, 1), 5).tolist(),
    }
    if values is not None:
        doc["values"] = _significant(values, 7).tolist()
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _significant(x: np.ndarray, digits: int) -> np.ndarray:
    """``x`` as float64 rounded to ``digits`` significant digits (what float32 holds), so that
    JSON carries ``0.1`` and not ``0.10000000149011612``."""
    x = np.asarray(x, np.float64)
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log10(np.abs(x)))
    exponent = np.where(np.isfinite(exponent), exponent, 0)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.power(10.0, digits - 1 - exponent)
        rounded = np.round(x * scale) / scale
    return np.where(np.isfinite(rounded), rounded, x)  # subnormal float64: as it is


def decode_results(b: bytes | bytearray | memoryview | str) -> ResultBatch:
    return decode_json_model(ResultBatch, b, RESULT_MAX_BYTES)
