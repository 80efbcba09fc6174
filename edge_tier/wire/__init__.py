"""The one wire format shared by device and cloud.

Three things travel over MQTT (see docs/wire-format.md for the byte-level reference):

* the upload **frame** (device -> cloud, ``et/{tenant}/{device}/up``): binary, versioned,
  little-endian, CRC32-protected; a batch of records (seq, score, time, feature vector, meta);
* the **receipt** (cloud -> device, ``.../receipt``): JSON, says whether a frame is durably in
  JetStream so the device may delete it;
* the device **status** (retained, ``.../status``): JSON.

Decoding is strict and total: for *any* input bytes the decoders either return a value or
raise :class:`WireError` (a ``ValueError``), never another exception, and they check sizes
before allocating, so a hostile frame can cost at most ``FrameLimits`` worth of memory.
The numeric parts are handled with numpy/struct/bytes.join, never a Python loop per record.

The package's modules, by concept: ``ids`` (tenant, device and stream ids; upload ids),
``header`` (the frame layout, ``Dtype``, ``FrameLimits``, ``FrameHeader``, ``peek_header``),
``meta`` (per-record metadata JSON), ``frame`` (``Frame`` and its encoders), ``decode`` (the
strict decoder), ``jsonmodel`` (the strict JSON decoding helper) and ``messages`` (receipt,
status and tier-two results). Import from ``edge_tier.wire``; the names below are its surface.
"""

from __future__ import annotations

from edge_tier.errors import ChecksumMismatch, FrameTooLarge, UnsupportedVersion, WireError
from edge_tier.wire.decode import decode_frame
from edge_tier.wire.frame import Frame, encode_frame, encode_frame_parts
from edge_tier.wire.header import (
    FLAG_HAS_META,
    FLAG_RESCUED,
    FORMAT_VERSION,
    HEADER_FIXED_SIZE,
    MAGIC,
    RECORD_WIRE_OVERHEAD,
    Dtype,
    FrameHeader,
    FrameLimits,
    check_kind,
    frame_overhead,
    peek_header,
)
from edge_tier.wire.ids import (
    ID_MAX_LEN,
    ID_PATTERN,
    U64_MAX,
    UPLOAD_ID_PATTERN,
    parse_upload_id,
    upload_id,
    validate_id,
)
from edge_tier.wire.jsonmodel import U64, decode_json_model
from edge_tier.wire.messages import (
    RESULT_MAX_BYTES,
    CloudLimits,
    DeviceStatus,
    Receipt,
    ReceiptStatus,
    ResultBatch,
    decode_receipt,
    decode_results,
    decode_status,
    encode_receipt,
    encode_results,
    encode_status,
    encode_stored_receipt,
)
from edge_tier.wire.meta import MetaValue, check_meta

__all__ = [
    "FLAG_HAS_META",
    "FLAG_RESCUED",
    "FORMAT_VERSION",
    "HEADER_FIXED_SIZE",
    "ID_MAX_LEN",
    "ID_PATTERN",
    "MAGIC",
    "RECORD_WIRE_OVERHEAD",
    "RESULT_MAX_BYTES",
    "U64",
    "U64_MAX",
    "UPLOAD_ID_PATTERN",
    "ChecksumMismatch",
    "CloudLimits",
    "DeviceStatus",
    "Dtype",
    "Frame",
    "FrameHeader",
    "FrameLimits",
    "FrameTooLarge",
    "MetaValue",
    "Receipt",
    "ReceiptStatus",
    "ResultBatch",
    "UnsupportedVersion",
    "WireError",
    "check_kind",
    "check_meta",
    "decode_frame",
    "decode_json_model",
    "decode_receipt",
    "decode_results",
    "decode_status",
    "encode_frame",
    "encode_frame_parts",
    "encode_receipt",
    "encode_results",
    "encode_status",
    "encode_stored_receipt",
    "frame_overhead",
    "parse_upload_id",
    "peek_header",
    "upload_id",
    "validate_id",
]
