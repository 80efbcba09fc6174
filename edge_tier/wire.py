"""The one wire format shared by device and cloud.

Three things travel over MQTT (see docs/wire-format.md for the byte-level reference):

* the upload **frame** (device -> cloud, ``et/{tenant}/{device}/up``): binary, versioned,
  little-endian, CRC32-protected; a batch of records (seq, score, time, feature vector, meta);
* the **receipt** (cloud -> device, ``.../receipt``): JSON, says whether a frame is durably in
  JetStream so the device may delete it;
* the device **status** (retained, ``.../status``): JSON.

Decoding is strict and total: for *any* input bytes the decoders either return a value or
raise :class:`WireError` (a ``ValueError``), never another exception, and they check sizes
before allocating, so a hostile frame can cost at most ``FrameLimits`` worth of memory.
The numeric parts are handled with numpy/struct/bytes.join, never a Python loop per record.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_tier.errors import ChecksumMismatch, FrameTooLarge, UnsupportedVersion, WireError

__all__ = [
    "FORMAT_VERSION",
    "HEADER_FIXED_SIZE",
    "ID_MAX_LEN",
    "ID_PATTERN",
    "MAGIC",
    "RECORD_WIRE_OVERHEAD",
    "UPLOAD_ID_PATTERN",
    "ChecksumMismatch",
    "CloudLimits",
    "ControlState",
    "DeviceStatus",
    "Dtype",
    "Frame",
    "FrameHeader",
    "FrameLimits",
    "FrameTooLarge",
    "MetaValue",
    "ModelState",
    "Receipt",
    "ReceiptStatus",
    "UnsupportedVersion",
    "WireError",
    "decode_frame",
    "decode_receipt",
    "decode_status",
    "encode_frame",
    "encode_frame_parts",
    "encode_receipt",
    "encode_status",
    "frame_overhead",
    "parse_upload_id",
    "peek_header",
    "upload_id",
    "validate_id",
]

# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------

ID_MAX_LEN = 64
U64_MAX = 2**64 - 1
# Ids become MQTT topic levels and NATS subject tokens: no '/', '+', '#', '.', '*', '>',
# whitespace or NUL can appear, so the charset is the safe intersection.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PRINTABLE_RE = re.compile(r"[\x20-\x7e]{0,64}")
_SEQ_RE = re.compile(r"0|[1-9][0-9]{0,19}")


def _short(value: object, limit: int = 80) -> str:
    """repr() cut short so a hostile 10 MB value cannot flood an error message or log."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def validate_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid ``kind`` id (tenant, device, stream), else WireError."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise WireError(
            f"{kind} id {_short(value)}: only letters, digits, '_' and '-' allowed (1..{ID_MAX_LEN} chars)"
        )
    return value


def _validate_printable(kind: str, value: str) -> str:
    if not isinstance(value, str) or _PRINTABLE_RE.fullmatch(value) is None:
        raise WireError(f"{kind} {_short(value)}: must be 0..64 printable ASCII characters")
    return value


def _check_uint(name: str, value: object, max_value: int) -> int:
    # bool is an int subclass; a True seq is always a bug.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise WireError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if not 0 <= v <= max_value:
        raise WireError(f"{name} {v} out of range 0..{max_value}")
    return v


def upload_id(tenant: str, device: str, first_seq: int, last_seq: int) -> str:
    """The idempotency key of one upload: ``{tenant}.{device}.{first_seq}-{last_seq}``.

    It is JetStream's ``Nats-Msg-Id``; ids contain no '.', so it parses back unambiguously.
    """
    validate_id("tenant", tenant)
    validate_id("device", device)
    first = _check_uint("first_seq", first_seq, U64_MAX)
    last = _check_uint("last_seq", last_seq, U64_MAX)
    if first > last:
        raise WireError(f"first_seq {first} > last_seq {last}")
    return f"{tenant}.{device}.{first}-{last}"


# The shapes above as JSON Schema / OpenAPI patterns, so the API's document and the code share one
# vocabulary. An upload id's range order (first <= last <= U64_MAX) is checked by parse_upload_id only.
ID_PATTERN = f"^{_ID_RE.pattern}$"
UPLOAD_ID_PATTERN = rf"^{_ID_RE.pattern}\.{_ID_RE.pattern}\.(?:{_SEQ_RE.pattern})-(?:{_SEQ_RE.pattern})$"


def parse_upload_id(s: str) -> tuple[str, str, int, int]:
    """Inverse of :func:`upload_id`; only the canonical form is accepted (no leading zeros)."""
    if not isinstance(s, str) or len(s) > 2 * ID_MAX_LEN + 2 + 41:
        raise WireError(f"upload id {_short(s)}: not a string of plausible length")
    parts = s.split(".")
    if len(parts) != 3:
        raise WireError(f"upload id {_short(s)}: expected 'tenant.device.first-last'")
    tenant, device, seqs = parts
    validate_id("tenant", tenant)
    validate_id("device", device)
    first_s, sep, last_s = seqs.partition("-")
    if not sep or _SEQ_RE.fullmatch(first_s) is None or _SEQ_RE.fullmatch(last_s) is None:
        raise WireError(f"upload id {_short(s)}: seq range must be 'first-last' in decimal")
    first, last = int(first_s), int(last_s)
    if last > U64_MAX or first > last:
        raise WireError(f"upload id {_short(s)}: bad seq range {first}-{last}")
    return tenant, device, first, last


