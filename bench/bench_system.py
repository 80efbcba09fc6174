"""The whole system at rising load: features enqueued on devices -> results in ET_RESULTS.

One stack on loopback for every load level: mosquitto and ``nats-server -js``, the ingest
service, one tier-two worker and ``--devices`` agents, all real processes configured by
their TOML files. Paced load generators here POST 16-value float32 feature vectors
(the tier-two model's input) to each agent's endpoint (binary form, durable); every
record's answer is read back from ET_RESULTS by a durable consumer. Per level:

* **features/s end to end**: results written / time from the first enqueue of the level
  to its last result;
* **enqueue -> result p50/p99**: ``produced_ms`` (the worker) minus the record's
  ``times_ms`` (the agent, at enqueue), so the reader's own delay is not counted;
* **CPU** (seconds per second of the level) and **peak RSS** of each process;
* **lost / duplicated**: every acknowledged record must have exactly one result.

A last level posts raw vibration windows (1024 samples, 64 per request) to the agents'
prefilter as fast as they take them: the whole path from sensor to answer, where only
the windows the prefilter keeps become features.

A one-second warm-up runs first, unreported (the worker finds the tenant and makes its
consumer then).

The naive baselines of the earlier benchmarks run in the same invocation and the ratio
against them is printed: the per-record pipeline of ``bench_pipeline`` (commit,
message, publish and receipt per record) and the one-at-a-time worker of
``bench_tier2`` (fetch 1, infer, publish, ack_sync), against ours. With ``--write``
(``make bench``) the tables go to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import numpy as np
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench import bench_pipeline, bench_tier2
from bench.figures import RESULTS_MD, save_json, write_section
from edge_tier import topics
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.wire import decode_results
from edge_tier_harness.brokers import BrokerProcess, Mosquitto, NatsServer
from edge_tier_harness.services import AgentProcess, IngestProcess, WorkerProcess, agent_status
from edge_tier_harness.testkit import CpuMeter, wait_until

DIM = 16
TENANT = "bench"
PAGE = 4096


@dataclass
class Level:
    offered: float | None  # features/s over all devices; None = as fast as the agents take them
    windows: bool = False  # raw windows through the prefilter instead of features
    windows_in: int = 0
    enqueued: int = 0
    results: int = 0
    seconds: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    lost: int = 0
    duplicated: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per second
    rss_mb: dict[str, float] = field(default_factory=dict)  # peak resident set
    want: set[tuple[str, int]] = field(default_factory=set, repr=False)  # (device, seq) acknowledged

    @property
    def rate(self) -> float:
        return self.results / self.seconds if self.seconds else 0.0


def rss_mb(pid: int | None) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return 0.0


class RssMeter(threading.Thread):
    """The peak resident set of each process, sampled every 0.2 s until ``stop()``."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak = pids, {k: 0.0 for k in pids}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            for k, p in self.pids.items():
                self.peak[k] = max(self.peak[k], rss_mb(p))

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        return self.peak


@dataclass(frozen=True)
class Load:
    """What the load generators post: request bodies of ``per_body`` items each."""

    path: str
    content_type: str
    bodies: list[bytes]
    per_body: int
    windows: bool = False  # raw windows through the prefilter (only the kept become features)


def feature_load(batch: int, seed: int) -> Load:
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(4):
        scores = rng.random(batch, dtype=np.float32)
        feats = rng.standard_normal((batch, DIM), dtype=np.float32)
        bodies.append(scores.astype("<f4").tobytes() + feats.astype("<f4").tobytes())
    return Load(f"/v1/records?stream=bench&dim={DIM}", "application/x-edge-tier-features", bodies, batch)


def window_load(batch: int, seed: int) -> Load:
    from edge_tier.model.generator import generate

    x = generate(8 * batch, seed=seed, fault_fraction=0.1).x.astype("<f4")
    bodies = [x[i * batch : (i + 1) * batch].tobytes() for i in range(8)]
    return Load("/v1/windows?stream=bench", "application/x-edge-tier-windows", bodies, batch, windows=True)


