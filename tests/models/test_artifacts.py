"""The shipped models: match their manifest, and still meet the report's figures on fresh data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

litert = pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")
ort = pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from edge_tier.model.features import BINS, spectrum_features  # noqa: E402
from edge_tier.model.generator import CLASSES, HEALTHY, generate  # noqa: E402

MODELS = Path(__file__).resolve().parents[2] / "models"
MANIFEST = json.loads((MODELS / "manifest.json").read_text())


def test_files_match_the_manifest() -> None:
    for part in ("prefilter", "tier2"):
        entry = MANIFEST[part]
        data = (MODELS / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], part
        assert len(data) == entry["bytes"]
    assert MANIFEST["prefilter"]["bytes"] < 100_000
    assert MANIFEST["labels"] == list(CLASSES)


def test_features_ignore_sensor_gain_and_have_the_models_width() -> None:
    w = generate(50, seed=5).x
    f1, f2 = spectrum_features(w), spectrum_features(w * 3.0)
    assert f1.shape == (50, BINS) and f1.dtype == np.float32
    assert np.abs(f1 - f2).max() < 1e-3


def test_shipped_models_meet_the_report_on_fresh_windows() -> None:
    te = generate(3000, seed=404, fault_fraction=0.5)
    it = litert.Interpreter(model_path=str(MODELS / MANIFEST["prefilter"]["file"]), num_threads=1)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], [len(te), BINS])
    it.allocate_tensors()
    it.set_tensor(inp["index"], spectrum_features(te.x))
    it.invoke()
    out = {o["name"]: it.get_tensor(o["index"]) for o in it.get_output_details()}
    kept = out["score"][:, 0] >= MANIFEST["prefilter"]["threshold"]
    fault = te.y != HEALTHY
    assert kept[fault].mean() >= 0.97, f"faults kept {kept[fault].mean():.3f}"
    assert (~kept[~fault]).mean() >= 0.78, f"healthy dropped {(~kept[~fault]).mean():.3f}"

    sess = ort.InferenceSession(str(MODELS / MANIFEST["tier2"]["file"]), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {"embedding": out["embedding"][kept]})[0]
    pred, y = probs.argmax(axis=1), te.y[kept]
    f1s = []
    for c in range(len(CLASSES)):
        tp, fp, fn = (
            np.sum((pred == c) & (y == c)),
            np.sum((pred == c) & (y != c)),
            np.sum((pred != c) & (y == c)),
        )
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert np.mean(f1s) >= 0.88, f"macro-F1 {np.mean(f1s):.3f}"
