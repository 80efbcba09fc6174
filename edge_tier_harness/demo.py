"""``make demo``: the whole tiered pipeline on embedded defaults, watched live, then a summary.

Starts nats-server with JetStream and its own MQTT listener (so no separate broker is
needed), the ingest service, a tier-two worker, the result API, and one agent per
simulated device. Each device is a simulated machine (seeded vibration windows with
fault episodes) posting raw windows to its agent's prefilter. While it runs, a line a
second: windows emitted, kept (and the prefilter's drop rate), delivered, results,
backlog, bytes on the wire against raw, and enqueue-to-result latency. At the end it
waits until every queue is empty and every kept record has its answer, and counts
what ET_RESULTS holds against what the agents acknowledged: lost and duplicated must
both be 0 (exit 1 otherwise).

``--chaos`` kills (``kill -9``) and restarts the broker, ingest, the worker and a device
during the run; the counts must still come out at 0. ``--serve`` keeps it all up after the
summary, with a trickle of windows (``--trickle``) so that the printed stream and MQTT
commands have answers to show. Every printed command works as printed, from the directory
the demo was started in (without an activated virtualenv too). Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import numpy as np
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cloud_ingest.streams import read_all
from edge_agent.simulate import Tally, machine_windows, run_machine
from edge_tier import topics
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.tokens import TokenStore
from edge_tier.wire import decode_results
from edge_tier_harness.brokers import BrokerProcess, NatsServer
from edge_tier_harness.services import (
    AgentProcess,
    ApiProcess,
    IngestProcess,
    WorkerProcess,
    agent_status,
    metric,
)

TENANT = "demo"


@dataclass
class Stack:
    """Every process of the demo, and how to reach them."""

    work: Path
    nats: NatsServer
    ingest: IngestProcess
    worker: WorkerProcess
    api: ApiProcess
    agents: list[AgentProcess]
    token: str

    @property
    def processes(self) -> list[BrokerProcess]:
        return [self.nats, self.ingest, self.worker, self.api, *self.agents]


def start_stack(work: Path, devices: int) -> Stack:
    server = NatsServer(work / "nats", mqtt_port=0, server_name="et-demo")
    started: list[BrokerProcess] = []
    try:
        server.start()
        started.append(server)
        mqtt = {"port": server.mqtt_port, "version": "3.1.1", "backoff_min_s": 0.1, "backoff_max_s": 1.0}
        nats_cfg = {"servers": [server.url]}
        registry = work / "registry.db"
        token = TokenStore(registry).add(TENANT, "demo")[1]
        ingest = IngestProcess(work / "ingest", {"mqtt": mqtt, "nats": nats_cfg}, name="cloud-ingest")
        worker = WorkerProcess(
            work / "worker",
            {"nats": nats_cfg, "worker": {"discover_s": 0.5, "ack_wait_s": 5.0}},
            name="cloud-ingest-worker",
        )
        api = ApiProcess(work / "api", {"nats": nats_cfg, "api": {"registry": str(registry)}}, name="api")
        for p in (ingest, worker, api):
            p.start(timeout=60)
            started.append(p)
        agents = []
        for i in range(devices):
            d = work / f"device-{i}"
            a = AgentProcess(
                d,
                {
                    "device": {"tenant": TENANT, "device": f"device-{i}"},
                    "mqtt": mqtt,
                    "store": {"path": str(d / "queue.db")},
                    "uplink": {"receipt_timeout_s": 5.0, "status_interval_s": 2.0},
                    "prefilter": {"manifest": str(DEFAULT_MANIFEST)},
                },
                name=f"edge-agent-{i}",
            )
            a.start(timeout=60)
            started.append(a)
            agents.append(a)
    except BaseException:
        for proc in reversed(started):
            proc.stop()
        raise
    return Stack(work, server, ingest, worker, api, agents, token)


# -- what the demo counts ------------------------------------------------------------------


@dataclass
class Counts:
    tallies: list[Tally]
    acked: list[list[tuple[int, int]]]  # per device: seq ranges the agent acknowledged as kept
    results: int = 0  # records answered, as seen live
    latencies_ms: list[float] = field(default_factory=list)  # enqueue -> result, per record
    wire_bytes: float = 0.0
    _wire_seen: dict[int, float] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)

    @property
    def windows(self) -> int:
        return sum(t.windows for t in self.tallies)

    @property
    def kept(self) -> int:
        return sum(t.kept for t in self.tallies)

    @property
    def raw_bytes(self) -> int:
        return sum(t.raw_bytes for t in self.tallies)

    def add_wire(self, i: int, total: float) -> None:
        """An agent's upload byte counter; a restarted agent starts it at 0 again."""
        last = self._wire_seen.get(i, 0.0)
        self.wire_bytes += total - last if total >= last else total
        self._wire_seen[i] = total


