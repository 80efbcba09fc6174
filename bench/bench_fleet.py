"""Fleet scale: many devices, each sending small frames, one in flight, waiting for its receipt.

Real mosquitto and ``nats-server -js`` on loopback, one ``cloud-ingest run`` process (the
contender), and generator processes that simulate the devices: each device has its own
chain and sends the documented upload frame (``--records`` records x 16 float32, the real
wire format), then the next one when its receipt comes (COMMITTED or DUPLICATE: the chain
moves on). A generator is one MQTT connection speaking for its devices (tenant
``fleet{level}g{n}``), as a gateway would; the broker's per-frame work is the same.

Per level (``--levels``, devices): frames/s and records/s committed, the receipt latency
p50/p99 (frame sent -> its receipt), and the CPU microseconds per committed frame of
ingest, nats-server and mosquitto (utime + stime over the level). In the same run, the
same load against a straightforward per-frame bridge (``bench/naive_fleet.py``: decode,
publish, await the ack, receipt, one frame at a time per message) gives the ratio.
``--ingests 1 2`` also runs two ingest processes on the shared subscription (the scale-out
ratio beside it; on a 2-core machine the generators and brokers take most of the second
core). ``--write`` puts the table in bench/RESULTS.md (``make bench``).

Run as ``python -m bench.bench_fleet`` (``--levels 100 1000 10000 --seconds 10``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.figures import save_json, write_section
from edge_tier import topics
from edge_tier_harness.brokers import BrokerProcess, Mosquitto, NatsServer
from edge_tier_harness.services import IngestProcess, ServiceProcess, WorkerProcess
from edge_tier_harness.testkit import CpuMeter, ingest_config, percentiles_ms, temp_dir, upload_frame

DIM = 16


def generator(
    port: int, tenant: str, devices: int, records: int, seconds: float, warmup: float, go: str, out: Any
) -> None:
    """One generator process: ``devices`` chains through one MQTT connection, for ``warmup``
    seconds not counted (every device's first frames: ingest reads its mark from the
    stream), then ``seconds`` counted."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    rng = np.random.default_rng(os.getpid())
    values = rng.standard_normal((records, DIM)).astype("<f4")
    names = [f"d{i}" for i in range(devices)]
    next_seq = dict.fromkeys(names, 1)
    prev = dict.fromkeys(names, 0)
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    counts = {"committed": 0, "duplicate": 0, "other": 0}
    stop_at = [0.0]
    measure_from = [0.0]
    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{tenant}", clean_session=True)
    client.max_inflight_messages_set(65535)
    client.max_queued_messages_set(0)

    def send(d: str) -> None:
        first = next_seq[d]
        sent_at[d] = time.perf_counter()
        client.publish(
            topics.mqtt_topic(tenant, d, "up"), upload_frame(tenant, d, first, prev[d], values), qos=1
        )

    def on_message(c: Any, u: Any, msg: Any) -> None:
        d = msg.topic.split("/")[2]
        r = json.loads(msg.payload)
        status = r["status"]
        if status in ("committed", "duplicate") and r["last_seq"] == next_seq[d] + records - 1:
            sent = sent_at.pop(d)
            if sent >= measure_from[0]:
                counts[status] += 1
                latencies.append(time.perf_counter() - sent)
            prev[d] = r["last_seq"]
            next_seq[d] = r["last_seq"] + 1
        else:
            counts["other"] += 1
        if time.perf_counter() < stop_at[0]:
            send(d)

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port, keepalive=60)
    client.subscribe(topics.mqtt_topic(tenant, "+", "receipt"), qos=1)
    client.loop_start()
    subscribed.wait(30)
    out.put(("ready", tenant))
    while not os.path.exists(go):  # the parent writes the start time (epoch seconds) there
        time.sleep(0.005)
    start = float(Path(go).read_text())
    while time.time() < start:
        time.sleep(0.001)
    measure_from[0] = time.perf_counter() + warmup
    stop_at[0] = measure_from[0] + seconds
    for d in names:
        send(d)
    time.sleep(warmup + seconds)
    deadline = time.perf_counter() + 5.0
    while sent_at and time.perf_counter() < deadline:  # the last frames' receipts
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    out.put(("done", {"tenant": tenant, "counts": counts, "latencies": latencies, "lost": len(sent_at)}))