# --------------------------------------------------------------------------------------
# Dtypes and codecs
# --------------------------------------------------------------------------------------


class Dtype(IntEnum):
    """Element type of the feature vectors (a u8 in the frame header)."""

    FLOAT32 = 1
    FLOAT16 = 2
    INT8 = 3

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return _DTYPE_TO_NP[self]

    @property
    def itemsize(self) -> int:
        return _DTYPE_TO_NP[self].itemsize

    @classmethod
    def from_numpy(cls, dtype: Any) -> Dtype:
        """Map a numpy dtype (any byte order) to a Dtype; WireError if not one of the three."""
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            raise WireError(f"dtype {_short(dtype)}: not a numpy dtype") from exc
        for member, np_dt in _DTYPE_TO_NP.items():
            if dt.kind == np_dt.kind and dt.itemsize == np_dt.itemsize:
                return member
        raise WireError(f"feature dtype {dt}: must be float32, float16 or int8")


_DTYPE_TO_NP: dict[Dtype, np.dtype[Any]] = {
    Dtype.FLOAT32: np.dtype("<f4"),
    Dtype.FLOAT16: np.dtype("<f2"),
    Dtype.INT8: np.dtype("i1"),
}


class _Codec(IntEnum):
    # A whole byte, not a flag bit, so "zstd" = 2 (etc.) can be added in a later version.
    NONE = 0
    ZLIB = 1


_CODEC_BY_NAME: dict[str | None, _Codec] = {None: _Codec.NONE, "zlib": _Codec.ZLIB}
_CODEC_NAME: dict[_Codec, str | None] = {v: k for k, v in _CODEC_BY_NAME.items()}

# --------------------------------------------------------------------------------------
# Frame layout
# --------------------------------------------------------------------------------------

MAGIC = b"ETWF"
FORMAT_VERSION = 1
FLAG_HAS_META = 0x01
# Records rescued from a queue file that failed its integrity check: outside the device's
# chain (prev_seq is 0), de-duplicated by the cloud against what it holds, by seq.
FLAG_RESCUED = 0x02
_KNOWN_FLAGS = FLAG_HAS_META | FLAG_RESCUED

# Fixed part of the header; offsets are documented in docs/wire-format.md and must stay
# in sync with _FIELD_OFFSETS below. magic+version (first 6 bytes) are stable forever.
_FIXED = struct.Struct("<4sHHBBBBHHIIQQQQdII5B3s")
HEADER_FIXED_SIZE = _FIXED.size  # 80
_PREFIX = struct.Struct("<4sH")
_CRC = struct.Struct("<I")
_U32_MAX = 2**32 - 1
_STRING_FIELDS = ("tenant", "device", "stream", "model", "model_version")
_FIELD_OFFSETS = {
    "magic": 0,
    "version": 4,
    "header_len": 6,
    "flags": 8,
    "compression": 9,
    "dtype": 10,
    "reserved": 11,
    "schema_version": 12,
    "reserved2": 14,
    "n": 16,
    "dim": 20,
    "first_seq": 24,
    "last_seq": 32,
    "prev_seq": 40,
    "created_ms": 48,
    "scale": 56,
    "meta_len": 64,
    "body_len": 68,
    "tenant_len": 72,
    "device_len": 73,
    "stream_len": 74,
    "model_len": 75,
    "model_version_len": 76,
    "reserved3": 77,
}
# Per record in the raw body: seq u64 + time u64 + score f32, then the features.
_PER_RECORD_FIXED = 8 + 8 + 4
_HARD_MAX_BODY = 2**48


def _align8(n: int) -> int:
    return (n + 7) & ~7


# What one record adds to a frame besides its feature bytes and its metadata's JSON:
# seq, time and score, and the comma and braces of its metadata object.
RECORD_WIRE_OVERHEAD = _PER_RECORD_FIXED + 3


def frame_overhead(*, stream: str, model: str = "", model_version: str = "") -> int:
    """What a frame adds to its records, at most: header (with the longest tenant and device
    ids), CRC and the brackets of the metadata list. A frame of n records of ``record_bytes``
    and metadata JSON of m bytes is at most ``frame_overhead + n x (record_bytes +
    RECORD_WIRE_OVERHEAD) + m`` bytes uncompressed."""
    strings = 2 * ID_MAX_LEN + len(stream) + len(model.encode()) + len(model_version.encode())
    return _align8(HEADER_FIXED_SIZE + strings) + _CRC.size + 2


@dataclass(frozen=True)
class FrameLimits:
    """What a receiver is willing to accept; checked before anything is allocated."""

    max_frame_bytes: int = 16 * 1024 * 1024
    max_records: int = 65536
    max_dim: int = 65536
    max_meta_bytes: int = 1024 * 1024
    # Bound on the decompressed body, so a small compressed frame cannot inflate without end.
    max_body_bytes: int = 64 * 1024 * 1024