def _percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


async def feed(url: str, device: int, seconds: float, rate: float, counts: Counts) -> None:
    """One simulated machine posting raw windows to its agent, ``rate`` windows/s."""
    windows = machine_windows(seed=1000 + device, fault_rate=0.02)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await run_machine(
            session, url, windows, stream="vibration", batch=max(1, int(rate // 5)), rate=rate,
            until=time.monotonic() + seconds, tally=counts.tallies[device], acked=counts.acked[device],
        )  # fmt: skip


async def watch_results(url: str, counts: Counts) -> None:
    """Count answers as they are written (a durable consumer, so it outlives a broker restart)."""

    async def quiet(e: Exception) -> None:  # the broker's restarts are part of the show
        pass

    nc = await nats.connect(
        url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=quiet, disconnected_cb=None
    )
    try:
        js = nc.jetstream()
        sub = None
        while sub is None:
            try:
                sub = await js.pull_subscribe(
                    topics.RESULTS_SUBJECTS,
                    durable=topics.DEMO_CONSUMER,
                    stream=topics.RESULTS_STREAM,
                    config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
                )
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.5)
        seen = 0  # stream sequence: a broker restart may deliver some messages again
        while True:
            try:
                msgs = await sub.fetch(256, timeout=0.5)
            except (nats.errors.Error, TimeoutError):
                continue
            now = time.time() * 1000
            for m in msgs:
                if m.metadata.sequence.stream <= seen:
                    continue
                seen = m.metadata.sequence.stream
                b = decode_results(m.data)
                counts.results += len(b.seqs)
                counts.latencies_ms.extend(now - t for t in b.times_ms)
    finally:
        await nc.close()


async def live_view(stack: Stack, counts: Counts, t0: float, every: float = 1.0) -> None:
    """A line a second: each stage's rate over the last second, and where the pipeline stands."""
    print(f"{'t':>5} {'windows/s':>9} {'kept/s':>7} {'drop':>6} {'delivered/s':>11} {'results/s':>9} "
          f"{'backlog':>7} {'wire/raw':>8} {'p50 ms':>7}  events")  # fmt: skip
    last = (0, 0, 0, 0)
    delivered: dict[int, int] = {}  # per agent, the last it told (a killed agent tells nothing)
    while True:
        await asyncio.sleep(every)
        sts = await asyncio.to_thread(lambda: [agent_status(a.port) or {} for a in stack.agents])
        for i, st in enumerate(sts):
            delivered[i] = st.get("delivered", delivered.get(i, 0))
        for i, a in enumerate(stack.agents):
            b = await asyncio.to_thread(metric, a.port, "et_agent_upload_bytes_total")
            if b is not None:
                counts.add_wire(i, b)
        now = (counts.windows, counts.kept, sum(delivered.values()), counts.results)
        w, k, d, r = ((x - y) / every for x, y in zip(now, last, strict=True))
        last = now
        drop = 1 - now[1] / now[0] if now[0] else 0.0
        p50 = _percentile(counts.latencies_ms[-2000:], 50)
        ev = "; ".join(counts.events)
        counts.events.clear()
        backlog = sum(s.get("records", 0) for s in sts)
        print(
            f"{time.monotonic() - t0:4.0f}s {w:>9.0f} {k:>7.0f} {drop:>6.1%} {d:>11.0f} {r:>9.0f} "
            f"{backlog:>7} {counts.wire_bytes / max(counts.raw_bytes, 1):>8.2%} "
            f"{'-' if p50 is None else f'{p50:.0f}':>7}  {ev}",
            flush=True,
        )


async def chaos(stack: Stack, seconds: float, counts: Counts) -> None:
    """Kill -9 and restart each part once, spread evenly over the run."""
    victims: list[tuple[str, BrokerProcess]] = [
        ("broker (nats-server)", stack.nats),
        ("ingest", stack.ingest),
        ("worker", stack.worker),
        (f"device {stack.agents[0].name}", stack.agents[0]),
    ]
    t0 = time.monotonic()
    gap = seconds / (len(victims) + 1)
    for k, (name, proc) in enumerate(victims, start=1):
        await asyncio.sleep(max(0.0, t0 + k * gap - time.monotonic()))
        await asyncio.to_thread(proc.kill)
        counts.events.append(f"killed {name}")
        await asyncio.sleep(min(2.0, gap / 3))
        await asyncio.to_thread(proc.start, 60)
        counts.events.append(f"{name} back")


async def settle(stack: Stack, counts: Counts, within: float, grace: float) -> dict[str, Any]:
    """Wait until every queue is empty and every kept record is answered, then ``grace``
    seconds more (a late redelivery would show as a duplicate then); the final count."""
    want = {(f"device-{i}", s) for i, ranges in enumerate(counts.acked) for a, b in ranges
            for s in range(a, b + 1)}  # fmt: skip
    deadline = time.monotonic() + within
    while True:
        sts = await asyncio.to_thread(lambda: [agent_status(a.port) for a in stack.agents])
        drained = all(s is not None and s["records"] == 0 and s["frames_in_flight"] == 0 for s in sts)
        if drained or time.monotonic() > deadline:
            got = await _stored_results(stack.nats.url)
            if set(got) >= want or time.monotonic() > deadline:
                break
        await asyncio.sleep(0.5)
    await asyncio.sleep(grace)
    got = await _stored_results(stack.nats.url)
    answered = set(got)
    evicted = sum(sum((s or {}).get("evictions", {}).values()) for s in sts)
    return {
        "kept": len(want),
        "results": len(answered & want),
        "lost": len(want - answered),
        "duplicated": len(got) - len(answered),
        # taken by an agent that died before its answer reached the machine: the machine
        # did not count them, the cloud answered them once all the same
        "unacknowledged_answered": len(answered - want),
        "evicted": evicted,
    }


async def _stored_results(url: str) -> list[tuple[str, int]]:
    nc = await nats.connect(url)
    try:
        msgs = await read_all(nc.jetstream(), topics.RESULTS_STREAM)
    finally:
        await nc.close()
    out: list[tuple[str, int]] = []
    for m in msgs:
        b = decode_results(m.data or b"")
        out.extend((b.device, int(s)) for s in b.seqs)
    return out


async def run(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    counts = Counts([Tally() for _ in stack.agents], [[] for _ in stack.agents])
    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(watch_results(stack.nats.url, counts))
        view = tg.create_task(live_view(stack, counts, t0))
        feeders = [
            tg.create_task(feed(a.endpoint, i, args.seconds, args.rate, counts))
            for i, a in enumerate(stack.agents)
        ]
        if args.chaos:
            tg.create_task(chaos(stack, args.seconds, counts))
        await asyncio.gather(*feeders)
        emitted_s = time.monotonic() - t0
        final = await settle(stack, counts, within=120, grace=6.0 if args.chaos else 1.0)
        await asyncio.sleep(1.5)  # one more line of the view, with the last results
        view.cancel()
        watcher.cancel()
    elapsed = time.monotonic() - t0
    lat = counts.latencies_ms
    faults = sum(t.faults for t in counts.tallies)
    return {
        "devices": len(stack.agents),
        "seconds": round(emitted_s, 1),
        "emitted": counts.windows,
        "kept": counts.kept,
        "faults": faults,
        "faults_kept": sum(t.faults_kept for t in counts.tallies),
        **final,
        "delivered": sum((agent_status(a.port) or {}).get("delivered", 0) for a in stack.agents),
        "features_per_s": round(final["results"] / max(elapsed, 1e-9), 1),
        "latency_p50_ms": _percentile(lat, 50),
        "latency_p99_ms": _percentile(lat, 99),
        "raw_bytes": counts.raw_bytes,
        "wire_bytes": int(counts.wire_bytes),
        "unreachable_posts": sum(t.unreachable for t in counts.tallies),
        "chaos": bool(args.chaos),
    }


def summary(s: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} ms"

    return "\n".join([
        "",
        "summary",
        f"  emitted      {s['emitted']} windows from {s['devices']} devices in {s['seconds']} s"
        f" ({s['faults']} in fault episodes)",
        f"  kept         {s['kept']} ({s['kept'] / max(s['emitted'], 1):.1%}); faults kept "
        f"{s['faults_kept']}/{s['faults']}",
        f"  delivered    {s['delivered']} (receipted by the cloud, deleted on the device)",
        f"  results      {s['results']} ({s['features_per_s']:.0f} features/s end to end)",
        f"  lost         {s['lost']}"
        + (f" (and {s['unacknowledged_answered']} taken by a device killed before it could say so,"
           " answered once)" if s.get("unacknowledged_answered") else ""),
        f"  duplicated   {s['duplicated']}",
        f"  latency      enqueue -> result p50 {ms(s['latency_p50_ms'])}, p99 {ms(s['latency_p99_ms'])}",
        f"  bytes        on the wire {s['wire_bytes']:,} vs raw {s['raw_bytes']:,} "
        f"({s['wire_bytes'] / max(s['raw_bytes'], 1):.2%})",
    ])  # fmt: skip


async def trickle(stack: Stack, rate: float) -> None:
    """Under ``--serve``, after the summary: each machine goes on posting ``rate`` windows/s
    (new seeds), so that ``/v1/stream`` and ``mosquitto_sub`` have new answers to show."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.TaskGroup() as tg:
        for i, a in enumerate(stack.agents):
            windows = machine_windows(seed=2000 + i, fault_rate=0.02)
            tg.create_task(
                run_machine(session, a.endpoint, windows, stream="vibration", batch=max(1, int(rate // 5)),
                            rate=rate, until=float("inf"), tally=Tally())
            )  # fmt: skip


async def _last_result_seq(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(topics.RESULTS_STREAM)).state.last_seq)
    finally:
        await nc.close()


def script(name: str) -> str:
    """How to type this installation's console script ``name`` here: the bare name when PATH
    finds this one, else its path (relative to the working directory when under it): with
    ``make demo`` that is ``.venv/bin/NAME``, which needs no activated virtualenv."""
    mine = Path(sys.executable).parent / name
    if not mine.exists():
        return name
    found = shutil.which(name)
    if found is not None and Path(found).resolve() == mine.resolve():
        return name
    try:
        rel = str(mine.relative_to(Path.cwd()))
    except ValueError:
        return str(mine)
    return rel if "/" in rel else f"./{rel}"


def next_steps(stack: Stack, kept_up: bool, *, replay_after: int = 0, trickle_rate: float = 0.0) -> str:
    """The commands to try, each exactly as it works in a shell in the demo's directory."""
    api = f"http://127.0.0.1:{stack.api.port}"
    auth = '-H "Authorization: Bearer $TOKEN"'
    if not kept_up:
        head = "try next (run with --serve to keep the demo up for these)"
    elif trickle_rate > 0:
        head = f"try next (the demo stays up; {trickle_rate:g} windows/s per device keep answers coming)"
    else:
        head = "try next (the demo stays up; --trickle 0: no new answers, /v1/stream replays the last)"
    lines = [
        "",
        head,
        f"  export TOKEN={stack.token}",
        f"  curl -s {auth} {api}/v1/devices",
        f"  curl -s {auth} '{api}/v1/devices/device-0/results?limit=5'",
        f"  curl -sN {auth} -H 'Last-Event-ID: {replay_after}' {api}/v1/stream",
        f"  mosquitto_sub -h 127.0.0.1 -p {stack.nats.mqtt_port} -V mqttv311 -t 'et/{TENANT}/+/results'",
        f"  {script('edge-agent')} status --config {stack.agents[0].config_path}",
        "(the stream replays the answers after Last-Event-ID, then goes on live: leave the header out for "
        "live only; Ctrl-C ends it. mosquitto_sub is Debian's mosquitto-clients: apt-get install "
        "mosquitto-clients)",
    ]
    return "\n".join(lines)


_STOPPING: list[Stack] = []  # what the exit watchdog stops, once the stack is up
_EXIT_CODE = [130]  # what it exits with: under --serve, the run's own verdict
EXIT_GRACE_S = 20.0


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C, SIGTERM, SIGHUP: unwind (the ``finally`` stops every child). Should the unwinding
    hang (a task that swallows its cancellation, under asyncio.run), a watchdog stops the
    children and exits after EXIT_GRACE_S anyway: Ctrl-C always ends the demo and all it runs."""
    if not _STOPPING or getattr(_interrupt, "armed", False):
        raise KeyboardInterrupt
    _interrupt.armed = True  # type: ignore[attr-defined]

    def watchdog() -> None:
        time.sleep(EXIT_GRACE_S)
        print("\nstopping (Ctrl-C): the unwinding hung; stopping every process now", flush=True)
        for proc in reversed(_STOPPING[0].processes):
            with contextlib.suppress(Exception):
                proc.stop()
        os._exit(_EXIT_CODE[0])

    threading.Thread(target=watchdog, name="demo-exit-watchdog", daemon=True).start()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-tier-demo", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rate", type=float, default=50.0, help="raw windows/s per device")
    p.add_argument("--chaos", action="store_true", help="kill and restart broker, ingest, worker, a device")
    p.add_argument("--serve", action="store_true", help="keep everything running after the summary")
    p.add_argument(
        "--trickle", type=float, default=10.0, metavar="RATE",
        help="with --serve: raw windows/s per device after the summary, so answers keep coming (0: none)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="the summary as JSON on stdout (the view on stderr)")
    p.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = p.parse_args(argv)
    # SIGINT too, so that asyncio.run leaves Ctrl-C to us: one Ctrl-C always ends the demo
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edge-tier-demo-"))
    out = sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    stack: Stack | None = None
    try:
        print(f"edge-tier demo: {args.devices} devices x {args.rate:g} windows/s x {args.seconds:g}s"
              f"{' with chaos' if args.chaos else ''}; files in {work}")  # fmt: skip
        stack = start_stack(work, args.devices)
        _STOPPING.append(stack)
        print(f"  nats-server {stack.nats.url} (JetStream; MQTT on {stack.nats.mqtt_port}), ingest, "
              f"worker, API on {stack.api.port}, {len(stack.agents)} agents (prefilter)\n")  # fmt: skip
        result = asyncio.run(run(args, stack))
        print(summary(result))
        last = asyncio.run(_last_result_seq(stack.nats.url))
        steps = next_steps(stack, args.serve, replay_after=max(0, last - 3), trickle_rate=args.trickle)
        print(steps)
        if args.json:
            out.write(json.dumps(result) + "\n")
        flowed = result["kept"] > 0 and result["results"] == result["kept"]
        verdict = 0 if flowed and result["lost"] == 0 and result["duplicated"] == 0 else 1
        _EXIT_CODE[0] = verdict
        if args.serve:
            print("\nrunning until Ctrl-C", flush=True)
            try:
                if args.trickle > 0:
                    asyncio.run(trickle(stack, args.trickle))
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:  # the way out of --serve: the run's own verdict stands
                print("\nstopping (Ctrl-C)")
        return verdict
    except KeyboardInterrupt:
        print("\nstopping (Ctrl-C)")
        return 130
    finally:
        if stack is not None:
            for proc in reversed(stack.processes):
                proc.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        sys.stdout = out


if __name__ == "__main__":
    sys.exit(main())
