"""End to end: agent enqueue -> JetStream with receipts, ours vs a naive per-record pipeline.

Every record is 128 float32 features (512 bytes) and a float32 score. A record
counts only once the cloud's receipt for it has reached the device and the
device has deleted it: the figure is *records receipted per second*, from the
first enqueue until the device's queue is empty. Both contenders run in the
same invocation, one after the other, each on a fresh pair of real brokers on
loopback (mosquitto and ``nats-server -js``, file store) in a temp dir, and
each rate is divided by naive's.

* ``ours``: the agent (``edge-agent run``) and the ingest (``cloud-ingest run``)
  as child processes, configured through their TOML config only. Load
  generator threads here POST the compact binary form
  (``application/x-edge-tier-features``, ``durable=1``) to the agent's
  endpoint as fast as the agent answers (saturating, ``--repeat`` times), then
  wait until ``GET /v1/status`` says ``records == 0`` and ``frames_in_flight == 0``.
  At the end the ``Et-Records`` headers of the ET_FEATURES stream must add up
  to the number of records enqueued, and their seq ranges must be exactly the
  ranges the agent acknowledged (no loss, no overlap).
* ``naive``: store-and-forward done the obvious way, written here. The device
  (in this process) does ``INSERT`` + commit per record (WAL,
  ``synchronous=FULL``), one MQTT QoS1 message per record (8-byte seq + 512
  feature bytes), and deletes the row (one commit) when that record's receipt
  arrives. The ingest (a child process) is a paho subscriber that, per
  message, awaits one ``js.publish(..., headers={"Nats-Msg-Id": ...})`` and
  then publishes one receipt.
* ``ours @ half load``: ours again with paced posters offering half the median
  rate of the saturating runs; latency per record = time its receipt reached a paho
  subscriber on the device's receipt topic (in this process) minus the time
  the POST that enqueued it returned (durable). p50/p99/max reported.

CPU seconds per process are read from ``/proc/PID/stat`` over the measured
window. Run as ``python -m bench.bench_pipeline``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import os
import platform
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
import numpy as np
import paho.mqtt.client as paho
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from paho.mqtt.enums import CallbackAPIVersion

from bench import naive_pipeline
from bench.figures import save_json
from edge_tier import topics
from edge_tier_harness import testkit
from edge_tier_harness.brokers import Mosquitto, NatsServer
from edge_tier_harness.services import AgentProcess, IngestProcess, agent_drained, agent_status
from edge_tier_harness.testkit import CpuMeter, percentiles_ms, temp_dir, wait_until

DIM = 128
RECORD_BYTES = DIM * 4
TENANT, DEVICE, STREAM = "bench", "dev-1", "bench"
BODY_POOL = 8  # distinct request bodies the posters cycle through (content does not matter)
PROC_NAMES = ("agent", "ingest", "mosquitto", "nats-server", "bench")


# -- results -------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    contender: str
    records: int
    seconds: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    offered_per_s: float | None = None
    posts: int = 0
    frames: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)  # enqueue -> receipt
    post_ms: dict[str, float] = field(default_factory=dict)  # POST call -> durable return
    verified: str = ""
    note: str = ""
    ratio: float | None = None

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


# -- helpers -------------------------------------------------------------------


def start_brokers(
    stack: contextlib.ExitStack, d: Path, args: argparse.Namespace
) -> tuple[Mosquitto, NatsServer]:
    mosq = Mosquitto(
        d / "mosquitto",
        max_queued_messages=args.mosquitto_max_queued,
        autosave_interval=args.mosquitto_autosave_s,
    )
    stack.callback(mosq.stop)
    mosq.start()
    nsrv = NatsServer(d / "nats")
    stack.callback(nsrv.stop)
    nsrv.start()
    return mosq, nsrv


class ReceiptWatcher:
    """A paho subscriber on a device's receipt topic: when each receipt arrived, for which seqs.

    ``parse`` turns a payload into ``(first_seq, last_seq)`` or None (not a delivery).
    """

    def __init__(self, port: int, topic: str, parse: Callable[[bytes], tuple[int, int] | None]) -> None:
        self.parse = parse
        self.ranges: dict[int, tuple[int, float]] = {}  # first_seq -> (last_seq, monotonic arrival)
        self.records = 0
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, 1)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"no SUBACK for {topic}")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        t = time.monotonic()
        rng = self.parse(msg.payload)
        if rng is None:
            return
        with self._cond:
            if rng[0] not in self.ranges:
                self.ranges[rng[0]] = (rng[1], t)
                self.records += rng[1] - rng[0] + 1
                self._cond.notify_all()

    def wait_records(self, n: int, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.records >= n, timeout):
                raise TimeoutError(f"receipts for {self.records} of {n} records after {timeout:.0f}s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def parse_our_receipt(payload: bytes) -> tuple[int, int] | None:
    r = json.loads(payload)
    if r.get("status") not in ("committed", "duplicate"):
        return None
    return int(r["first_seq"]), int(r["last_seq"])


# -- ours ----------------------------------------------------------------------


def agent_config(d: Path, mqtt_port: int, args: argparse.Namespace) -> dict[str, Any]:
    return testkit.agent_config(
        d,
        mqtt_port,
        device={"tenant": TENANT, "device": DEVICE},
        store={
            "budget_bytes": args.budget_mb * 1024 * 1024,
            "policy": args.policy,
            "synchronous": args.synchronous,
            "commit_window_ms": args.commit_window_ms,
            "commit_max_records": args.commit_max_records,
        },
        uplink={
            "frame_max_records": args.frame_records,
            "frame_max_bytes": args.frame_bytes,
            "window": args.window,
            "receipt_timeout_s": 30.0,
            "status_interval_s": 10.0,
        },
        endpoint={"max_body_bytes": 64 * 1024 * 1024},
    )


def ingest_config(mqtt_port: int, nats_url: str) -> dict[str, Any]:
    return testkit.ingest_config(mqtt_port, nats_url, ingest={"publish_timeout_s": 10.0})


def make_bodies(batch: int, seed: int = 7) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(BODY_POOL):
        scores = rng.random(batch, dtype=np.float32)
        feats = rng.standard_normal((batch, DIM), dtype=np.float32)
        out.append(scores.astype("<f4").tobytes() + feats.astype("<f4").tobytes())
    return out


@dataclass(slots=True)
class Post:
    started: float
    returned: float
    first_seq: int
    last_seq: int


class Poster(threading.Thread):
    """POSTs ``count`` bodies over one keep-alive connection; paced when ``interval`` > 0."""

    def __init__(
        self,
        port: int,
        bodies: list[bytes],
        count: int,
        stop: threading.Event,
        *,
        start_at: float = 0.0,
        interval: float = 0.0,
        offset: int = 0,
    ) -> None:
        super().__init__(daemon=True, name=f"poster-{offset}")
        self.port, self.bodies, self.count, self.stop = port, bodies, count, stop
        self.start_at, self.interval, self.offset = start_at, interval, offset
        self.posts: list[Post] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        path = f"/v1/records?stream={STREAM}&dim={DIM}&durable=1"
        headers = {"Content-Type": "application/x-edge-tier-features"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            for k in range(self.count):
                if self.stop.is_set():
                    return
                if self.interval:
                    delay = self.start_at + k * self.interval - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                t = time.monotonic()
                conn.request("POST", path, self.bodies[(self.offset + k) % len(self.bodies)], headers)
                resp = conn.getresponse()
                data = resp.read()
                done = time.monotonic()
                if resp.status != 200:
                    raise RuntimeError(f"POST answered {resp.status}: {data[:300]!r}")
                body = json.loads(data)
                self.posts.append(Post(t, done, int(body["first_seq"]), int(body["last_seq"])))
        except BaseException as e:
            self.error = e
            self.stop.set()
        finally:
            conn.close()


def run_posters(posters: list[Poster], stop: threading.Event) -> None:
    for p in posters:
        p.start()
    try:
        for p in posters:
            while p.is_alive():
                p.join(0.2)  # short joins so Ctrl-C gets through
    finally:
        stop.set()
    for p in posters:
        if p.error is not None:
            raise RuntimeError(f"{p.name} failed: {p.error!r}") from p.error


async def _stream_ranges(url: str, stream: str) -> list[tuple[int, int, int]]:
    """(first_seq, last_seq, records) of every message in ``stream``, from headers only."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        total = info.state.messages
        out: list[tuple[int, int, int]] = []
        if not total:
            return out
        sub = await js.pull_subscribe(
            topics.FEATURES_SUBJECTS,
            stream=stream,
            config=ConsumerConfig(
                headers_only=True, ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL
            ),
        )
        while len(out) < total:
            for m in await sub.fetch(min(512, total - len(out)), timeout=10):
                h = m.headers or {}
                out.append((int(h[topics.H_FIRST]), int(h[topics.H_LAST]), int(h[topics.H_RECORDS])))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