def produce(
    port: int, load: Load, rate: float | None, seconds: float, acked: list[int], sent: list[int]
) -> None:
    """POST ``load`` to one agent: ``rate`` items/s, or saturating (None); the seqs it acknowledged."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        body = load.bodies[i % len(load.bodies)]
        conn.request("POST", load.path, body, {"Content-Type": load.content_type})
        i += 1
        r = conn.getresponse()
        answer = json.loads(r.read())
        if r.status == 200 and "first_seq" in answer:  # (windows: only when some were kept)
            acked.extend(range(answer["first_seq"], answer["last_seq"] + 1))
        sent[0] += load.per_body
        if rate is not None:
            time.sleep(max(0.0, t0 + sent[0] / rate - time.monotonic()))
    conn.close()


class ResultReader:
    """Every result message, read back as written (a durable pull consumer in its own thread)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.rows: list[tuple[str, int, int, int]] = []  # (device, seq, times_ms, produced_ms)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def count(self) -> int:
        with self.lock:
            return len(self.rows)

    def keys(self, since: int = 0) -> set[tuple[str, int]]:
        with self.lock:
            return {(d, s) for d, s, _, _ in self.rows[since:]}

    def tally(self, levels: list[Level]) -> None:
        """Each level's lost and duplicated, over everything read (a late copy of a record
        of an earlier level counts against that level)."""
        with self.lock:
            seen = Counter((d, s) for d, s, _, _ in self.rows)
        for lv in levels:
            lv.results = sum(1 for k in lv.want if seen[k])
            lv.lost = len(lv.want) - lv.results
            lv.duplicated = sum(seen[k] - 1 for k in lv.want if seen[k] > 1)

    async def _run(self) -> None:
        nc = await nats.connect(self.url)
        js = nc.jetstream()
        sub = None
        while sub is None and not self._stop.is_set():
            try:
                sub = await js.pull_subscribe(
                    topics.RESULTS_SUBJECTS, durable="bench-reader", stream=topics.RESULTS_STREAM,
                    config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
                )  # fmt: skip
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.2)
        while sub is not None and not self._stop.is_set():
            try:
                msgs = await sub.fetch(PAGE, timeout=0.2)
            except (nats.errors.Error, TimeoutError):
                continue
            rows = []
            for m in msgs:
                b = decode_results(m.data)
                rows.extend((b.device, s, t, b.produced_ms) for s, t in zip(b.seqs, b.times_ms, strict=True))
            with self.lock:
                self.rows.extend(rows)
        await nc.close()