MetaValue = str | int | float | bool | None


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One upload: a batch of consecutive records of one device.

    eq=False because numpy arrays do not compare to a single bool; compare fields explicitly.
    """

    tenant: str
    device: str
    prev_seq: int  # last seq of this device's previous frame (0 = start of a new chain)
    stream: str  # producer stream name, e.g. "vibration"
    model: str  # prefilter model name ("" allowed)
    model_version: str  # ("" allowed) <= 64 printable ASCII
    schema_version: int  # u16, feature schema version
    created_ms: int  # frame creation time, ms since epoch
    seqs: np.ndarray  # uint64[n], strictly increasing, n >= 1
    scores: np.ndarray  # float32[n]
    times_ms: np.ndarray  # uint64[n], record creation times (ms since epoch)
    features: np.ndarray  # [n, dim] float32 / float16 / int8
    scale: float = 1.0  # int8 dequantization: real = q * scale; 1.0 for float dtypes
    meta: tuple[dict[str, MetaValue], ...] | None = None  # per-record, len == n when present
    rescued: bool = False  # FLAG_RESCUED: records of a set-aside queue file, outside the chain

    @property
    def first_seq(self) -> int:
        return int(self.seqs[0])

    @property
    def last_seq(self) -> int:
        return int(self.seqs[-1])

    @property
    def n(self) -> int:
        return int(self.seqs.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def dtype(self) -> Dtype:
        return Dtype.from_numpy(self.features.dtype)

    @property
    def upload_id(self) -> str:
        return upload_id(self.tenant, self.device, self.first_seq, self.last_seq)


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The fixed header of a frame: readable without (and before) checking the body."""

    version: int
    header_len: int
    body_len: int  # bytes of body on the wire (after compression)
    flags: int
    compression: str | None
    dtype: Dtype
    schema_version: int
    n: int
    dim: int
    first_seq: int
    last_seq: int
    prev_seq: int
    created_ms: int
    scale: float
    meta_len: int  # bytes of meta JSON in the uncompressed body (0 = no meta)
    tenant: str
    device: str
    stream: str
    model: str
    model_version: str

    @property
    def has_meta(self) -> bool:
        return bool(self.flags & FLAG_HAS_META)

    @property
    def rescued(self) -> bool:
        return bool(self.flags & FLAG_RESCUED)

    @property
    def raw_body_len(self) -> int:
        """Size of the uncompressed body that the header declares."""
        return self.n * (_PER_RECORD_FIXED + self.dim * self.dtype.itemsize) + self.meta_len

    @property
    def frame_len(self) -> int:
        return self.header_len + self.body_len + _CRC.size

    @property
    def upload_id(self) -> str:
        return upload_id(self.tenant, self.device, self.first_seq, self.last_seq)


# --------------------------------------------------------------------------------------
# Shared validation (encode and decode check the same rules, so a device never builds a
# frame the cloud would reject for its structure)
# --------------------------------------------------------------------------------------


def _hdr_error(field: str, message: str, cls: type[WireError] = WireError) -> WireError:
    return cls(message, field=field, offset=_FIELD_OFFSETS.get(field))


def _check_scale(dtype: Dtype, scale: float) -> None:
    if dtype is Dtype.INT8:
        if not (math.isfinite(scale) and scale > 0.0):
            raise WireError(f"scale {scale!r}: int8 features need a finite scale > 0")
    elif scale != 1.0:
        raise WireError(f"scale {scale!r}: must be 1.0 for {dtype.name.lower()} features")


def check_kind(
    *,
    stream: str,
    model: str,
    model_version: str,
    schema_version: int,
    dtype: Dtype,
    dim: int,
    scale: float,
    limits: FrameLimits | None = None,
) -> None:
    """What one frame's records share must fit a frame header; WireError says which field.

    The device checks this when records arrive, so that nothing it accepts can
    later fail to encode (a frame that cannot be encoded would block its queue).
    """
    validate_id("stream", stream)
    _validate_printable("model", model)
    _validate_printable("model_version", model_version)
    _check_uint("schema_version", schema_version, 0xFFFF)
    max_dim = (limits or FrameLimits()).max_dim
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= max_dim:
        raise WireError(f"dim {dim!r}: must be 1..{max_dim}")
    _check_scale(Dtype(dtype), float(scale))


def check_meta(item: Mapping[str, MetaValue]) -> None:
    """One record's metadata must be a flat object of strict-JSON scalars."""
    _check_meta_item(0, item)
    try:
        json.dumps(item, allow_nan=False)
    except (ValueError, TypeError) as exc:
        raise WireError(f"meta not encodable as strict JSON: {exc}", field="meta") from exc


def _check_chain(n: int, first: int, last: int, prev: int) -> None:
    if first > last or last - first < n - 1:
        raise WireError(f"seq range {first}-{last} cannot hold {n} strictly increasing seqs")
    if prev >= first:
        raise WireError(f"prev_seq {prev} must be < first_seq {first}")


