"""Helpers for pipeline tests: agent and ingest as real child processes, producers, readers.

The configs and waits the benchmarks share are in ``edge_tier_harness.testkit`` (re-exported).

The brokers come from ``tests/conftest.py``; here are the services on top of
them, a producer that records which seqs the agent acknowledged, and readers
that return every seq JetStream holds (with repeats, so duplicates show).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cloud_ingest.config import IngestConfig
from cloud_ingest.streams import read_all
from cloud_ingest.worker import Worker
from edge_tier import topics
from edge_tier.wire import ResultBatch, decode_frame, decode_results
from edge_tier_harness import services
from edge_tier_harness.brokers import Mosquitto, NatsServer
from edge_tier_harness.services import AgentProcess, IngestProcess
from edge_tier_harness.testkit import DEVICE, TENANT, upload_frame, wait_until
from edge_tier_harness.testkit import agent_config as agent_config
from edge_tier_harness.testkit import ingest_config as ingest_config

DIM = 16


def copy_models(dst: Path, *files: str) -> Path:
    """The manifest and ``files`` from models/ copied into ``dst``; the copied manifest's path."""
    import shutil

    from edge_tier.model.manifest import DEFAULT_MANIFEST

    for name in ("manifest.json", *files):
        shutil.copy(DEFAULT_MANIFEST.parent / name, dst / name)
    return dst / "manifest.json"


def random_prefilter(seed: int = 0) -> tuple[Any, np.ndarray]:
    """Prefilter weights (models.build.tflite_writer.PrefilterWeights) of random values, and inputs."""
    from models.build.tflite_writer import Dense, PrefilterWeights

    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.5, (2000, 256)).astype(np.float32)
    w1, b1 = rng.normal(0, 0.1, (32, 256)), rng.normal(0, 0.05, 32)
    w2, b2 = rng.normal(0, 0.3, (16, 32)), rng.normal(0, 0.05, 16)
    w3, b3 = rng.normal(0, 0.5, (1, 16)), rng.normal(0, 0.05, 1)
    h = np.maximum(0, x @ w1.T + b1)
    e = h @ w2.T + b2
    lg = e @ w3.T + b3

    def rng_of(a: np.ndarray) -> tuple[float, float]:  # min/max: nothing clips
        return float(a.min()), float(a.max())

    pw = PrefilterWeights(
        Dense(w1.astype(np.float32), b1.astype(np.float32)),
        Dense(w2.astype(np.float32), b2.astype(np.float32)),
        Dense(w3.astype(np.float32), b3.astype(np.float32)),
        {"input": rng_of(x), "hidden": rng_of(h), "embedding": rng_of(e), "logit": rng_of(lg)},
    )
    return pw, x


def new_prefilter(dst: Path, version: str, *, seed: int = 0, data: bytes | None = None) -> Path:
    """A model directory like models/ with another prefilter (random weights, or ``data``
    as the file, loadable or not) and ``version``; its manifest's path."""
    import hashlib

    from edge_tier.model.manifest import DEFAULT_MANIFEST
    from models.build.tflite_writer import write_prefilter

    dst.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = write_prefilter(random_prefilter(seed)[0])
    (dst / "prefilter.tflite").write_bytes(data)
    manifest = json.loads(DEFAULT_MANIFEST.read_text())
    manifest["prefilter"].update(
        version=version, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), file="prefilter.tflite"
    )
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst / "manifest.json"


