"""Tests for edge_tier.wire.frame: round trips through both encoders, and the encode-side
validation (a device never builds a frame the cloud would reject)."""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from typing import Any

import numpy as np
import pytest

from edge_tier.wire import (
    FORMAT_VERSION,
    Dtype,
    Frame,
    WireError,
    decode_frame,
    encode_frame,
    encode_frame_parts,
    peek_header,
)
from tests.edge_tier.test_wire_kit import assert_frames_equal, make_frame, parts_kwargs, with_

# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(Dtype))
@pytest.mark.parametrize("compress", [None, "zlib"])
@pytest.mark.parametrize("meta", [False, True])
@pytest.mark.parametrize(("n", "dim"), [(1, 1), (1, 128), (1000, 1), (1000, 128)])
def test_round_trip(dtype: Dtype, compress: str | None, meta: bool, n: int, dim: int) -> None:
    f = make_frame(n, dim, dtype, meta=meta)
    data = encode_frame(f, compress=compress)
    g = decode_frame(data)
    assert_frames_equal(f, g)
    assert g.seqs.dtype == np.uint64 and g.times_ms.dtype == np.uint64
    assert g.scores.dtype == np.float32 and g.features.shape == (n, dim)
    # The device's path must produce the very same bytes.
    assert encode_frame_parts(**parts_kwargs(f), compress=compress) == data
    h = peek_header(data)
    assert (h.tenant, h.device, h.first_seq, h.last_seq, h.prev_seq, h.n, h.dim) == (
        "acme",
        "dev-01",
        f.first_seq,
        f.last_seq,
        f.prev_seq,
        n,
        dim,
    )
    assert h.upload_id == f.upload_id == g.upload_id
    assert h.compression == compress and h.dtype is dtype and h.has_meta is meta
    assert h.frame_len == len(data) and h.version == FORMAT_VERSION


def test_round_trip_edge_values() -> None:
    f = make_frame(2, 2)
    f = Frame(
        **{
            **{k: getattr(f, k) for k in Frame.__dataclass_fields__},
            "prev_seq": 2**64 - 3,
            "seqs": np.array([2**64 - 2, 2**64 - 1], dtype=np.uint64),
            "times_ms": np.array([0, 2**64 - 1], dtype=np.uint64),
            "model": "",
            "model_version": "",
            "schema_version": 65535,
            "created_ms": 0,
        }
    )
    assert_frames_equal(f, decode_frame(encode_frame(f)))


def test_compression_shrinks_and_levels() -> None:
    f = make_frame(100, 16)
    zeros = Frame(**{**{k: getattr(f, k) for k in Frame.__dataclass_fields__}, "features": f.features * 0})
    plain, z1, z9 = (
        encode_frame(zeros),
        encode_frame(zeros, compress="zlib"),
        encode_frame(zeros, compress="zlib", level=9),
    )
    assert len(z1) < len(plain) and len(z9) <= len(z1)
    for data in (z1, z9):
        assert_frames_equal(decode_frame(data), zeros)


def test_rescued_frames_round_trip_outside_the_chain() -> None:
    f = dataclasses.replace(make_frame(prev=0, meta=True), rescued=True)
    data = encode_frame(f)
    assert data[8] == 0x03  # has meta | rescued
    g = decode_frame(data)
    assert g.rescued and peek_header(data).rescued and g.prev_seq == 0
    assert not decode_frame(encode_frame(make_frame(prev=0))).rescued
    with pytest.raises(WireError, match="outside the chain"):
        encode_frame(dataclasses.replace(f, prev_seq=7))
    forged = bytearray(encode_frame(make_frame(prev=7)))
    forged[8] |= 0x02  # a chained frame claiming to be rescued, with a CRC that fits
    forged[-4:] = struct.pack("<I", zlib.crc32(bytes(forged[:-4])))
    with pytest.raises(WireError, match="outside the chain") as e:
        decode_frame(bytes(forged))
    assert e.value.field == "prev_seq"