@dataclass
class Stack:
    mosquitto: Mosquitto
    nats: NatsServer
    ingest: IngestProcess
    worker: WorkerProcess
    agents: list[AgentProcess]

    def pids(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {f"agent-{i}": a.pid for i, a in enumerate(self.agents)}
        out |= {"ingest": self.ingest.pid, "worker": self.worker.pid, "mosquitto": self.mosquitto.pid,
                "nats-server": self.nats.pid, "load+reader": os.getpid()}  # fmt: skip
        return out


def start_stack(d: Path, devices: int, stack: contextlib.ExitStack) -> Stack:
    procs: list[BrokerProcess] = []

    def up(p: BrokerProcess) -> Any:
        stack.callback(p.stop)
        p.start(timeout=60)
        procs.append(p)
        return p

    mosq = up(Mosquitto(d / "mosquitto", max_queued_messages=1_000_000, autosave_interval=60))
    nsrv = up(NatsServer(d / "nats"))
    ingest = up(IngestProcess(d / "ingest", bench_pipeline.ingest_config(mosq.port, nsrv.url), name="ingest"))
    worker = up(WorkerProcess(d / "worker", {"nats": {"servers": [nsrv.url]}, "log_level": "INFO",
                                             "worker": {"discover_s": 0.5, "max_wait_ms": 5.0}},
                              name="worker"))  # fmt: skip
    agents = []
    for i in range(devices):
        a = d / f"agent-{i}"
        cfg = {
            "log_level": "INFO",
            "device": {"tenant": TENANT, "device": f"dev-{i}"},
            "mqtt": {"port": mosq.port},
            "store": {"path": str(a / "queue.db"), "budget_bytes": 1 << 30},
            "uplink": {"frame_max_records": 4096, "window": 8, "receipt_timeout_s": 30.0},
            "prefilter": {"manifest": str(DEFAULT_MANIFEST)},  # for the raw-windows level
        }
        agents.append(up(AgentProcess(a, cfg, name=f"agent-{i}")))
    return Stack(mosq, nsrv, ingest, worker, agents)


def run_level(
    stack: Stack, reader: ResultReader, offered: float | None, seconds: float, *, windows: bool = False
) -> Level:
    lv = Level(offered, windows=windows)
    acked: list[list[int]] = [[] for _ in stack.agents]
    sent = [[0] for _ in stack.agents]
    before = reader.count()
    per_agent = None if offered is None else offered / len(stack.agents)
    batch = 1000 if per_agent is None else max(1, int(per_agent / 20))  # 20 posts a second
    loads = [window_load(64, i) if windows else feature_load(batch, i) for i in range(len(stack.agents))]
    meter, rss = CpuMeter(stack.pids()), RssMeter(stack.pids())
    meter.start()
    rss.start()
    t0 = time.monotonic()
    threads = [
        threading.Thread(target=produce, args=(a.port, loads[i], per_agent, seconds, acked[i], sent[i]))
        for i, a in enumerate(stack.agents)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lv.enqueued = sum(map(len, acked))
    lv.windows_in = sum(x[0] for x in sent) if windows else 0
    deadline = time.monotonic() + 180
    while reader.count() - before < lv.enqueued and time.monotonic() < deadline:  # cheap: a count
        time.sleep(0.01)
    t_end = time.monotonic()
    lv.cpu = {k: v / (t_end - t0) for k, v in meter.stop().items()}
    lv.rss_mb = rss.stop()
    # outside the measured time (a set of a million keys takes the GIL for a while): were
    # those rows the records asked for, or did a duplicate make the count come early?
    lv.want = {(f"dev-{i}", s) for i, seqs in enumerate(acked) for s in seqs}
    while not lv.want <= reader.keys(before) and time.monotonic() < deadline:
        time.sleep(0.05)
        t_end = time.monotonic()
    lv.seconds = t_end - t0
    with reader.lock:
        rows = reader.rows[before:]
    lv.results = len(lv.want & {(d, s) for d, s, _, _ in rows})  # lost and doubled: tally()
    lat = np.array([p - t for d, s, t, p in rows if (d, s) in lv.want], dtype=np.float64)
    if lat.size:
        lv.p50_ms, lv.p99_ms = (float(x) for x in np.percentile(lat, [50, 99]))
    for a in stack.agents:  # the next level starts from empty queues
        wait_until(lambda a=a: (agent_status(a.port) or {}).get("records") == 0, 60, "drain")
    return lv


def baselines(args: argparse.Namespace) -> dict[str, float]:
    """The naive pipeline (bench_pipeline) and the naive and our worker (bench_tier2), here."""
    print("# baseline: naive per-record pipeline ...", file=sys.stderr, flush=True)
    pargs = argparse.Namespace(naive_records=args.naive_records, dir=None, keep=False, drain_timeout_s=120.0,
                               mosquitto_max_queued=1_000_000, mosquitto_autosave_s=60)  # fmt: skip
    naive_pipeline = bench_pipeline.run_naive(pargs).rate
    print("# baseline: naive and our worker ...", file=sys.stderr, flush=True)
    wargs = argparse.Namespace(uploads=args.worker_uploads, per_upload=64, tenants=2, devices=4,
                               max_batch=512)  # fmt: skip
    naive_worker, our_worker = bench_tier2.worker_rates(wargs, ["CPUExecutionProvider"])
    return {"naive_pipeline": naive_pipeline, "naive_worker": naive_worker, "our_worker": our_worker}


def _f(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def tables(levels: list[Level], base: dict[str, float], devices: int) -> str:
    names = list(levels[0].cpu)
    out = ["| offered features/s | features/s end to end | enqueue→result p50 ms | p99 ms | lost | dup |",
           "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

    def load(lv: Level) -> str:
        if lv.windows:
            return f"raw windows, saturating ({_f(lv.windows_in / lv.seconds)} windows/s in)"
        return "saturating" if lv.offered is None else _f(lv.offered)

    for lv in levels:
        out.append(f"| {load(lv)} | {_f(lv.rate)} | {_f(lv.p50_ms, '.1f')} | {_f(lv.p99_ms, '.1f')} | "
                   f"{lv.lost} | {lv.duplicated} |")  # fmt: skip
    out += ["", "CPU (seconds per second) and peak RSS (MB) per process:", "",
            "| offered | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]  # fmt: skip
    for lv in levels:
        cells = [f"{lv.cpu[n]:.2f} / {lv.rss_mb[n]:.0f}" for n in names]
        out.append(f"| {load(lv)} | " + " | ".join(cells) + " |")
    best = max(lv.rate for lv in levels)
    slowest_naive = min(base["naive_pipeline"], base["naive_worker"])
    out += [
        "",
        "Against the naive baselines, measured in the same run:",
        "",
        "| what | naive | ours | x naive |",
        "|---|---:|---:|---:|",
        f"| device → JetStream, receipted (per-record commit, message, publish, receipt; bench_pipeline) "
        f"| {_f(base['naive_pipeline'])} records/s | {_f(best)} features/s end to end | "
        f"{best / base['naive_pipeline']:.1f} |",
        f"| tier two (fetch 1, infer, publish, ack_sync; bench_tier2, uploads of 64) "
        f"| {_f(base['naive_worker'])} features/s | {_f(base['our_worker'])} features/s | "
        f"{base['our_worker'] / base['naive_worker']:.1f} |",
        f"| whole path (naive: its slower stage) | {_f(slowest_naive)} | {_f(best)} | "
        f"{best / slowest_naive:.1f} |",
        "",
        f"{devices} devices; every level ran on the same stack; 16 float32 features per record.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_system", description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--levels", type=float, nargs="+", default=[2_000, 10_000, 40_000],
                    help="offered features/s over all devices; a saturating level follows")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=6.0, help="load per level")
    ap.add_argument("--naive-records", type=int, default=3000)
    ap.add_argument("--worker-uploads", type=int, default=1500)
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--write", action="store_true", help=f"write the tables to {RESULTS_MD}")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = ap.parse_args(argv)
    levels: list[Level] = []
    with tempfile.TemporaryDirectory(prefix="bench-system-") as tmp, contextlib.ExitStack() as stack:
        s = start_stack(Path(tmp), args.devices, stack)
        reader = ResultReader(s.nats.url)
        reader.start()
        stack.callback(reader.stop)
        # warm-up, not reported: the worker finds the tenant and makes its consumer
        run_level(s, reader, 1000, 1.0)
        plan = [(x, False) for x in [*args.levels, None]] + [(None, True)]
        for offered, windows in plan:
            what = "saturating" if offered is None else f"{offered:,.0f}/s"
            print(f"# level {'raw windows, ' if windows else ''}{what} ...", file=sys.stderr, flush=True)
            lv = run_level(s, reader, offered, args.seconds, windows=windows)
            print(f"#   {lv.rate:,.0f} features/s, p99 {_f(lv.p99_ms, '.1f')} ms", file=sys.stderr,
                  flush=True)  # fmt: skip
            levels.append(lv)
        time.sleep(2.0)  # a late duplicate would arrive by now
        reader.tally(levels)
    base = {"naive_pipeline": float("nan"), "naive_worker": float("nan"), "our_worker": float("nan")}
    if not args.skip_baselines:
        base = baselines(args)
    text = tables(levels, base, args.devices)
    print(text)
    if args.write:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        write_section(
            "bench_system",
            f"# Whole-system benchmark\n\n`python -m bench.bench_system --write` on {when}: "
            f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
            "Absolute figures drift on a shared machine; compare the ratios, measured in the same run.\n\n"
            + text,
        )
    figures = [{k: v for k, v in asdict(lv).items() if k != "want"} | {"rate": lv.rate} for lv in levels]
    save_json(args.json, {"levels": figures, "baselines": base})
    return 0 if all(lv.lost == 0 and lv.duplicated == 0 for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
