"""Two streams on one device, each with its own prefilter, each answered by its own tier-two model:
a real agent, mosquitto, ingest, nats-server and worker, with foreign models from the zoo."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")
pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from edge_agent.cli import main as agent_main
from edge_tier.model.generator import generate
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier_harness.services import WorkerProcess
from models.build import zoo
from tests.support import Pipeline, results, wait_until

ZOO = Path(__file__).parents[1] / "models" / "zoo"


def _post(port: int, stream: str, windows: np.ndarray) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", f"/v1/windows?stream={stream}", windows.astype("<f4").tobytes(),
                     {"Content-Type": "application/x-edge-tier-windows"})  # fmt: skip
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200, body
        return dict(body)
    finally:
        conn.close()


def _tier2_zipmap(dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(ZOO / "sk_logreg_zipmap.onnx", dst)
    data = (dst / "sk_logreg_zipmap.onnx").read_bytes()
    doc = {
        "schema_version": 2,
        "tier2": {
            "name": "sk-logreg", "version": "3.0.0", "file": "sk_logreg_zipmap.onnx",
            "sha256": hashlib.sha256(data).hexdigest(), "labels": [f"class{i}" for i in range(6)],
            "input": {"name": "X", "shape": [-1, 16], "dtype": "float32"},
            "output": "output_probability", "answer": {"label": "output_label"},
        },
    }  # fmt: skip
    (dst / "manifest.json").write_text(json.dumps(doc))
    return dst / "manifest.json"


def test_each_stream_is_kept_by_its_model_and_answered_by_its_tier_two_model(
    make_pipeline: Any, tmp_path: Path
) -> None:
    machine = tmp_path / "two_heads" / "manifest.json"
    assert agent_main([
        "model", "init", str(ZOO / "two_heads_f32.tflite"), "--out", str(machine), "--score", "one_minus",
        "--score-class", "0", "--threshold", "0.5", "--name", "two-heads", "--version", "1.4.0",
    ]) == 0  # fmt: skip
    p: Pipeline = make_pipeline(agent={
        "prefilter": {"manifest": str(DEFAULT_MANIFEST)},
        "streams": {"machine": {"manifest": str(machine), "upload_dtype": "float32"}},
    })  # fmt: skip
    worker = WorkerProcess(
        tmp_path / "worker",
        {
            "nats": {"servers": [p.nats.url]},
            "worker": {
                "max_wait_ms": 5.0, "discover_s": 0.2, "manifest": str(DEFAULT_MANIFEST),
                "models": [{"manifest": str(_tier2_zipmap(tmp_path / "t2")), "streams": ["machine"]}],
            },
        },
        name="worker",
    )  # fmt: skip
    worker.start(timeout=30)
    try:
        x, y = zoo.classes128(60, seed=4)
        kept_machine = _post(p.agent.port, "machine", x)
        assert (
            kept_machine["model"] == "two-heads"
            and kept_machine["kept_index"] == np.flatnonzero(y != 0).tolist()
        )
        vib = _post(p.agent.port, "vibration", generate(64, seed=5, fault_fraction=1.0).x)
        assert vib["model"] == "prefilter" and vib["kept"] > 0
        want = kept_machine["kept"] + vib["kept"]
        wait_until(
            lambda: sum(len(b.seqs) for b in results(p.nats.url)) >= want, 60, "every kept record's answer"
        )
        got = results(p.nats.url)
    finally:
        worker.stop()
    by_stream: dict[str, set[tuple[str, str]]] = {}
    for b in got:
        by_stream.setdefault(b.stream, set()).add((b.model, b.model_version))
    assert by_stream == {"machine": {("sk-logreg", "3.0.0")}, "vibration": {("tier2", "1.0.0")}}, by_stream
    machine_rows = [label for b in got if b.stream == "machine" for label in b.labels]
    assert len(machine_rows) == kept_machine["kept"] and set(machine_rows) <= {f"class{i}" for i in range(6)}
    seqs = [s for b in got for s in b.seqs]
    assert len(seqs) == len(set(seqs)) == want  # each answered once
