"""Tests for edge_tier.wire.header: the documented layout, every header rejection (through
decode_frame and peek_header) and the frame_overhead bound."""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any

import numpy as np
import pytest

from edge_tier.wire import (
    HEADER_FIXED_SIZE,
    MAGIC,
    RECORD_WIRE_OVERHEAD,
    Dtype,
    Frame,
    UnsupportedVersion,
    WireError,
    encode_frame,
    frame_overhead,
    peek_header,
)
from tests.edge_tier.test_wire_kit import SMALL, SMALL_Z, make_frame, raw_body_of, rebuild, rejects, split

# --------------------------------------------------------------------------------------
# dtypes and layout
# --------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("seed", range(20))
def test_frame_overhead_bounds_every_encoded_frame(seed: int) -> None:
    """The device cuts frames by this bound (edge_agent.store), so no frame it cuts for a
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


# --------------------------------------------------------------------------------------
# header rejections
# --------------------------------------------------------------------------------------


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


def test_wire_error_is_value_error_with_field_and_offset() -> None:
    err = rejects(rebuild(SMALL, n=0))
    assert isinstance(err, ValueError)
    assert (err.field, err.offset) == ("n", 16)
    assert str(err).startswith("n at offset 16: ")
