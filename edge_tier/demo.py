"""``make demo``: the spine end to end on embedded defaults, then a summary.

Starts nats-server with JetStream and its own MQTT listener (so no separate
broker is needed), the ingest service, and N agents (one per simulated
device), feeds each agent synthetic feature vectors for a while, waits until
every queue has drained, and counts what JetStream holds against what the
agents acknowledged: lost and duplicated must both be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nats
import numpy as np

from cloud_ingest.streams import read_all
from edge_tier import topics
from edge_tier.brokers import NatsServer
from edge_tier.services import AgentProcess, IngestProcess, agent_drained, agent_status
from edge_tier.wire import decode_frame

DIM = 128


def _post(port: int, payload: bytes, n: int) -> tuple[int, int] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            f"/v1/records?stream=vibration&dim={DIM}",
            payload,
            {"Content-Type": "application/x-edge-tier-features"},
        )
        resp = conn.getresponse()
        body = json.loads(resp.read())
        return (body["first_seq"], body["last_seq"]) if resp.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


def _produce(port: int, seconds: float, rate: int, acked: list[int], seed: int) -> None:
    """Offer ``rate`` records/s in batches of ~rate/10; keep the seqs the agent acknowledged."""
    rng = np.random.default_rng(seed)
    batch = max(1, rate // 10)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        scores = rng.random(batch, dtype=np.float32)
        feats = rng.standard_normal((batch, DIM), dtype=np.float32)
        got = _post(port, scores.astype("<f4").tobytes() + feats.astype("<f4").tobytes(), batch)
        if got:
            acked.extend(range(got[0], got[1] + 1))
        time.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))


async def _stream_seqs(url: str) -> list[tuple[str, int]]:
    nc = await nats.connect(url)
    try:
        msgs = await read_all(nc.jetstream(), topics.FEATURES_STREAM)
    finally:
        await nc.close()
    out: list[tuple[str, int]] = []
    for msg in msgs:
        f = decode_frame(msg.data or b"")
        out.extend((f.device, int(x)) for x in f.seqs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-tier-demo", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=2000, help="records/s offered per device")
    p.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = p.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="edge-tier-demo-"))
    procs: list[Any] = []
    try:
        print(
            f"edge-tier demo: {args.devices} devices x {args.rate} records/s x {args.seconds:.0f}s; "
            f"files in {work}"
        )
        server = NatsServer(work / "nats", mqtt_port=0, server_name="et-demo")
        server.start()
        procs.append(server)
        mqtt = {"port": server.mqtt_port, "version": "3.1.1", "backoff_min_s": 0.1, "backoff_max_s": 2.0}
        ingest = IngestProcess(
            work / "ingest", {"mqtt": mqtt, "nats": {"servers": [server.url]}}, name="cloud-ingest"
        )
        ingest.start(timeout=30)
        procs.append(ingest)
        agents = []
        for i in range(args.devices):
            d = work / f"device-{i}"
            a = AgentProcess(
                d,
                {
                    "device": {"tenant": "demo", "device": f"device-{i}"},
                    "mqtt": mqtt,
                    "store": {"path": str(d / "queue.db")},
                },
                name=f"edge-agent-{i}",
            )
            a.start(timeout=30)
            procs.append(a)
            agents.append(a)
        print(f"  nats-server  {server.url} (MQTT {server.mqtt_url}), ingest, {len(agents)} agents: running")
        acked: list[list[int]] = [[] for _ in agents]
        threads = [
            threading.Thread(target=_produce, args=(a.port, args.seconds, args.rate, acked[i], i))
            for i, a in enumerate(agents)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(1.0)
            sts = [agent_status(a.port) or {} for a in agents]
            print(
                f"  t={time.monotonic() - t0:5.1f}s  enqueued={sum(map(len, acked)):>8}  "
                f"delivered={sum(s.get('delivered', 0) for s in sts):>8}  "
                f"backlog={sum(s.get('records', 0) for s in sts):>6}"
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(agent_drained(a.port) for a in agents):
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        stored = asyncio.run(_stream_seqs(server.url))
        expected = {(f"device-{i}", s) for i, seqs in enumerate(acked) for s in seqs}
        got = set(stored)
        lost = len(expected - got)
        dup = len(stored) - len(got)
        evicted = sum(sum((agent_status(a.port) or {}).get("evictions", {}).values()) for a in agents)
        print("\nsummary")
        print(f"  enqueued     {len(expected)}")
        print(f"  in JetStream {len(got)}  ({len(got) / elapsed:,.0f} features/s over {elapsed:.1f}s)")
        print(f"  evicted      {evicted}")
        print(f"  lost         {lost}")
        print(f"  duplicated   {dup}")
        print(
            "\nnext: `make demo ARGS='--workdir DIR'` keeps the files, then "
            "`edge-agent status --config DIR/device-0/edge-agent-0.conf` reads a device's queue; "
            "`make test` runs the fault tests"
        )
        return 0 if lost == 0 and dup == 0 else 1
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in reversed(procs):
            proc.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
