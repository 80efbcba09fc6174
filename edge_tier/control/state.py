"""The device's side of the control channel: how it applied its control document.

``ControlState`` travels in the device status (``edge_tier.wire.DeviceStatus.control``),
``ModelState`` in it says where a model update stands. Because the wire's messages embed
these models, this module imports only the wire's leaf modules (ids, jsonmodel), never
``edge_tier.wire`` itself: either package can then be imported first.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_tier.wire.jsonmodel import U64

__all__ = ["ControlState", "ModelState"]


class ModelState(BaseModel):
    """Where the device's model update stands (the ``model`` of a control document)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state: Literal["active", "downloading", "refused", "failed"]
    stream: Annotated[str, Field(max_length=64)] | None = None  # whose model ("prefilter": the default)
    version: Annotated[str, Field(max_length=64)] | None = None  # of the update in question
    sha256: Annotated[str, Field(max_length=64)] | None = None
    chunks_have: U64 = 0
    chunks_total: U64 = 0
    chunks_fetched: U64 = 0  # received since the agent started (a resumed transfer fetches only the rest)
    error: Annotated[str, Field(max_length=1024)] | None = None


class ControlState(BaseModel):
    """The device's acknowledgement of its control document (et/{tenant}/{device}/control)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation: U64 = 0  # of the last document applied
    applied_ms: U64 | None = None
    error: Annotated[str, Field(max_length=1024)] | None = None  # why the newest document was refused
    paused: bool = False
    threshold: Annotated[float, Field(allow_inf_nan=False)] | None = None  # the default model's
    thresholds: dict[str, float] = Field(default_factory=dict)  # each stream model's
    upload_bytes_per_s: U64 | None = None
    model: ModelState | None = None
