"""What the tests of edge_tier.wire share: the documented header layout written out
independently of the package, frame makers, re-packing a frame with a valid CRC, and the
fuzz settings.

No tests here; the tests are in the other ``test_wire_*.py`` files, one per module of
the package (``edge_tier/wire/``).
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from edge_tier.wire import HEADER_FIXED_SIZE, Dtype, Frame, WireError, decode_frame, encode_frame

# The documented fixed header layout (docs/wire-format.md), written out independently of
# the package so a layout change that forgets the docs fails here.
FIXED = struct.Struct("<4sHHBBBBHHIIQQQQdII5B3s")
FIELDS = [
    "magic",
    "version",
    "header_len",
    "flags",
    "compression",
    "dtype",
    "reserved",
    "schema_version",
    "reserved2",
    "n",
    "dim",
    "first_seq",
    "last_seq",
    "prev_seq",
    "created_ms",
    "scale",
    "meta_len",
    "body_len",
    "tenant_len",
    "device_len",
    "stream_len",
    "model_len",
    "model_version_len",
    "reserved3",
]
STRINGS = ("tenant", "device", "stream", "model", "model_version")


def make_frame(
    n: int = 3,
    dim: int = 4,
    dtype: Dtype = Dtype.FLOAT32,
    *,
    meta: bool = False,
    seed: int = 0,
    first: int = 10,
    prev: int = 7,
) -> Frame:
    rng = np.random.default_rng(seed)
    if dtype is Dtype.INT8:
        feats = rng.integers(-128, 128, size=(n, dim), dtype=np.int8)
        scale = 0.05
    else:
        feats = rng.standard_normal((n, dim)).astype(dtype.np_dtype)
        scale = 1.0
    seqs = first + np.cumsum(rng.integers(1, 3, size=n)).astype(np.uint64) - 1
    metas = None
    if meta:
        metas = tuple(
            {"site": f"s{i % 3}", "i": i, "t": i * 0.5, "ok": i % 2 == 0, "none": None} for i in range(n)
        )
    return Frame(
        tenant="acme",
        device="dev-01",
        prev_seq=prev,
        stream="vibration",
        model="prefilter",
        model_version="1.2.3 beta",
        schema_version=3,
        created_ms=1_700_000_000_000,
        seqs=seqs,
        scores=rng.random(n).astype(np.float32),
        times_ms=(1_700_000_000_000 + np.arange(n) * 10).astype(np.uint64),
        features=feats,
        scale=scale,
        meta=metas,
    )


def parts_kwargs(f: Frame) -> dict[str, Any]:
    """The same frame in the device's shape: Python lists and per-record blobs."""
    return dict(
        tenant=f.tenant,
        device=f.device,
        prev_seq=f.prev_seq,
        stream=f.stream,
        model=f.model,
        model_version=f.model_version,
        schema_version=f.schema_version,
        created_ms=f.created_ms,
        dtype=f.dtype,
        dim=f.dim,
        seqs=[int(s) for s in f.seqs],
        scores=[float(s) for s in f.scores],
        times_ms=[int(t) for t in f.times_ms],
        feature_blobs=[row.tobytes() for row in f.features],
        scale=f.scale,
        meta=list(f.meta) if f.meta is not None else None,
    )


def assert_frames_equal(a: Frame, b: Frame) -> None:
    for name in [
        "tenant",
        "device",
        "prev_seq",
        "stream",
        "model",
        "model_version",
        "schema_version",
        "created_ms",
        "scale",
        "meta",
    ]:
        assert getattr(a, name) == getattr(b, name), name
    assert a.features.dtype == b.features.dtype
    for name in ("seqs", "scores", "times_ms", "features"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.n, a.dim, a.dtype, a.upload_id) == (b.n, b.dim, b.dtype, b.upload_id)


def split(data: bytes) -> tuple[dict[str, Any], dict[str, bytes], bytes]:
    """A frame's header fields, its strings and its stored body."""
    fields = dict(zip(FIELDS, FIXED.unpack_from(data, 0), strict=True))
    strings, off = {}, HEADER_FIXED_SIZE
    for name in STRINGS:
        strings[name] = data[off : off + fields[f"{name}_len"]]
        off += fields[f"{name}_len"]
    body = data[fields["header_len"] : fields["header_len"] + fields["body_len"]]
    return fields, strings, body


def rebuild(
    data: bytes,
    *,
    body: bytes | None = None,
    raw_body: bytes | None = None,
    strings: dict[str, bytes] | None = None,
    fix_lengths: bool = True,
    **fields: Any,
) -> bytes:
    """Re-pack a frame with some fields/strings/body replaced and a *valid* CRC, so the
    decoder's checks beyond the checksum are reached. raw_body is compressed if the frame is."""
    f, s, b = split(data)
    if strings:
        s.update(strings)
    if raw_body is not None:
        body = zlib.compress(raw_body, 1) if f["compression"] == 1 else raw_body
    if body is not None:
        b = body
    if fix_lengths:
        for name in STRINGS:
            f[f"{name}_len"] = len(s[name])
        str_len = sum(len(v) for v in s.values())
        f["header_len"] = (HEADER_FIXED_SIZE + str_len + 7) & ~7
        f["body_len"] = len(b)
    f.update(fields)
    strs = b"".join(s[name] for name in STRINGS)
    header = FIXED.pack(*(f[k] for k in FIELDS)) + strs
    header += b"\0" * max(0, f["header_len"] - len(header))
    out = header + b
    return out + struct.pack("<I", zlib.crc32(out))


def raw_body_of(f: Frame) -> bytes:
    meta = b"" if f.meta is None else json.dumps(list(f.meta), separators=(",", ":")).encode()
    return (
        f.seqs.astype("<u8").tobytes()
        + f.times_ms.astype("<u8").tobytes()
        + f.scores.astype("<f4").tobytes()
        + f.features.tobytes()
        + meta
    )


def rejects(data: Any, match: str | None = None, **kw: Any) -> WireError:
    with pytest.raises(WireError, match=match) as info:
        decode_frame(data, **kw)
    return info.value


def with_(f: Frame, **changes: Any) -> Frame:
    return Frame(**{**{k: getattr(f, k) for k in Frame.__dataclass_fields__}, **changes})


SMALL = encode_frame(make_frame(2, 3, meta=True))
SMALL_Z = encode_frame(make_frame(2, 3, meta=True), compress="zlib")

# The settings of every fuzz test.
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
