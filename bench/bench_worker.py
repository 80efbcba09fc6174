"""The tier-two worker on many small uploads: CPU per message and per feature (issue 15).

A fresh ``nats-server -js`` per contender (so that neither sees the other's results in
JetStream's duplicate window); ET_FEATURES filled with ``--messages`` upload frames of the
documented size (``--records`` 5 x 16 float32, the real wire format, ``--tenants`` x
``--devices`` each with its own chain), then drained into ET_RESULTS by:

* ``naive``: a straightforward loop on one pull consumer: fetch 1, decode, one onnxruntime
  ``InferenceSession.run`` on its rows, encode the result, ``js.publish`` it (awaiting the
  PubAck, ``Nats-Msg-Id`` = the upload id), ack;
* ``ours``: ``cloud_ingest.worker.Worker``, in this process.

Each is measured from its start to the moment ET_RESULTS holds one result per upload:
CPU seconds of this process (``time.process_time``: every thread; the only other work in
it is a poll of the stream's message count every 50 ms) per message and per feature, and
messages/s. Run as ``python -m bench.bench_worker``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import nats
import numpy as np
from nats.js import JetStreamContext

from bench.figures import save_json
from cloud_ingest.config import IngestConfig, StreamSettings
from cloud_ingest.streams import ensure_streams
from cloud_ingest.tier2 import Tier2Model
from cloud_ingest.worker import Worker
from edge_tier import topics
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.wire import decode_frame, encode_results, upload_id
from edge_tier_harness.brokers import NatsServer
from edge_tier_harness.testkit import upload_frame

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process (``/proc/self/task``), by Python thread name
    (the to_thread pool's are ``asyncio_N``), summed per name."""
    names = {t.native_id: t.name.split("_")[0] for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = names.get(int(task.name), "other")
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return out


@dataclass
class Run:
    contender: str
    messages: int
    records: int
    wall_s: float
    cpu_s: float
    threads_s: dict[str, float]  # CPU seconds by thread name over the run

    @property
    def us_per_message(self) -> float:
        return 1e6 * self.cpu_s / self.messages

    @property
    def us_per_feature(self) -> float:
        return 1e6 * self.cpu_s / self.records

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.wall_s


def make_frames(messages: int, records: int, tenants: int, devices: int) -> list[tuple[str, str, bytes]]:
    """(subject, upload id, frame) of each upload, devices taking turns, each with its chain."""
    rng = np.random.default_rng(15)
    last: dict[tuple[str, str], int] = {}
    out = []
    for u in range(messages):
        tenant, device = f"t{u % tenants}", f"d{(u // tenants) % devices}"
        prev = last.get((tenant, device), 0)
        first = prev + 1
        last[(tenant, device)] = prev + records
        frame = upload_frame(tenant, device, first, prev, rng.normal(0, 4, (records, 16)).astype(np.float32))
        uid = upload_id(tenant, device, first, first + records - 1)
        out.append((topics.features_subject(tenant, device), uid, frame))
    return out


async def fill(js: JetStreamContext, frames: list[tuple[str, str, bytes]]) -> None:
    await ensure_streams(js, StreamSettings())
    for i in range(0, len(frames), 1000):
        acks = [
            await js.publish_async(subject, data, headers={topics.H_MSG_ID: uid})
            for subject, uid, data in frames[i : i + 1000]
        ]
        await asyncio.gather(*acks)


async def results_in(js: JetStreamContext) -> int:
    return (await js.stream_info(topics.RESULTS_STREAM)).state.messages


async def measured(
    contender: str, url: str, messages: int, records: int, start: Callable[[asyncio.Event], Awaitable[None]]
) -> Run:
    """Runs ``start(ready)`` as a task until ET_RESULTS holds ``messages`` results; its cost from
    ``ready`` on (loading the model and binding consumers are not what is measured)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    ready = asyncio.Event()
    task = asyncio.create_task(start(ready))
    await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    cpu0, t0, threads0 = time.process_time(), time.perf_counter(), thread_cpu()
    try:
        while (got := await results_in(js)) < messages:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError(f"{contender}: stopped with {got} of {messages} results stored")
            await asyncio.sleep(0.05)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        threads = {k: v - threads0.get(k, 0.0) for k, v in thread_cpu().items()}
        if got != messages:
            raise RuntimeError(f"{contender}: {got} results stored for {messages} uploads")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await nc.close()
    return Run(
        contender, messages, messages * records, wall, cpu, {k: v for k, v in threads.items() if v > 0}
    )


async def naive_loop(url: str, model: Tier2Model, ready: asyncio.Event) -> None:
    """Fetch 1, decode, infer, publish and await the PubAck, ack: until cancelled."""
    sess, labels = model.session, model.labels
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(topics.FEATURES_SUBJECTS, durable="naive", stream=topics.FEATURES_STREAM)
    ready.set()
    try:
        while True:
            try:
                msgs = await sub.fetch(1, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                f = decode_frame(msg.data)
                label, conf = sess.run(["label", "confidence"], {"embedding": f.features.astype(np.float32)})
                body = encode_results(
                    f, slice(None), labels, label, conf, part=0, parts=1, model=model.name,
                    model_version=model.version, worker="naive", produced_ms=int(time.time() * 1000),
                )  # fmt: skip
                subject = topics.results_subject(f.tenant, f.device)
                await js.publish(subject, body, headers={topics.H_MSG_ID: f.upload_id})
                await msg.ack()
    finally:
        await nc.close()


async def ours_loop(url: str, args: argparse.Namespace, ready: asyncio.Event) -> None:
    cfg = IngestConfig(
        nats={"servers": [url]},
        worker={"providers": ["CPUExecutionProvider"], **dict(args.set or [])},
        log_level="WARNING",
    )
    worker = Worker(cfg)
    task = asyncio.create_task(worker.run())
    await asyncio.wait([task, asyncio.create_task(worker.ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    ready.set()
    await task


def one_run(contender: str, frames: list[tuple[str, str, bytes]], args: argparse.Namespace) -> Run:
    with tempfile.TemporaryDirectory(prefix=f"bench-worker-{contender}-") as d:
        server = NatsServer(Path(d))
        server.start()
        try:

            async def go() -> Run:
                nc = await nats.connect(server.url)
                await fill(nc.jetstream(), frames)
                await nc.close()
                print(f"# {contender}: {len(frames):,} uploads in ET_FEATURES, draining ...", file=sys.stderr)
                if contender == "naive":
                    model = Tier2Model(DEFAULT_MANIFEST, providers=["CPUExecutionProvider"])
                    return await measured(
                        contender,
                        server.url,
                        len(frames),
                        args.records,
                        lambda ready: naive_loop(server.url, model, ready),
                    )
                return await measured(
                    contender,
                    server.url,
                    len(frames),
                    args.records,
                    lambda ready: ours_loop(server.url, args, ready),
                )

            return asyncio.run(go())
        finally:
            server.stop()


def _setting(text: str) -> tuple[str, float]:
    key, _, value = text.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE (a worker setting)")
    return key, float(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_worker", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000, help="uploads for ours")
    ap.add_argument("--naive-messages", type=int, default=5_000, help="uploads for naive (it is slower)")
    ap.add_argument("--records", type=int, default=5, help="records per upload (16 float32 each)")
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--devices", type=int, default=250, help="per tenant")
    ap.add_argument("--only", choices=["naive", "ours"], help="run one contender (profiling)")
    ap.add_argument(
        "--set", type=_setting, action="append", metavar="KEY=VALUE", help="a worker setting for ours"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    runs = []
    for contender in ("naive", "ours"):
        if args.only not in (None, contender):
            continue
        n = args.naive_messages if contender == "naive" else args.messages
        runs.append(one_run(contender, make_frames(n, args.records, args.tenants, args.devices), args))
    base = runs[0] if runs[0].contender == "naive" else None
    print(
        f"Tier-two worker, uploads of {args.records} records x 16 float32, "
        f"{args.tenants} tenants x {args.devices} devices, CPU provider:\n"
    )
    print(
        "| contender | uploads | CPU us/message | CPU us/feature | messages/s | x naive CPU | x naive rate |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        cpu_x = f"{base.us_per_message / r.us_per_message:.1f}" if base else "-"
        rate_x = f"{r.messages_per_s / base.messages_per_s:.1f}" if base else "-"
        print(
            f"| {r.contender} | {r.messages:,} | {r.us_per_message:.0f} | {r.us_per_feature:.1f} | "
            f"{r.messages_per_s:,.0f} | {cpu_x} | {rate_x} |"
        )
    for r in runs:
        where = ", ".join(f"{k} {1e6 * v / r.messages:.0f}" for k, v in sorted(r.threads_s.items()))
        print(f"\n{r.contender}: CPU us/message by thread (/proc, 10 ms ticks): {where}", end="")
    print(f"\n\nPython {platform.python_version()}, {os.cpu_count()} CPUs; nats-server on the same machine.")
    save_json(args.json, {"runs": [{**asdict(r), "us_per_message": r.us_per_message} for r in runs]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