def verify_ours(nats_url: str, acked: list[tuple[int, int]]) -> str:
    """Stored ranges must tile exactly the acknowledged ranges; returns a summary."""
    stored = sorted(asyncio.run(_stream_ranges(nats_url, topics.FEATURES_STREAM)))
    n_stored = sum(r[2] for r in stored)
    n_acked = sum(b - a + 1 for a, b in acked)
    assert n_stored == n_acked, f"ours: {n_stored} records in ET_FEATURES (Et-Records), {n_acked} enqueued"
    # Both sides as sets of seqs (ranges merged): equal, and the stored ranges never overlap.
    for (_, last, _), (first, _, _) in itertools.pairwise(stored):
        assert first > last, f"ours: stored frames overlap ({last} >= {first})"
    stored_seqs = np.concatenate([np.arange(a, b + 1) for a, b, _ in stored])
    acked_seqs = np.sort(np.concatenate([np.arange(a, b + 1) for a, b in acked]))
    assert np.array_equal(stored_seqs, acked_seqs), "ours: stored seqs differ from acknowledged seqs"
    return f"ok: {n_stored} records in {len(stored)} messages = enqueued"


def record_latencies(posts: list[Post], watcher: ReceiptWatcher) -> tuple[np.ndarray, np.ndarray]:
    """Per record: (receipt arrival - POST return, receipt arrival - POST start), seconds."""
    firsts = np.array(sorted(watcher.ranges), dtype=np.int64)
    lasts = np.array([watcher.ranges[f][0] for f in firsts], dtype=np.int64)
    times = np.array([watcher.ranges[f][1] for f in firsts])
    seqs = np.concatenate([np.arange(p.first_seq, p.last_seq + 1) for p in posts])
    sizes = [p.last_seq - p.first_seq + 1 for p in posts]
    ret = np.repeat(np.array([p.returned for p in posts]), sizes)
    beg = np.repeat(np.array([p.started for p in posts]), sizes)
    idx = np.searchsorted(firsts, seqs, side="right") - 1
    assert (idx >= 0).all() and (seqs <= lasts[idx]).all(), "a record has no receipt"
    rt = times[idx]
    return rt - ret, rt - beg


