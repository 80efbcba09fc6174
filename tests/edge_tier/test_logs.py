"""Structured logs: one JSON object a line, with the upload's tenant, device and seq range."""

from __future__ import annotations

import json
import logging

import pytest

from edge_tier.logs import JsonFormatter, context
from edge_tier.wire import upload_id


def test_a_json_line_carries_the_uploads_context() -> None:
    uid = upload_id("acme", "press-7", 10, 19)
    rec = logging.LogRecord("cloud_ingest.ingest", logging.WARNING, __file__, 1, "upload %s: %s", (uid, "x"),
                            None)  # fmt: skip
    for k, v in context(uid, topic="et/acme/press-7/up").items():
        setattr(rec, k, v)
    line = json.loads(JsonFormatter().format(rec))
    assert line["msg"] == f"upload {uid}: x" and line["level"] == "WARNING"
    assert (line["tenant"], line["device"], line["seq"], line["upload_id"], line["topic"]) == (
        "acme", "press-7", "10-19", uid, "et/acme/press-7/up")  # fmt: skip


@pytest.mark.parametrize("uid", ["not-an-id", f"{upload_id('a', 'b', 1, 2)}#3"])
def test_context_takes_odd_and_part_ids_without_failing(uid: str) -> None:
    c = context(uid, tenant="t")
    assert c["upload_id"] == uid and c["tenant"] in ("t",)


def test_a_service_started_with_log_format_json_logs_json(tmp_path, nats_server) -> None:  # type: ignore[no-untyped-def]
    from edge_tier_harness.services import WorkerProcess

    cfg = {"log_format": "json", "nats": {"servers": [nats_server.url]}}
    w = WorkerProcess(tmp_path / "w", cfg, name="w")
    w.start(timeout=30)
    w.stop()
    lines = [json.loads(x) for x in w.log_path.read_text().splitlines() if x.startswith("{")]
    assert any("worker ready" in x["msg"] for x in lines), w.log_tail()
    assert all({"ts", "level", "logger", "msg"} <= x.keys() for x in lines)
