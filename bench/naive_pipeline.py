"""The naive contender of bench_pipeline: store-and-forward done the obvious way.

The device (in the bench process) does ``INSERT`` + commit per record (WAL,
``synchronous=FULL``), one MQTT QoS1 message per record (8-byte seq + the feature bytes),
and deletes the row (one commit) when that record's receipt arrives. The ingest (a child
process) is a paho subscriber that, per message, awaits one
``js.publish(..., headers={"Nats-Msg-Id": ...})`` and then publishes one receipt. Its
names are its own (``naive/...`` topics, the NAIVE_FEATURES stream), not the product's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.synchronize
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import numpy as np
import paho.mqtt.client as paho
from nats.js.api import StorageType, StreamConfig
from paho.mqtt.enums import CallbackAPIVersion

from edge_tier_harness.brokers import Mosquitto, NatsServer
from edge_tier_harness.testkit import CpuMeter

DEVICE = "dev-1"
STREAM, SUBJECT = "NAIVE_FEATURES", f"naive.features.{DEVICE}"


@dataclass(frozen=True)
class NaiveRun:
    seconds: float  # first enqueue -> last receipt
    posted_s: float  # the enqueue + publish loop alone
    cpu_s: dict[str, float]
    stored: int  # messages in the stream at the end


def ingest_main(mqtt_port: int, nats_url: str, ready: multiprocessing.synchronize.Event) -> None:
    """Child process: per message, one awaited JetStream publish, then one receipt."""
    asyncio.run(_ingest(mqtt_port, nats_url, ready))


async def _ingest(mqtt_port: int, nats_url: str, ready: multiprocessing.synchronize.Event) -> None:
    parent = os.getppid()
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=["naive.features.>"],
            storage=StorageType.FILE,
            duplicate_window=7200.0,
        )
    )
    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="naive-ingest")

    def on_message(c: paho.Client, u: Any, m: paho.MQTTMessage) -> None:
        loop.call_soon_threadsafe(inbox.put_nowait, (m.topic, bytes(m.payload)))

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", mqtt_port)
    client.subscribe("naive/+/up", 1)
    client.loop_start()
    await asyncio.to_thread(subscribed.wait, 10)
    ready.set()
    try:
        while True:
            try:
                topic, payload = await asyncio.wait_for(inbox.get(), 1.0)
            except TimeoutError:
                if os.getppid() != parent:
                    return  # the benchmark died: do not outlive it
                continue
            seq = int.from_bytes(payload[:8], "little")
            device = topic.split("/")[1]
            await js.publish(SUBJECT, payload, headers={"Nats-Msg-Id": f"{device}.{seq}"})
            receipt = json.dumps({"seq": seq, "status": "committed"}).encode()
            client.publish(f"naive/{device}/receipt", receipt, qos=1)
    finally:
        client.loop_stop()
        client.disconnect()
        await nc.close()


async def _stream_count(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


def run(d: Path, mosq: Mosquitto, nsrv: NatsServer, n: int, dim: int, drain_timeout_s: float) -> NaiveRun:
    """``n`` records of ``dim`` float32 through the naive pipeline on running brokers; each
    receipted and deleted on the device, each stored once in the stream (else AssertionError)."""
    rng = np.random.default_rng(11)
    feats = rng.standard_normal((n, dim), dtype=np.float32)
    blobs = [feats[i].astype("<f4").tobytes() for i in range(n)]
    with contextlib.ExitStack() as stack:
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        child = ctx.Process(
            target=ingest_main, args=(mosq.port, nsrv.url, ready), name="naive-ingest", daemon=True
        )
        child.start()

        def _stop_child() -> None:
            if child.is_alive():
                child.terminate()
                child.join(5)
            if child.is_alive():
                child.kill()
                child.join()

        stack.callback(_stop_child)
        if not ready.wait(30):
            raise RuntimeError("the naive ingest did not become ready")

        db = sqlite3.connect(d / "naive.db", isolation_level=None, check_same_thread=False)
        stack.callback(db.close)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE q (seq INTEGER PRIMARY KEY, created_ms INTEGER, features BLOB)")
        lock = threading.Lock()  # one connection, used by the producer and the receipt thread
        done = threading.Event()
        left = [n]

        def on_receipt(client: Any, userdata: Any, msg: Any) -> None:
            seq = int(json.loads(msg.payload)["seq"])
            with lock:
                db.execute("DELETE FROM q WHERE seq = ?", (seq,))  # autocommit: one commit
                left[0] -= 1
                if left[0] == 0:
                    done.set()

        subscribed = threading.Event()
        dev = paho.Client(CallbackAPIVersion.VERSION2, client_id="naive-device")
        dev.on_message = on_receipt
        dev.on_subscribe = lambda *a: subscribed.set()
        dev.connect("127.0.0.1", mosq.port)
        dev.subscribe(f"naive/{DEVICE}/receipt", 1)
        dev.loop_start()

        def _stop_dev() -> None:
            dev.loop_stop()
            dev.disconnect()

        stack.callback(_stop_dev)
        if not subscribed.wait(10):
            raise TimeoutError("naive device: no SUBACK")
        up = f"naive/{DEVICE}/up"

        meter = CpuMeter(
            {"agent": os.getpid(), "ingest": child.pid, "mosquitto": mosq.pid, "nats-server": nsrv.pid}
        )
        meter.start()
        t0 = time.monotonic()
        for i in range(n):
            seq = i + 1
            with lock:
                db.execute("INSERT INTO q VALUES (?, ?, ?)", (seq, time.time_ns() // 1_000_000, blobs[i]))
            dev.publish(up, seq.to_bytes(8, "little") + blobs[i], qos=1)
        t_posted = time.monotonic()
        deadline = time.monotonic() + drain_timeout_s
        while not done.wait(0.2):
            if time.monotonic() > deadline or not child.is_alive():
                raise TimeoutError(f"naive: {left[0]} of {n} records without a receipt")
        t_end = time.monotonic()
        cpu = meter.stop()
        with lock:
            rows = db.execute("SELECT count(*) FROM q").fetchone()[0]
        stored = asyncio.run(_stream_count(nsrv.url, STREAM))
    assert rows == 0 and stored == n, f"naive: {rows} rows left, {stored} messages stored, {n} enqueued"
    return NaiveRun(seconds=t_end - t0, posted_s=t_posted - t0, cpu_s=cpu, stored=stored)
