"""Per-record metadata: the JSON array at the end of a frame's body.

Each record may carry a flat object of strict-JSON scalars (string, number, bool, null).
Encoding refuses what strict JSON cannot say (NaN, infinities, lone surrogates); decoding
refuses non-finite numbers, duplicate keys, nesting and a count that is not the frame's n.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from edge_tier.errors import WireError
from edge_tier.wire.ids import _short

__all__ = ["MetaValue", "check_meta"]

MetaValue = str | int | float | bool | None


def check_meta(item: Mapping[str, MetaValue]) -> None:
    """One record's metadata must be a flat object of strict-JSON scalars."""
    _check_meta_item(0, item)
    try:
        json.dumps(item, allow_nan=False)
    except (ValueError, TypeError) as exc:
        raise WireError(f"meta not encodable as strict JSON: {exc}", field="meta") from exc


def _encode_meta(meta: Sequence[Mapping[str, MetaValue]], n: int) -> bytes:
    if isinstance(meta, str | bytes) or len(meta) != n:
        raise WireError(f"meta: expected a sequence of {n} dicts", field="meta")
    for i, item in enumerate(meta):
        _check_meta_item(i, item)
    try:
        text = json.dumps(list(meta), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (ValueError, TypeError) as exc:  # NaN/inf, lone surrogates
        raise WireError(f"meta not encodable as strict JSON: {exc}", field="meta") from exc


def _check_meta_item(i: int, item: object, where: str = "") -> None:
    if not isinstance(item, Mapping):
        raise WireError(f"meta[{i}]{where}: expected an object, got {type(item).__name__}")
    for key, value in item.items():
        if not isinstance(key, str):
            raise WireError(f"meta[{i}]{where}: key {_short(key)} is not a string")
        if value is not None and not isinstance(value, str | int | float):
            raise WireError(
                f"meta[{i}][{_short(key)}]{where}: value must be a string, number, bool or "
                f"null, got {type(value).__name__}"
            )


def _json_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" parses to inf
        raise ValueError(f"number {text[:40]} out of range")
    return value


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


def _decode_meta(raw: bytes | memoryview, n: int, where: str) -> tuple[dict[str, MetaValue], ...]:
    try:
        items = json.loads(
            bytes(raw).decode("utf-8"),
            parse_constant=_json_constant,
            parse_float=_json_float,
            object_pairs_hook=_json_object,
        )
    # RecursionError: deeply nested arrays; ValueError covers JSONDecodeError, bad UTF-8,
    # and int strings longer than sys.get_int_max_str_digits().
    except (ValueError, RecursionError) as exc:
        raise WireError(f"meta{where}: not valid JSON: {_short(str(exc), 120)}") from exc
    if not isinstance(items, list) or len(items) != n:
        got = f"{len(items)} items" if isinstance(items, list) else type(items).__name__
        raise WireError(f"meta{where}: expected a JSON array of {n} objects, got {got}")
    for i, item in enumerate(items):
        _check_meta_item(i, item, where)
    return tuple(items)
