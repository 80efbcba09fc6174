"""The strict frame decoder.

Decoding is total: for any input bytes :func:`decode_frame` either returns a Frame or raises
:class:`WireError`, never another exception. It checks sizes against ``FrameLimits`` before
allocating (a zlib body is inflated at most one byte past its declared size), checks the CRC
before it trusts a header field, and names the field and byte offset of what it refuses.
"""

from __future__ import annotations

import zlib

import numpy as np

from edge_tier.errors import ChecksumMismatch, FrameTooLarge, WireError
from edge_tier.wire.frame import Frame
from edge_tier.wire.header import (
    _CRC,
    _FIELD_OFFSETS,
    _FIXED,
    _HARD_MAX_BODY,
    FrameHeader,
    FrameLimits,
    _as_view,
    _check_prefix,
    _hdr_error,
    _parse_header,
)
from edge_tier.wire.meta import _decode_meta

__all__ = ["decode_frame"]

_DEFAULT_LIMITS = FrameLimits()


def _check_size_and_crc(mv: memoryview, limits: FrameLimits) -> None:
    """The frame's length against the limit and against what its header declares, then its
    CRC. Lengths come first so truncation/trailing bytes get a precise message; the CRC then
    vouches for every header field before they are trusted."""
    size = len(mv)
    if size > limits.max_frame_bytes:
        raise FrameTooLarge(f"frame is {size} bytes, limit is {limits.max_frame_bytes}", offset=0)
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


def _check_limits(h: FrameHeader, limits: FrameLimits) -> int:
    """FrameTooLarge if the header declares more than ``limits`` allow; else the raw body size."""
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
    return raw_len


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


def _raw_body(mv: memoryview, h: FrameHeader, raw_len: int) -> tuple[bytes | memoryview, int, str]:
    """The uncompressed body, the frame offset its offsets count from (0 when it was
    decompressed) and the suffix that says so in error messages."""
    stored = mv[h.header_len : h.header_len + h.body_len]
    if h.compression is None:
        if h.body_len != raw_len:
            raise WireError(
                f"body is {h.body_len} bytes, n/dim/dtype/meta_len declare {raw_len}",
                field="body_len",
                offset=_FIELD_OFFSETS["body_len"],
            )
        return stored, h.header_len, ""
    return _decompress(stored, raw_len, h.header_len), 0, " (in decompressed body)"


def _check_seqs(seqs: np.ndarray, h: FrameHeader, base: int, suffix: str) -> None:
    """The body's seqs span the header's first..last seq and strictly increase."""
    n = h.n
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


def decode_frame(data: bytes | bytearray | memoryview, *, limits: FrameLimits = _DEFAULT_LIMITS) -> Frame:
    """Strictly parse a frame. Arrays are read-only views into ``data`` (or into the
    decompressed body). Raises only WireError (and its subclasses), for any input."""
    mv = _as_view(data)
    _check_prefix(mv)
    _check_size_and_crc(mv, limits)
    h = _parse_header(mv)
    raw, base, suffix = _raw_body(mv, h, _check_limits(h, limits))

    n, dim, dt = h.n, h.dim, h.dtype.np_dtype
    off_times = 8 * n
    off_scores = 16 * n
    off_feats = 20 * n
    off_meta = off_feats + n * dim * dt.itemsize
    seqs = np.frombuffer(raw, dtype="<u8", count=n, offset=0)
    times_ms = np.frombuffer(raw, dtype="<u8", count=n, offset=off_times)
    scores = np.frombuffer(raw, dtype="<f4", count=n, offset=off_scores)
    features = np.frombuffer(raw, dtype=dt, count=n * dim, offset=off_feats).reshape(n, dim)

    _check_seqs(seqs, h, base, suffix)
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