# --------------------------------------------------------------------------------------
# encode-side validation (a device never builds a frame the cloud would reject)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"seqs": np.array([10, 12, 12], dtype=np.uint64)}, r"seqs\[2\]"),
        ({"seqs": np.array([10, 9, 12], dtype=np.uint64)}, r"seqs\[1\]"),
        ({"seqs": np.array([-1, 9, 12])}, "negative"),
        ({"seqs": np.array([1.0, 2.0, 3.0])}, "integers"),
        ({"prev_seq": 10}, "prev_seq"),
        ({"prev_seq": -1}, "prev_seq"),
        ({"tenant": "a/b"}, "tenant id"),
        ({"device": "+"}, "device id"),
        ({"device": "#"}, "device id"),
        ({"device": "a\0"}, "device id"),
        ({"device": "x" * 65}, "device id"),
        ({"device": ""}, "device id"),
        ({"device": "."}, "device id"),
        ({"stream": ""}, "stream id"),
        ({"model_version": "v\n"}, "model_version"),
        ({"model": "m" * 65}, "model"),
        ({"schema_version": 65536}, "schema_version"),
        ({"created_ms": -5}, "created_ms"),
        ({"scores": np.array([0.1, np.nan, 0.3], dtype=np.float32)}, r"scores\[1\]"),
        ({"scores": np.array([0.1, 0.2, np.inf], dtype=np.float32)}, r"scores\[2\]"),
        ({"scores": np.array([0.1, 0.2], dtype=np.float32)}, "scores"),
        ({"times_ms": np.array([1, 2], dtype=np.uint64)}, "times_ms"),
        ({"features": np.zeros((3, 4), dtype=np.float64)}, "dtype"),
        ({"features": np.zeros((3, 0), dtype=np.float32)}, "dim"),
        ({"features": np.zeros((2, 4), dtype=np.float32)}, "rows"),
        ({"features": np.zeros(12, dtype=np.float32)}, "2-D"),
        ({"scale": 0.5}, "scale"),
        ({"meta": ({"a": 1},)}, "meta"),
        ({"meta": ({"a": [1]}, {}, {})}, r"meta\[0\]"),
        ({"meta": ({"a": math.nan}, {}, {})}, "meta"),
        ({"meta": ({1: 1}, {}, {})}, "key"),
        ({"meta": ("x", {}, {})}, r"meta\[0\]"),
    ],
)
def test_encode_rejects(changes: dict[str, Any], match: str) -> None:
    f = with_(make_frame(3, 4), **changes)
    with pytest.raises(WireError, match=match):
        encode_frame(f)


def test_encode_rejects_bad_int8_scale_and_options() -> None:
    f = make_frame(3, 4, Dtype.INT8)
    for scale in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(WireError, match="scale"):
            encode_frame(with_(f, scale=scale))
    with pytest.raises(WireError, match="compress"):
        encode_frame(f, compress="zstd")
    with pytest.raises(WireError, match="level"):
        encode_frame(f, compress="zlib", level=11)
    empty = with_(
        f,
        seqs=np.zeros(0, np.uint64),
        scores=np.zeros(0, np.float32),
        times_ms=np.zeros(0, np.uint64),
        features=np.zeros((0, 4), np.int8),
    )
    with pytest.raises(WireError, match="at least 1"):
        encode_frame(empty)


def test_encode_frame_parts_rejects_bad_blobs() -> None:
    kw = parts_kwargs(make_frame(3, 4))
    kw["feature_blobs"][1] = kw["feature_blobs"][1][:-1]
    with pytest.raises(WireError, match=r"feature_blobs\[1\]: 15 bytes, expected dim\*itemsize = 16"):
        encode_frame_parts(**kw)
    kw = parts_kwargs(make_frame(3, 4))
    kw["seqs"] = kw["seqs"][:2]
    with pytest.raises(WireError, match="seqs"):
        encode_frame_parts(**kw)
    kw = parts_kwargs(make_frame(3, 4))
    kw["dtype"] = 9
    with pytest.raises(WireError, match="dtype"):
        encode_frame_parts(**kw)
    for name, value in [
        ("seqs", [10, 11, "12"]),
        ("seqs", [10, 11, 2**64]),
        ("scores", [0.1, "x", 0.3]),
        ("times_ms", [1, 2, 3.5]),
        ("scale", "big"),
        ("feature_blobs", []),
    ]:
        kw = parts_kwargs(make_frame(3, 4))
        kw[name] = value
        with pytest.raises(WireError, match=name.rstrip("s") if name != "feature_blobs" else None):
            encode_frame_parts(**kw)
    kw = parts_kwargs(make_frame(3, 4))
    kw["seqs"] = [10, 11, -12]
    with pytest.raises(WireError, match="seqs"):
        encode_frame_parts(**kw)