def _encode_meta(meta: Sequence[Mapping[str, MetaValue]], n: int) -> bytes:
    if isinstance(meta, str | bytes) or len(meta) != n:
        raise WireError(f"meta: expected a sequence of {n} dicts", field="meta")
    for i, item in enumerate(meta):
        _check_meta_item(i, item)
    try:
        text = json.dumps(list(meta), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (ValueError, TypeError) as exc:  # NaN/inf, lone surrogates
        raise WireError(f"meta not encodable as strict JSON: {exc}", field="meta") from exc


def _check_meta_item(i: int, item: object, where: str = "") -> None:
    if not isinstance(item, Mapping):
        raise WireError(f"meta[{i}]{where}: expected an object, got {type(item).__name__}")
    for key, value in item.items():
        if not isinstance(key, str):
            raise WireError(f"meta[{i}]{where}: key {_short(key)} is not a string")
        if value is not None and not isinstance(value, str | int | float):
            raise WireError(
                f"meta[{i}][{_short(key)}]{where}: value must be a string, number, bool or "
                f"null, got {type(value).__name__}"
            )


def _as_u64(name: str, values: object, n: int) -> np.ndarray:
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as exc:
        raise WireError(f"{name}: not an integer array ({exc})") from exc
    if arr.shape != (n,):
        raise WireError(f"{name}: expected shape ({n},), got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise WireError(f"{name}: expected integers, got dtype {arr.dtype}")
    # astype would silently wrap negatives around to huge u64 values.
    if arr.dtype.kind == "i" and n and int(arr.min()) < 0:
        raise WireError(f"{name}: negative value {int(arr.min())}")
    return np.ascontiguousarray(arr, dtype="<u8")


def _as_f32(name: str, values: object, n: int) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype="<f4")
    except (ValueError, TypeError, OverflowError) as exc:
        raise WireError(f"{name}: not a float array ({exc})") from exc
    if arr.shape != (n,):
        raise WireError(f"{name}: expected shape ({n},), got {arr.shape}")
    return np.ascontiguousarray(arr)


def _encode(
    *,
    tenant: str,
    device: str,
    prev_seq: int,
    stream: str,
    model: str,
    model_version: str,
    schema_version: int,
    created_ms: int,
    dtype: Dtype,
    dim: int,
    seqs: np.ndarray,
    scores: np.ndarray,
    times_ms: np.ndarray,
    features: bytes | memoryview,
    scale: float,
    meta: Sequence[Mapping[str, MetaValue]] | None,
    compress: str | None,
    level: int,
    rescued: bool = False,
) -> bytes:
    """The single place that writes the frame layout; inputs already have the right dtypes."""
    validate_id("tenant", tenant)
    validate_id("device", device)
    validate_id("stream", stream)
    _validate_printable("model", model)
    _validate_printable("model_version", model_version)
    prev_seq = _check_uint("prev_seq", prev_seq, U64_MAX)
    schema_version = _check_uint("schema_version", schema_version, 0xFFFF)
    created_ms = _check_uint("created_ms", created_ms, U64_MAX)
    dim = _check_uint("dim", dim, _U32_MAX)
    try:
        scale = float(scale)
    except (TypeError, ValueError) as exc:
        raise WireError(f"scale {_short(scale)}: not a number") from exc
    _check_scale(dtype, scale)
    if compress not in _CODEC_BY_NAME:
        raise WireError(f"compress {compress!r}: must be None or 'zlib'")
    codec = _CODEC_BY_NAME[compress]
    if codec is _Codec.ZLIB and not (isinstance(level, int) and -1 <= level <= 9):
        raise WireError(f"level {level!r}: zlib level must be -1..9")

    n = len(seqs)
    if not 1 <= n <= _U32_MAX:
        raise WireError(f"n: a frame needs at least 1 record, got {n}")
    if dim < 1:
        raise WireError("dim: must be >= 1")
    if len(features) != n * dim * dtype.itemsize:
        raise WireError(f"features: expected {n * dim * dtype.itemsize} bytes, got {len(features)}")
    if n > 1:
        bad = np.flatnonzero(seqs[1:] <= seqs[:-1])
        if bad.size:
            i = int(bad[0]) + 1
            raise WireError(f"seqs[{i}] = {int(seqs[i])} not > seqs[{i - 1}]: must strictly increase")
    first, last = int(seqs[0]), int(seqs[-1])
    _check_chain(n, first, last, prev_seq)
    if rescued and prev_seq:
        raise WireError(f"prev_seq {prev_seq}: a rescued frame is outside the chain, prev_seq must be 0")
    finite = np.isfinite(scores)
    if not finite.all():
        i = int(np.argmin(finite))
        raise WireError(f"scores[{i}] = {float(scores[i])}: must be finite")

    meta_bytes = b"" if meta is None else _encode_meta(meta, n)
    if len(meta_bytes) > _U32_MAX:
        raise WireError("meta: JSON larger than 4 GiB")

    raw_parts: list[bytes | memoryview] = [
        seqs.view(np.uint8).data,
        times_ms.view(np.uint8).data,
        scores.view(np.uint8).data,
        features,
        meta_bytes,
    ]
    if codec is _Codec.ZLIB:
        comp = zlib.compressobj(level)
        body_parts: list[bytes | memoryview] = [comp.compress(p) for p in raw_parts]
        body_parts.append(comp.flush())
    else:
        body_parts = raw_parts
    body_len = sum(len(p) for p in body_parts)
    if body_len > _U32_MAX:
        raise WireError(f"body: {body_len} bytes does not fit the u32 body_len field")

    strings = [s.encode("ascii") for s in (tenant, device, stream, model, model_version)]
    str_bytes = b"".join(strings)
    header_len = _align8(HEADER_FIXED_SIZE + len(str_bytes))
    fixed = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        header_len,
        (FLAG_HAS_META if meta is not None else 0) | (FLAG_RESCUED if rescued else 0),
        int(codec),
        int(dtype),
        0,
        schema_version,
        0,
        n,
        dim,
        first,
        last,
        prev_seq,
        created_ms,
        scale,
        len(meta_bytes),
        body_len,
        *(len(s) for s in strings),
        b"\0\0\0",
    )
    header = fixed + str_bytes + b"\0" * (header_len - HEADER_FIXED_SIZE - len(str_bytes))
    # CRC part by part, so the only full copy of the frame is the final join.
    crc = zlib.crc32(header)
    for p in body_parts:
        crc = zlib.crc32(p, crc)
    return b"".join([header, *body_parts, _CRC.pack(crc)])


