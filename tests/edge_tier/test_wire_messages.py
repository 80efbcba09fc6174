"""Tests for edge_tier.wire.messages: receipts, status and tier-two results, and fuzzing their
decoders."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_tier.wire import (
    CloudLimits,
    DeviceStatus,
    Dtype,
    Frame,
    Receipt,
    ReceiptStatus,
    WireError,
    decode_frame,
    decode_receipt,
    decode_results,
    decode_status,
    encode_frame_parts,
    encode_receipt,
    encode_results,
    encode_status,
    encode_stored_receipt,
)
from tests.edge_tier.test_wire_kit import FUZZ

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


@given(
    tenant=st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True),
    first=st.integers(1, 2**63),
    n=st.integers(0, 2**20),
    stream_seq=st.integers(0, 2**64 - 1),
    status=st.sampled_from([ReceiptStatus.COMMITTED, ReceiptStatus.DUPLICATE]),
    limits=st.builds(
        CloudLimits,
        max_frame_bytes=st.integers(1024, 2**40),
        max_records=st.integers(1, 2**20),
        max_dim=st.integers(1, 2**20),
    ),
)
def test_stored_receipt_is_the_models_encoding_byte_for_byte(
    tenant: str, first: int, n: int, stream_seq: int, status: ReceiptStatus, limits: CloudLimits
) -> None:
    last = min(first + n, 2**64 - 1)
    upload_id = f"{tenant}.dev-{tenant}.{first}-{last}"
    model = Receipt(
        upload_id=upload_id,
        status=status,
        first_seq=first,
        last_seq=last,
        stream_seq=stream_seq,
        limits=limits,
    )
    fast = encode_stored_receipt(upload_id, status, first, last, stream_seq, limits)
    assert fast == encode_receipt(model)
    assert decode_receipt(fast) == model


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


# --------------------------------------------------------------------------------------
# tier-two results
# --------------------------------------------------------------------------------------


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


def _regressor_doc(f: Frame, values: np.ndarray) -> dict[str, Any]:
    n = len(values)
    data = encode_results(
        f, slice(None), ["load_kn"], np.zeros(n, np.int64), np.zeros(n, np.float32), part=0, parts=1,
        model="ridge", model_version="2", worker="w0", produced_ms=5, values=values,
    )  # fmt: skip
    return dict(json.loads(data))


def test_results_of_a_regressor_carry_values_as_v2_and_classifiers_stay_v1() -> None:
    f = _result_frame()
    doc = _regressor_doc(f, np.array([0.1, -2.5, 1e-7, 12345.678, 3.0], np.float32))
    assert doc["v"] == 2 and doc["values"] == [0.1, -2.5, 1e-07, 12345.68, 3.0]  # float32's digits, no more
    r = decode_results(json.dumps(doc))
    assert r.values == doc["values"] and r.labels == ["load_kn"] * 5 and r.confidences == [0.0] * 5
    classifier = _results_doc(f)
    assert classifier["v"] == 1 and "values" not in classifier
    assert decode_results(json.dumps(classifier)).values is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"v": 1}, "values come with v 2"),
        ({"values": None}, "values come with v 2"),
        ({"values": [1.0, 2.0]}, "values has 2 entries, seqs 5"),
        ({"values": [1.0, 2.0, "x", 4.0, 5.0]}, "valid number"),
        ({"values": [1.0, 2.0, float("nan"), 4.0, 5.0]}, "finite number"),
    ],
)
def test_regressor_results_reject(change: dict[str, Any], match: str) -> None:
    doc = {**_regressor_doc(_result_frame(), np.arange(5, dtype=np.float32)), **change}
    with pytest.raises(WireError, match=match):
        decode_results(json.dumps(doc))
