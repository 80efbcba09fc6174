"""Several streams on one agent, each with its own model and window shape: the real endpoint and
queue, the shipped vibration model as [prefilter] and zoo models as [streams.*]."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")

from edge_agent.cli import main as agent_main
from edge_agent.config import AgentConfig
from edge_agent.endpoint import WINDOWS_TYPE, Endpoint
from edge_agent.store import AsyncQueue, Store
from edge_agent.stream_models import StreamModels
from edge_tier.model.generator import generate
from edge_tier.model.manifest import DEFAULT_MANIFEST
from models.build import zoo

ZOO = Path(__file__).parents[1] / "models" / "zoo"


def _manifest(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name / "manifest.json"
    assert agent_main(["model", "init", str(ZOO / f"{name}.tflite"), "--out", str(out), *extra]) == 0
    return out


def _config(tmp_path: Path) -> AgentConfig:
    ae = _manifest(tmp_path, "ae_int8", "--threshold", "0.5")
    kws = _manifest(tmp_path, "kws_int8", "--score-class", "1", "--threshold", "0.5")
    return AgentConfig(
        store={"path": str(tmp_path / "q.db"), "synchronous": "NORMAL"},
        endpoint={"port": 0},
        prefilter={"manifest": str(DEFAULT_MANIFEST)},
        streams={
            "acoustic": {"manifest": str(ae)},
            "keywords": {"manifest": str(kws), "upload_dtype": "float32"},
            "counts": {},
        },
    )


async def _post(http: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(url, **kw) if body is None else http.post(url, json=body) as r:
        return r.status, await r.json()


def test_each_stream_is_answered_by_its_own_model_and_the_queue_says_whose(tmp_path: Path) -> None:
    cfg = _config(tmp_path)

    async def main() -> None:
        models = StreamModels(cfg)
        models.start({})
        queue = AsyncQueue(Store(cfg.store))
        committer = asyncio.create_task(queue.run())
        endpoint = Endpoint(cfg, queue, models)
        await endpoint.start()
        url = f"http://127.0.0.1:{endpoint.port}/v1/windows"
        try:
            async with aiohttp.ClientSession() as http:
                noise = np.random.default_rng(1).standard_normal((6, 640)).astype(np.float32)
                normal = zoo.normal_logmel(6, seed=1)
                st, ae = await _post(
                    http, url, {"stream": "acoustic", "windows": np.concatenate([noise, normal]).tolist()}
                )
                assert st == 200 and ae["kept_index"] == [0, 1, 2, 3, 4, 5] and ae["model"] == "ae_int8", ae
                x, y = zoo.kws_mfcc(20, seed=3)
                st, kw = await _post(http, url + "?stream=keywords", None, data=x.astype("<f4").tobytes(),
                                     headers={"Content-Type": WINDOWS_TYPE})  # fmt: skip
                assert st == 200 and kw["model"] == "kws_int8", kw
                assert set(kw["kept_index"]) == set(np.flatnonzero(y == 1).tolist()) and kw["kept"] == 4
                vib = generate(8, seed=2, fault_fraction=1.0).x
                st, vb = await _post(
                    http, url, {"stream": "vibration", "windows": vib.tolist()}
                )  # not in [streams]
                assert st == 200 and vb["model"] == "prefilter" and vb["windows"] == 8, vb
                # a window of another stream's shape: 400 naming stream and shape, nothing queued
                st, bad = await _post(http, url, {"stream": "keywords", "windows": noise.tolist()})
                assert st == 400 and "stream 'keywords'" in bad["detail"], bad
                assert "[49, 10, 1]" in bad["detail"], bad
                st, none = await _post(http, url, {"stream": "counts", "windows": noise.tolist()})
                assert st == 404 and "stream 'counts' has no model" in none["detail"], none
        finally:
            await endpoint.stop()
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
            await queue.close()
        store = Store(cfg.store, readonly=True)
        kinds = {(k.stream, k.model, k.dtype.name, k.dim) for _, _, k, *_ in store.records()}
        n = sum(1 for _ in store.records())
        store.close()
        assert ("acoustic", "ae_int8", "INT8", 8) in kinds  # the bottleneck, int8 at its tensor's scale
        assert ("keywords", "kws_int8", "FLOAT32", 32) in kinds
        assert any(k[0] == "vibration" and k[1] == "prefilter" for k in kinds)
        assert n == 6 + 4 + vb["kept"]  # the refused requests queued nothing

    asyncio.run(main())


def test_the_status_lists_each_streams_model(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    models = StreamModels(cfg)
    models.start({"keywords": 0.9})
    st = models.status()
    assert set(st) == {"prefilter", "acoustic", "keywords"}  # counts has no model
    assert st["keywords"]["threshold"] == 0.9 and st["keywords"]["window"] == [49, 10, 1]
    assert st["acoustic"]["upload_dtype"] == "int8" and st["acoustic"]["embedding_dim"] == 8
    assert json.dumps(st)  # the status is JSON
