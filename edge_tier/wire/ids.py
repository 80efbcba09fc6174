"""Ids: tenant, device and stream ids, and the upload id that names one frame.

Ids become MQTT topic levels and NATS subject tokens, so they are restricted to a charset
that is safe in both; the upload id ``{tenant}.{device}.{first_seq}-{last_seq}`` is the
idempotency key of an upload (JetStream's ``Nats-Msg-Id``) and parses back unambiguously.
"""

from __future__ import annotations

import re

import numpy as np

from edge_tier.errors import WireError

__all__ = [
    "ID_MAX_LEN",
    "ID_PATTERN",
    "U64_MAX",
    "UPLOAD_ID_PATTERN",
    "parse_upload_id",
    "upload_id",
    "validate_id",
]

ID_MAX_LEN = 64
U64_MAX = 2**64 - 1
# Ids become MQTT topic levels and NATS subject tokens: no '/', '+', '#', '.', '*', '>',
# whitespace or NUL can appear, so the charset is the safe intersection.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PRINTABLE_RE = re.compile(r"[\x20-\x7e]{0,64}")
_SEQ_RE = re.compile(r"0|[1-9][0-9]{0,19}")


def _short(value: object, limit: int = 80) -> str:
    """repr() cut short so a hostile 10 MB value cannot flood an error message or log."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def validate_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid ``kind`` id (tenant, device, stream), else WireError."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise WireError(
            f"{kind} id {_short(value)}: only letters, digits, '_' and '-' allowed (1..{ID_MAX_LEN} chars)"
        )
    return value


def _validate_printable(kind: str, value: str) -> str:
    if not isinstance(value, str) or _PRINTABLE_RE.fullmatch(value) is None:
        raise WireError(f"{kind} {_short(value)}: must be 0..64 printable ASCII characters")
    return value


def _check_uint(name: str, value: object, max_value: int) -> int:
    # bool is an int subclass; a True seq is always a bug.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise WireError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if not 0 <= v <= max_value:
        raise WireError(f"{name} {v} out of range 0..{max_value}")
    return v


def upload_id(tenant: str, device: str, first_seq: int, last_seq: int) -> str:
    """The idempotency key of one upload: ``{tenant}.{device}.{first_seq}-{last_seq}``.

    It is JetStream's ``Nats-Msg-Id``; ids contain no '.', so it parses back unambiguously.
    """
    validate_id("tenant", tenant)
    validate_id("device", device)
    first = _check_uint("first_seq", first_seq, U64_MAX)
    last = _check_uint("last_seq", last_seq, U64_MAX)
    if first > last:
        raise WireError(f"first_seq {first} > last_seq {last}")
    return f"{tenant}.{device}.{first}-{last}"


# The shapes above as JSON Schema / OpenAPI patterns, so the API's document and the code share one
# vocabulary. An upload id's range order (first <= last <= U64_MAX) is checked by parse_upload_id only.
ID_PATTERN = f"^{_ID_RE.pattern}$"
UPLOAD_ID_PATTERN = rf"^{_ID_RE.pattern}\.{_ID_RE.pattern}\.(?:{_SEQ_RE.pattern})-(?:{_SEQ_RE.pattern})$"


def parse_upload_id(s: str) -> tuple[str, str, int, int]:
    """Inverse of :func:`upload_id`; only the canonical form is accepted (no leading zeros)."""
    if not isinstance(s, str) or len(s) > 2 * ID_MAX_LEN + 2 + 41:
        raise WireError(f"upload id {_short(s)}: not a string of plausible length")
    parts = s.split(".")
    if len(parts) != 3:
        raise WireError(f"upload id {_short(s)}: expected 'tenant.device.first-last'")
    tenant, device, seqs = parts
    validate_id("tenant", tenant)
    validate_id("device", device)
    first_s, sep, last_s = seqs.partition("-")
    if not sep or _SEQ_RE.fullmatch(first_s) is None or _SEQ_RE.fullmatch(last_s) is None:
        raise WireError(f"upload id {_short(s)}: seq range must be 'first-last' in decimal")
    first, last = int(first_s), int(last_s)
    if last > U64_MAX or first > last:
        raise WireError(f"upload id {_short(s)}: bad seq range {first}-{last}")
    return tenant, device, first, last
