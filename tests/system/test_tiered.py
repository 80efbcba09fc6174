"""The whole tiered path: simulated machines -> prefilter -> queue -> MQTT -> ingest -> JetStream
-> tier-two worker -> results, with the worker killed mid-run."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")
pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from edge_tier import topics
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.wire import Dtype, decode_frame
from edge_tier_harness.services import WorkerProcess
from tests.support import (
    TENANT,
    Pipeline,
    result_keys,
    results,
    stream_messages,
    wait_until,
)


def test_simulated_machines_get_each_answer_once_across_a_worker_kill(make_pipeline, tmp_path: Path) -> None:
    p: Pipeline = make_pipeline(agent={"prefilter": {"manifest": str(DEFAULT_MANIFEST)}})
    worker = WorkerProcess(
        tmp_path / "worker",
        {
            "nats": {"servers": [p.nats.url]},
            "worker": {"max_wait_ms": 5.0, "discover_s": 0.2, "ack_wait_s": 2.0},
        },
        name="worker",
    )
    worker.start(timeout=30)
    out: dict[str, str] = {}

    def run_simulator() -> None:
        cmd = [sys.executable, "-m", "edge_agent.cli", "simulate", "--url", p.agent.endpoint, "--json"]
        cmd += ["--machines", "3", "--seconds", "5", "--rate", "60", "--fault-rate", "0.1"]
        out["stdout"] = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout

    sim = threading.Thread(target=run_simulator)
    sim.start()
    try:
        wait_until(lambda: len(results(p.nats.url)) >= 3, 30, "the first results")
        worker.kill()
        worker.start(timeout=30)
        sim.join(60)
        tally = json.loads(out["stdout"])
        p.wait_drained()
        features = [decode_frame(m.data) for m in stream_messages(p.nats.url, topics.FEATURES_STREAM)]
        kept = {(TENANT, f.device, int(s)) for f in features for s in f.seqs}
        wait_until(
            lambda: len(result_keys(results(p.nats.url))) >= len(kept), 60, "every kept record's result"
        )
        got = results(p.nats.url)
    finally:
        worker.stop()
    assert tally["windows"] >= 600 and tally["unreachable"] == 0 and tally["refused"] == 0
    assert tally["faults"] and tally["faults_kept"] >= 0.9 * tally["faults"]
    assert tally["kept"] == len(kept) < tally["windows"]
    assert tally["queued_bytes"] == 16 * len(kept) < tally["raw_bytes"] / 100  # int8 embeddings
    assert all(f.dtype is Dtype.INT8 for f in features)
    keys = result_keys(got)
    assert len(keys) == len(set(keys)), "duplicate results"
    assert set(keys) == kept
    assert {label for b in got for label in b.labels} - {"healthy"}, "no fault was recognised"
