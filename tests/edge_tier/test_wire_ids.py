"""Tests for edge_tier.wire.ids: tenant, device and stream ids, and upload ids."""

from __future__ import annotations

import pytest

from edge_tier.wire import WireError, parse_upload_id, upload_id, validate_id


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
