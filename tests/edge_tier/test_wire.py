"""Tests for edge_tier.wire: round trips, every documented rejection, and fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import struct
import time
import tracemalloc
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_tier.wire import (
    FORMAT_VERSION,
    HEADER_FIXED_SIZE,
    MAGIC,
    RECORD_WIRE_OVERHEAD,
    ChecksumMismatch,
    CloudLimits,
    DeviceStatus,
    Dtype,
    Frame,
    FrameLimits,
    FrameTooLarge,
    Receipt,
    ReceiptStatus,
    UnsupportedVersion,
    WireError,
    decode_frame,
    decode_receipt,
    decode_results,
    decode_status,
    encode_frame,
    encode_frame_parts,
    encode_receipt,
    encode_results,
    encode_status,
    frame_overhead,
    parse_upload_id,
    peek_header,
    upload_id,
    validate_id,
)

# The documented fixed header layout (docs/wire-format.md), written out independently of
# the module so a layout change that forgets the docs fails here.
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

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


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


SMALL = encode_frame(make_frame(2, 3, meta=True))
SMALL_Z = encode_frame(make_frame(2, 3, meta=True), compress="zlib")

# --------------------------------------------------------------------------------------
# ids
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "dev-01", "A_b-9", "x" * 64])
def test_validate_id_accepts(good: str) -> None:
    assert validate_id("device", good) == good


@pytest.mark.parametrize(
    "bad", ["a/b", "+", "#", "a\0b", "x" * 65, "", ".", "a.b", "a b", "é", "a*", ">", "a\n"]
)
def test_validate_id_rejects(bad: str) -> None:
    with pytest.raises(WireError, match="device id"):
        validate_id("device", bad)


def test_validate_id_rejects_non_str_and_keeps_message_short() -> None:
    with pytest.raises(WireError):
        validate_id("tenant", 5)  # type: ignore[arg-type]
    with pytest.raises(WireError) as info:
        validate_id("tenant", "/" * 1_000_000)
    assert len(str(info.value)) < 300


def test_upload_id_round_trip() -> None:
    uid = upload_id("acme", "dev-01", 1, 1000)
    assert uid == "acme.dev-01.1-1000"
    assert parse_upload_id(uid) == ("acme", "dev-01", 1, 1000)
    assert parse_upload_id(upload_id("t", "d", 2**64 - 1, 2**64 - 1))[2] == 2**64 - 1


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "acme.dev",
        "acme.dev.1",
        "acme.dev.1-",
        "acme.dev.-1-2",
        "acme.dev.01-2",
        "acme.dev.2-1",
        "acme.dev.1-2.x",
        "a/b.dev.1-2",
        "acme.dev.1-+2",
        "acme.dev.1-18446744073709551616",
        "acme.dev.1-2\n",
        "acme.dev." + "9" * 5000 + "-1",
    ],
)
def test_parse_upload_id_rejects(bad: str) -> None:
    with pytest.raises(WireError):
        parse_upload_id(bad)


def test_upload_id_rejects_bad_input() -> None:
    for args in [("a/b", "d", 1, 2), ("t", "d", 3, 2), ("t", "d", -1, 2), ("t", "d", 1, 2**64)]:
        with pytest.raises(WireError):
            upload_id(*args)


def test_dtype_helpers() -> None:
    assert Dtype.FLOAT32.np_dtype == np.dtype("<f4")
    assert Dtype.FLOAT16.np_dtype == np.dtype("<f2")
    assert Dtype.INT8.np_dtype == np.dtype("i1")
    assert [d.itemsize for d in Dtype] == [4, 2, 1]
    assert Dtype.from_numpy(np.float32) is Dtype.FLOAT32
    assert Dtype.from_numpy(">f4") is Dtype.FLOAT32
    assert Dtype.from_numpy("int8") is Dtype.INT8
    for bad in (np.float64, np.uint8, "i4", "not-a-dtype"):
        with pytest.raises(WireError):
            Dtype.from_numpy(bad)


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


def test_layout_matches_docs() -> None:
    f = make_frame(2, 3, meta=True)
    data = encode_frame(f)
    fields, strings, body = split(data)
    assert fields["magic"] == MAGIC == b"ETWF" and fields["version"] == 1
    assert fields["header_len"] % 8 == 0 and fields["header_len"] >= HEADER_FIXED_SIZE == 80
    assert fields["flags"] == 1 and fields["compression"] == 0 and fields["dtype"] == 1
    assert (fields["n"], fields["dim"], fields["first_seq"], fields["last_seq"]) == (
        2,
        3,
        f.first_seq,
        f.last_seq,
    )
    assert strings["tenant"] == b"acme" and strings["model_version"] == b"1.2.3 beta"
    assert body == raw_body_of(f)
    assert fields["meta_len"] == len(body) - 2 * (20 + 3 * 4)
    assert data[-4:] == struct.pack("<I", zlib.crc32(data[:-4]))
    # Compressed: the header is identical apart from the codec and body_len.
    zf, zs, zbody = split(encode_frame(f, compress="zlib"))
    assert zs == strings and zf["compression"] == 1 and zlib.decompress(zbody) == body


def test_decoded_arrays_are_read_only_zero_copy_views() -> None:
    f = make_frame(4, 8)
    buf = bytearray(encode_frame(f))
    g = decode_frame(buf)
    for arr in (g.seqs, g.scores, g.times_ms, g.features):
        assert not arr.flags.writeable
    feat_off = split(bytes(buf))[0]["header_len"] + 20 * 4
    before = float(g.features[0, 0])
    buf[feat_off + 3] ^= 0x80  # flip the sign bit of features[0, 0] under the Frame's feet
    assert float(g.features[0, 0]) == -before


def test_decode_accepts_memoryview_and_bytearray() -> None:
    data = SMALL
    for form in (bytearray(data), memoryview(data), memoryview(bytearray(data))):
        assert_frames_equal(decode_frame(form), decode_frame(data))
    wide = np.frombuffer(data[: len(data) // 4 * 4], dtype=np.uint32)
    with pytest.raises(WireError):  # a cast view of the wrong length is just a bad frame
        decode_frame(memoryview(wide))


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


# --------------------------------------------------------------------------------------
# encode-side validation (a device never builds a frame the cloud would reject)
# --------------------------------------------------------------------------------------


def with_(f: Frame, **changes: Any) -> Frame:
    return Frame(**{**{k: getattr(f, k) for k in Frame.__dataclass_fields__}, **changes})


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


# --------------------------------------------------------------------------------------
# decode-side rejections
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [SMALL, SMALL_Z], ids=["plain", "zlib"])
def test_truncation_at_every_offset(data: bytes) -> None:
    for cut in range(len(data)):
        with pytest.raises(WireError):
            decode_frame(data[:cut])
    # peek needs only the header: it fails while the header is cut, then succeeds.
    header_len = split(data)[0]["header_len"]
    for cut in range(header_len):
        with pytest.raises(WireError):
            peek_header(data[:cut])
    assert peek_header(data[:header_len]).n == 2


@pytest.mark.parametrize("data", [SMALL, SMALL_Z], ids=["plain", "zlib"])
def test_flipped_byte_anywhere(data: bytes) -> None:
    buf = bytearray(data)
    for i in range(len(buf)):
        for bit in (0x01, 0x80):
            buf[i] ^= bit
            with pytest.raises(WireError):
                decode_frame(bytes(buf))
            buf[i] ^= bit


def test_flipped_body_byte_is_checksum_error_but_peek_still_routes() -> None:
    buf = bytearray(SMALL)
    buf[split(SMALL)[0]["header_len"] + 5] ^= 0xFF
    err = rejects(bytes(buf), "CRC32")
    assert isinstance(err, ChecksumMismatch)
    assert err.field == "crc32" and err.offset == len(buf) - 4
    assert peek_header(bytes(buf)).upload_id == decode_frame(SMALL).upload_id


def test_bad_magic() -> None:
    rejects(b"XXXX" + SMALL[4:], "magic at offset 0")
    with pytest.raises(WireError, match="magic"):
        peek_header(b"XXXX" + SMALL[4:])


def test_unknown_version_is_clear_even_when_short() -> None:
    for data in (rebuild(SMALL, version=2), MAGIC + b"\x02\x00", MAGIC + b"\x00\x00" + b"\0" * 200):
        err = rejects(data, "version")
        assert isinstance(err, UnsupportedVersion)
        assert "not supported" in str(err) and err.offset == 4


def test_too_short() -> None:
    for data in (b"", b"E", MAGIC, MAGIC + b"\x01\x00" + b"\0" * 10):
        rejects(data, "short|truncated")


def test_oversized_frame_vs_limits() -> None:
    data = encode_frame(make_frame(50, 16))
    err = rejects(data, "limit", limits=FrameLimits(max_frame_bytes=len(data) - 1))
    assert isinstance(err, FrameTooLarge)
    decode_frame(data, limits=FrameLimits(max_frame_bytes=len(data)))
    for limits, match in [
        (FrameLimits(max_records=49), "n at offset 16"),
        (FrameLimits(max_dim=15), "dim at offset 20"),
        (FrameLimits(max_body_bytes=100), "body"),
    ]:
        assert isinstance(rejects(data, match, limits=limits), FrameTooLarge)
    meta_data = encode_frame(make_frame(50, 16, meta=True))
    rejects(meta_data, "meta_len", limits=FrameLimits(max_meta_bytes=10))


def test_declared_records_bigger_than_bytes_does_not_allocate() -> None:
    for data in (SMALL, SMALL_Z):
        # 100k x 60k float32 would be 24 GB; the default limits refuse it outright...
        rejects(rebuild(data, fix_lengths=False, n=100_000, dim=60_000, last_seq=2**63), "limit")
        # ...and with limits raised the body size mismatch refuses it without allocating.
        huge = FrameLimits(max_records=2**32, max_dim=2**32, max_body_bytes=2**62)
        tracemalloc.start()
        try:
            for n, dim in [(100_000, 60_000), (2**32 - 1, 2**32 - 1)]:
                lying = rebuild(data, fix_lengths=False, n=n, dim=dim, last_seq=2**63)
                rejects(lying, "body", limits=huge)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * 1024 * 1024


def test_zip_bomb_is_refused_quickly() -> None:
    f = make_frame(1, 4)  # declares a 36-byte body
    bomb = zlib.compress(raw_body_of(f) + b"\0" * 100_000_000, 1)
    assert len(bomb) < 1_000_000
    data = rebuild(encode_frame(f, compress="zlib"), body=bomb)
    t0 = time.perf_counter()
    err = rejects(data, "inflates beyond")
    assert time.perf_counter() - t0 < 0.5
    assert err.field == "body"


def test_compressed_body_lies() -> None:
    f = make_frame(2, 3)
    z = encode_frame(f, compress="zlib")
    raw = raw_body_of(f)
    rejects(rebuild(z, body=zlib.compress(raw[:-1])), "inflates to")
    rejects(rebuild(z, body=zlib.compress(raw)[:-3]), "incomplete|decompress")
    rejects(rebuild(z, body=zlib.compress(raw) + b"junk"), "after the end")
    rejects(rebuild(z, body=b"not zlib at all"), "decompress")


def test_trailing_bytes() -> None:
    err = rejects(SMALL + b"\0", "1 trailing bytes")
    assert err.offset == len(SMALL)
    rejects(SMALL_Z + b"xyz", "3 trailing bytes")


@pytest.mark.parametrize("compress", [None, "zlib"])
def test_body_validation(compress: str | None) -> None:
    f = make_frame(3, 2, meta=True)
    data = encode_frame(f, compress=compress)
    raw = raw_body_of(f)
    a, b, c = (int(s) for s in f.seqs)

    def body(seqs: list[int] | None = None, scores: list[float] | None = None) -> bytes:
        s = np.array(seqs or [a, b, c], "<u8").tobytes()
        sc = np.array(scores or [0.5, 0.5, 0.5], "<f4").tobytes()
        return s + raw[24:48] + sc + raw[60:]

    # The header's first/last must match the body's seqs, which must strictly increase.
    rejects(rebuild(data, raw_body=body([a + 1, b, c])), r"seqs\[0\]")
    rejects(rebuild(data, raw_body=body([a, b, c + 1])), r"seqs\[2\]")
    err = rejects(rebuild(data, raw_body=body([a, a, c])), r"seqs\[1\].*strictly increase")
    rejects(rebuild(data, raw_body=body([a, c, c])), r"seqs\[2\].*strictly increase")
    rejects(rebuild(data, raw_body=body([a, a - 1, c])), r"seqs\[1\]")
    if compress is None:
        assert err.offset == split(data)[0]["header_len"] + 8
    else:
        assert "decompressed" in str(err) and err.offset == 8
    err = rejects(rebuild(data, raw_body=body(scores=[0.5, 0.5, math.nan])), r"scores\[2\]")
    assert "not finite" in str(err)
    rejects(rebuild(data, raw_body=body(scores=[-math.inf, 0.5, 0.5])), r"scores\[0\]")
    if compress is None:
        assert err.offset == split(data)[0]["header_len"] + 16 * 3 + 4 * 2


@pytest.mark.parametrize("data", [SMALL, SMALL_Z], ids=["plain", "zlib"])
def test_header_validation(data: bytes) -> None:
    first = split(data)[0]["first_seq"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prev_seq": first}, "prev_seq"),
        ({"prev_seq": first + 1}, "prev_seq"),
        ({"n": 0}, "n at offset 16"),
        ({"dim": 0}, "dim at offset 20"),
        ({"flags": 0x80}, "flags at offset 8"),
        ({"flags": 0}, "meta_len"),
        ({"compression": 2}, "compression at offset 9"),
        ({"dtype": 0}, "dtype at offset 10"),
        ({"dtype": 4}, "dtype at offset 10"),
        ({"reserved": 1}, "reserved"),
        ({"reserved2": 1}, "reserved"),
        ({"reserved3": b"\0\0\1"}, "reserved"),
        ({"scale": 2.0}, "scale at offset 56"),
        ({"scale": math.nan}, "scale"),
        ({"dtype": 3, "scale": 0.0}, "scale"),
        ({"last_seq": 2**64 - 1, "n": 2**32 - 1}, "limit"),
        ({"first_seq": 12, "last_seq": 11}, "last_seq"),
    ]
    for fields, match in cases:
        rejects(rebuild(data, **fields), match)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("tenant", b"a/b"),
        ("tenant", b"+"),
        ("device", b"#"),
        ("device", b"a\0b"),
        ("device", b"x" * 65),
        ("device", b""),
        ("device", b"."),
        ("stream", b"a.b"),
        ("stream", b""),
        ("model", b"\xff"),
        ("model_version", b"v\x7f"),
    ],
)
def test_invalid_strings_in_header(name: str, value: bytes) -> None:
    data = rebuild(SMALL, strings={name: value})
    err = rejects(data, f"invalid {name}")
    assert err.field == name and err.offset is not None and err.offset >= HEADER_FIXED_SIZE
    with pytest.raises(WireError, match=f"invalid {name}"):
        peek_header(data)


def test_header_len_and_padding_checked() -> None:
    hl = split(SMALL)[0]["header_len"]
    rejects(rebuild(SMALL, header_len=hl + 8), "header_len")
    bad_pad = bytearray(SMALL)
    pad_at = hl - 1
    assert bad_pad[pad_at] == 0  # "acme"+"dev-01"+"vibration"+... leaves padding here
    bad_pad[pad_at] = 1
    data = bytes(bad_pad[:-4])
    rejects(data + struct.pack("<I", zlib.crc32(data)), "padding")


@pytest.mark.parametrize("data", [SMALL, SMALL_Z], ids=["plain", "zlib"])
def test_meta_validation(data: bytes) -> None:
    f = make_frame(2, 3)
    records = raw_body_of(f)

    def with_meta(meta_json: bytes, **kw: Any) -> bytes:
        return rebuild(data, raw_body=records + meta_json, meta_len=len(meta_json), **kw)

    decode_frame(with_meta(b'[{"a":1},{}]'))
    for bad, match in [
        (b'[{"a":1}]', "2 objects, got 1 items"),
        (b'[{"a":1},{},{}]', "got 3 items"),
        (b'{"a":1}', "got dict"),
        (b"[1,2]", r"meta\[0\]"),
        (b'[{"a":[1]},{}]', r"meta\[0\]\['a'\]"),
        (b'[{"a":{"b":1}},{}]', r"meta\[0\]"),
        (b'[{"a":NaN},{}]', "JSON"),
        (b'[{"a":1e999},{}]', "JSON"),
        (b'[{"a":1,"a":2},{}]', "duplicate"),
        (b'[{"a":1},{}', "JSON"),
        (b'[{"a":"\xff"},{}]', "JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
        (b'[{"a":' + b"9" * 10_000 + b"},{}]", "JSON"),
    ]:
        err = rejects(with_meta(bad), match)
        assert "offset" in str(err)


def test_wire_error_is_value_error_with_field_and_offset() -> None:
    err = rejects(rebuild(SMALL, n=0))
    assert isinstance(err, ValueError)
    assert (err.field, err.offset) == ("n", 16)
    assert str(err).startswith("n at offset 16: ")


def test_decode_rejects_non_bytes() -> None:
    for bad in ("a string", None, 42, [1, 2]):
        with pytest.raises(WireError):
            decode_frame(bad)  # type: ignore[arg-type]
        with pytest.raises(WireError):
            peek_header(bad)  # type: ignore[arg-type]
    strided = memoryview(bytearray(SMALL * 2))[::2]
    with pytest.raises(WireError, match="contiguous"):
        decode_frame(strided)
    released = memoryview(SMALL)
    released.release()
    with pytest.raises(WireError):
        decode_frame(released)


# --------------------------------------------------------------------------------------
# fuzzing: nothing but WireError ever escapes
# --------------------------------------------------------------------------------------

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = [
    SMALL,
    SMALL_Z,
    encode_frame(make_frame(1, 1, Dtype.INT8)),
    encode_frame(make_frame(3, 2, Dtype.FLOAT16, meta=True), compress="zlib"),
]


def decode_or_wire_error(data: bytes) -> Frame | None:
    try:
        return decode_frame(data)
    except WireError:
        return None


def peek_or_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        peek_header(data)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    decode_or_wire_error(data)
    peek_or_wire_error(data)


@FUZZ
@given(st.binary(min_size=74, max_size=400))
def test_fuzz_valid_prefix(rest: bytes) -> None:
    # Past magic/version so the fuzz reaches header parsing; with a matching CRC too.
    data = MAGIC + struct.pack("<H", FORMAT_VERSION) + rest
    peek_or_wire_error(data)
    decode_or_wire_error(data)
    decode_or_wire_error(data[:-4] + struct.pack("<I", zlib.crc32(data[:-4])))


mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just(0)),
)


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, value in edits:
        i = pos % (len(buf) + 1)
        if op == "set" and i < len(buf):
            buf[i] = value
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            buf.insert(i, value)
        elif op == "delete" and i < len(buf):
            del buf[i]
    return bytes(buf)


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(mutation, min_size=1, max_size=6), st.booleans())
def test_fuzz_mutated_frames(seed: bytes, edits: list[tuple[str, int, int]], fix_crc: bool) -> None:
    data = mutate(seed, edits)
    if fix_crc and len(data) >= 4:
        # Re-seal the CRC so the mutation reaches header and body validation.
        data = data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))
    peek_or_wire_error(data)
    frame = decode_or_wire_error(data)
    if frame is not None:  # whatever decodes must re-encode to a valid frame
        decode_frame(encode_frame(frame))


@FUZZ
@given(
    st.sampled_from(SEEDS),
    st.dictionaries(st.sampled_from(FIELDS[1:-1]), st.integers(0, 2**64 - 1), min_size=1, max_size=3),
)
def test_fuzz_header_fields(seed: bytes, fields: dict[str, int]) -> None:
    # Arbitrary values in numeric header fields, clipped to each field's width.
    fmt = dict(
        zip(
            FIELDS,
            [
                "4s",
                "H",
                "H",
                "B",
                "B",
                "B",
                "B",
                "H",
                "H",
                "I",
                "I",
                "Q",
                "Q",
                "Q",
                "Q",
                "d",
                "I",
                "I",
                "B",
                "B",
                "B",
                "B",
                "B",
                "3s",
            ],
            strict=True,
        )
    )
    packed = {}
    for name, value in fields.items():
        width = struct.calcsize("<" + fmt[name])
        packed[name] = float(value) if fmt[name] == "d" else value % (2 ** (8 * width))
    data = rebuild(seed, fix_lengths=False, **packed)
    peek_or_wire_error(data)
    decode_or_wire_error(data)


# --------------------------------------------------------------------------------------
# receipts and status
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "receipt",
    [
        Receipt(
            upload_id="acme.dev-01.1-1000",
            status=ReceiptStatus.COMMITTED,
            first_seq=1,
            last_seq=1000,
            stream_seq=42,
        ),
        Receipt(upload_id="acme.dev-01.1-1000", status="duplicate", first_seq=1, last_seq=1000),
        Receipt(upload_id="acme.dev-01.5-9", status="gap", first_seq=5, last_seq=9, expected_prev=2),
        Receipt(
            upload_id="acme.dev-01.5-9",
            status="rejected",
            first_seq=5,
            last_seq=9,
            reason="scores[3] at offset 120: nan is not finite",
        ),
        Receipt(
            upload_id="acme.dev-01.5-9",
            status="too_large",
            first_seq=5,
            last_seq=9,
            reason="frame is 2000000 bytes, limit is 1044480",
            limits=CloudLimits(max_frame_bytes=1044480, max_records=65536, max_dim=65536),
        ),
    ],
)
def test_receipt_round_trip(receipt: Receipt) -> None:
    data = encode_receipt(receipt)
    assert decode_receipt(data) == receipt
    assert decode_receipt(memoryview(data)) == receipt
    assert decode_receipt(data.decode()) == receipt
    assert b"null" not in data and json.loads(data)["v"] == 2


def test_receipt_v1_still_decodes() -> None:
    r = decode_receipt(b'{"v":1,"upload_id":"t.d.3-4","status":"committed","first_seq":3,"last_seq":4}')
    assert (r.v, r.status, r.limits) == (1, ReceiptStatus.COMMITTED, None)


def test_receipt_json_shape() -> None:
    limits = CloudLimits(max_frame_bytes=1044480, max_records=65536, max_dim=65536)
    r = Receipt(upload_id="t.d.3-4", status="committed", first_seq=3, last_seq=4, stream_seq=7, limits=limits)
    assert json.loads(encode_receipt(r)) == {
        "v": 2,
        "upload_id": "t.d.3-4",
        "status": "committed",
        "first_seq": 3,
        "last_seq": 4,
        "stream_seq": 7,
        "limits": {"max_frame_bytes": 1044480, "max_records": 65536, "max_dim": 65536},
    }


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"garbage",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"v":1}',
        b'{"v":4,"upload_id":"t.d.1-2","status":"committed","first_seq":1,"last_seq":2}',
        b'{"v":2,"upload_id":"t.d.1-2","status":"committed","first_seq":1,"last_seq":2,"set_aside":1}',
        b'{"v":3,"upload_id":"t.d.1-2","status":"committed","first_seq":1,"last_seq":2,"set_aside":3}',
        b'{"v":3,"upload_id":"t.d.1-2","status":"committed","first_seq":1,"last_seq":2,"set_aside":0}',
        b'{"upload_id":"t.d.1-2","status":"too_large","first_seq":1,"last_seq":2}',
        b'{"v":1,"upload_id":"t.d.1-2","status":"too_large","first_seq":1,"last_seq":2,'
        b'"limits":{"max_frame_bytes":4096,"max_records":1,"max_dim":1}}',
        b'{"upload_id":"t.d.1-2","status":"committed","first_seq":1,"last_seq":2,'
        b'"limits":{"max_frame_bytes":10,"max_records":1,"max_dim":1}}',
        b'{"upload_id":"t.d.1-2","status":"done","first_seq":1,"last_seq":2}',
        b'{"upload_id":"t.d.1-2","status":"committed","first_seq":"1","last_seq":2}',
        b'{"upload_id":"t.d.1-2","status":"committed","first_seq":1.0,"last_seq":2}',
        b'{"upload_id":"t.d.1-2","status":"committed","first_seq":-1,"last_seq":2}',
        b'{"upload_id":"t.d.1-2","status":"committed","first_seq":1,"last_seq":2,"x":1}',
        b'{"upload_id":"t.d.1-2","status":"committed","first_seq":1,"last_seq":3}',
        b'{"upload_id":"t/d.1-2","status":"committed","first_seq":1,"last_seq":2}',
        b'{"upload_id":"t.d.1-2","status":"gap","first_seq":1,"last_seq":2}',
        b'{"upload_id":"t.d.1-2","status":"rejected","first_seq":1,"last_seq":2}',
        b"[" * 100_000,
        b"{" + b" " * 70_000 + b"}",
    ],
)
def test_receipt_rejects(bad: bytes) -> None:
    with pytest.raises(WireError):
        decode_receipt(bad)


def test_receipt_v3_carries_set_aside() -> None:
    r = decode_receipt(
        b'{"v":3,"upload_id":"t.d.1-9","status":"duplicate","first_seq":1,"last_seq":9,"set_aside":4}'
    )
    assert r.set_aside == 4 and decode_receipt(encode_receipt(r)) == r


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


def test_status_round_trip_and_defaults() -> None:
    s = DeviceStatus(
        state="online",
        ts_ms=1_700_000_000_000,
        backlog_records=12,
        backlog_bytes=6144,
        oldest_age_s=3.5,
        evictions={"low_score": 3, "oldest": 1},
        last_receipt_ms=1_699_999_999_000,
        model_version="1.2.3",
    )
    assert decode_status(encode_status(s)) == s
    offline = DeviceStatus(state="offline", ts_ms=0)
    assert json.loads(encode_status(offline)) == {
        "v": 1,
        "state": "offline",
        "ts_ms": 0,
        "backlog_records": 0,
        "backlog_bytes": 0,
        "evictions": {},
    }
    assert decode_status(encode_status(offline)).evictions == {}


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"{}",
        b'{"state":"sleeping","ts_ms":1}',
        b'{"state":"online"}',
        b'{"state":"online","ts_ms":-1}',
        b'{"state":"online","ts_ms":1,"evictions":{"x":-1}}',
        b'{"state":"online","ts_ms":1,"oldest_age_s":-1}',
        b'{"state":"online","ts_ms":1,"oldest_age_s":NaN}',
        b'{"state":"online","ts_ms":1,"extra":true}',
        b'{"v":2,"state":"online","ts_ms":1}',
        b"\x00\x01",
    ],
)
def test_status_rejects(bad: bytes) -> None:
    with pytest.raises(WireError):
        decode_status(bad)


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_fuzz_json_messages(data: bytes | str) -> None:
    for decode in (decode_receipt, decode_status, decode_results):
        with contextlib.suppress(WireError):
            decode(data)


# -- tier-two results ----------------------------------------------------------------------


def _result_frame(n: int = 5) -> Frame:
    return decode_frame(
        encode_frame_parts(
            tenant="acme",
            device="press-7",
            prev_seq=0,
            stream="vibration",
            model="pf",
            model_version="1",
            schema_version=1,
            created_ms=1,
            dtype=Dtype.INT8,
            scale=0.5,
            dim=4,
            seqs=list(range(11, 11 + n)),
            scores=[0.25] * n,
            times_ms=[1700000000000 + i for i in range(n)],
            feature_blobs=[bytes(4)] * n,
        )
    )


def _results_doc(f: Frame, rows: slice = slice(None), **kw: Any) -> dict[str, Any]:
    n = len(f.seqs[rows])
    data = encode_results(
        f,
        rows,
        ["healthy", "imbalance"],
        np.arange(n) % 2,
        np.linspace(0.5, 1.0, n, dtype=np.float32),
        part=kw.pop("part", 0),
        parts=kw.pop("parts", 1),
        model="tier2",
        model_version="1.0.0",
        worker="w0",
        produced_ms=5,
    )
    return {**json.loads(data), **kw}


def test_results_round_trip_from_numpy_columns() -> None:
    f = _result_frame()
    r = decode_results(json.dumps(_results_doc(f, slice(2, 5), part=1, parts=2)))
    assert r.upload_id == "acme.press-7.11-15" and (r.part, r.parts) == (1, 2)
    assert r.seqs == [13, 14, 15] and r.times_ms == [1700000000002, 1700000000003, 1700000000004]
    assert r.labels == ["healthy", "imbalance", "healthy"] and r.confidences == [0.5, 0.75, 1.0]
    assert r.scores == [0.25] * 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"labels": ["healthy"]}, "equally long"),
        ({"device": "other"}, "is not of acme/other"),
        ({"seqs": [1, 2, 3, 4, 5]}, "outside the upload 11-15"),
        ({"confidences": [1.5] * 5}, "less than or equal to 1"),
        ({"part": 2, "parts": 2}, "part 2 of 2"),
        ({"seqs": [11, 12, 13, 14, -15]}, "greater than or equal to 0"),
        ({"upload_id": "acme.press-7"}, "upload"),
        ({"extra": 1}, "Extra inputs"),
    ],
)
def test_results_reject(change: dict[str, Any], match: str) -> None:
    doc = {**_results_doc(_result_frame()), **change}
    with pytest.raises(WireError, match=match):
        decode_results(json.dumps(doc))


def test_results_refuse_non_finite_columns() -> None:
    f = _result_frame()
    bad = Frame(**{k: getattr(f, k) for k in Frame.__slots__ if k != "scores"}, scores=np.full(5, np.nan))
    with pytest.raises(ValueError):
        _results_doc(bad)


@pytest.mark.parametrize("seed", range(20))
def test_frame_overhead_bounds_every_encoded_frame(seed: int) -> None:
    """The device cuts frames by this bound (edge_agent/store.py), so no frame it cuts for a
    limit may encode larger than the limit."""
    rng = np.random.default_rng(seed)
    n, dim = int(rng.integers(1, 50)), int(rng.integers(1, 300))
    dtype = [Dtype.FLOAT32, Dtype.FLOAT16, Dtype.INT8][seed % 3]
    meta = None
    if seed % 2:
        meta = tuple(
            {"site": "plänt-" + "x" * int(rng.integers(0, 30)), "n": int(rng.integers(0, 9))}
            for _ in range(n)
        )
    f = Frame(
        tenant="t" * 64,
        device="d" * 64,
        prev_seq=0,
        stream="s" * int(rng.integers(1, 64)),
        model="m" * int(rng.integers(0, 40)),
        model_version="1.2.3",
        schema_version=1,
        created_ms=1,
        seqs=np.arange(1, n + 1, dtype=np.uint64),
        scores=np.zeros(n, dtype=np.float32),
        times_ms=np.ones(n, dtype=np.uint64),
        features=np.zeros((n, dim), dtype=dtype.np_dtype),
        scale=0.5 if dtype is Dtype.INT8 else 1.0,
        meta=meta,
    )
    # the device charges metadata as ASCII JSON (json.dumps' default), never less than UTF-8
    meta_len = sum(len(json.dumps(m, separators=(",", ":"))) for m in meta) if meta else 0
    bound = frame_overhead(stream=f.stream, model=f.model, model_version=f.model_version)
    bound += n * (dim * dtype.itemsize + RECORD_WIRE_OVERHEAD) + meta_len
    assert len(encode_frame(f)) <= bound
