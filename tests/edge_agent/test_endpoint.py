"""Tests for edge_agent.endpoint: the local HTTP enqueue endpoint, against a real queue.

Each test runs an ``Endpoint`` on 127.0.0.1 (port 0) over ``AsyncQueue(Store(...))`` in a tmp
dir inside ``asyncio.run`` and talks to it with aiohttp's client.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from edge_agent.config import AgentConfig
from edge_agent.endpoint import BINARY_TYPE, Endpoint
from edge_agent.store import AsyncQueue, Store
from edge_tier.wire import Dtype, WireError, encode_frame_parts

JSON = {"Content-Type": "application/json"}


@dataclass
class Agent:
    url: str
    queue: AsyncQueue
    http: aiohttp.ClientSession

    @property
    def store(self) -> Store:
        return self.queue.store

    async def post(
        self,
        body: Any,
        *,
        query: str = "",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        data = body if isinstance(body, str | bytes) else json.dumps(body)
        async with self.http.post(f"{self.url}/v1/records{query}", data=data, headers=headers or JSON) as r:
            text = await r.text()
            try:
                parsed: Any = json.loads(text)
            except ValueError:
                parsed = text
            return r.status, {"content-type": r.content_type, **r.headers}, parsed

    async def snapshot(self) -> tuple[Any, ...]:
        def snap() -> tuple[Any, ...]:
            db = self.store.db
            return (
                db.execute("SELECT total(n) FROM chunks").fetchone()[0],
                db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone(),
                db.execute("SELECT count(*) FROM kinds").fetchone()[0],
                self.store.bytes_used,
            )

        await self.queue.flush()
        return await self.queue.call(snap)

    async def records(self) -> list[tuple[Any, ...]]:
        await self.queue.flush()
        return await self.queue.call(
            lambda: [
                (
                    seq,
                    score,
                    feats,
                    json.dumps(meta, separators=(",", ":")) if meta else None,
                    k.stream,
                    int(k.dtype),
                    k.dim,
                )
                for seq, _, k, score, feats, meta in self.store.records()
            ]
        )


@asynccontextmanager
async def agent(tmp_path: Path, **store: Any) -> AsyncIterator[Agent]:
    uplink = {"window": 8, "frame_max_bytes": 4096}
    cfg = AgentConfig(
        store={"path": str(tmp_path / "q.db"), "synchronous": "NORMAL", **store},
        uplink=uplink,
        endpoint={"port": 0},
    )
    queue = AsyncQueue(Store(cfg.store))
    committer = asyncio.create_task(queue.run())
    endpoint = Endpoint(cfg, queue)
    await endpoint.start()
    assert endpoint.port
    try:
        async with aiohttp.ClientSession() as http:
            yield Agent(f"http://127.0.0.1:{endpoint.port}", queue, http)
    finally:
        await endpoint.stop()
        committer.cancel()
        await asyncio.gather(committer, return_exceptions=True)
        await queue.close()


def run(tmp_path: Path, scenario: Callable[[Agent], Awaitable[Any]], **store: Any) -> Any:
    async def main() -> Any:
        async with agent(tmp_path, **store) as a:
            return await scenario(a)

    return asyncio.run(main())


def f32(values: list[float]) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


THREE = {
    "stream": "vib",
    "records": [
        {"features": [1.5, -2.0, 3.25, 0.0], "score": 0.9, "meta": {"site": "a", "sensor": 3}},
        {"features": [4, 5, 6, 7], "score": 0.1},
        {"features": [1e-3, 2e-3, 3e-3, 4e-3], "score": 0.5, "meta": {"label": None}},
    ],
}


def check_three(rows: list[tuple[Any, ...]], first: int, last: int, with_meta: bool = True) -> None:
    assert [r[0] for r in rows] == list(range(first, last + 1))
    assert [r[2] for r in rows] == [f32(r["features"]) for r in THREE["records"]]
    assert [r[1] for r in rows] == pytest.approx([0.9, 0.1, 0.5])
    assert {(r[4], r[5], r[6]) for r in rows} == {("vib", int(Dtype.FLOAT32), 4)}
    if with_meta:
        assert [json.loads(r[3]) if r[3] else None for r in rows] == [
            {"site": "a", "sensor": 3},
            None,
            {"label": None},
        ]


def test_json_body_is_queued_durably(tmp_path: Path) -> None:
    async def scenario(a: Agent) -> None:
        status, _, body = await a.post(THREE)
        assert status == 200, body
        assert body["accepted"] == 3 and body["durable"] is True
        assert body["last_seq"] == body["first_seq"] + 2
        check_three(await a.records(), body["first_seq"], body["last_seq"])

    run(tmp_path, scenario)


def test_binary_body_is_queued_like_json(tmp_path: Path) -> None:
    scores = [r["score"] for r in THREE["records"]]
    feats = [v for r in THREE["records"] for v in r["features"]]
    payload = struct.pack("<3f", *scores) + f32(feats)

    async def scenario(a: Agent) -> None:
        status, _, body = await a.post(
            payload, query="?stream=vib&dim=4", headers={"Content-Type": BINARY_TYPE}
        )
        assert status == 200, body
        assert body["accepted"] == 3 and body["last_seq"] == body["first_seq"] + 2
        check_three(await a.records(), body["first_seq"], body["last_seq"], with_meta=False)

    run(tmp_path, scenario)


def test_not_durable_answers_202_and_still_queues(tmp_path: Path) -> None:
    async def scenario(a: Agent) -> None:
        status, _, body = await a.post(THREE, query="?durable=0")
        assert status == 202, body
        assert body == {"accepted": 3, "durable": False}
        rows = await a.records()
        check_three(rows, rows[0][0], rows[0][0] + 2)

    run(tmp_path, scenario, commit_window_ms=50)


def _bin(n: int, dim: int, extra: bytes = b"") -> bytes:
    return f32([0.5] * n) + f32([1.0] * n * dim) + extra


BAD_REQUESTS = {
    "invalid-json": ('{"stream": "vib", "records": [', {}, ["not valid JSON"]),
    "empty-records": ({"stream": "vib", "records": []}, {}, ["non-empty 'records'"]),
    "not-an-object": ([1, 2, 3], {}, ["object"]),
    "ragged-features": (
        {
            "stream": "vib",
            "records": [{"features": [1, 2, 3]}, {"features": [1, 2, 3]}, {"features": [1, 2]}],
        },
        {},
        ["records[2]", "3 numbers"],
    ),
    "non-numeric-feature": (
        {"stream": "vib", "records": [{"features": [1, 2]}, {"features": [1, "x"]}]},
        {},
        ["records[1].features", "'x'"],
    ),
    "nan-score": (
        '{"stream": "vib", "records": [{"features": [1], "score": NaN}]}',
        {},
        ["records[0].score", "finite"],
    ),
    "inf-score": (
        '{"stream": "vib", "records": [{"features": [1]}, {"features": [1], "score": -Infinity}]}',
        {},
        ["records[1].score", "finite"],
    ),
    "bool-score": (
        {"stream": "vib", "records": [{"features": [1], "score": True}]},
        {},
        ["records[0].score"],
    ),
    "meta-not-allowed": (
        {"stream": "vib", "records": [{"features": [1], "meta": {"site": "a", "gps": "51.1,4.3"}}]},
        {},
        ["records[0].meta", "'gps'", "allow", "label", "sensor", "site"],
    ),
    "meta-nested": (
        {"stream": "vib", "records": [{"features": [1], "meta": {"site": {"raw": [1, 2]}}}]},
        {},
        ["records[0].meta['site']"],
    ),
    "meta-not-object": (
        {"stream": "vib", "records": [{"features": [1], "meta": ["site"]}]},
        {},
        ["records[0].meta"],
    ),
    "bad-stream": ({"stream": "a/b", "records": [{"features": [1]}]}, {}, ["stream", "a/b"]),
    "missing-stream": ({"records": [{"features": [1]}]}, {}, ["'stream'"]),
    "unknown-dtype": (
        {"stream": "vib", "dtype": "float64", "records": [{"features": [1]}]},
        {},
        ["dtype", "float64"],
    ),
    "int8-out-of-range": (
        {"stream": "vib", "dtype": "int8", "records": [{"features": [1, 300]}]},
        {},
        ["records[0].features", "300"],
    ),
    "binary-wrong-size": (_bin(2, 4, b"\0\0"), {"query": "?stream=vib&dim=4"}, ["42 bytes", "16"]),
    "binary-empty": (b"", {"query": "?stream=vib&dim=4"}, ["0 bytes"]),
    "binary-missing-dim": (_bin(1, 4), {"query": "?stream=vib"}, ["'dim'"]),
    "binary-zero-dim": (_bin(1, 4), {"query": "?stream=vib&dim=0"}, ["'dim'", "0"]),
    "binary-bad-stream": (_bin(1, 4), {"query": "?stream=a%2Fb&dim=4"}, ["stream"]),
    "binary-nan-score": (f32([float("nan")]) + f32([1.0] * 4), {"query": "?stream=vib&dim=4"}, ["finite"]),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_400_problem_json_and_changes_nothing(tmp_path: Path, name: str) -> None:
    body, opts, needles = BAD_REQUESTS[name]
    binary = isinstance(body, bytes)

    async def scenario(a: Agent) -> None:
        before = await a.snapshot()
        status, headers, problem = await a.post(
            body, query=opts.get("query", ""), headers={"Content-Type": BINARY_TYPE} if binary else JSON
        )
        assert status == 400, problem
        assert headers["content-type"] == "application/problem+json"
        assert problem["status"] == 400 and problem["title"] == "Bad Request"
        for needle in needles:
            assert needle in problem["detail"], problem["detail"]
        assert await a.snapshot() == before
        # the endpoint is still healthy and accepts the next good request
        status, _, _ = await a.post(THREE)
        assert status == 200

    run(tmp_path, scenario)


def test_unsupported_media_type_is_415(tmp_path: Path) -> None:
    async def scenario(a: Agent) -> None:
        before = await a.snapshot()
        status, headers, problem = await a.post(json.dumps(THREE), headers={"Content-Type": "text/plain"})
        assert status == 415
        assert headers["content-type"] == "application/problem+json"
        assert "text/plain" in problem["detail"] and BINARY_TYPE in problem["detail"]
        assert await a.snapshot() == before

    run(tmp_path, scenario)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("features", [[1, None], [1, 1e39]], ids=["null", "overflow"])
def test_null_or_overflowing_feature_is_refused(tmp_path: Path, features: list[Any]) -> None:
    async def scenario(a: Agent) -> None:
        before = await a.snapshot()
        status, _, problem = await a.post({"stream": "vib", "records": [{"features": features}]})
        assert status == 400, problem
        assert "records[0].features" in problem["detail"]
        assert await a.snapshot() == before

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    "extra, record",
    [
        ({"schema_version": "two"}, {}),
        ({"scale": "big"}, {}),
        ({"schema_version": None}, {}),
        ({}, {"score": 10**400}),
    ],
    ids=["schema_version-str", "scale-str", "schema_version-null", "huge-int-score"],
)
def test_badly_typed_header_fields_are_400_not_500(
    tmp_path: Path, extra: dict[str, Any], record: dict[str, Any]
) -> None:
    async def scenario(a: Agent) -> None:
        body = {"stream": "vib", **extra, "records": [{"features": [1, 2], **record}]}
        status, headers, problem = await a.post(body)
        assert status == 400, (status, problem)
        assert headers["content-type"] == "application/problem+json"

    run(tmp_path, scenario)


ENCODE_CASES = {
    "ok-float32": ({"stream": "vib"}, {}),
    "ok-int8-scaled": (
        {
            "stream": "vib",
            "dtype": "int8",
            "scale": 0.05,
            "model": "pf",
            "model_version": "1.2.0",
            "schema_version": 3,
        },
        {"features": [1, -2]},
    ),
    "scale-on-float32": ({"stream": "vib", "scale": 2.0}, {}),
    "int8-zero-scale": ({"stream": "vib", "dtype": "int8", "scale": 0}, {"features": [1, 2]}),
    "model-too-long": ({"stream": "vib", "model": "m" * 100}, {}),
    "model-not-ascii": ({"stream": "vib", "model": "modèle"}, {}),
    "schema-version-too-big": ({"stream": "vib", "schema_version": 70000}, {}),
    "negative-created-ms": ({"stream": "vib"}, {"created_ms": -5}),
    "meta-nan": ({"stream": "vib"}, {"meta": {"site": float("nan")}}),
}


@pytest.mark.parametrize("name", list(ENCODE_CASES))
def test_accepted_records_can_be_encoded_as_a_frame(tmp_path: Path, name: str) -> None:
    header, record = ENCODE_CASES[name]
    body = json.dumps({**header, "records": [{"features": [1.0, 2.0], "score": 0.5, **record}]})

    async def scenario(a: Agent) -> tuple[int, Any]:
        status, _, answer = await a.post(body)
        if status != 200:
            return status, answer
        await a.queue.flush()
        frame = await a.queue.call(a.store.next_frame, 100, 1 << 20)
        assert frame is not None
        k = frame.kind
        try:
            encode_frame_parts(
                tenant="demo",
                device="device-1",
                prev_seq=frame.prev_seq,
                stream=k.stream,
                model=k.model,
                model_version=k.model_version,
                schema_version=k.schema_version,
                created_ms=1,
                dtype=k.dtype,
                dim=k.dim,
                seqs=frame.seqs,
                scores=frame.scores,
                times_ms=frame.times_ms,
                feature_blobs=frame.features,
                scale=k.scale,
                meta=frame.meta,
            )
        except WireError as e:
            raise AssertionError(f"accepted with 200, but the frame cannot be encoded: {e}") from None
        return status, answer

    status, answer = run(tmp_path, scenario)
    if name.startswith("ok-"):
        assert status == 200, answer
    else:
        assert status == 400, answer


def test_a_record_no_frame_can_carry_is_413_naming_the_limit_and_nothing_is_queued(tmp_path: Path) -> None:
    async def scenario(a: Agent) -> None:
        a.queue.store.set_frame_limits(100, 8192)  # as the cloud's receipts may set them
        ok = await a.post(_bin(3, 1024), query="?stream=vib&dim=1024", headers={"Content-Type": BINARY_TYPE})
        assert ok[0] == 200, ok
        before = await a.snapshot()
        for dim in (2048, 4096):  # 8 KiB of features and more: no 8 KiB frame holds one
            status, headers, problem = await a.post(
                _bin(5, dim), query=f"?stream=vib&dim={dim}", headers={"Content-Type": BINARY_TYPE}
            )
            assert status == 413, problem
            assert headers["content-type"] == "application/problem+json"
            assert "8192" in problem["detail"] and "frame" in problem["detail"], problem
        a.queue.store.set_frame_limits(100, 1 << 20, max_dim=1000)  # the cloud takes dim <= 1000
        status, _, problem = await a.post(
            _bin(2, 1024), query="?stream=vib&dim=1024", headers={"Content-Type": BINARY_TYPE}
        )
        assert status == 413 and "max_dim 1000" in problem["detail"], problem
        assert await a.snapshot() == before

    run(tmp_path, scenario)


def test_block_policy_full_is_503_with_retry_after(tmp_path: Path) -> None:
    dim = 1024  # 4096 + 64 bytes per record: 15 fit in the 64 KiB budget
    payload = _bin(10, dim)

    async def scenario(a: Agent) -> None:
        status, _, body = await a.post(
            payload, query=f"?stream=vib&dim={dim}", headers={"Content-Type": BINARY_TYPE}
        )
        assert status == 200, body
        before = await a.snapshot()
        status, headers, problem = await a.post(
            payload, query=f"?stream=vib&dim={dim}", headers={"Content-Type": BINARY_TYPE}
        )
        assert status == 503, problem
        assert headers["content-type"] == "application/problem+json"
        assert int(headers["Retry-After"]) >= 1
        assert "full" in problem["detail"] and "block" in problem["detail"]
        assert await a.snapshot() == before
        assert before[0] == 10

    run(tmp_path, scenario, budget_bytes=64 * 1024, policy="block", block_timeout_s=0)


def test_healthz_metrics_and_status(tmp_path: Path) -> None:
    async def scenario(a: Agent) -> None:
        async with a.http.get(f"{a.url}/healthz") as r:
            assert r.status == 200 and (await r.json()) == {"ok": True}
        status, _, _ = await a.post(THREE)
        assert status == 200
        status, _, _ = await a.post(THREE)
        assert status == 200
        async with a.http.get(f"{a.url}/v1/status") as r:
            assert r.status == 200
            st = await r.json()
        assert st["records"] == 6
        assert st["bytes"] == a.store.bytes_used > 0
        assert st["budget_bytes"] == a.store.settings.budget_bytes
        assert st["evictions"] == {} and st["oldest_age_s"] is not None
        async with a.http.get(f"{a.url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
        assert "et_agent_enqueued_records_total" in text
        samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        assert float(samples["et_agent_queue_records"]) == 6  # set by the /v1/status call

    run(tmp_path, scenario)


def test_unix_socket_takes_the_same_requests(tmp_path: Path) -> None:
    sock = tmp_path / "enqueue.sock"

    async def scenario() -> tuple[int, dict[str, Any], int]:
        cfg = AgentConfig(
            store={"path": str(tmp_path / "q.db"), "synchronous": "NORMAL"},
            uplink={"window": 8, "frame_max_bytes": 4096},
            endpoint={"port": 0, "unix_socket": str(sock)},
        )
        queue = AsyncQueue(Store(cfg.store))
        committer = asyncio.create_task(queue.run())
        endpoint = Endpoint(cfg, queue)
        await endpoint.start()
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as http:
                body = {"stream": "vib", "records": [{"features": [1.0, 2.0], "score": 0.5}] * 3}
                async with http.post("http://localhost/v1/records", json=body) as r:
                    answer = await r.json()
                    status = r.status
            await queue.flush()
            count = await queue.call(lambda: sum(1 for _ in queue.store.records()))
        finally:
            await endpoint.stop()
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
            await queue.close()
        return status, answer, count

    status, answer, count = asyncio.run(scenario())
    assert status == 200 and answer["accepted"] == 3
    assert answer["last_seq"] - answer["first_seq"] == 2
    assert count == 3