def encode_frame(frame: Frame, *, compress: str | None = None, level: int = 1) -> bytes:
    """Serialize a Frame. compress: None or "zlib" (body only; the header stays readable)."""
    feats = frame.features
    if not isinstance(feats, np.ndarray) or feats.ndim != 2:
        raise WireError("features: expected a 2-D numpy array [n, dim]")
    dtype = Dtype.from_numpy(feats.dtype)
    n = int(np.shape(frame.seqs)[0]) if np.ndim(frame.seqs) == 1 else -1
    if feats.shape[0] != n:
        raise WireError(f"features: {feats.shape[0]} rows but {n} seqs")
    feat_bytes = np.ascontiguousarray(feats, dtype=dtype.np_dtype).reshape(-1).view(np.uint8)
    return _encode(
        tenant=frame.tenant,
        device=frame.device,
        prev_seq=frame.prev_seq,
        stream=frame.stream,
        model=frame.model,
        model_version=frame.model_version,
        schema_version=frame.schema_version,
        created_ms=frame.created_ms,
        dtype=dtype,
        dim=int(feats.shape[1]),
        seqs=_as_u64("seqs", frame.seqs, n),
        scores=_as_f32("scores", frame.scores, n),
        times_ms=_as_u64("times_ms", frame.times_ms, n),
        features=feat_bytes.data,
        scale=frame.scale,
        meta=frame.meta,
        compress=compress,
        level=level,
        rescued=frame.rescued,
    )


def encode_frame_parts(
    *,
    tenant: str,
    device: str,
    prev_seq: int,
    stream: str,
    model: str,
    model_version: str,
    schema_version: int,
    created_ms: int,
    dtype: Dtype,
    dim: int,
    seqs: Sequence[int],
    scores: Sequence[float],
    times_ms: Sequence[int],
    feature_blobs: Sequence[bytes],
    scale: float = 1.0,
    meta: Sequence[Mapping[str, MetaValue]] | None = None,
    compress: str | None = None,
    level: int = 1,
) -> bytes:
    """Build the same bytes as encode_frame from per-record raw feature blobs (device path).

    Each blob is one record's features, ``dim * dtype.itemsize`` bytes of little-endian
    values, as stored in the device queue; they are joined, never parsed.
    """
    try:
        dtype = Dtype(dtype)
    except ValueError as exc:
        raise WireError(f"dtype {dtype!r}: unknown") from exc
    n = len(feature_blobs)
    row = _check_uint("dim", dim, _U32_MAX) * dtype.itemsize
    # map(len)/count run in C; only walk the blobs in Python to name the bad one.
    if list(map(len, feature_blobs)).count(row) != n:
        i = next(i for i, b in enumerate(feature_blobs) if len(b) != row)
        raise WireError(f"feature_blobs[{i}]: {len(feature_blobs[i])} bytes, expected dim*itemsize = {row}")
    return _encode(
        tenant=tenant,
        device=device,
        prev_seq=prev_seq,
        stream=stream,
        model=model,
        model_version=model_version,
        schema_version=schema_version,
        created_ms=created_ms,
        dtype=dtype,
        dim=dim,
        seqs=_as_u64("seqs", seqs, n),
        scores=_as_f32("scores", scores, n),
        times_ms=_as_u64("times_ms", times_ms, n),
        features=b"".join(feature_blobs),
        scale=scale,
        meta=meta,
        compress=compress,
        level=level,
    )


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def _as_view(data: object) -> memoryview:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"frame must be bytes-like, got {type(data).__name__}")
    try:
        mv = memoryview(data)
        if not mv.c_contiguous:
            raise WireError("frame buffer is not contiguous")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        # Read-only so arrays viewing a caller's bytearray cannot be altered through the Frame.
        return mv.toreadonly()
    except (ValueError, TypeError) as exc:  # e.g. a released memoryview
        if isinstance(exc, WireError):
            raise
        raise WireError(f"frame buffer unusable: {exc}") from exc


def _check_prefix(mv: memoryview) -> None:
    if len(mv) < _PREFIX.size:
        raise WireError(f"frame is {len(mv)} bytes, too short for magic and version", offset=0)
    magic, version = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise _hdr_error("magic", f"{bytes(magic)!r} is not {MAGIC!r}: not an edge-tier frame")
    if version != FORMAT_VERSION:
        raise _hdr_error(
            "version",
            f"format version {version} not supported (this decoder reads {FORMAT_VERSION})",
            UnsupportedVersion,
        )
    if len(mv) < HEADER_FIXED_SIZE:
        raise WireError(f"frame truncated: {len(mv)} bytes, fixed header needs {HEADER_FIXED_SIZE}", offset=0)


