"""Tier-two workers against a real nats-server: results once each, poison set aside, fair tenants.

Features go straight into the ET_FEATURES stream, as ingest commits them; the
worker runs in this process (or as child processes, for kill -9), and the
checks read ET_RESULTS and ET_DEADLETTER.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from cloud_ingest import metrics
from cloud_ingest.config import IngestConfig
from cloud_ingest.tier2 import Answers, Tier2Model
from cloud_ingest.worker import Outcome, Work, Worker
from edge_tier import topics
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.wire import ResultBatch, decode_frame, decode_results
from edge_tier_harness.brokers import NatsServer
from edge_tier_harness.services import WorkerProcess
from tests.support import (
    frame,
    message_count,
    publish_features,
    result_keys,
    results,
    running_worker,
    stored,
    wait_for_rows,
    wait_until,
    worker_config,
)

DIM = 16


def device_frames(device: str, frames: int, per: int, *, tenant: str = "acme", dim: int = DIM) -> list[bytes]:
    return [frame(1 + i * per, per, i * per, tenant=tenant, device=device, dim=dim) for i in range(frames)]


def test_each_record_gets_the_models_answer_once_in_batches(nats_server: NatsServer) -> None:
    sent = [f for d in ("d1", "d2", "d3") for f in device_frames(d, 10, 30)]

    async def scenario() -> list[ResultBatch]:
        await publish_features(nats_server.url, sent)
        batches_before = metrics.BATCH_RECORDS._sum.get()  # type: ignore[attr-defined]
        async with running_worker(nats_server.url, max_batch=256, max_wait_ms=20):
            got = await wait_for_rows(nats_server.url, 900)
            await asyncio.sleep(0.3)  # anything extra would show now
            got = [decode_results(m.data) for m in await stored(nats_server.url, topics.RESULTS_STREAM)]
        assert metrics.BATCH_RECORDS._sum.get() - batches_before == 900  # type: ignore[attr-defined]
        return got

    got = asyncio.run(scenario())
    keys = result_keys(got)
    assert len(keys) == len(set(keys)) == 900
    model = Tier2Model(DEFAULT_MANIFEST, providers=["CPUExecutionProvider"], warmup=False)
    by_upload = {b.upload_id: b for b in got}
    for data in sent:
        f = decode_frame(data)
        b = by_upload[f.upload_id]
        labels, conf = model.classify(f.features)
        assert b.seqs == f.seqs.tolist()
        assert b.labels == [model.labels[i] for i in labels]
        assert np.allclose(b.confidences, conf, atol=1e-4)
        assert b.model == "tier2" and b.model_version == model.version


def test_large_uploads_are_split_into_parts_each_written_once(nats_server: NatsServer) -> None:
    async def scenario() -> list[ResultBatch]:
        await publish_features(nats_server.url, device_frames("big", 2, 2500))
        async with running_worker(nats_server.url, results_max_records=1000, max_batch=512):
            return await wait_for_rows(nats_server.url, 5000)

    got = asyncio.run(scenario())
    assert sorted((b.upload_id, b.part, b.parts) for b in got) == [
        ("acme.big.1-2500", p, 3) for p in range(3)
    ] + [("acme.big.2501-5000", p, 3) for p in range(3)]
    keys = result_keys(got)
    assert len(keys) == len(set(keys)) == 5000


def test_poison_messages_are_retried_then_dead_lettered_and_hold_nothing_back(
    nats_server: NatsServer,
) -> None:
    good = device_frames("ok", 5, 20)
    wrong_shape = frame(1, 5, 0, device="narrow", dim=8)
    nan = np.full((4, DIM), np.nan, np.float32)
    non_finite = frame(1, 4, 0, device="nan", values=nan)

    async def scenario() -> tuple[list[ResultBatch], list[Any], float, float]:
        await publish_features(nats_server.url, [*good, wrong_shape, non_finite])
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().publish(topics.features_subject("acme", "junk"), b"not a frame at all")
        await nc.close()
        t0 = time.monotonic()
        async with running_worker(nats_server.url, max_deliveries=3, backoff_s=[0.3, 0.6]):
            got = await wait_for_rows(nats_server.url, 100)
            t_good = time.monotonic() - t0
            deadline = time.monotonic() + 20
            while len(dlq := await stored(nats_server.url, topics.DEADLETTER_STREAM)) < 3:
                assert time.monotonic() < deadline, f"only {len(dlq)} dead letters"
                await asyncio.sleep(0.1)
            t_dlq = time.monotonic() - t0
            await asyncio.sleep(0.5)  # nothing more comes
            return got, await stored(nats_server.url, topics.DEADLETTER_STREAM), t_good, t_dlq

    got, dlq, t_good, t_dlq = asyncio.run(scenario())
    assert len(result_keys(got)) == len(set(result_keys(got))) == 100
    assert {b.device for b in got} == {"ok"}
    assert t_good < t_dlq - 0.5, "good messages waited for the poison ones"
    reasons = {m.subject: m.headers for m in dlq}
    reason = {topics.parse_dlq_subject(s)[2]: h[topics.H_REASON] for s, h in reasons.items()}
    assert set(reasons) == {topics.dlq_subject("worker", "acme", d) for d in ("narrow", "nan", "junk")}
    assert "wrong shape: 8 features" in reason["narrow"]
    assert "non-finite" in reason["nan"]
    assert "undecodable" in reason["junk"]
    assert all(h[topics.H_DELIVERIES] == "3" and h[topics.H_SOURCE] == "worker" for h in reasons.values())
    assert next(m.data for m in dlq if m.subject.endswith(".junk")) == b"not a frame at all"


class _FailsOnMarker:
    """A stand-in model (no broker here) that fails any call containing a marked row."""

    dim, labels = DIM, ["a", "b"]

    def answer(self, x: np.ndarray) -> Answers:
        if (x == 666).any():
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")
        return Answers(np.zeros(len(x), np.int64), np.full(len(x), 0.9, np.float32))


def test_an_inference_error_sets_aside_only_its_own_message() -> None:
    stand_in = _FailsOnMarker()
    w = Worker(IngestConfig(), model=stand_in)  # type: ignore[arg-type]
    batch = []
    for i in range(4):
        values = np.full((3, DIM), 666.0 if i == 2 else 0.5, np.float32)
        data = frame(1 + 3 * i, 3, 3 * i, values=values)
        f = decode_frame(data)
        batch.append(Work(None, f, f.upload_id, values, stand_in))  # type: ignore[arg-type]
    out: list[Outcome] = w.infer(batch)
    assert [o.error is None for o in out] == [True, True, False, True]
    assert "RUNTIME_EXCEPTION" in (out[2].error or "")
    assert all(o.labels is not None and len(o.labels) == 3 for i, o in enumerate(out) if i != 2)


def test_a_flooding_tenant_does_not_hold_back_another(nats_server: NatsServer) -> None:
    """A 120k-record backlog of one tenant, held to 20k features/s; the other's
    uploads, sent while the backlog drains, are answered within a fraction of a second."""
    flood = device_frames("f", 120, 1000, tenant="flood")

    async def scenario() -> tuple[list[float], int, float]:
        await publish_features(nats_server.url, flood)
        latencies: list[float] = []
        async with running_worker(
            nats_server.url, tenant_rates={"flood": 20_000}, tenant_burst=5_000, max_batch=1024, prefetch=8
        ):
            await asyncio.sleep(1.0)  # the flood is being worked on
            nc = await nats.connect(nats_server.url)
            js = nc.jetstream()
            sub = await nc.subscribe(topics.results_subject("quiet", "q"))
            for i in range(15):
                data = frame(1 + 10 * i, 10, 10 * i, tenant="quiet", device="q", dim=DIM)
                t0 = time.monotonic()
                await js.publish(topics.features_subject("quiet", "q"), data)
                await sub.next_msg(timeout=10)
                latencies.append(time.monotonic() - t0)
                await asyncio.sleep(0.1)
            await nc.close()
            done = sum(len(b.seqs) for b in await wait_for_rows(nats_server.url, 0) if b.tenant == "flood")
            elapsed = time.monotonic()
            await wait_for_rows(nats_server.url, 120_150, within=30)
            drain = time.monotonic() - elapsed
        return latencies, done, drain

    latencies, flood_done_when_quiet_finished, drain = asyncio.run(scenario())
    assert flood_done_when_quiet_finished < 100_000, "the flood was not still queued: the test proves nothing"
    assert max(latencies) < 0.5, f"quiet tenant latencies {sorted(latencies)[-3:]}"
    assert drain > 0.5  # the bucket held the flood back
    keys = result_keys(results(nats_server.url))
    assert len(keys) == len(set(keys)) == 120_150


PER_TENANT = 500  # uploads of 400 records: some seconds of work for two workers


def test_workers_share_the_consumer_and_kill_9_mid_batch_leaves_each_result_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    frames = [f for t in ("t1", "t2", "t3", "t4") for f in device_frames("k", PER_TENANT, 400, tenant=t)]
    total = 4 * PER_TENANT * 400
    asyncio.run(publish_features(nats_server.url, frames))

    def rows() -> int:  # every upload here is one result message of 400 rows
        return 400 * asyncio.run(message_count(nats_server.url, topics.RESULTS_STREAM))

    def spawn(name: str) -> WorkerProcess:
        p = WorkerProcess(
            tmp_path / name,
            # unlimited, so that a worker is always busy: a kill lands mid-batch
            worker_config(nats_server.url, instance=name, ack_wait_s=2.0, max_batch=512, prefetch=4),
            name=name,
        )
        p.start(timeout=30)
        return p

    a, b = spawn("wa"), spawn("wb")
    try:
        wait_until(lambda: rows() >= 20_000, 60, "results to flow")
        for victim in (a, b):  # b right after a is back: the run must not end in between
            assert rows() < total, "everything was done before the kill: the test proves nothing"
            victim.kill()  # SIGKILL, mid-batch: fetched, maybe answered, not acked
            victim.start(timeout=30)
        wait_until(lambda: rows() >= total, 120, "every record's result")
        time.sleep(2.5)  # past ack_wait: a redelivered message would add a row now
        got = results(nats_server.url)
        redelivered = asyncio.run(redeliveries(nats_server.url, ["t1", "t2", "t3", "t4"]))
    finally:
        a.stop()
        b.stop()
    keys = result_keys(got)
    assert len(keys) - len(set(keys)) == 0, "duplicate results"
    assert len(set(keys)) == total
    assert {b.worker for b in got} == {"wa", "wb"}, "the two workers did not split the work"
    assert redelivered > 0, "no message was in flight at a kill: the test proves nothing"


async def redeliveries(url: str, tenants: list[str]) -> int:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        infos = [await js.consumer_info(topics.FEATURES_STREAM, topics.worker_consumer(t)) for t in tenants]
        # consumer sequences count every delivery, redeliveries too
        return sum(i.delivered.consumer_seq - PER_TENANT for i in infos)
    finally:
        await nc.close()


def test_a_result_written_just_before_a_crash_is_not_written_again(nats_server: NatsServer) -> None:
    """The worker died after JetStream stored the result and before it acked the features."""
    sent = device_frames("c", 3, 10)
    first = decode_frame(sent[0])

    async def scenario() -> list[ResultBatch]:
        await publish_features(nats_server.url, sent)
        nc = await nats.connect(nats_server.url)
        earlier = frame(1, 10, 0, device="c", dim=DIM)  # what the dead worker had written
        doc = {
            "upload_id": first.upload_id, "tenant": "acme", "device": "c", "stream": "vibration",
            "model": "tier2", "model_version": "1.0.0", "worker": "dead", "produced_ms": 1,
            "seqs": list(range(1, 11)), "times_ms": [1] * 10, "scores": [0.5] * 10,
            "labels": ["healthy"] * 10, "confidences": [0.9] * 10,
        }  # fmt: skip
        assert decode_frame(earlier).upload_id == first.upload_id
        await nc.jetstream().publish(
            topics.results_subject("acme", "c"),
            ResultBatch(**doc).model_dump_json().encode(),
            headers={topics.H_MSG_ID: first.upload_id},
        )
        await nc.close()
        async with running_worker(nats_server.url):
            await wait_for_rows(nats_server.url, 30)
            await asyncio.sleep(0.5)
        return [decode_results(m.data) for m in await stored(nats_server.url, topics.RESULTS_STREAM)]

    got = asyncio.run(scenario())
    assert [b.worker for b in got if b.upload_id == first.upload_id] == ["dead"]
    keys = result_keys(got)
    assert len(keys) == len(set(keys)) == 30


def test_nats_server_kill_9_mid_run_still_answers_each_record_once(nats_server: NatsServer) -> None:
    sent = [f for d in ("n1", "n2") for f in device_frames(d, 300, 200)]
    total = 2 * 300 * 200

    async def scenario() -> list[ResultBatch]:
        await publish_features(nats_server.url, sent)
        async with running_worker(
            nats_server.url, ack_wait_s=2.0, max_batch=256, prefetch=4, tenant_rate=20_000
        ):
            deadline = time.monotonic() + 30
            while (n := await message_count(nats_server.url, topics.RESULTS_STREAM)) < 20:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert n < 300, "done before the fault: the test proves nothing"
            await asyncio.to_thread(nats_server.kill)  # SIGKILL: in-flight publishes and acks are lost
            await asyncio.sleep(0.5)
            await asyncio.to_thread(nats_server.start)
            await wait_for_rows(nats_server.url, total, within=60)
            await asyncio.sleep(2.5)  # past ack_wait: a redelivery would add rows now
            return [decode_results(m.data) for m in await stored(nats_server.url, topics.RESULTS_STREAM)]

    got = asyncio.run(scenario())
    keys = result_keys(got)
    assert len(keys) - len(set(keys)) == 0, "duplicate results"
    assert len(set(keys)) == total


@pytest.mark.parametrize("max_records", [4096, 3, 1])
def test_result_bodies_are_byte_for_byte_what_encode_results_writes(max_records: int) -> None:
    from types import SimpleNamespace

    from cloud_ingest.result_messages import Answered, result_messages
    from edge_tier.wire import encode_results

    rng = np.random.default_rng(3)
    labels = ["ok", 'say "hi"\\', "défaut", "\u2603", "", "x" * 40]
    model: Any = SimpleNamespace(name='tier "2"', version="1.0-ü", labels=labels)
    answered = []
    for i in range(12):
        n = 1 + i % 7
        f = decode_frame(frame(1 + 10 * i, n, 10 * i if i else 0, device=f"d-{i % 3}", dim=4))
        conf = rng.random(n).astype(np.float32) * np.float32(1.2) - np.float32(0.1)  # clipped to 0..1
        answered.append(Answered(f, f.upload_id, model, rng.integers(0, 6, n), conf))
    f = answered[0].frame
    regressor: Any = SimpleNamespace(name="reg", version="2", labels=["mm"])
    answered.append(
        Answered(f, f.upload_id, regressor, np.zeros(f.n, np.int64), np.zeros(f.n), np.full(f.n, 0.1))
    )
    got = result_messages(answered, worker="w-1", max_records=max_records, produced_ms=1234)
    for a, messages in zip(answered, got, strict=True):
        n, parts = a.frame.n, -(-a.frame.n // max_records)
        assert len(messages) == parts
        for part, (subject, body, headers) in enumerate(messages):
            rows = slice(part * max_records, (part + 1) * max_records)
            assert body == encode_results(
                a.frame, rows, a.model.labels, a.labels[rows], a.confidences[rows], part=part, parts=parts,
                model=a.model.name, model_version=a.model.version, worker="w-1", produced_ms=1234,
                values=None if a.values is None else a.values[rows],
            )  # fmt: skip
            decode_results(body)  # and it is a valid ResultBatch
            seqs = a.frame.seqs[rows]
            assert subject == topics.results_subject(a.frame.tenant, a.frame.device)
            assert headers[topics.H_MSG_ID] == topics.result_msg_id(a.upload_id, part)
            assert (headers[topics.H_FIRST], headers[topics.H_LAST]) == (str(seqs[0]), str(seqs[-1]))
            assert headers[topics.H_RECORDS] == str(len(seqs)) and headers[topics.H_PARTS] == str(parts)
        assert sum(int(h[topics.H_RECORDS]) for _, _, h in messages) == n


def test_a_deleted_consumer_is_bound_again_and_nothing_is_left_unanswered(nats_server: NatsServer) -> None:
    async def scenario() -> list[ResultBatch]:
        await publish_features(nats_server.url, device_frames("d1", 20, 5))
        async with running_worker(nats_server.url) as w:
            await wait_for_rows(nats_server.url, 100)
            nc = await nats.connect(nats_server.url)
            await nc.jetstream().delete_consumer(topics.FEATURES_STREAM, topics.worker_consumer("acme"))
            await nc.close()
            # JetStream ends the open pull request (409 Consumer Deleted), and the worker binds
            # again: a new consumer, from the stream's start (the first 100 come back, duplicates)
            await publish_features(
                nats_server.url, [frame(101 + i * 5, 5, 100 + i * 5, device="d1", dim=DIM) for i in range(20)]
            )
            await wait_for_rows(nats_server.url, 200, within=15)
            assert not w.jetstream_failing
        return [decode_results(m.data) for m in await stored(nats_server.url, topics.RESULTS_STREAM)]

    keys = result_keys(asyncio.run(scenario()))
    assert len(keys) == len(set(keys)) == 200
