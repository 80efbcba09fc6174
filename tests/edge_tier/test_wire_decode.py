"""Tests for edge_tier.wire.decode: every documented rejection, truncation at every offset,
flipped bytes, limits checked before allocating, and fuzzing (nothing but WireError escapes)."""

from __future__ import annotations

import contextlib
import math
import struct
import time
import tracemalloc
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_tier.wire import (
    FORMAT_VERSION,
    MAGIC,
    ChecksumMismatch,
    Dtype,
    Frame,
    FrameLimits,
    FrameTooLarge,
    WireError,
    decode_frame,
    encode_frame,
    peek_header,
)
from tests.edge_tier.test_wire_kit import (
    FIELDS,
    FUZZ,
    SMALL,
    SMALL_Z,
    assert_frames_equal,
    make_frame,
    raw_body_of,
    rebuild,
    rejects,
    split,
)

# --------------------------------------------------------------------------------------
# what decode_frame accepts
# --------------------------------------------------------------------------------------


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
