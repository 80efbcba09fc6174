"""Result API: page reads, and the SSE stream under 1,000 results/s, against naive readers.

One nats-server and one ``cloud-ingest api`` child process; result messages
(as workers write them, with the index headers) go straight into ET_RESULTS.

* **Pages**: one device's ``--history`` result messages (5 records each) read
  in full, in records/s. ``naive``: a client walking the device's subject in
  JetStream itself, one direct get per message (what a reader without an index
  does). ``ours``: ``GET /v1/devices/{device}/results`` pages of ``--page``
  records: one client reading first (each message decoded and its records
  encoded as it is first read), the same again (pre-encoded, from the cache),
  ``--clients`` concurrent clients, and one client of an API restarted with its
  index on disk (nothing cached: batched direct gets from JetStream).
* **Live**: results written at ``--rate`` messages/s for ``--seconds``;
  latency from the write (``produced_ms``) to the reader having it. ``naive``:
  polling the page endpoint with ``since`` every 250 ms. ``ours``: one SSE
  client on ``/v1/stream``.

Run as ``python -m bench.bench_api``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
import numpy as np

from bench.figures import save_json
from cloud_ingest.config import StreamSettings
from cloud_ingest.streams import ensure_streams
from edge_tier import topics
from edge_tier.tokens import TokenStore
from edge_tier.wire import decode_results, upload_id
from edge_tier_harness.brokers import NatsServer
from edge_tier_harness.services import ApiProcess

TENANT, DEVICE, PER = "bench", "dev-1", 5


def result_message(first: int, produced_ms: int) -> tuple[bytes, dict[str, str]]:
    uid = upload_id(TENANT, DEVICE, first, first + PER - 1)
    doc = {
        "v": 1, "upload_id": uid, "tenant": TENANT, "device": DEVICE, "stream": "vibration", "part": 0,
        "parts": 1, "model": "tier2", "model_version": "1.0.0", "worker": "bench", "produced_ms": produced_ms,
        "seqs": list(range(first, first + PER)), "times_ms": [produced_ms] * PER, "scores": [0.5] * PER,
        "labels": ["imbalance"] * PER, "confidences": [0.91] * PER,
    }  # fmt: skip
    headers = {
        topics.H_MSG_ID: topics.result_msg_id(uid, 0), topics.H_UPLOAD_ID: uid, topics.H_PART: "0",
        topics.H_PARTS: "1", topics.H_RECORDS: str(PER), topics.H_FIRST: str(first),
        topics.H_LAST: str(first + PER - 1), topics.H_PRODUCED_MS: str(produced_ms),
    }  # fmt: skip
    return json.dumps(doc).encode(), headers


async def fill(url: str, n: int, start: int = 0) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    now = int(time.time() * 1000)
    futs = []
    for i in range(start, start + n):
        body, headers = result_message(1 + i * PER, now)
        futs.append(await js.publish_async(topics.results_subject(TENANT, DEVICE), body, headers=headers))
        if len(futs) >= 2000:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)
    await nc.close()


async def naive_pages(url: str) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    subject = topics.results_subject(TENANT, DEVICE)
    t0, rows, seq = time.perf_counter(), 0, 1
    while True:
        try:
            m = await js.get_msg(topics.RESULTS_STREAM, seq, subject=subject, next=True, direct=True)
        except nats.js.errors.NotFoundError:
            break
        rows += len(decode_results(m.data or b"").seqs)
        seq = (m.seq or 0) + 1
    await nc.close()
    return rows / (time.perf_counter() - t0)


async def our_pages(base: str, token: str, page: int, clients: int, expect: int = 0) -> float:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as s:

        async def walk() -> int:
            rows, cursor = 0, None
            while True:
                params = {"limit": str(page), **({"cursor": cursor} if cursor else {})}
                async with s.get(f"{base}/v1/devices/{DEVICE}/results", params=params) as r:
                    body = await r.json()
                rows += len(body["results"])
                if (cursor := body["next_cursor"]) is None:
                    return rows

        t0 = time.perf_counter()
        rows = sum(await asyncio.gather(*(walk() for _ in range(clients))))
        took = time.perf_counter() - t0
        if rows < clients * expect:
            raise RuntimeError(
                f"pages of {base}: {rows} records read by {clients} clients, {expect} each expected"
            )
        return rows / took


async def writer(url: str, rate: int, seconds: float, start: int) -> int:
    nc = await nats.connect(url)
    js = nc.jetstream()
    n, t0 = 0, time.monotonic()
    while (elapsed := time.monotonic() - t0) < seconds:
        due = int(elapsed * rate) + 1
        while n < due:
            body, headers = result_message(1 + (start + n) * PER, int(time.time() * 1000))
            await js.publish_async(topics.results_subject(TENANT, DEVICE), body, headers=headers)
            n += 1
        await asyncio.sleep(0.002)
    await js.publish_async_completed()
    await nc.close()
    return n


async def sse_latency(base: str, token: str, url: str, rate: int, seconds: float, start: int) -> list[float]:
    lat: list[float] = []
    auth = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(headers=auth) as s,
        s.get(f"{base}/v1/stream", params={"device": DEVICE}, timeout=None) as r,
    ):
        await asyncio.sleep(0.3)
        write = asyncio.create_task(writer(url, rate, seconds, start))
        buf = b""
        expected = None
        while expected is None or len(lat) < expected:
            if write.done() and expected is None:
                expected = write.result()
            try:
                chunk = await asyncio.wait_for(r.content.readany(), 5)
            except TimeoutError:
                break
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        produced = json.loads(line[6:])["produced_ms"]
                        lat.append(time.time() - produced / 1000)
        await write
    return lat


async def poll_latency(base: str, token: str, url: str, rate: int, seconds: float, start: int) -> list[float]:
    lat: list[float] = []
    since = int(time.time() * 1000)
    seen: set[int] = set()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        write = asyncio.create_task(writer(url, rate, seconds, start))
        idle = 0
        while idle < 8:
            await asyncio.sleep(0.25)
            got = 0
            cursor = None
            while True:
                params = {"limit": "1000", "since": str(since), **({"cursor": cursor} if cursor else {})}
                async with s.get(f"{base}/v1/devices/{DEVICE}/results", params=params) as r:
                    body = await r.json()
                now = time.time()
                for rec in body["results"]:
                    if rec["seq"] not in seen:
                        seen.add(rec["seq"])
                        lat.append(now - rec["produced_ms"] / 1000)
                        got += 1
                if (cursor := body["next_cursor"]) is None:
                    break
            idle = idle + 1 if write.done() and not got else 0
        await write
    return [x for i, x in enumerate(lat) if i % PER == 0]  # one per result message, like SSE


def api_process(workdir: Path, nats_url: str, registry: Path, **api: Any) -> ApiProcess:
    settings = {"registry": str(registry), "rate_per_token": 1e6, "burst_per_token": 1e6, **api}
    return ApiProcess(workdir, {"nats": {"servers": [nats_url]}, "api": settings}, name="api")


def cold_pages(workdir: Path, nats_url: str, registry: Path, token: str, page: int, expect: int) -> float:
    """One client's pages from an API restarted with its index on disk: its cache holds nothing."""
    api = api_process(workdir, nats_url, registry, index_path=str(workdir / "index.db"))
    try:
        api.start(timeout=120)  # builds the index
        api.stop()
        api.start(timeout=120)  # finds it: follows from its last sequence, nothing replayed
        return asyncio.run(our_pages(f"http://127.0.0.1:{api.port}", token, page, 1, expect))
    finally:
        api.stop()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_api", description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, default=20_000, help="result messages read as pages")
    ap.add_argument("--page", type=int, default=500)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rate", type=int, default=1000, help="result messages/s written during the live part")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as d:
        server = NatsServer(Path(d) / "nats")
        server.start()
        store = TokenStore(Path(d) / "registry.db")
        token = store.add(TENANT)[1]
        api = None
        try:
            print(f"# writing {args.history} result messages ...", file=sys.stderr, flush=True)
            asyncio.run(fill(server.url, args.history))
            t0 = time.perf_counter()
            api = api_process(Path(d) / "api", server.url, Path(d) / "registry.db")
            api.start(timeout=120)
            out["index_rebuild_msgs_per_s"] = args.history / (time.perf_counter() - t0)
            base = f"http://127.0.0.1:{api.port}"
            print("# pages ...", file=sys.stderr, flush=True)
            out["naive_pages"] = asyncio.run(naive_pages(server.url))
            out["ours_pages_1"] = asyncio.run(our_pages(base, token, args.page, 1, args.history * PER))
            out["ours_pages_1_again"] = asyncio.run(our_pages(base, token, args.page, 1, args.history * PER))
            out["ours_pages_n"] = asyncio.run(
                our_pages(base, token, args.page, args.clients, args.history * PER)
            )
            print("# pages, cold (restarted with the index on disk) ...", file=sys.stderr, flush=True)
            out["ours_pages_cold"] = cold_pages(
                Path(d) / "api-cold",
                server.url,
                Path(d) / "registry.db",
                token,
                args.page,
                args.history * PER,
            )
            print("# live: polling ...", file=sys.stderr, flush=True)
            n0 = args.history
            poll = asyncio.run(poll_latency(base, token, server.url, args.rate, args.seconds, n0))
            print("# live: SSE ...", file=sys.stderr, flush=True)
            n1 = n0 + int(args.rate * args.seconds) + 10
            sse = asyncio.run(sse_latency(base, token, server.url, args.rate, args.seconds, n1))
            out["poll"] = {"n": len(poll), "p50_ms": pct(poll, 50), "p99_ms": pct(poll, 99)}
            out["sse"] = {"n": len(sse), "p50_ms": pct(sse, 50), "p99_ms": pct(sse, 99)}
        finally:
            if api is not None:
                api.stop()
            server.stop()
    naive = out["naive_pages"]
    print("| reading one device's history | records/s | x naive |\n|---|---:|---:|")
    print(f"| naive: direct get per message from JetStream | {naive:,.0f} | 1.0 |")
    for name, key in (
        (f"ours: pages of {args.page}, 1 client, first read", "ours_pages_1"),
        (f"ours: pages of {args.page}, 1 client, again (cached)", "ours_pages_1_again"),
        (f"ours: pages of {args.page}, {args.clients} clients", "ours_pages_n"),
        (f"ours: pages of {args.page}, 1 client, restarted API (nothing cached)", "ours_pages_cold"),
    ):
        print(f"| {name} | {out[key]:,.0f} | {out[key] / naive:.1f} |")
    print(f"\n| live, {args.rate} results/s for {args.seconds:g}s | received | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for name, key in (("naive: poll pages every 250 ms", "poll"), ("ours: SSE /v1/stream", "sse")):
        r = out[key]
        print(f"| {name} | {r['n']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    print(
        f"\nindex rebuilt at start: {out['index_rebuild_msgs_per_s']:,.0f} result messages/s. "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs."
    )
    save_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
