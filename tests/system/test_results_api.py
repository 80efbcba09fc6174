"""Applications' view of the whole path: device status and results through the API, and each
result on the MQTT results topic, with real agent, ingest, worker and API processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")
pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from edge_tier import topics
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.tokens import TokenStore
from edge_tier_harness.services import ApiProcess, WorkerProcess
from tests.cloud_ingest.test_api import Api, api_config
from tests.support import DEVICE, TENANT, Pipeline, results, wait_until


def test_devices_results_and_mqtt_topics_agree(make_pipeline, tmp_path: Path) -> None:
    p: Pipeline = make_pipeline(agent={"prefilter": {"manifest": str(DEFAULT_MANIFEST)}})
    worker = WorkerProcess(
        tmp_path / "worker", {"nats": {"servers": [p.nats.url]}, "worker": {"discover_s": 0.2}}, name="worker"
    )
    worker.start(timeout=30)
    store = TokenStore(tmp_path / "registry.db")
    token = store.add(TENANT)[1]
    api_proc = ApiProcess(tmp_path / "api", api_config(p.nats.url, tmp_path / "registry.db"), name="api")
    api_proc.start(timeout=30)
    api = Api(api_proc, p.nats.url, {TENANT: token}, store)
    on_mqtt: list[dict[str, Any]] = []
    lock = threading.Lock()
    app = paho.Client(CallbackAPIVersion.VERSION2, client_id="an-app")
    app.on_message = lambda c, u, m: (lock.acquire(), on_mqtt.append(json.loads(m.payload)), lock.release())
    app.connect("127.0.0.1", p.mosquitto.port)
    app.subscribe(topics.mqtt_filter("results", TENANT), 1)
    app.loop_start()
    try:
        cmd = [sys.executable, "-m", "edge_agent.cli", "simulate", "--url", p.agent.endpoint, "--json"]
        cmd += ["--machines", "2", "--seconds", "3", "--rate", "60", "--fault-rate", "0.1"]
        tally = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout)
        p.wait_drained()
        wait_until(lambda: sum(len(b.seqs) for b in results(p.nats.url)) >= tally["kept"], 30, "every result")
        stored = results(p.nats.url)
        wait_until(lambda: len(on_mqtt) >= len(stored), 15, "every result on MQTT")

        def device() -> dict[str, Any]:
            return next(d for d in api.get("/v1/devices")[2]["devices"] if d["device"] == DEVICE)

        wait_until(lambda: device()["results"] == tally["kept"], 15, "the API to index every result")
        d = device()
    finally:
        app.loop_stop()
        app.disconnect()
        api_proc.stop()
        worker.stop()
    assert {(b["upload_id"], b["part"]) for b in on_mqtt} == {(b.upload_id, b.part) for b in stored}
    assert d["online"] and d["model_version"] == "1.0.0" and d["last_seen_ms"] > 0
    assert (d["control"]["model"]["state"], d["control"]["model"]["version"]) == ("active", "1.0.0")
    assert d["backlog_records"] is not None and d["evictions"] == {}
