"""Strict JSON documents: the decoding helper and the field types the JSON messages share.

:func:`decode_json_model` bounds the size before it parses and turns every validation
failure into a short :class:`WireError`. This module imports no other part of the wire but
its ids, so ``edge_tier.control`` (whose ``ControlState`` the device status embeds) can use
it without an import cycle.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import BaseModel, Field, ValidationError

from edge_tier.errors import FrameTooLarge, WireError
from edge_tier.wire.ids import U64_MAX

__all__ = ["U64", "decode_json_model"]

# strict=True: JSON "5" or 5.0 or true is not a seq number.
U64 = Annotated[int, Field(strict=True, ge=0, le=U64_MAX)]
_MAX_JSON_BYTES = 64 * 1024
_M = TypeVar("_M", bound=BaseModel)


def decode_json_model(
    cls: type[_M], data: bytes | bytearray | memoryview | str, max_bytes: int = _MAX_JSON_BYTES
) -> _M:
    """``data`` as a ``cls``: WireError if it is not bytes or text or does not validate,
    FrameTooLarge if it is over ``max_bytes``."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, bytes | bytearray | str):
        raise WireError(f"{cls.__name__}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise FrameTooLarge(f"{cls.__name__}: {len(data)} bytes, limit is {max_bytes}")
    try:
        return cls.model_validate_json(data)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
        raise WireError(f"invalid {cls.__name__}: {errs}") from exc
