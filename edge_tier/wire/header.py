"""The upload frame's header: layout, element types and limits, and the strict header parser.

The fixed part is 80 bytes (offsets in docs/wire-format.md, ``_FIELD_OFFSETS`` here), then the
five strings (tenant, device, stream, model, model_version), zero-padded to a multiple of 8.
The header is readable without the body: :func:`peek_header` routes a frame that fails full
decoding. The checks both sides share live here too, so a device never builds a frame whose
header the cloud would reject.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from edge_tier.errors import UnsupportedVersion, WireError
from edge_tier.wire.ids import ID_MAX_LEN, _check_uint, _short, _validate_printable, upload_id, validate_id

__all__ = [
    "FLAG_HAS_META",
    "FLAG_RESCUED",
    "FORMAT_VERSION",
    "HEADER_FIXED_SIZE",
    "MAGIC",
    "RECORD_WIRE_OVERHEAD",
    "Dtype",
    "FrameHeader",
    "FrameLimits",
    "check_kind",
    "frame_overhead",
    "peek_header",
]

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


def _check_chain(n: int, first: int, last: int, prev: int) -> None:
    if first > last or last - first < n - 1:
        raise WireError(f"seq range {first}-{last} cannot hold {n} strictly increasing seqs")
    if prev >= first:
        raise WireError(f"prev_seq {prev} must be < first_seq {first}")


# --------------------------------------------------------------------------------------
# Parsing
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


def _check_codes(
    flags: int, codec: int, dtype_code: int, reserved: int, reserved2: int, reserved3: bytes
) -> Dtype:
    """The fixed part's code bytes: reserved ones zero; flags, compression and dtype known."""
    if reserved or reserved2 or reserved3 != b"\0\0\0":
        field = "reserved" if reserved else "reserved2" if reserved2 else "reserved3"
        raise _hdr_error(field, "reserved bytes must be zero")
    if flags & ~_KNOWN_FLAGS:
        raise _hdr_error("flags", f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x}")
    if codec not in _CODEC_NAME:
        raise _hdr_error("compression", f"unknown compression code {codec}")
    if dtype_code not in Dtype._value2member_map_:
        raise _hdr_error("dtype", f"unknown dtype code {dtype_code}")
    return Dtype(dtype_code)


def _read_strings(mv: memoryview, str_lens: list[int], header_len: int) -> list[str]:
    """The header's five strings (ids checked as ids, the others as printable ASCII) and
    the zero padding after them; mv holds at least header_len bytes."""
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
    return values


def _check_values(
    dtype: Dtype, scale: float, n: int, first_seq: int, last_seq: int, prev_seq: int, flags: int
) -> None:
    """The numbers the codes and strings do not settle: scale for the dtype, the seq chain."""
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
    dtype = _check_codes(flags, codec, dtype_code, reserved, reserved2, reserved3)
    if n < 1:
        raise _hdr_error("n", "a frame needs at least 1 record")
    if dim < 1:
        raise _hdr_error("dim", "must be >= 1")
    if bool(flags & FLAG_HAS_META) != (meta_len > 0):
        raise _hdr_error("meta_len", f"{meta_len} disagrees with the has-meta flag")
    expected_header_len = _align8(HEADER_FIXED_SIZE + sum(str_lens))
    if header_len != expected_header_len:
        raise _hdr_error("header_len", f"{header_len}, but string lengths imply {expected_header_len}")
    if len(mv) < header_len:
        raise WireError(f"frame truncated: {len(mv)} bytes, header needs {header_len}", offset=len(mv))
    tenant, device, stream, model, model_version = _read_strings(mv, str_lens, header_len)
    _check_values(dtype, scale, n, first_seq, last_seq, prev_seq, flags)
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
