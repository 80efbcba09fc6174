"""What operators watch: /metrics, /healthz and /readyz on every process, readiness that
tells a broken dependency, and a Grafana dashboard whose every query names a real metric."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from edge_tier.tokens import TokenStore
from edge_tier_harness.services import ApiProcess, WorkerProcess
from tests.cloud_ingest.test_api import api_config
from tests.support import Pipeline, wait_until

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _families(port: int) -> set[str]:
    status, text = _get(port, "/metrics")
    assert status == 200
    return {f.name for f in text_string_to_metric_families(text)}


def test_every_process_serves_metrics_health_and_readiness(make_pipeline, tmp_path: Path) -> None:
    p: Pipeline = make_pipeline()
    TokenStore(tmp_path / "registry.db").add("acme")
    worker = WorkerProcess(tmp_path / "worker", {"nats": {"servers": [p.nats.url]}}, name="worker")
    api = ApiProcess(tmp_path / "api", api_config(p.nats.url, tmp_path / "registry.db"), name="api")
    worker.start(timeout=30)
    api.start(timeout=30)
    try:
        p.producer.post(50)
        p.wait_drained()
        ports = {"agent": p.agent.port, "ingest": p.ingest.port, "worker": worker.port, "api": api.port}
        names: set[str] = set()
        for what, port in ports.items():
            assert _get(port, "/healthz")[0] == 200, what
            wait_until(lambda port=port: _get(port, "/readyz")[0] == 200, 20, f"{what} ready")  # type: ignore[misc]
            names |= _families(port)
        # the dashboard's every query names a metric some process exports
        dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]
        used = {re.sub(r"_bucket$", "", m) for e in exprs for m in re.findall(r"\bet_[a-z0-9_]+", e)}
        assert len(used) >= 25
        exported = {n.removesuffix("_total") for n in names}
        missing = sorted(u for u in used if u.removesuffix("_total") not in exported)
        assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
        # readiness tells a missing broker; the agent keeps taking records (store and forward)
        p.mosquitto.stop()
        wait_until(lambda: _get(p.ingest.port, "/readyz")[0] == 503, 20, "ingest to be unready")
        body = json.loads(_get(p.ingest.port, "/readyz")[1])
        assert body["ready"] is False and body["checks"]["mqtt"] is False and body["checks"]["nats"] is True
        assert _get(p.agent.port, "/readyz")[0] == 200
        assert p.producer.post(5) is not None
        p.mosquitto.start()
        wait_until(lambda: _get(p.ingest.port, "/readyz")[0] == 200, 30, "ingest ready again")
        p.nats.stop()
        wait_until(lambda: _get(worker.port, "/readyz")[0] == 503, 30, "the worker to be unready")
        assert json.loads(_get(worker.port, "/readyz")[1])["checks"]["nats"] is False
    finally:
        api.stop()
        worker.stop()
