"""The hand-written int8 prefilter runs in LiteRT and matches its float weights."""

from __future__ import annotations

import numpy as np
import pytest

litert = pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")

from models.build.tflite_writer import write_prefilter  # noqa: E402
from tests.support import random_prefilter  # noqa: E402


def test_int8_model_matches_the_float_forward_at_any_batch_size() -> None:
    pw, x = random_prefilter()
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
    pw, _ = random_prefilter()
    assert write_prefilter(pw) == write_prefilter(pw)