def run_ours(args: argparse.Namespace, *, records: int, rate: float | None, label: str, batch: int) -> Result:
    nposters = args.posters
    posts_total = max(1, records // batch)
    records = posts_total * batch
    bodies = make_bodies(batch)
    with temp_dir(args.dir, "bench-pipeline-ours", args.keep) as d, contextlib.ExitStack() as stack:
        mosq, nsrv = start_brokers(stack, d, args)
        ingest = IngestProcess(d / "ingest", ingest_config(mosq.port, nsrv.url), name="ingest")
        stack.callback(ingest.stop, 15.0)
        ingest.start(timeout=30)
        agent = AgentProcess(d / "agent", agent_config(d, mosq.port, args), name="agent")
        stack.callback(agent.stop, 15.0)
        agent.start(timeout=30)
        watcher = ReceiptWatcher(mosq.port, topics.mqtt_topic(TENANT, DEVICE, "receipt"), parse_our_receipt)
        stack.callback(watcher.close)

        # Warm-up: one batch end to end (kinds row, ingest ledger, connections), not timed.
        stop = threading.Event()
        warm = Poster(agent.port, bodies, 1, stop)
        run_posters([warm], stop)
        watcher.wait_records(batch, 30)
        wait_until(lambda: agent_drained(agent.port), 30, "the warm-up to drain", 0.02)
        warm_frames = len(watcher.ranges)

        meter = CpuMeter(
            {
                "agent": agent.pid,
                "ingest": ingest.pid,
                "mosquitto": mosq.pid,
                "nats-server": nsrv.pid,
                "bench": os.getpid(),
            }
        )
        stop = threading.Event()
        start_at = time.monotonic() + 0.05
        interval = nposters * batch / rate if rate else 0.0
        posters = [
            Poster(
                agent.port,
                bodies,
                posts_total // nposters + (1 if i < posts_total % nposters else 0),
                stop,
                start_at=start_at + i * interval / nposters,
                interval=interval,
                offset=i,
            )
            for i in range(nposters)
        ]
        meter.start()
        t0 = time.monotonic()
        run_posters(posters, stop)
        t_posted = time.monotonic()
        watcher.wait_records(batch + records, args.drain_timeout_s)
        wait_until(
            lambda: agent_drained(agent.port), args.drain_timeout_s, "the agent's queue to drain", 0.005
        )
        t_end = time.monotonic()
        cpu = meter.stop()
        if rate:
            t0 = start_at  # paced: the clock starts at the first scheduled POST

        posts = [p for pp in posters for p in pp.posts]
        acked = [(p.first_seq, p.last_seq) for p in [*warm.posts, *posts]]
        verified = verify_ours(nsrv.url, acked)
        frames = len(watcher.ranges) - warm_frames
        lat_ret, _ = record_latencies(posts, watcher)
        post_s = np.array([p.returned - p.started for p in posts])
        st = agent_status(agent.port)
        assert st is not None and not st["evictions"], f"ours: the queue evicted records: {st['evictions']}"
    return Result(
        contender=label,
        records=records,
        seconds=t_end - t0,
        cpu_s=cpu,
        offered_per_s=rate,
        posts=len(posts),
        frames=frames,
        latency_ms=percentiles_ms(lat_ret),
        post_ms=percentiles_ms(post_s),
        verified=verified,
        note=f"{nposters} posters x {batch} rec/POST; posting took {t_posted - t0:.2f}s, drain after it "
        f"{t_end - t_posted:.2f}s; {records / max(frames, 1):,.0f} rec/frame",
    )


# -- naive ---------------------------------------------------------------------


def run_naive(args: argparse.Namespace) -> Result:
    n = args.naive_records
    with temp_dir(args.dir, "bench-pipeline-naive", args.keep) as d, contextlib.ExitStack() as stack:
        mosq, nsrv = start_brokers(stack, d, args)
        run = naive_pipeline.run(d, mosq, nsrv, n, DIM, args.drain_timeout_s)
    return Result(
        contender="naive (per-record commit, message, publish, receipt)",
        records=n,
        seconds=run.seconds,
        cpu_s=run.cpu_s,
        frames=n,
        verified=f"ok: {run.stored} messages in {naive_pipeline.STREAM} = enqueued",
        note=f"enqueue+publish loop took {run.posted_s:.2f}s; device runs in the bench process",
    )


# -- report --------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: list[Result]) -> str:
    lines = [
        "| contender | records | seconds | features/s | x naive | CPU s: agent/device | ingest | mosquitto "
        "| nats-server | load gen | cores busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c = r.cpu_s
        cells = [f"{c[k]:.2f}" if k in c else "-" for k in PROC_NAMES]
        busy = sum(c.values()) / r.seconds if r.seconds > 0 else 0.0
        lines.append(
            f"| {r.contender} | {r.records:,} | {r.seconds:.2f} | {r.rate:,.0f} | {_fmt(r.ratio, '.1f')} | "
            f"{' | '.join(cells)} | {busy:.2f} |"
        )
    return "\n".join(lines)


def latency_table(results: list[Result]) -> str:
    lines = [
        "| contender | offered/s | achieved/s | enqueue->receipt p50 ms | p99 ms | max ms | "
        "POST p50 ms | POST p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.latency_ms:
            continue
        lat, post = r.latency_ms, r.post_ms
        lines.append(
            f"| {r.contender} | {_fmt(r.offered_per_s, ',.0f')} | {r.rate:,.0f} | {lat['p50']:.1f} | "
            f"{lat['p99']:.1f} | {lat['max']:.1f} | {post['p50']:.1f} | {post['p99']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=400_000, help="records for ours, saturating (400000)")
    ap.add_argument("--naive-records", type=int, default=6_000, help="records for naive (6000)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="saturating runs of ours (3); the half-load run offers a fraction of their median",
    )
    ap.add_argument(
        "--latency-seconds",
        type=float,
        default=6.0,
        help="length of the half-load run in seconds of offered load (6); 0 skips it",
    )
    ap.add_argument("--load-fraction", type=float, default=0.5, help="offered load of the latency run (0.5)")
    ap.add_argument("--batch", type=int, default=1000, help="records per POST (1000)")
    ap.add_argument(
        "--latency-batch",
        type=int,
        default=0,
        help="records per POST in the half-load run (default: --batch)",
    )
    ap.add_argument("--posters", type=int, default=4, help="concurrent posting threads (4)")
    ap.add_argument("--frame-records", type=int, default=4096, help="uplink.frame_max_records (4096)")
    ap.add_argument("--frame-bytes", type=int, default=4 * 1024 * 1024, help="uplink.frame_max_bytes (4 MiB)")
    ap.add_argument("--window", type=int, default=8, help="uplink.window, frames in flight (8)")
    ap.add_argument(
        "--policy",
        default="lowest_score",
        choices=["oldest", "lowest_score", "block"],
        help="store.policy (lowest_score, the agent's default)",
    )
    ap.add_argument(
        "--synchronous",
        default="FULL",
        choices=["FULL", "NORMAL", "EXTRA"],
        help="store.synchronous (FULL: survives power loss; NORMAL only for diagnosis)",
    )
    ap.add_argument(
        "--budget-mb",
        type=int,
        default=2048,
        help="store.budget_bytes in MiB (2048: no eviction in these runs)",
    )
    ap.add_argument("--commit-window-ms", type=float, default=0.0, help="store.commit_window_ms (0)")
    ap.add_argument("--commit-max-records", type=int, default=8192, help="store.commit_max_records (8192)")
    ap.add_argument(
        "--mosquitto-autosave-s",
        type=int,
        default=60,
        help="mosquitto autosave_interval (60; the class default of 1 s rewrites its "
        "whole in-memory store every second)",
    )
    ap.add_argument(
        "--mosquitto-max-queued", type=int, default=1_000_000, help="mosquitto max_queued_messages (1000000)"
    )
    ap.add_argument("--drain-timeout-s", type=float, default=120.0)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temp dirs (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (queue, broker data, logs)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.records < args.batch or args.posters < 1:
        ap.error("need --repeat >= 1, --posters >= 1 and --records >= --batch")

    # SIGTERM unwinds like Ctrl-C, so every child process is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    probe = Path(args.dir or tempfile.gettempdir())
    config = {
        "uplink.frame_max_records": args.frame_records,
        "uplink.frame_max_bytes": args.frame_bytes,
        "uplink.window": args.window,
        "store.policy": args.policy,
        "store.synchronous": args.synchronous,
        "store.budget_bytes": args.budget_mb * 1024 * 1024,
        "store.commit_window_ms": args.commit_window_ms,
        "store.commit_max_records": args.commit_max_records,
        "mosquitto": f"max_queued_messages {args.mosquitto_max_queued}, "
        f"autosave_interval {args.mosquitto_autosave_s}",
    }
    print(
        f"# pipeline: {DIM}-dim float32 records ({RECORD_BYTES} B) + score, agent -> mosquitto -> ingest "
        f"-> JetStream (file) -> receipt\n# dir {probe}, python {platform.python_version()}, "
        f"sqlite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs\n# config: "
        + ", ".join(f"{k}={v}" for k, v in config.items()),
        file=sys.stderr,
    )

    results: list[Result] = []
    naive: Result | None = None
    if not args.skip_naive:
        print(f"# running naive ({args.naive_records} records) ...", file=sys.stderr, flush=True)
        naive = run_naive(args)
        results.append(naive)
        print(f"#   {naive.rate:,.0f} features/s", file=sys.stderr, flush=True)
    saturating: list[Result] = []
    for i in range(args.repeat):
        label = "ours (saturating)" if args.repeat == 1 else f"ours (saturating) #{i + 1}"
        print(f"# running {label} ({args.records} records) ...", file=sys.stderr, flush=True)
        r = run_ours(args, records=args.records, rate=None, label=label, batch=args.batch)
        saturating.append(r)
        print(f"#   {r.rate:,.0f} features/s", file=sys.stderr, flush=True)
    results += saturating
    max_rate = float(np.median([r.rate for r in saturating]))
    if args.latency_seconds > 0:
        rate = max_rate * args.load_fraction
        n = int(rate * args.latency_seconds)
        print(
            f"# running ours at {args.load_fraction:g} of the median max ({rate:,.0f}/s offered, "
            f"{n} records) ...",
            file=sys.stderr,
            flush=True,
        )
        half = run_ours(
            args,
            records=n,
            rate=rate,
            label=f"ours @ {args.load_fraction:g} load (paced)",
            batch=args.latency_batch or args.batch,
        )
        results.append(half)
        print(
            f"#   p50 {half.latency_ms['p50']:.1f} ms, p99 {half.latency_ms['p99']:.1f} ms",
            file=sys.stderr,
            flush=True,
        )
    if naive is not None:
        for r in results:
            r.ratio = r.rate / naive.rate

    print(markdown_table(results))
    print()
    print(latency_table(results))
    print(
        "\nfeatures/s = records receipted per second, from the first enqueue until the device's queue is "
        "empty; x naive = that over naive's rate in this run. Latency: arrival of the record's receipt at a "
        "subscriber on the device's receipt topic minus the return of the durable POST that enqueued it. "
        "CPU s: over the measured window, from /proc/PID/stat (naive's device runs in the bench process); "
        "cores busy = all of them / seconds, of "
        f"{os.cpu_count()}.\n\nconfig: " + ", ".join(f"{k}={v}" for k, v in config.items())
    )
    for r in results:
        print(f"- {r.contender}: {r.note}; verified {r.verified}")
    if args.json:
        payload: dict[str, Any] = {
            "benchmark": "pipeline",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "cpus": os.cpu_count(),
            "dir": str(probe),
            "record_bytes": RECORD_BYTES,
            "config": config,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "median_saturating_features_per_s": max_rate,
            "results": [{**asdict(r), "features_per_s": r.rate} for r in results],
        }
        save_json(args.json, payload)
        print(f"# figures written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("# interrupted; every child process was stopped", file=sys.stderr)
        raise SystemExit(130) from None
