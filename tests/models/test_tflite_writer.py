"""The hand-written int8 prefilter runs in LiteRT and matches its float weights."""

from __future__ import annotations

import numpy as np
import pytest

litert = pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")

from models.tflite_writer import Dense, PrefilterWeights, write_prefilter  # noqa: E402


def _weights(seed: int = 0) -> tuple[PrefilterWeights, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.5, (2000, 256)).astype(np.float32)
    w1, b1 = rng.normal(0, 0.1, (32, 256)), rng.normal(0, 0.05, 32)
    w2, b2 = rng.normal(0, 0.3, (16, 32)), rng.normal(0, 0.05, 16)
    w3, b3 = rng.normal(0, 0.5, (1, 16)), rng.normal(0, 0.05, 1)
    h = np.maximum(0, x @ w1.T + b1)
    e = h @ w2.T + b2
    lg = e @ w3.T + b3

    def rng_of(a: np.ndarray) -> tuple[float, float]:  # min/max: nothing clips
        return float(a.min()), float(a.max())

    pw = PrefilterWeights(
        Dense(w1.astype(np.float32), b1.astype(np.float32)),
        Dense(w2.astype(np.float32), b2.astype(np.float32)),
        Dense(w3.astype(np.float32), b3.astype(np.float32)),
        {"input": rng_of(x), "hidden": rng_of(h), "embedding": rng_of(e), "logit": rng_of(lg)},
    )
    return pw, x


def test_int8_model_matches_the_float_forward_at_any_batch_size() -> None:
    pw, x = _weights()
    model = write_prefilter(pw)
    assert len(model) < 100_000
    h = np.maximum(0, x @ pw.hidden.weight.T + pw.hidden.bias)
    e = h @ pw.embed.weight.T + pw.embed.bias
    score = 1 / (1 + np.exp(-(e @ pw.score.weight.T + pw.score.bias)[:, 0]))
    it = litert.Interpreter(model_content=model, num_threads=1)
    inp = it.get_input_details()[0]
    for batch in (1, 7, 512):
        it.resize_tensor_input(inp["index"], [batch, 256])
        it.allocate_tensors()
        it.set_tensor(inp["index"], x[:batch])
        it.invoke()
        out = {o["name"]: it.get_tensor(o["index"]) for o in it.get_output_details()}
        assert out["score"].shape == (batch, 1) and out["embedding"].shape == (batch, 16)
        err = np.abs(out["score"][:, 0] - score[:batch])
        assert err.max() < 0.05 and err.mean() < 0.01, (err.max(), err.mean())
        assert np.abs(out["embedding"] - e[:batch]).max() < 0.1 * np.abs(e).max()


def test_the_file_is_reproducible() -> None:
    pw, _ = _weights()
    assert write_prefilter(pw) == write_prefilter(pw)
