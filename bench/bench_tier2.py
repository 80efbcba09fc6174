"""Tier-two throughput: the model alone, and the whole worker on JetStream.

**Model** (same embeddings, same ``tier2.onnx``, one run): ``raw onnxruntime``
(``InferenceSession.run`` on each batch for the graph's ``label`` and ``confidence``
outputs, nothing else) against ``ours`` (``Tier2Model.classify``: the same outputs
through the verified model, with shape and finiteness checks), at
batch sizes 1, 8, 64 and 512, in features per second. ``ours / raw`` is the
overhead of our wrapper (goal >= 0.8); ``x batch 1`` is what batching buys.

**Worker** (real nats-server, a fresh one per contender): uploads of a few
records each (what devices send when the prefilter drops most windows) are put
in ET_FEATURES across several tenants and devices, then drained to results:

* ``naive``: a loop that fetches one message, runs the model on its records,
  publishes the result (awaiting JetStream's ack) and acks the message;
* ``ours``: ``cloud_ingest.worker.Worker`` (per-tenant consumers, batches across
  messages, results published concurrently),

in features per second from the first fetch to the last result stored.
Run as ``python -m bench.bench_tier2``; ``--providers CUDAExecutionProvider``
on a GPU host (with onnxruntime-gpu) measures the GPU path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nats
import numpy as np

from bench.figures import save_json
from cloud_ingest.config import IngestConfig, StreamSettings
from cloud_ingest.streams import ensure_streams
from cloud_ingest.tier2 import Tier2Model
from cloud_ingest.worker import Worker
from edge_tier import topics
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.wire import Dtype, decode_frame, encode_frame_parts, encode_results
from edge_tier_harness.brokers import NatsServer

BATCHES = (1, 8, 64, 512)


# -- the model alone ---------------------------------------------------------------------------


def model_rates(x: np.ndarray, batch: int, providers: list[str], repeat: int) -> tuple[float, float]:
    import onnxruntime as ort

    model = Tier2Model(DEFAULT_MANIFEST, providers=providers, max_batch=max(batch, 512))
    sess = ort.InferenceSession(str(DEFAULT_MANIFEST.parent / "tier2.onnx"), providers=model.providers)
    n = len(x) - len(x) % batch
    raw = our = 0.0
    for _ in range(repeat):  # alternate, so that both see the same machine weather
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            sess.run(["label", "confidence"], {"embedding": x[i : i + batch]})
        raw = max(raw, n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            model.classify(x[i : i + batch])
        our = max(our, n / (time.perf_counter() - t0))
    return raw, our


# -- the worker on JetStream -----------------------------------------------------------------


def make_frames(uploads: int, per: int, tenants: int, devices: int) -> list[bytes]:
    rng = np.random.default_rng(5)
    frames, next_seq = [], {}
    for u in range(uploads):
        t, d = f"t{u % tenants}", f"d{(u // tenants) % devices}"
        first = next_seq.get((t, d), 1)
        next_seq[(t, d)] = first + per
        q = rng.integers(-100, 100, (per, 16), dtype=np.int8)
        frames.append(
            encode_frame_parts(
                tenant=t,
                device=d,
                prev_seq=first - 1,
                stream="vibration",
                model="prefilter",
                model_version="1.0.0",
                schema_version=1,
                created_ms=1,
                dtype=Dtype.INT8,
                scale=0.13,
                dim=16,
                seqs=list(range(first, first + per)),
                scores=[0.5] * per,
                times_ms=[1] * per,
                feature_blobs=[row.tobytes() for row in q],
            )
        )
    return frames


async def fill(url: str, frames: list[bytes]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    for i in range(0, len(frames), 500):
        chunk = [decode_frame(f) for f in frames[i : i + 500]]
        await asyncio.gather(
            *(
                js.publish(
                    topics.features_subject(f.tenant, f.device), data, headers={topics.H_MSG_ID: f.upload_id}
                )
                for f, data in zip(chunk, frames[i : i + 500], strict=True)
            )
        )
    await nc.close()


async def results_stored(js: nats.js.JetStreamContext) -> int:
    return (await js.stream_info(topics.RESULTS_STREAM)).state.messages


async def naive_worker(url: str, uploads: int, tenants: int, providers: list[str]) -> float:
    model = Tier2Model(DEFAULT_MANIFEST, providers=providers)
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(topics.FEATURES_SUBJECTS, durable="naive", stream=topics.FEATURES_STREAM)
    done = 0
    t0 = time.perf_counter()
    records = 0
    while done < uploads:
        for msg in await sub.fetch(1, timeout=5):
            f = decode_frame(msg.data)
            x = f.features.astype(np.float32) * np.float32(f.scale)
            labels, conf = model.classify(x)
            body = encode_results(
                f, slice(None), model.labels, labels, conf, part=0, parts=1, model="tier2",
                model_version=model.version, worker="naive", produced_ms=0,
            )  # fmt: skip
            await js.publish(
                topics.results_subject(f.tenant, f.device), body, headers={topics.H_MSG_ID: f.upload_id}
            )
            await msg.ack_sync()
            done += 1
            records += f.n
    elapsed = time.perf_counter() - t0
    await nc.close()
    return records / elapsed


async def our_worker(url: str, uploads: int, records: int, providers: list[str], max_batch: int) -> float:
    cfg = IngestConfig(
        nats={"servers": [url]},
        worker={"providers": providers, "max_batch": max_batch, "max_wait_ms": 2.0, "discover_s": 0.5},
        log_level="WARNING",
    )
    worker = Worker(cfg)
    nc = await nats.connect(url)
    js = nc.jetstream()
    task = asyncio.create_task(worker.run())
    await worker.ready.wait()
    t0 = time.perf_counter()
    while True:  # polled: what is measured is JetStream holding every result
        if await results_stored(js) >= uploads:
            break
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - t0
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await nc.close()
    return records / elapsed


def worker_rates(args: argparse.Namespace, providers: list[str]) -> tuple[float, float]:
    frames = make_frames(args.uploads, args.per_upload, args.tenants, args.devices)
    records = args.uploads * args.per_upload
    rates = []
    for contender in ("naive", "ours"):
        with tempfile.TemporaryDirectory(prefix=f"bench-tier2-{contender}-") as d:
            server = NatsServer(Path(d))
            server.start()
            try:
                asyncio.run(fill(server.url, frames))
                print(f"# worker: {contender} ...", file=sys.stderr, flush=True)
                if contender == "naive":
                    rates.append(asyncio.run(naive_worker(server.url, args.uploads, args.tenants, providers)))
                else:
                    rates.append(
                        asyncio.run(our_worker(server.url, args.uploads, records, providers, args.max_batch))
                    )
            finally:
                server.stop()
    return rates[0], rates[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_tier2", description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=200_000, help="embeddings for the model table")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    ap.add_argument("--uploads", type=int, default=6000, help="features messages for the worker table")
    ap.add_argument("--per-upload", type=int, default=8, help="records per upload")
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--devices", type=int, default=25, help="per tenant")
    ap.add_argument("--max-batch", type=int, default=512)
    ap.add_argument("--skip-worker", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    x = np.random.default_rng(1).normal(0, 4, (args.features, 16)).astype(np.float32)
    model_rates(x[:20_000], 64, args.providers, 1)  # warm-up: caches, allocator, CPU clock
    rows = []
    for batch in BATCHES:
        print(f"# model: batch {batch} ...", file=sys.stderr, flush=True)
        n = min(len(x), max(20_000, batch * 200))
        raw, our = model_rates(x[:n], batch, args.providers, args.repeat)
        rows.append({"batch": batch, "raw": raw, "ours": our})
    base = rows[0]["ours"]
    print(f"Model, {args.providers[0]}:\n")
    print("| batch | raw onnxruntime features/s | ours features/s | ours / raw | ours x batch 1 |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['raw']:,.0f} | {r['ours']:,.0f} | {r['ours'] / r['raw']:.2f} | "
            f"{r['ours'] / base:.1f} |"
        )
    out: dict[str, object] = {"model": rows, "providers": args.providers}
    if not args.skip_worker:
        naive, ours = worker_rates(args, args.providers)
        print(
            f"\nWorker on JetStream: {args.uploads} uploads of {args.per_upload} records, "
            f"{args.tenants} tenants x {args.devices} devices:\n"
        )
        print("| contender | features/s | x naive |\n|---|---:|---:|")
        print(f"| naive (fetch 1, infer, publish, ack) | {naive:,.0f} | 1.0 |")
        print(
            f"| ours (`cloud-ingest worker`, max_batch {args.max_batch}) | {ours:,.0f} | {ours / naive:.1f} |"
        )
        out["worker"] = {"naive": naive, "ours": ours}
    print(
        f"\nPython {platform.python_version()}, {os.cpu_count()} CPUs; best of {args.repeat} for the model."
    )
    save_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