@dataclass
class Level:
    contender: str
    devices: int
    seconds: float
    frames: int = 0
    records: int = 0
    other: int = 0
    lost: int = 0
    latency: dict[str, float] = field(default_factory=dict)
    cpu_us: dict[str, float] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds


def run_level(
    d: Path,
    contender: str,
    procs_: list[ServiceProcess],
    brokers: dict[str, int | None],
    port: int,
    devices: int,
    generators: int,
    records: int,
    seconds: float,
    warmup: float,
    tag: str,
) -> Level:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    go = d / f"go-{tag}"
    per = [devices // generators + (1 if i < devices % generators else 0) for i in range(generators)]
    procs = [
        ctx.Process(
            target=generator,
            args=(port, f"{tag}g{i}", n, records, seconds, warmup, str(go), q),
            daemon=True,
        )
        for i, n in enumerate(per)
        if n
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert q.get(timeout=60)[0] == "ready"
    meter = CpuMeter({f"{contender}#{i}": p.pid for i, p in enumerate(procs_)} | brokers)
    start = time.time() + 0.5
    go.write_text(str(start))
    time.sleep(0.5 + warmup)
    meter.start()
    time.sleep(seconds)
    used = meter.stop()
    used[contender] = sum(v for k, v in used.items() if k.startswith(f"{contender}#"))
    results = [q.get(timeout=seconds + 60)[1] for _ in procs]
    for p in procs:
        p.join(10)
    lv = Level(contender, devices, seconds)
    lat = []
    for r in results:
        lv.frames += r["counts"]["committed"] + r["counts"]["duplicate"]
        lv.other += r["counts"]["other"]
        lv.lost += r["lost"]
        lat.extend(r["latencies"])
    lv.records = lv.frames * records
    lv.latency = percentiles_ms(np.asarray(lat))
    lv.cpu_us = {k: 1e6 * v / max(1, lv.frames) for k, v in used.items()}
    print(
        f"# {contender} {devices} devices: {lv.fps:,.0f} frames/s, {lv.cpu_us[contender]:.0f} us/frame, "
        f"p99 {lv.latency.get('p99', 0):.0f} ms",
        file=sys.stderr,
        flush=True,
    )
    return lv


class NaiveProcess(IngestProcess):
    """``bench/naive_fleet.py`` with the ingest's config."""

    _ready_marker = "naive ready"

    def _command(self, exe: str) -> list[str]:
        return [exe, str(Path(__file__).with_name("naive_fleet.py")), "--config", str(self.config_path)]


def table(rows: list[Level], records: int) -> str:
    out = [
        "| contender | devices | frames/s | records/s | receipt p50 ms | p99 ms | ingest us/frame | "
        "nats-server us/frame | mosquitto us/frame | worker us/message | worker us/feature | "
        "ours / naive (us/frame) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    naive = {r.devices: r for r in rows if r.contender == "naive"}
    for r in rows:
        base = naive.get(r.devices)
        own = r.cpu_us.get(r.contender, 0.0)
        ratio = f"{base.cpu_us['naive'] / own:.1f}x" if base and r.contender != "naive" and own else ""
        out.append(
            f"| {r.contender} | {r.devices:,} | {r.fps:,.0f} | {r.fps * records:,.0f} | "
            f"{r.latency.get('p50', 0):.1f} | {r.latency.get('p99', 0):.1f} | {own:.0f} | "
            f"{r.cpu_us['nats-server']:.0f} | {r.cpu_us['mosquitto']:.0f} | {r.cpu_us['worker']:.0f} | "
            f"{r.cpu_us['worker'] / records:.1f} | {ratio} |"
        )
    one = {r.devices: r for r in rows if r.contender == "ingest"}
    two = [r for r in rows if r.contender.startswith("ingest x") and r.devices in one]
    if two:
        out.append("\nScale-out, frames/s of N ingest processes over one's at the same level:")
        for r in two:
            out.append(f"- {r.contender}, {r.devices:,} devices: {r.fps / one[r.devices].fps:.2f}x")
    return "\n".join(out)


def _answered(url: str, within: float = 30.0) -> tuple[int, int]:
    """(features messages, results messages) once the worker caught up, or after ``within`` s."""
    import asyncio

    import nats

    async def counts() -> tuple[int, int]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + within
            while True:
                f = (await js.stream_info(topics.FEATURES_STREAM)).state.messages
                r = (await js.stream_info(topics.RESULTS_STREAM)).state.messages
                if r >= f or time.monotonic() > deadline:
                    return int(f), int(r)
                await asyncio.sleep(0.5)
        finally:
            await nc.close()

    return asyncio.run(counts())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_fleet", description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[100, 1000, 10000], help="devices per level")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured, after --warmup")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load not counted, first")
    ap.add_argument("--generators", type=int, default=4, help="generator processes (MQTT connections)")
    ap.add_argument("--records", type=int, default=5, help="records per frame (16 float32 each)")
    ap.add_argument("--no-naive", action="store_true", help="skip the per-frame bridge")
    ap.add_argument("--ingests", type=int, nargs="+", default=[1], help="ingest processes, a contender each")
    ap.add_argument("--write", action="store_true", help="put the table in bench/RESULTS.md")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = ap.parse_args(argv)
    rows: list[Level] = []
    with temp_dir(None, "bench-fleet", keep=args.keep) as d, contextlib.ExitStack() as stack:

        def up(p: BrokerProcess) -> Any:
            stack.callback(p.stop)
            p.start(timeout=60)
            return p

        mosq = up(
            Mosquitto(
                d / "mosquitto",
                max_queued_messages=1_000_000,
                max_inflight_messages=65535,
                autosave_interval=600,
            )
        )
        nsrv = up(NatsServer(d / "nats"))
        # the tier-two worker answers every committed frame (one features message each) as it
        # comes: its CPU per message is reported beside the rest, and at the end whether it
        # answered them all (else its figure is for fewer messages than the level's)
        worker = up(
            WorkerProcess(
                d / "worker",
                {
                    "nats": {"servers": [nsrv.url]},
                    "log_level": "INFO",
                    "worker": {"discover_s": 0.5, "max_wait_ms": 5.0},
                },
                name="worker",
            )
        )
        brokers = {"nats-server": nsrv.pid, "mosquitto": mosq.pid, "worker": worker.pid}

        def cfg(instance: int = 0) -> dict[str, Any]:
            # each ingest its own client id (instance): the shared subscription splits the load
            ing = {"publish_timeout_s": 10.0, "instance": str(instance)}
            return ingest_config(mosq.port, nsrv.url, ingest=ing)

        def ingests(n: int) -> list[ServiceProcess]:
            tag = "ingest" if n == 1 else f"ingest{n}"
            return [IngestProcess(d / f"{tag}-{i}", cfg(i), name=f"{tag}-{i}") for i in range(n)]

        contenders: list[tuple[str, list[ServiceProcess]]] = [
            ("ingest" if n == 1 else f"ingest x{n}", ingests(n)) for n in args.ingests
        ]
        if not args.no_naive:
            contenders.append(("naive", [NaiveProcess(d / "naive", cfg(), name="naive")]))
        for name, procs in contenders:
            for proc in procs:
                up(proc)
            for i, devices in enumerate(args.levels):
                gens = min(args.generators, devices)
                rows.append(
                    run_level(
                        d,
                        name,
                        procs,
                        brokers,
                        mosq.port,
                        devices,
                        gens,
                        args.records,
                        args.seconds,
                        args.warmup,
                        f"{name[0]}{len(procs)}x{i}",
                    )
                )
            for proc in procs:
                proc.stop()
        answered = _answered(nsrv.url)
    text = table(rows, args.records)
    text += (
        f"\n\n{args.records} records x {DIM} float32 a frame, one frame in flight per device, "
        f"{args.seconds:.0f} s a level, {args.generators} generator processes; Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs (generators, brokers and ingest share them).\n"
        f"The worker answered {answered[1]:,} of {answered[0]:,} uploads (features messages) by the end."
    )
    print(text)
    if args.write:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = " ".join(["python -m bench.bench_fleet", *(argv if argv is not None else sys.argv[1:])])
        write_section("bench_fleet", f"# Fleet scale\n\n`{cmd}` on {when}.\n\n{text}")
    save_json(args.json, {"rows": [r.__dict__ for r in rows], "records": args.records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