def post_windows(port: int, windows: np.ndarray) -> dict[str, Any]:
    """Raw windows to the agent's prefilter (``POST /v1/windows``); its answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/windows?stream=vibration",
            windows.astype("<f4").tobytes(),
            {"Content-Type": "application/x-edge-tier-windows"},
        )
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200, body
        return body
    finally:
        conn.close()


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte of a file, as a bad disk or a tampering hand would."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@dataclass
class Producer:
    """Enqueues records over the agent's HTTP endpoint and remembers what was acknowledged."""

    port: int
    acked: list[int] = field(default_factory=list)
    attempted: int = 0
    errors: int = 0

    def post(
        self, n: int, *, score: float | None = None, seed: int = 0, meta: dict[str, Any] | None = None
    ) -> tuple[int, int] | None:
        rng = np.random.default_rng(seed)
        body = {
            "stream": "vibration",
            "records": [
                {
                    "features": rng.standard_normal(DIM).round(4).tolist(),
                    "score": float(rng.random()) if score is None else score,
                    **({"meta": meta} if meta else {}),
                }
                for _ in range(n)
            ],
        }
        self.attempted += n
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", "/v1/records", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
        except (OSError, http.client.HTTPException, ValueError):
            self.errors += 1
            return None
        finally:
            conn.close()
        if resp.status != 200:
            self.errors += 1
            return None
        first, last = data["first_seq"], data["last_seq"]
        self.acked.extend(range(first, last + 1))
        return first, last

    def run(
        self,
        batches: int,
        size: int,
        stop: threading.Event | None = None,
        pause: float = 0.0,
        seed_base: int = 0,
    ) -> None:
        for i in range(batches):
            if stop is not None and stop.is_set():
                return
            self.post(size, seed=seed_base + i)
            if pause:
                time.sleep(pause)


agent_status = services.agent_status
drained = services.agent_drained


async def _stream_messages(url: str, stream: str) -> list[Any]:
    nc = await nats.connect(url)
    try:
        return await read_all(nc.jetstream(), stream)
    finally:
        await nc.close()


def stream_messages(url: str, stream: str) -> list[Any]:
    return asyncio.run(_stream_messages(url, stream))


def stream_seqs(url: str, stream: str = topics.FEATURES_STREAM) -> list[int]:
    """Every record seq in the features stream, in stream order, repeats kept."""
    return [int(x) for m in stream_messages(url, stream) for x in decode_frame(m.data).seqs]


def frame(
    first: int,
    n: int,
    prev: int,
    *,
    tenant: str = TENANT,
    device: str = DEVICE,
    dim: int = 8,
    values: np.ndarray | None = None,
) -> bytes:
    """An upload frame of records ``first .. first+n-1``; random features unless ``values``."""
    rng = np.random.default_rng(first)
    x = rng.standard_normal((n, dim)).astype("<f4") if values is None else values
    return upload_frame(tenant, device, first, prev, x)


async def publish_features(url: str, frames: list[bytes]) -> None:
    """Put frames into the features stream as ingest would (creating the streams first)."""
    from cloud_ingest.config import StreamSettings
    from cloud_ingest.streams import ensure_streams

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, StreamSettings())
        acks = [
            js.publish(
                topics.features_subject(f.tenant, f.device),
                data,
                headers={topics.H_MSG_ID: f.upload_id},
            )
            for data, f in ((d, decode_frame(d)) for d in frames)
        ]
        await asyncio.gather(*acks)
    finally:
        await nc.close()


def results(url: str) -> list[ResultBatch]:
    """Every result message in ET_RESULTS, in stream order."""
    return [decode_results(m.data) for m in stream_messages(url, topics.RESULTS_STREAM)]


def result_keys(batches: list[ResultBatch]) -> list[tuple[str, str, int]]:
    """(tenant, device, seq) of every result row, repeats kept."""
    return [(b.tenant, b.device, s) for b in batches for s in b.seqs]


def worker_config(url: str, **worker: Any) -> dict[str, Any]:
    return {
        "log_level": "INFO",
        "nats": {"servers": [url]},
        "worker": {"max_wait_ms": 2.0, "discover_s": 0.2, "backoff_s": [0.2], **worker},
    }


@contextlib.asynccontextmanager
async def running_worker(url: str, **worker: Any) -> AsyncIterator[Worker]:
    w = Worker(IngestConfig(**worker_config(url, **worker)))
    task = asyncio.create_task(w.run())
    ready = asyncio.create_task(w.ready.wait())
    await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises what stopped it
    assert w.ready.is_set(), "the worker did not become ready"
    try:
        yield w
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)  # a worker that does not stop fails here, loudly


async def stored(url: str, stream: str) -> list[Any]:
    nc = await nats.connect(url)
    try:
        return await read_all(nc.jetstream(), stream)
    finally:
        await nc.close()


async def message_count(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(stream)).state.messages
    finally:
        await nc.close()


