"""Foreign models as the prefilter: the zoo (tests/models/zoo, built with TensorFlow's converter)
through `edge-agent model init` and `check`, the runtime's quantization, batching and score
kinds, and every load-time refusal naming the manifest field and the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")

from edge_agent.cli import main as agent_main
from edge_agent.prefilter import Prefilter, PrefilterError, WindowRefused
from models.build import zoo

ZOO = Path(__file__).parents[1] / "models" / "zoo"
TFLITE = ["kws_int8", "ae_f32", "ae_int8", "img_uint8", "fixed_batch", "two_heads_f32", "waveform_nobatch"]


def init(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name / "manifest.json"
    assert agent_main(["model", "init", str(ZOO / f"{name}.tflite"), "--out", str(out), *extra]) == 0
    return out


def edit(manifest: Path, change: Any) -> Path:
    doc = json.loads(manifest.read_text())
    change(doc["prefilter"])
    manifest.write_text(json.dumps(doc))
    return manifest


@pytest.mark.parametrize("name", TFLITE)
def test_init_writes_a_manifest_check_takes_and_batches_agree_with_one_by_one(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = init(tmp_path, name)
    said = capsys.readouterr().out
    assert "score:" in said and "embedding:" in said  # it says what it chose
    assert agent_main(["model", "check", str(manifest), "--json", "--seconds", "0.05"]) == 0
    report = json.loads(capsys.readouterr().out)
    pf = Prefilter(manifest, upload_dtype=None)
    assert report["score"]["shape"] == [256] and report["embedding"]["shape"] == [256, pf.embedding_dim]
    rng = np.random.default_rng(1)
    w = (
        rng.uniform(0, 255, (7, *pf.window_shape))
        if name == "img_uint8"
        else rng.standard_normal((7, *pf.window_shape))
    )
    s, e = pf.score(w.astype(np.float32))
    one = [pf.score(w[i : i + 1].astype(np.float32)) for i in range(len(w))]
    np.testing.assert_allclose(s, np.concatenate([o[0] for o in one]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e, np.concatenate([o[1] for o in one]), rtol=1e-5, atol=1e-6)


def test_a_batch_dimension_that_does_not_resize_runs_batch_one_in_a_loop(tmp_path: Path) -> None:
    pf = Prefilter(init(tmp_path, "fixed_batch", "--score", "class", "--score-class", "3"))
    assert not pf.batch_resizes
    s, e = pf.score(np.ones((32, 64), np.float32))
    assert s.shape == (32,) and e.shape == (32, pf.embedding_dim)  # not (1, 28672, 16)-like garbage


def test_a_model_without_a_batch_dimension_runs_a_window_a_call_and_pools_its_frames(tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    m = init(tmp_path, "waveform_nobatch")
    assert json.loads(m.read_text())["prefilter"]["input"] == {
        "name": "serving_default_waveform:0", "shape": [1600], "dtype": "float32", "batch": False,
    }  # fmt: skip
    pf = Prefilter(m, upload_dtype=None)
    w = np.random.default_rng(8).standard_normal((5, 1600)).astype(np.float32)
    s, e = pf.score(w)
    it = Interpreter(model_path=str(ZOO / "waveform_nobatch.tflite"))
    it.allocate_tensors()
    outs = {o["shape"][-1]: o["index"] for o in it.get_output_details()}
    for i in range(5):  # by hand: one waveform, frame embeddings [10, 8] mean-pooled, max of [10, 3]
        it.set_tensor(it.get_input_details()[0]["index"], w[i])
        it.invoke()
        np.testing.assert_allclose(e[i], it.get_tensor(outs[8]).mean(axis=0), rtol=1e-5, atol=1e-6)
        assert abs(s[i] - it.get_tensor(outs[3]).max()) < 1e-6
    with pytest.raises(PrefilterError, match=r"prefilter\.input\.shape: the first dimension is the batch"):
        Prefilter(edit(m, lambda p: p["input"].pop("batch")))


def test_autoencoder_reconstruction_error_separates_normal_from_noise_in_float_and_int8(
    tmp_path: Path,
) -> None:
    normal = zoo.normal_logmel(200, seed=5)
    noise = np.random.default_rng(5).standard_normal((200, 640)).astype(np.float32)
    np.save(tmp_path / "normal.npy", normal)
    scores = {}
    for name in ("ae_f32", "ae_int8"):
        m = init(tmp_path, name, "--windows", str(tmp_path / "normal.npy"), "--keep", "0.01")
        pf = Prefilter(m, upload_dtype=None)
        assert pf.spec.score.kind == "reconstruction" and pf.embedding_dim == 8  # the bottleneck
        assert pf.threshold > 1 or pf.threshold < 0.1  # in the score's own range, not a probability
        sn, sx = pf.score(normal)[0], pf.score(noise)[0]
        assert sn.max() < sx.min()
        assert (pf.keep(noise).index.size == 200) and pf.keep(normal).index.size <= 4
        scores[name] = sn
    # int8 in and out, quantized and dequantized with each tensor's own parameters: close to float
    assert np.abs(scores["ae_int8"] - scores["ae_f32"]).mean() < 0.01


def test_int8_keyword_spotter_on_raw_audio_through_mfcc(tmp_path: Path) -> None:
    m = init(
        tmp_path, "kws_int8", "--preprocess", "mfcc", "--window", "16000", "--sample-rate", "16000",
        "--param", "n_fft=640", "--param", "hop_length=320", "--param", "n_mels=40", "--param", "n_mfcc=10",
        "--score-class", "3", "--threshold", "0.5",
    )  # fmt: skip
    pf = Prefilter(m, upload_dtype=None)
    assert pf.item_shape == (49, 10, 1) and pf.upload_dtype.name == "INT8"  # the int8 tensor's own scale
    audio = np.random.default_rng(2).standard_normal((5, 16000)).astype(np.float32)
    s, e = pf.score(audio)
    assert s.shape == (5,) and ((s >= 0) & (s <= 1)).all() and e.shape == (5, 32)


def test_the_keyword_spotter_predicts_its_classes_from_mfcc_windows(tmp_path: Path) -> None:
    x, y = zoo.kws_mfcc(120, seed=1)
    m = init(tmp_path, "kws_int8", "--score-class", "4", "--threshold", "0.5")
    pf = Prefilter(m)
    s, _ = pf.score(x[..., None])
    kept = s >= 0.5
    assert (kept == (y == 4)).mean() > 0.95  # class 4 windows, and only they, are kept


def test_image_frames_resized_and_normalised_into_a_uint8_model(tmp_path: Path) -> None:
    x, y = zoo.images32(60, seed=1)  # [0, 1] at 32 x 32
    big = np.repeat(np.repeat(x * 255, 2, axis=1), 2, axis=2)  # the camera gives 64 x 64 pixels
    m = init(
        tmp_path, "img_uint8", "--preprocess", "image", "--window", "64,64,3",
        "--param", f"scale={1 / 255}", "--score-class", "7", "--threshold", "0.5",
    )  # fmt: skip
    pf = Prefilter(m)
    s, _ = pf.score(big)
    assert ((s >= 0.5) == (y == 7)).mean() > 0.9


def test_two_outputs_with_converter_names_and_an_intermediate_embedding(tmp_path: Path) -> None:
    hidden = "functional_1/hidden_1/MatMul;functional_1/hidden_1/Relu;functional_1/hidden_1/BiasAdd"
    m = init(tmp_path, "two_heads_f32", "--embedding", hidden, "--score", "one_minus", "--score-class", "0")
    pf = Prefilter(m)
    x, y = zoo.classes128(100, seed=1)
    s, e = pf.score(x)
    assert e.shape == (100, 32) and (e >= 0).all()  # the ReLU layer, read from inside the graph
    assert ((s >= 0.5) == (y != 0)).mean() > 0.95  # "not class 0"
    # a signature key names a tensor too
    edit(m, lambda p: p["score"].update(tensor="output_0"))
    assert np.allclose(Prefilter(m).score(x)[0], s)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: p["score"].update(tensor="Identity"), r"prefilter\.score\.tensor names tensor 'Identity'"),
        (lambda p: p["embedding"].update(tensor="nope"), r"prefilter\.embedding\.tensor names tensor 'nope'"),
        (lambda p: p["input"].update(name="x"), r"prefilter\.input\.name names tensor 'x'"),
        (lambda p: p["input"].update(shape=[-1, 49, 11, 1]), r"prefilter\.input\.shape\[2\]: 11"),
        (lambda p: p["input"].update(shape=[-1, 490]), r"prefilter\.input\.shape: \[-1, 490\] has 2 dim"),
        (lambda p: p["input"].update(dtype="float32"), r"prefilter\.input\.dtype: float32, but .* int8"),
        (
            lambda p: p["score"].update(kind="class", index=12),
            r"prefilter\.score\.index: 12, but .* 12 values",
        ),
        (lambda p: p["score"].update(kind="max", classes=[0, 40]), r"prefilter\.score\.classes"),
        (
            lambda p: p["preprocess"].update(name="mfcc", params={"n_mfccs": 10}),
            r"prefilter\.preprocess\.params: n_mfccs: Extra inputs",
        ),
        (lambda p: p["preprocess"].update(name="fft"), r"prefilter\.preprocess\.name: no stage 'fft'"),
        (lambda p: p["window"].update(shape=[400]), r"prefilter\.preprocess: 'identity' makes \[400\]"),
        (
            lambda p: p["score"].update(kind="reconstruction"),
            r"reconstruction of the model's input \(490 values\)",
        ),
        (lambda p: p.update(threshold="high"), r"prefilter\.threshold"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_every_mismatch_is_refused_at_load_naming_the_field_and_tensor(
    tmp_path: Path, change: Any, field: str
) -> None:
    m = init(tmp_path, "kws_int8")
    with pytest.raises(PrefilterError, match=field):
        Prefilter(edit(m, change))


def test_the_agent_exits_2_at_start_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = edit(init(tmp_path, "kws_int8"), lambda p: p["score"].update(tensor="Identity"))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path / "q.db"}"\n[streams.audio]\nmanifest = "{m}"\n')
    assert agent_main(["run", "--config", str(cfg)]) == 2
    assert "prefilter.score.tensor names tensor 'Identity'" in capsys.readouterr().err


def test_a_window_the_model_cannot_take_is_refused_naming_the_stream_and_shape(tmp_path: Path) -> None:
    pf = Prefilter(init(tmp_path, "kws_int8"), stream="audio")
    with pytest.raises(
        WindowRefused, match=r"stream 'audio': .* takes windows of \[49, 10, 1\] .* got \[3, 40\]"
    ):
        pf.score(np.zeros((3, 40), np.float32))
    assert pf.score(np.zeros((3, 490), np.float32))[0].shape == (3,)  # flat rows of the window's size


def test_a_users_own_preprocessing_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = tmp_path / "my_stage.py"
    mod.write_text("def frames(w, gain=1.0):\n    return (w[:, :490] * gain).reshape(len(w), 49, 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = init(
        tmp_path, "kws_int8", "--preprocess", "my_stage:frames", "--window", "500", "--param", "gain=0.5"
    )
    pf = Prefilter(m)
    assert pf.score(np.zeros((2, 500), np.float32))[0].shape == (2,)
    with pytest.raises(PrefilterError, match=r"prefilter\.preprocess\.params: my_stage:frames does not take"):
        Prefilter(edit(m, lambda p: p["preprocess"]["params"].update(bias=1)))
    with pytest.raises(PrefilterError, match=r"prefilter\.preprocess\.name: 'my_stage' has no 'nope'"):
        Prefilter(edit(m, lambda p: p["preprocess"].update(name="my_stage:nope", params={})))


def test_model_init_copies_the_model_beside_the_manifest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ZOO / "ae_f32.tflite", src)
    out = tmp_path / "elsewhere" / "m.json"
    assert agent_main(["model", "init", str(src / "ae_f32.tflite"), "--out", str(out)]) == 0
    assert (out.parent / "ae_f32.tflite").read_bytes() == (src / "ae_f32.tflite").read_bytes()
