"""The control channel's wire format: signed model updates, and decoders that never crash."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given
from hypothesis import strategies as st

from edge_tier.control import (
    ControlDoc,
    ModelRefused,
    decode_control,
    encode_control,
    model_update,
    sign_model,
    verify_model,
)
from edge_tier.wire import WireError
from models.manifest import DEFAULT_MANIFEST


@pytest.fixture(scope="module")
def update() -> tuple[object, list[bytes]]:
    return model_update("acme", DEFAULT_MANIFEST, chunk_bytes=4096)


def test_an_update_names_every_chunk_and_the_manifest_the_device_loads(update) -> None:  # type: ignore[no-untyped-def]
    u, chunks = update
    data = (DEFAULT_MANIFEST.parent / "prefilter.tflite").read_bytes()
    assert b"".join(chunks) == data and len(chunks) == len(u.chunks) == -(-len(data) // 4096)
    entry = u.manifest["prefilter"]
    assert entry["sha256"] == u.sha256 and entry["file"] == "prefilter.tflite"
    assert u.manifest["signal"]["window"] == 1024


def test_only_the_fleet_key_signing_these_bytes_for_this_tenant_is_accepted(update) -> None:  # type: ignore[no-untyped-def]
    u, _ = update
    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    signed = sign_model(key, u)
    assert verify_model(key.public_key(), signed, "acme") == u
    with pytest.raises(ModelRefused, match="signature does not match"):
        verify_model(other.public_key(), signed, "acme")
    # one character of the statement changed (another file's sha256): the signature fails
    forged = signed.model_copy(update={"update": signed.update.replace(u.sha256, "0" * 64)})
    with pytest.raises(ModelRefused, match="signature does not match"):
        verify_model(key.public_key(), forged, "acme")
    with pytest.raises(ModelRefused, match="signed for tenant 'acme'"):
        verify_model(key.public_key(), signed, "globex")
    with pytest.raises(ModelRefused, match="signature"):
        verify_model(key.public_key(), signed.model_copy(update={"signature": "not base64!"}), "acme")


def test_an_update_whose_parts_disagree_is_invalid(update) -> None:  # type: ignore[no-untyped-def]
    u, _ = update
    with pytest.raises(ValueError, match="chunk hashes"):
        type(u).model_validate({**u.model_dump(), "chunks": u.chunks[:-1]})
    with pytest.raises(ValueError, match=r"manifest\.prefilter\.sha256"):
        type(u).model_validate({**u.model_dump(), "sha256": "1" * 64})


def test_a_document_round_trips_and_refusals_say_what(update) -> None:  # type: ignore[no-untyped-def]
    u, _ = update
    doc = ControlDoc(generation=7, config={"threshold": 0.3, "paused": True}, model=sign_model(
        ed25519.Ed25519PrivateKey.generate(), u))  # fmt: skip
    assert decode_control(encode_control(doc)) == doc
    for bad, what in (
        (b"{", "invalid ControlDoc"),
        (json.dumps({"generation": 0}).encode(), "generation"),
        (json.dumps({"generation": 1, "config": {"threshold": 2}}).encode(), "config.threshold"),
        (json.dumps({"generation": 1, "config": {"rate": 1}}).encode(), "config.rate"),
        (b"x" * (2 << 20), "limit"),
    ):
        with pytest.raises(WireError, match=what):
            decode_control(bad)


@given(st.binary(max_size=2048))
def test_decode_control_never_raises_anything_but_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode_control(data)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                    max_leaves=20))  # fmt: skip
def test_decode_control_takes_any_json_calmly(value: object) -> None:
    doc = {"generation": 1, "config": value} if isinstance(value, dict) else value
    with contextlib.suppress(WireError):
        decode_control(json.dumps(doc))


def test_a_model_too_big_or_a_missing_manifest_is_refused_with_the_file(tmp_path: Path) -> None:
    from models.manifest import ManifestError

    with pytest.raises(ManifestError, match="manifest not found"):
        model_update("acme", tmp_path / "nope.json")
