"""The control channel's wire format: documents signed whole, freshness and model order, and
decoders that never crash."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given
from hypothesis import strategies as st

from edge_tier.control import (
    CLOCK_SKEW_MS,
    ControlDoc,
    ControlRefused,
    ModelRefused,
    SignedControl,
    check_fresh,
    check_model,
    decode_control,
    encode_control,
    model_update,
    sign_control,
    verify_control,
)
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.wire import WireError

KEY = ed25519.Ed25519PrivateKey.generate()
NOW = 1_764_612_000_000
DAY = 24 * 3600 * 1000


@pytest.fixture(scope="module")
def update() -> tuple[object, list[bytes]]:
    return model_update("acme", DEFAULT_MANIFEST, counter=3, chunk_bytes=4096)


def _doc(generation: int = 10, issued: int = NOW, **kw: object) -> ControlDoc:
    return ControlDoc.model_validate(
        {"tenant": "acme", "device": "d1", "generation": generation, "issued_ms": issued,
         "expires_ms": issued + DAY, **kw}
    )  # fmt: skip


def test_an_update_names_every_chunk_and_the_manifest_the_device_loads(update) -> None:  # type: ignore[no-untyped-def]
    u, chunks = update
    data = (DEFAULT_MANIFEST.parent / "prefilter.tflite").read_bytes()
    assert b"".join(chunks) == data and len(chunks) == len(u.chunks) == -(-len(data) // 4096)
    entry = u.manifest["prefilter"]
    assert entry["sha256"] == u.sha256 and entry["file"] == "prefilter.tflite" and u.counter == 3
    # the whole entry travels: window, preprocessing, tensors, score, embedding
    assert entry["window"]["shape"] == [1024] and entry["preprocess"]["name"] == "spectrum"
    assert entry["score"]["tensor"] == "score" and entry["embedding"]["tensor"] == "embedding"


def test_only_the_fleet_key_signing_the_whole_document_for_this_device_is_accepted(update) -> None:  # type: ignore[no-untyped-def]
    u, _ = update
    other = ed25519.Ed25519PrivateKey.generate()
    doc = _doc(config={"threshold": 0.3}, model=u)
    signed = sign_control(KEY, doc)
    assert verify_control(KEY.public_key(), signed, "acme", "d1") == doc
    with pytest.raises(ControlRefused, match="signature does not match"):
        verify_control(other.public_key(), signed, "acme", "d1")
    # the config changed, or the generation: every byte is signed
    for forged in (signed.signed.replace('"threshold":0.3', '"threshold":0.9'),
                   signed.signed.replace('"generation":10', '"generation":11')):  # fmt: skip
        assert forged != signed.signed
        with pytest.raises(ControlRefused, match="signature does not match"):
            verify_control(KEY.public_key(), signed.model_copy(update={"signed": forged}), "acme", "d1")
    with pytest.raises(ControlRefused, match="signed for acme/d1, this device is acme/d2"):
        verify_control(KEY.public_key(), signed, "acme", "d2")
    with pytest.raises(ControlRefused, match="this device is globex/d1"):
        verify_control(KEY.public_key(), signed, "globex", "d1")
    with pytest.raises(ControlRefused, match="signature"):
        verify_control(KEY.public_key(), signed.model_copy(update={"signature": "not base64!"}), "acme", "d1")
    # signed, but not a document (a v1 model statement, say)
    junk = SignedControl(signed='{"v":1}', signature=_sig('{"v":1}'))
    with pytest.raises(ControlRefused, match="signed, but not a valid document"):
        verify_control(KEY.public_key(), junk, "acme", "d1")


def test_a_document_is_fresh_only_above_the_applied_generation_and_before_it_expires() -> None:
    old = _doc(10)
    applied = (old, sign_control(KEY, old))
    new = _doc(11, NOW + 1000)
    assert check_fresh(new, sign_control(KEY, new), applied, NOW + 2000) is True
    assert check_fresh(old, applied[1], applied, NOW) is False  # the same bytes again: nothing to do
    other = _doc(10, config={"paused": True})
    with pytest.raises(ControlRefused, match="generation 10 is applied already, with other contents"):
        check_fresh(other, sign_control(KEY, other), applied, NOW)
    older = _doc(9)
    with pytest.raises(ControlRefused, match="generation 9 is older than the applied 10"):
        check_fresh(older, sign_control(KEY, older), applied, NOW)
    # expiry: within the skew it passes, beyond it not
    assert check_fresh(new, sign_control(KEY, new), None, new.expires_ms + CLOCK_SKEW_MS)
    with pytest.raises(ControlRefused, match="generation 11 expired"):
        check_fresh(new, sign_control(KEY, new), None, new.expires_ms + CLOCK_SKEW_MS + 1)
    # a device whose clock says 1970 (no RTC): now is at least when the applied document was issued
    stale = _doc(12, NOW - 3 * DAY)  # expired two days before the applied one was issued
    late = _doc(5, NOW)
    applied = (late.model_copy(update={"issued_ms": NOW}), sign_control(KEY, late))
    with pytest.raises(ControlRefused, match="expired"):
        check_fresh(stale, sign_control(KEY, stale), applied, 0)
    assert check_fresh(new, sign_control(KEY, new), applied, 0)


def test_a_model_older_than_the_installed_one_needs_a_signed_rollback(update) -> None:  # type: ignore[no-untyped-def]
    u, _ = update  # counter 3
    check_model(u, False, None)
    check_model(u, False, (2, "a" * 64))
    check_model(u, False, (3, u.sha256))  # the installed one again (healing a damaged copy)
    with pytest.raises(
        ModelRefused, match="counter 3, below the installed 4; only a document signed with rollback"
    ):
        check_model(u, False, (4, "a" * 64))
    check_model(u, True, (4, "a" * 64))
    with pytest.raises(ModelRefused, match="as the installed aaaaaaaaaaaa, but another sha256"):
        check_model(u, True, (3, "a" * 64))


def test_a_document_whose_parts_disagree_is_invalid(update) -> None:  # type: ignore[no-untyped-def]
    u, _ = update
    with pytest.raises(ValueError, match="chunk hashes"):
        type(u).model_validate({**u.model_dump(), "chunks": u.chunks[:-1]})
    with pytest.raises(ValueError, match=r"manifest\.prefilter\.sha256"):
        type(u).model_validate({**u.model_dump(), "sha256": "1" * 64})
    with pytest.raises(ValueError, match="expires_ms"):
        _doc(expires_ms=NOW)
    with pytest.raises(ValueError, match=r"model\.tenant 'acme' is not the document's 'globex'"):
        _doc(tenant="globex", model=u)
    with pytest.raises(ValueError, match="device id"):
        _doc(device="a/b")


def test_a_document_round_trips_and_refusals_say_what(update) -> None:  # type: ignore[no-untyped-def]
    u, _ = update
    signed = sign_control(KEY, _doc(config={"threshold": 0.3, "paused": True}, model=u, rollback=True))
    assert decode_control(encode_control(signed)) == signed
    assert decode_control(encode_control(signed)).unverified().model == u
    for bad, what in (
        (b"{", "invalid SignedControl"),
        (json.dumps({"v": 1, "generation": 1}).encode(), "SignedControl"),  # the old unsigned format
        (json.dumps({"signed": "{}"}).encode(), "signature"),
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
def test_verify_control_takes_any_signed_json_calmly(value: object) -> None:
    # even what the fleet key signed goes through the same checks: ControlRefused, never a crash
    body = {**_doc().model_dump(), "config": value} if isinstance(value, dict) else value
    text = json.dumps(body)
    signed = SignedControl(signed=text, signature=_sig(text))
    with contextlib.suppress(ControlRefused):
        verify_control(KEY.public_key(), signed, "acme", "d1")


def _sig(text: str) -> str:
    import base64

    return base64.b64encode(KEY.sign(text.encode())).decode()


def test_a_model_too_big_or_a_missing_manifest_is_refused_with_the_file(tmp_path: Path) -> None:
    from edge_tier.model.manifest import ManifestError

    with pytest.raises(ManifestError, match="manifest not found"):
        model_update("acme", tmp_path / "nope.json")