def _parse_header(mv: memoryview) -> FrameHeader:
    """Parse and validate the header (fixed part + strings); mv has passed _check_prefix."""
    (
        _magic,
        version,
        header_len,
        flags,
        codec,
        dtype_code,
        reserved,
        schema_version,
        reserved2,
        n,
        dim,
        first_seq,
        last_seq,
        prev_seq,
        created_ms,
        scale,
        meta_len,
        body_len,
        *str_lens,
        reserved3,
    ) = _FIXED.unpack_from(mv, 0)
    if reserved or reserved2 or reserved3 != b"\0\0\0":
        field = "reserved" if reserved else "reserved2" if reserved2 else "reserved3"
        raise _hdr_error(field, "reserved bytes must be zero")
    if flags & ~_KNOWN_FLAGS:
        raise _hdr_error("flags", f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x}")
    if codec not in _CODEC_NAME:
        raise _hdr_error("compression", f"unknown compression code {codec}")
    if dtype_code not in Dtype._value2member_map_:
        raise _hdr_error("dtype", f"unknown dtype code {dtype_code}")
    dtype = Dtype(dtype_code)
    if n < 1:
        raise _hdr_error("n", "a frame needs at least 1 record")
    if dim < 1:
        raise _hdr_error("dim", "must be >= 1")
    if bool(flags & FLAG_HAS_META) != (meta_len > 0):
        raise _hdr_error("meta_len", f"{meta_len} disagrees with the has-meta flag")
    strings_len = sum(str_lens)
    expected_header_len = _align8(HEADER_FIXED_SIZE + strings_len)
    if header_len != expected_header_len:
        raise _hdr_error("header_len", f"{header_len}, but string lengths imply {expected_header_len}")
    if len(mv) < header_len:
        raise WireError(f"frame truncated: {len(mv)} bytes, header needs {header_len}", offset=len(mv))
    values: list[str] = []
    off = HEADER_FIXED_SIZE
    for name, length in zip(_STRING_FIELDS, str_lens, strict=True):
        raw = bytes(mv[off : off + length])
        try:
            text = raw.decode("ascii")
            if name in ("tenant", "device", "stream"):
                validate_id(name, text)
            else:
                _validate_printable(name, text)
        except (UnicodeDecodeError, WireError) as exc:
            raise WireError(f"invalid {name} {_short(raw)}: {exc}", field=name, offset=off) from exc
        values.append(text)
        off += length
    if any(mv[off:header_len]):
        raise WireError("header padding must be zero", field="padding", offset=off)
    try:
        _check_scale(dtype, scale)
    except WireError as exc:
        raise _hdr_error("scale", str(exc)) from exc
    try:
        _check_chain(n, first_seq, last_seq, prev_seq)
    except WireError as exc:
        field = "prev_seq" if prev_seq >= first_seq and first_seq <= last_seq else "last_seq"
        raise _hdr_error(field, str(exc)) from exc
    if flags & FLAG_RESCUED and prev_seq:
        raise _hdr_error("prev_seq", f"{prev_seq}: a rescued frame is outside the chain, prev_seq must be 0")
    tenant, device, stream, model, model_version = values
    return FrameHeader(
        version=version,
        header_len=header_len,
        body_len=body_len,
        flags=flags,
        compression=_CODEC_NAME[_Codec(codec)],
        dtype=dtype,
        schema_version=schema_version,
        n=n,
        dim=dim,
        first_seq=first_seq,
        last_seq=last_seq,
        prev_seq=prev_seq,
        created_ms=created_ms,
        scale=scale,
        meta_len=meta_len,
        tenant=tenant,
        device=device,
        stream=stream,
        model=model,
        model_version=model_version,
    )


