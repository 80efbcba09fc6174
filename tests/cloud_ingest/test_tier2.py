"""The tier-two runtime: verified model, provider fallback, IOBinding, and a worker that refuses
to start on a bad model."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from cloud_ingest.errors import Tier2ModelError  # noqa: E402
from cloud_ingest.tier2 import Tier2Model  # noqa: E402
from edge_tier.model.manifest import DEFAULT_MANIFEST  # noqa: E402
from tests.support import copy_models, flip_byte  # noqa: E402


def embeddings(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(0, 4, (n, 16)).astype(np.float32)


def test_missing_gpu_provider_falls_back_to_cpu_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host has CUDA: the fallback is not taken")
    with caplog.at_level(logging.WARNING):
        m = Tier2Model(DEFAULT_MANIFEST, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert m.providers[0] == "CPUExecutionProvider" and not m.on_gpu and not m.io_binding
    assert "CUDAExecutionProvider is not in this onnxruntime build" in caplog.text
    assert "worker-gpu" in caplog.text
    with pytest.raises(Tier2ModelError, match="none of the providers"):
        Tier2Model(DEFAULT_MANIFEST, providers=["CUDAExecutionProvider"])


def test_io_binding_batches_and_single_calls_agree() -> None:
    x = embeddings(1000)
    plain = Tier2Model(DEFAULT_MANIFEST, providers=["CPUExecutionProvider"], io_binding=False)
    bound = Tier2Model(DEFAULT_MANIFEST, providers=["CPUExecutionProvider"], io_binding=True, max_batch=64)
    p1, p2 = plain.probs(x), bound.probs(x)
    assert p1.shape == (1000, 6) and np.allclose(p1, p2, atol=1e-6)
    assert np.allclose(plain.probs(x[7:8]), p1[7:8], atol=1e-6)
    assert np.allclose(p1.sum(axis=1), 1, atol=1e-5)
    labels, conf = plain.classify(x)
    assert (conf == p1.max(axis=1)).all() and (labels == p1.argmax(axis=1)).all()
    with pytest.raises(ValueError, match=r"shape \(3, 8\)"):
        plain.probs(np.zeros((3, 8), np.float32))


def test_a_tampered_or_missing_model_is_refused_and_the_worker_does_not_start(tmp_path: Path) -> None:
    manifest = copy_models(tmp_path, "tier2.onnx")
    model = tmp_path / "tier2.onnx"
    flip_byte(model, 200)
    with pytest.raises(Tier2ModelError, match=r"tier2\.onnx: sha256 .* does not match"):
        Tier2Model(manifest)
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(f'[nats]\nservers = ["nats://127.0.0.1:1"]\n[worker]\nmanifest = "{manifest}"\n')
    r = subprocess.run(
        [sys.executable, "-m", "cloud_ingest.cli", "worker", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "tier2.onnx: sha256" in r.stderr and "refusing to load it" in r.stderr
    model.unlink()
    with pytest.raises(Tier2ModelError, match=r"tier2\.onnx: cannot read the tier2 model"):
        Tier2Model(manifest)


def test_a_manifest_naming_the_wrong_tensors_is_refused(tmp_path: Path) -> None:
    manifest = copy_models(tmp_path, "tier2.onnx")
    doc = json.loads(manifest.read_text())
    doc["tier2"]["input"]["name"] = "x"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(Tier2ModelError, match=r'tier2\.input\.name = "x": the model has no such input; '
                       r"its inputs: 'embedding' tensor\(float\) \[batch, 16\]"):  # fmt: skip
        Tier2Model(manifest)
    doc["tier2"]["input"]["name"] = "embedding"
    doc["tier2"]["answer"]["confidence"] = "conf"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(
        Tier2ModelError, match=r'tier2\.answer\.confidence = "conf": the model has no such output'
    ):
        Tier2Model(manifest)
