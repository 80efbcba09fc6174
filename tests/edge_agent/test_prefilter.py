"""The device prefilter: loads only the model its manifest names, and keeps what it should."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")

from edge_agent.prefilter import Prefilter, PrefilterError
from edge_tier.model.generator import HEALTHY, generate
from tests.support import copy_models, flip_byte

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_keeps_faults_and_drops_healthy_in_batches_of_any_size() -> None:
    pf = Prefilter(MODELS / "manifest.json")
    w = generate(1000, seed=77, fault_fraction=0.5)
    kept = pf.keep(w.x)
    fault = w.y != HEALTHY
    is_kept = np.zeros(len(w), bool)
    is_kept[kept.index] = True
    assert is_kept[fault].mean() > 0.95 and (~is_kept[~fault]).mean() > 0.75
    assert kept.embeddings.shape == (len(kept.index), pf.embedding_dim)
    assert (kept.scores >= pf.threshold).all()
    # the same windows one at a time give the same answers
    for i in range(5):
        s1, e1 = pf.score(w.x[i : i + 1])
        s, e = pf.score(w.x[:5])
        assert np.allclose(s1[0], s[i]) and np.allclose(e1[0], e[i])


def test_a_tampered_model_is_refused_with_its_path(tmp_path: Path) -> None:
    manifest = copy_models(tmp_path, "prefilter.tflite")
    flip_byte(tmp_path / "prefilter.tflite", 100)
    with pytest.raises(PrefilterError, match=r"prefilter\.tflite: sha256 .* does not match"):
        Prefilter(manifest)


def test_missing_model_and_bad_manifest_say_which_file(tmp_path: Path) -> None:
    manifest = copy_models(tmp_path, "prefilter.tflite")
    (tmp_path / "prefilter.tflite").unlink()
    with pytest.raises(PrefilterError, match=r"prefilter\.tflite: cannot read"):
        Prefilter(manifest)
    manifest.write_text("{not json")
    with pytest.raises(PrefilterError, match=r"manifest\.json: not a readable JSON manifest"):
        Prefilter(manifest)
    with pytest.raises(PrefilterError, match="manifest not found"):
        Prefilter(tmp_path / "nope.json")


def test_a_file_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    manifest = copy_models(tmp_path, "prefilter.tflite")
    junk = b"not a flatbuffer at all" * 10
    (tmp_path / "prefilter.tflite").write_bytes(junk)
    m = json.loads(manifest.read_text())
    import hashlib

    m["prefilter"]["sha256"] = hashlib.sha256(junk).hexdigest()
    manifest.write_text(json.dumps(m))
    with pytest.raises(PrefilterError, match="not a loadable TFLite model"):
        Prefilter(manifest)


def test_the_agent_refuses_to_start_with_a_bad_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_agent.cli import main

    manifest = copy_models(tmp_path, "prefilter.tflite")
    (tmp_path / "prefilter.tflite").write_bytes(b"\0" * 64)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path / "q.db"}"\n[prefilter]\nmanifest = "{manifest}"\n')
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "prefilter.tflite" in err and "does not match" in err


def test_without_litert_the_fallback_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    import edge_agent.litert as litert

    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import fails
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(PrefilterError, match="no TFLite runtime: pip install ai-edge-litert"):
        litert.interpreter_class()
    # tflite-runtime present: used on numpy 1.x, refused with the reason on numpy 2
    fake = types.ModuleType("tflite_runtime.interpreter")
    fake.Interpreter = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake)
    monkeypatch.setattr(np, "__version__", "1.26.4")
    assert litert.interpreter_class() is object
    monkeypatch.setattr(np, "__version__", "2.1.0")
    with pytest.raises(
        PrefilterError, match=r"tflite-runtime is installed but cannot run with numpy 2\.1\.0"
    ):
        litert.interpreter_class()


def test_the_real_fallback_runtime_where_it_is_installed() -> None:
    tflite = pytest.importorskip("tflite_runtime.interpreter", reason="tflite-runtime is not installed")
    if int(np.__version__.split(".")[0]) >= 2:
        pytest.skip("tflite-runtime needs numpy < 2")
    assert tflite.Interpreter is not None
    pf = Prefilter(MODELS / "manifest.json")
    assert pf.keep(generate(20, seed=3).x).embeddings.shape[1] == pf.embedding_dim


def test_int8_upload_round_trips_within_half_a_step_and_needs_a_scale(tmp_path: Path) -> None:
    from edge_tier.wire import Dtype

    pf = Prefilter(MODELS / "manifest.json", upload_dtype=Dtype.INT8)
    _, emb = pf.score(generate(200, seed=9, fault_fraction=0.5).x)
    data, scale = pf.encode(emb, Dtype.INT8)
    back = np.frombuffer(data, np.int8).reshape(emb.shape).astype(np.float32) * scale
    assert len(data) == emb.size and np.abs(back - emb).max() <= scale / 2 + 1e-6
    manifest = copy_models(tmp_path, "prefilter.tflite")
    doc = json.loads(manifest.read_text())
    del doc["prefilter"]["embedding"]["scale"]
    manifest.write_text(json.dumps(doc))
    with pytest.raises(PrefilterError, match=r"prefilter\.embedding\.scale is missing"):
        Prefilter(manifest, upload_dtype=Dtype.INT8)
    assert Prefilter(manifest).upload_dtype is Dtype.FLOAT32
    assert Prefilter(manifest, upload_dtype=None).upload_dtype is Dtype.FLOAT16  # "auto", no scale
    assert Prefilter(MODELS / "manifest.json", upload_dtype=None).upload_dtype is Dtype.INT8