async def wait_for_rows(url: str, n: int, within: float = 30) -> list[ResultBatch]:
    deadline = time.monotonic() + within
    while True:
        got = [decode_results(m.data) for m in await stored(url, topics.RESULTS_STREAM)]
        if sum(len(b.seqs) for b in got) >= n or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


def assert_exactly_once(stored: list[int], expected: set[int]) -> None:
    dups = len(stored) - len(set(stored))
    assert dups == 0, f"{dups} records are in the stream more than once"
    missing = expected - set(stored)
    extra = set(stored) - expected
    assert not missing, (
        f"{len(missing)} acknowledged records never reached the stream, e.g. {sorted(missing)[:5]}"
    )
    assert not extra, f"{len(extra)} records in the stream were never enqueued, e.g. {sorted(extra)[:5]}"


class Subscriber:
    """A paho client that records every message on ``topic``: an application, or a wire spy."""

    def __init__(self, port: int, topic: str, client_id: str = "subscriber") -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(topic, 1)
        self.c.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for _, p in self.got]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class RawClient:
    """A plain paho client that speaks as a device: publishes frames, collects receipts."""

    def __init__(self, port: int, tenant: str = TENANT, device: str = DEVICE) -> None:
        self.receipts: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{tenant}-{device}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topics.mqtt_topic(tenant, device, "receipt"), 1)
        self.client.loop_start()
        self.tenant, self.device = tenant, device

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.receipts.append(json.loads(msg.payload))
            self._cond.notify_all()

    def publish(self, payload: bytes, topic: str | None = None) -> None:
        info = self.client.publish(topic or topics.mqtt_topic(self.tenant, self.device, "up"), payload, qos=1)
        info.wait_for_publish(5)

    def wait_receipts(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.receipts) >= n, timeout)
        assert ok, f"expected {n} receipts, got {len(self.receipts)}: {self.receipts}"
        return list(self.receipts)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Pipeline:
    mosquitto: Mosquitto
    nats: NatsServer
    agent: AgentProcess
    ingest: IngestProcess
    producer: Producer

    def wait_drained(self, timeout: float = 60.0) -> None:
        wait_until(lambda: drained(self.agent.port), timeout, "the agent's queue to drain")


class SmallFilesystem:
    """A real small filesystem for disk-full tests: a loop-mounted ext4 image or a tmpfs of
    ``size_mib``, mounted at ``mountpoint`` (needs root: CI runs as root on Debian)."""

    def __init__(self, workdir: Path, kind: str, size_mib: int) -> None:
        self.kind, self.size_mib = kind, size_mib
        self.image = workdir / f"{kind}.img"
        self.mountpoint = workdir / f"{kind}-mnt"

    def mount(self) -> None:
        import subprocess

        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.kind == "tmpfs":
            cmd = ["mount", "-t", "tmpfs", "-o", f"size={self.size_mib}m", "tmpfs", str(self.mountpoint)]
        else:
            with open(self.image, "wb") as f:
                f.truncate(self.size_mib << 20)
            import shutil

            exe = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"  # /sbin may not be on PATH
            mkfs = subprocess.run([exe, "-q", "-F", str(self.image)], capture_output=True, text=True)
            if mkfs.returncode:
                raise OSError(f"mkfs.ext4 {self.image}: {mkfs.stderr.strip()}")
            cmd = ["mount", "-o", "loop", str(self.image), str(self.mountpoint)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")

    def unmount(self) -> None:
        import subprocess

        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        with contextlib.suppress(OSError):
            self.image.unlink()

    def fill(self, name: str = "hog") -> Path:
        """Another process writes a file beside the queue until the filesystem is full."""
        import subprocess
        import sys

        hog = self.mountpoint / name
        code = (
            "import sys\n"
            "f = open(sys.argv[1], 'ab', buffering=0)\n"
            "block = b'x' * 65536\n"
            "try:\n"
            "    while True: f.write(block)\n"
            "except OSError: pass\n"
            "small = b'x' * 512\n"
            "try:\n"
            "    while True: f.write(small)\n"
            "except OSError: pass\n"
        )
        subprocess.run([sys.executable, "-c", code, str(hog)], check=True, timeout=60)
        return hog

    def free_bytes(self) -> int:
        import os

        st = os.statvfs(self.mountpoint)
        return st.f_bavail * st.f_frsize