def peek_header(data: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse only the header, without checking the CRC or the body.

    For routing and logging a frame that fails full decoding (dead-lettering it under the
    right tenant/device/upload id). Its values are unverified until decode_frame succeeds.
    """
    mv = _as_view(data)
    _check_prefix(mv)
    return _parse_header(mv)


def _decompress(stored: memoryview, expected: int, body_off: int) -> bytes:
    d = zlib.decompressobj()
    try:
        # max_length bounds the output (zip bombs): one byte over the declared size is
        # enough to know the body lies about its size.
        raw = d.decompress(stored, expected + 1)
    except zlib.error as exc:
        raise WireError(f"body does not decompress: {exc}", field="body", offset=body_off) from exc
    if len(raw) > expected:
        raise FrameTooLarge(
            f"body inflates beyond the declared {expected} bytes", field="body", offset=body_off
        )
    if len(raw) < expected or not d.eof:
        raise WireError(
            f"body inflates to {len(raw)} bytes, header declares {expected}"
            + ("" if d.eof else " (compressed stream incomplete)"),
            field="body",
            offset=body_off,
        )
    if d.unused_data:
        raise WireError(
            f"{len(d.unused_data)} bytes after the end of the compressed stream",
            field="body",
            offset=body_off + len(stored) - len(d.unused_data),
        )
    return raw


def _json_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" parses to inf
        raise ValueError(f"number {text[:40]} out of range")
    return value


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


def _decode_meta(raw: bytes | memoryview, n: int, where: str) -> tuple[dict[str, MetaValue], ...]:
    try:
        items = json.loads(
            bytes(raw).decode("utf-8"),
            parse_constant=_json_constant,
            parse_float=_json_float,
            object_pairs_hook=_json_object,
        )
    # RecursionError: deeply nested arrays; ValueError covers JSONDecodeError, bad UTF-8,
    # and int strings longer than sys.get_int_max_str_digits().
    except (ValueError, RecursionError) as exc:
        raise WireError(f"meta{where}: not valid JSON: {_short(str(exc), 120)}") from exc
    if not isinstance(items, list) or len(items) != n:
        got = f"{len(items)} items" if isinstance(items, list) else type(items).__name__
        raise WireError(f"meta{where}: expected a JSON array of {n} objects, got {got}")
    for i, item in enumerate(items):
        _check_meta_item(i, item, where)
    return tuple(items)


def decode_frame(data: bytes | bytearray | memoryview, *, limits: FrameLimits = FrameLimits()) -> Frame:
    """Strictly parse a frame. Arrays are read-only views into ``data`` (or into the
    decompressed body). Raises only WireError (and its subclasses), for any input."""
    mv = _as_view(data)
    _check_prefix(mv)
    size = len(mv)
    if size > limits.max_frame_bytes:
        raise FrameTooLarge(f"frame is {size} bytes, limit is {limits.max_frame_bytes}", offset=0)
    # Lengths are cross-checked before the CRC so truncation/trailing bytes get a precise
    # message; the CRC then vouches for every header field before they are trusted.
    fixed = _FIXED.unpack_from(mv, 0)
    header_len, body_len = fixed[2], fixed[17]
    declared = header_len + body_len + _CRC.size
    if size < declared:
        raise WireError(
            f"frame truncated: {size} bytes, header declares {declared}",
            field="body_len",
            offset=_FIELD_OFFSETS["body_len"],
        )
    if size > declared:
        raise WireError(
            f"{size - declared} trailing bytes after the declared {declared}-byte frame",
            offset=declared,
        )
    crc_off = size - _CRC.size
    (stored_crc,) = _CRC.unpack_from(mv, crc_off)
    actual_crc = zlib.crc32(mv[:crc_off])
    if stored_crc != actual_crc:
        raise ChecksumMismatch(
            f"CRC32 0x{stored_crc:08x} != computed 0x{actual_crc:08x}: frame damaged",
            field="crc32",
            offset=crc_off,
        )

    h = _parse_header(mv)
    if h.n > limits.max_records:
        raise _hdr_error("n", f"{h.n} records, limit is {limits.max_records}", FrameTooLarge)
    if h.dim > limits.max_dim:
        raise _hdr_error("dim", f"{h.dim}, limit is {limits.max_dim}", FrameTooLarge)
    if h.meta_len > limits.max_meta_bytes:
        raise _hdr_error("meta_len", f"{h.meta_len} bytes, limit is {limits.max_meta_bytes}", FrameTooLarge)
    raw_len = h.raw_body_len
    # The hard cap keeps zlib's max_length within a C ssize_t whatever limits say.
    if raw_len > min(limits.max_body_bytes, _HARD_MAX_BODY):
        raise FrameTooLarge(
            f"header declares a {raw_len}-byte body, limit is {limits.max_body_bytes}",
            field="body",
            offset=h.header_len,
        )

    stored = mv[h.header_len : h.header_len + h.body_len]
    if h.compression is None:
        if h.body_len != raw_len:
            raise WireError(
                f"body is {h.body_len} bytes, n/dim/dtype/meta_len declare {raw_len}",
                field="body_len",
                offset=_FIELD_OFFSETS["body_len"],
            )
        raw: bytes | memoryview = stored
        base, suffix = h.header_len, ""
    else:
        raw = _decompress(stored, raw_len, h.header_len)
        base, suffix = 0, " (in decompressed body)"

    n, dim, dt = h.n, h.dim, h.dtype.np_dtype
    off_times = 8 * n
    off_scores = 16 * n
    off_feats = 20 * n
    off_meta = off_feats + n * dim * dt.itemsize
    seqs = np.frombuffer(raw, dtype="<u8", count=n, offset=0)
    times_ms = np.frombuffer(raw, dtype="<u8", count=n, offset=off_times)
    scores = np.frombuffer(raw, dtype="<f4", count=n, offset=off_scores)
    features = np.frombuffer(raw, dtype=dt, count=n * dim, offset=off_feats).reshape(n, dim)

    if int(seqs[0]) != h.first_seq:
        raise WireError(
            f"seqs[0] = {int(seqs[0])} but header first_seq = {h.first_seq}{suffix}",
            field="seqs[0]",
            offset=base,
        )
    if int(seqs[-1]) != h.last_seq:
        raise WireError(
            f"seqs[-1] = {int(seqs[-1])} but header last_seq = {h.last_seq}{suffix}",
            field=f"seqs[{n - 1}]",
            offset=base + 8 * (n - 1),
        )
    if n > 1:
        bad = np.flatnonzero(seqs[1:] <= seqs[:-1])
        if bad.size:
            i = int(bad[0]) + 1
            raise WireError(
                f"{int(seqs[i])} not > seqs[{i - 1}] = {int(seqs[i - 1])}: seqs must strictly "
                f"increase{suffix}",
                field=f"seqs[{i}]",
                offset=base + 8 * i,
            )
    finite = np.isfinite(scores)
    if not finite.all():
        i = int(np.argmin(finite))
        raise WireError(
            f"{float(scores[i])} is not finite{suffix}",
            field=f"scores[{i}]",
            offset=base + off_scores + 4 * i,
        )
    meta = None
    if h.has_meta:
        where = f" at offset {base + off_meta}{suffix}"
        meta = _decode_meta(raw[off_meta:], n, where)

    return Frame(
        tenant=h.tenant,
        device=h.device,
        prev_seq=h.prev_seq,
        stream=h.stream,
        model=h.model,
        model_version=h.model_version,
        schema_version=h.schema_version,
        created_ms=h.created_ms,
        seqs=seqs,
        scores=scores,
        times_ms=times_ms,
        features=features,
        scale=h.scale,
        meta=meta,
        rescued=h.rescued,
    )


# --------------------------------------------------------------------------------------
# JSON messages: receipt and status
# --------------------------------------------------------------------------------------

# strict=True: JSON "5" or 5.0 or true is not a seq number.
_U64 = Annotated[int, Field(strict=True, ge=0, le=U64_MAX)]
_MAX_JSON_BYTES = 64 * 1024
_M = TypeVar("_M", bound=BaseModel)


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
    first_seq: _U64
    last_seq: _U64
    stream_seq: _U64 | None = None  # JetStream stream sequence when committed/duplicate
    expected_prev: _U64 | None = None  # GAP: the last seq the cloud has committed for the device
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


class ModelState(BaseModel):
    """Where the device's model update stands (the ``model`` of a control document)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state: Literal["active", "downloading", "refused", "failed"]
    version: Annotated[str, Field(max_length=64)] | None = None  # of the update in question
    sha256: Annotated[str, Field(max_length=64)] | None = None
    chunks_have: _U64 = 0
    chunks_total: _U64 = 0
    chunks_fetched: _U64 = 0  # received since the agent started (a resumed transfer fetches only the rest)
    error: Annotated[str, Field(max_length=1024)] | None = None


class ControlState(BaseModel):
    """The device's acknowledgement of its control document (et/{tenant}/{device}/control)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation: _U64 = 0  # of the last document applied
    applied_ms: _U64 | None = None
    error: Annotated[str, Field(max_length=1024)] | None = None  # why the newest document was refused
    paused: bool = False
    threshold: Annotated[float, Field(ge=0, le=1)] | None = None
    upload_bytes_per_s: _U64 | None = None
    model: ModelState | None = None


class DeviceStatus(BaseModel):
    """Device health, retained on et/{tenant}/{device}/status (last will: offline)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    state: Literal["online", "offline"]
    ts_ms: _U64
    backlog_records: _U64 = 0
    backlog_bytes: _U64 = 0
    oldest_age_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    evictions: dict[Annotated[str, Field(max_length=64)], _U64] = Field(default_factory=dict)
    # the queue's budget now: min(configured, what the filesystem can give), and whether
    # the filesystem is what bounds it
    budget_bytes: _U64 | None = None
    disk_limited: bool | None = None
    last_receipt_ms: _U64 | None = None
    model_version: Annotated[str, Field(max_length=64)] | None = None
    control: ControlState | None = None


def _decode_json_model(
    cls: type[_M], data: bytes | bytearray | memoryview | str, max_bytes: int = _MAX_JSON_BYTES
) -> _M:
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, bytes | bytearray | str):
        raise WireError(f"{cls.__name__}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise FrameTooLarge(f"{cls.__name__}: {len(data)} bytes, limit is {max_bytes}")
    try:
        return cls.model_validate_json(data)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
        raise WireError(f"invalid {cls.__name__}: {errs}") from exc


def encode_receipt(r: Receipt) -> bytes:
    return r.model_dump_json(exclude_none=True).encode("utf-8")


def decode_receipt(b: bytes | bytearray | memoryview | str) -> Receipt:
    return _decode_json_model(Receipt, b)


def encode_status(s: DeviceStatus) -> bytes:
    return s.model_dump_json(exclude_none=True).encode("utf-8")


def decode_status(b: bytes | bytearray | memoryview | str) -> DeviceStatus:
    return _decode_json_model(DeviceStatus, b)


# -- tier-two results ----------------------------------------------------------------------

RESULT_MAX_BYTES = 8 * 1024 * 1024
_Confidence = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
_Label = Annotated[str, Field(max_length=64)]


class ResultBatch(BaseModel):
    """Tier-two answers for one upload (or one part of a large one), as columns.

    Stream ET_RESULTS, subject ``et.results.{tenant}.{device}``, ``Nats-Msg-Id`` = the upload
    id (``upload_id#part`` for parts after the first); also what applications read on MQTT
    ``et/{tenant}/{device}/results``. Row ``i`` of every column is record ``seqs[i]``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    upload_id: str
    tenant: str
    device: str
    stream: Annotated[str, Field(max_length=64)]
    part: Annotated[int, Field(strict=True, ge=0)] = 0
    parts: Annotated[int, Field(strict=True, ge=1)] = 1
    model: Annotated[str, Field(max_length=64)]
    model_version: Annotated[str, Field(max_length=64)]
    worker: Annotated[str, Field(max_length=64)]
    produced_ms: _U64
    seqs: list[_U64]
    times_ms: list[_U64]  # when the device created each record
    scores: list[float]  # the prefilter's anomaly score
    labels: list[_Label]
    confidences: list[_Confidence]

    @model_validator(mode="after")
    def _consistent(self) -> ResultBatch:
        t, d, first, last = parse_upload_id(self.upload_id)
        if (t, d) != (self.tenant, self.device):
            raise ValueError(f"upload_id {self.upload_id!r} is not of {self.tenant}/{self.device}")
        n = len(self.seqs)
        if not n or any(len(c) != n for c in (self.times_ms, self.scores, self.labels, self.confidences)):
            raise ValueError("seqs, times_ms, scores, labels and confidences must be equally long, n >= 1")
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
) -> bytes:
    """One ResultBatch as JSON, straight from numpy columns (per-record objects would cost
    more than the inference)."""
    doc = {
        "v": 1,
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
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def decode_results(b: bytes | bytearray | memoryview | str) -> ResultBatch:
    return _decode_json_model(ResultBatch, b, RESULT_MAX_BYTES)
