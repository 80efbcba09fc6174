"""The upload frame: one batch of a device's records, and its encoder.

The body holds the records column by column (seqs u64, times u64, scores f32, the feature
vectors), then the metadata JSON when the has-meta flag is set; zlib may compress it (the
header stays readable). A CRC32 of everything before it closes the frame. The numeric parts
are handled with numpy/struct/bytes.join, never a Python loop per record.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge_tier.errors import WireError
from edge_tier.wire.header import (
    _CODEC_BY_NAME,
    _CRC,
    _FIXED,
    _U32_MAX,
    FLAG_HAS_META,
    FLAG_RESCUED,
    FORMAT_VERSION,
    HEADER_FIXED_SIZE,
    MAGIC,
    Dtype,
    _align8,
    _check_chain,
    _check_scale,
    _Codec,
)
from edge_tier.wire.ids import U64_MAX, _check_uint, _short, _validate_printable, upload_id, validate_id
from edge_tier.wire.meta import MetaValue, _encode_meta

__all__ = ["Frame", "encode_frame", "encode_frame_parts"]


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


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


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


def _as_codec(compress: str | None, level: int) -> _Codec:
    if compress not in _CODEC_BY_NAME:
        raise WireError(f"compress {compress!r}: must be None or 'zlib'")
    codec = _CODEC_BY_NAME[compress]
    if codec is _Codec.ZLIB and not (isinstance(level, int) and -1 <= level <= 9):
        raise WireError(f"level {level!r}: zlib level must be -1..9")
    return codec


def _check_records(seqs: np.ndarray, scores: np.ndarray, prev_seq: int, rescued: bool) -> tuple[int, int]:
    """Seqs strictly increase after prev_seq (0 for a rescued frame), scores are finite;
    returns the first and last seq."""
    n = len(seqs)
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
    return first, last


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
    codec = _as_codec(compress, level)

    n = len(seqs)
    if not 1 <= n <= _U32_MAX:
        raise WireError(f"n: a frame needs at least 1 record, got {n}")
    if dim < 1:
        raise WireError("dim: must be >= 1")
    if len(features) != n * dim * dtype.itemsize:
        raise WireError(f"features: expected {n * dim * dtype.itemsize} bytes, got {len(features)}")
    first, last = _check_records(seqs, scores, prev_seq, rescued)

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
