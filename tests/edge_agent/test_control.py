"""The agent's control channel in orders hard to provoke with a broker: a new document while
a chunk is being written, a model superseded mid-transfer, a full disk. (Messages go into
the real MqttBridge's routing; the whole path on real brokers is tests/system/test_control.py.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.config import AgentConfig
from edge_agent.control import Controller
from edge_agent.model_store import ModelStore
from edge_agent.stream_models import StreamModels
from edge_tier import topics
from edge_tier.control import ControlDoc, encode_control, model_update, sign_control
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.mqtt import Message, MqttBridge
from tests.support import new_prefilter

KEY = ed25519.Ed25519PrivateKey.generate()


class SlowStore(ModelStore):
    """Chunk writes take a while (a slow flash card), or fail (a full one)."""

    delay = 0.0
    fail: OSError | None = None

    def put_chunk(self, u, index, data):  # type: ignore[no-untyped-def]
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        super().put_chunk(u, index, data)


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        pem = KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        (tmp_path / "signing.pub").write_bytes(pem)
        self.cfg = AgentConfig(
            device={"tenant": "demo", "device": "device-1"},
            store={"path": str(tmp_path / "q.db")},
            prefilter={"manifest": str(DEFAULT_MANIFEST)},
            control={"signing_key": str(tmp_path / "signing.pub")},
        )
        self.bridge = MqttBridge(self.cfg.mqtt, client_id="test", name="test")  # never connected
        self.store = SlowStore(self.cfg.control_path("models"))
        self.models = StreamModels(self.cfg)
        self.models.stores["prefilter"] = self.store
        self.models.start({})
        self.swapped: list[str] = []
        self.ctl = Controller(
            self.cfg, self.bridge, self.models,
            swap=lambda k, p: self.swapped.append(p.version),
            limit=lambda c: None,
            publish_status=lambda: None,
        )  # fmt: skip
        self.gen = 1
        self.counter = 1
        self.tmp = tmp_path

    def update(self, version: str, seed: int) -> tuple[Any, list[bytes]]:
        self.counter += 1  # as edge-provision counts them: each new model file above the last
        manifest = new_prefilter(self.tmp / version, version, seed=seed)
        return model_update("demo", manifest, counter=self.counter, chunk_bytes=4096)

    def doc(self, update: Any = None) -> None:
        self.gen += 1
        now = int(time.time() * 1000)
        doc = ControlDoc(tenant="demo", device="device-1", generation=self.gen, issued_ms=now,
                         expires_ms=now + 60_000, model=update)  # fmt: skip
        payload = encode_control(sign_control(KEY, doc))
        self.bridge._deliver(Message(topics.mqtt_topic("demo", "device-1", "control"), payload, 1, 0, True))

    def chunk(self, update: Any, i: int, data: bytes) -> None:
        self.bridge._deliver(Message(topics.model_chunk_topic("demo", update.sha256, i), data, 1, 0, True))

    def all_chunks(self, update: Any, chunks: list[bytes]) -> None:
        for i, c in enumerate(chunks):
            self.chunk(update, i, c)

    async def offer(self, update: Any) -> None:
        """A document with ``update``; returns once the transfer has begun."""
        self.doc(update)
        await _until(lambda: self.ctl.transfer is not None, "the transfer to start")


async def _until(pred: Any, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_a_document_while_a_chunk_is_written_neither_crashes_nor_installs_the_dropped_model(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        r = Rig(tmp_path)
        task = asyncio.create_task(r.ctl.run())
        a, a_chunks = r.update("2.0.0", 2)
        await r.offer(a)
        r.store.delay = 0.3
        r.all_chunks(a, a_chunks)
        await asyncio.sleep(0.05)  # the first chunk is being written now
        r.doc(None)  # the update is withdrawn
        await asyncio.sleep(1.5)
        assert not task.done(), task.exception() if task.done() else None
        assert r.swapped == [] and r.ctl.transfer is None
        task.cancel()

    asyncio.run(main())


def test_a_model_superseded_mid_transfer_leaves_the_newer_one_running(tmp_path: Path) -> None:
    async def main() -> None:
        r = Rig(tmp_path)
        task = asyncio.create_task(r.ctl.run())
        a, a_chunks = r.update("2.0.0", 2)
        b, b_chunks = r.update("3.0.0", 3)
        await r.offer(a)
        r.store.delay = 0.2
        r.all_chunks(a, a_chunks)
        await asyncio.sleep(0.05 + 0.2 * (len(a_chunks) - 1))  # A's last chunk is being written
        r.doc(b)
        r.all_chunks(b, b_chunks)
        await _until(lambda: r.models.active_sha["prefilter"] == b.sha256, "model 3.0.0 to run")
        assert r.swapped[-1] == "3.0.0" and r.ctl.model is not None and r.ctl.model.state == "active"
        assert not task.done()
        task.cancel()

    asyncio.run(main())


def test_a_full_disk_is_reported_and_the_transfer_resumes_when_there_is_room(tmp_path: Path) -> None:
    async def main() -> None:
        r = Rig(tmp_path)
        task = asyncio.create_task(r.ctl.run())
        a, a_chunks = r.update("2.0.0", 2)
        await r.offer(a)
        r.store.fail = OSError(28, "No space left on device")
        r.chunk(a, 0, a_chunks[0])
        await _until(lambda: r.ctl.model is not None and "No space" in (r.ctl.model.error or ""), "the error")
        assert not task.done()
        r.store.fail = None
        r.all_chunks(a, a_chunks)  # the broker's copies come again (a reconnect, say)
        await _until(lambda: r.models.active_sha["prefilter"] == a.sha256, "model 2.0.0 to run")
        task.cancel()

    asyncio.run(main())


def test_a_model_that_failed_is_not_fetched_again_after_a_restart(tmp_path: Path) -> None:
    async def main() -> None:
        r = Rig(tmp_path)
        task = asyncio.create_task(r.ctl.run())
        u, chunks = model_update("demo", new_prefilter(tmp_path / "junk", "9.9.9", data=b"TFL3" + bytes(900)))
        await r.offer(u)
        r.chunk(u, 0, chunks[0])
        await _until(lambda: r.ctl.model is not None and r.ctl.model.state == "failed", "the refusal")
        task.cancel()
        again = Rig(tmp_path)  # a restart: same files, the same document comes back from disk
        task = asyncio.create_task(again.ctl.run())
        await asyncio.sleep(0.2)
        assert again.ctl.transfer is None, "a model that failed to install was fetched again"
        task.cancel()

    asyncio.run(main())


def test_a_device_named_like_the_chunk_namespace_keeps_its_receipts() -> None:
    from paho.mqtt.client import topic_matches_sub

    chunks = topics.model_chunks_filter("acme")
    assert not topic_matches_sub(chunks, topics.mqtt_topic("acme", "_models", "receipt"))
    assert topic_matches_sub(chunks, topics.model_chunk_topic("acme", "ab" * 32, 3))
