"""Logging for every process: text for a terminal, or one JSON object a line for a log
pipeline (``log_format = "json"``), with the context that finds a record again:
tenant, device, seq range and upload id."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from edge_tier.wire import WireError, parse_upload_id

CONTEXT = ("tenant", "device", "seq", "upload_id", "topic")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)


def context(upload_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """``extra=`` for a log call about one upload: its id, and the tenant, device and seq
    range it names."""
    out = {k: v for k, v in fields.items() if v is not None}
    if upload_id is not None:
        out["upload_id"] = upload_id
        try:
            tenant, device, first, last = parse_upload_id(upload_id.split("#")[0])
        except WireError:
            return out
        out.setdefault("tenant", tenant)
        out.setdefault("device", device)
        out.setdefault("seq", f"{first}-{last}")
    return out
