"""The control channel end to end: edge-provision publishes, a real agent on a real mosquitto
applies config without a restart, installs signed models, refuses the rest, and resumes
an interrupted transfer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")

from edge_tier import topics
from edge_tier.control import ControlDoc, encode_control, model_update, sign_model
from edge_tier.mqtt import MqttSettings
from edge_tier.services import agent_status, metric
from models.generator import generate
from models.manifest import DEFAULT_MANIFEST
from provisioning.control import ControlPlane, publish_retained
from provisioning.fleet import Fleet
from tests.support import (
    DEVICE,
    TENANT,
    Pipeline,
    new_prefilter,
    post_windows,
    stream_seqs,
    wait_until,
)


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    f = Fleet.init(tmp_path / "fleet")
    f.add_device(TENANT, DEVICE, tmp_path / "bundle", broker_host="127.0.0.1", port=0, tls_port=0)
    return f


def _plane(fleet: Fleet, p: Pipeline) -> ControlPlane:
    return ControlPlane(fleet, MqttSettings(port=p.mosquitto.port, username="et-ingest", password="x"))


@pytest.fixture
def setup(make_pipeline: Callable[..., Pipeline], fleet: Fleet) -> tuple[Pipeline, ControlPlane, int]:
    """An agent with the prefilter and the fleet's key, ingest, brokers; the control plane."""
    p = make_pipeline(agent={
        "prefilter": {"manifest": str(DEFAULT_MANIFEST)},
        "control": {"signing_key": str(fleet.root / "signing.pub")},
    })  # fmt: skip
    return p, _plane(fleet, p), p.agent.port


def _control(port: int) -> dict[str, Any]:
    st = agent_status(port)
    return {} if st is None else dict(st.get("control", {}))


def _wait_control(port: int, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20) -> None:
    wait_until(lambda: pred(_control(port)), timeout, what)


def _windows(n: int = 64) -> np.ndarray:
    return generate(n, seed=5, fault_fraction=0.5).x


def test_config_changes_apply_at_once_and_survive_a_restart_without_the_broker(
    setup: tuple[Pipeline, ControlPlane, int], fleet: Fleet, tmp_path: Path
) -> None:
    p, plane, port = setup
    # threshold: 1.0 keeps nothing, 0.0 keeps everything; no restart in between
    plane.set_config(TENANT, DEVICE, threshold=1.0)
    _wait_control(port, lambda c: c.get("threshold") == 1.0, "threshold 1.0")
    assert post_windows(port, _windows())["kept"] == 0
    plane.set_config(TENANT, None, threshold=0.0)  # --all: the tenant's every device
    _wait_control(port, lambda c: c.get("threshold") == 0.0, "threshold 0.0")
    assert post_windows(port, _windows())["kept"] == 64
    p.wait_drained()
    # pause: records queue up, nothing leaves; resume: all of them arrive, once
    before = len(stream_seqs(p.nats.url))
    plane.set_config(TENANT, DEVICE, paused=True)
    _wait_control(port, lambda c: c.get("paused") is True, "paused")
    r = post_windows(port, _windows())
    time.sleep(1.5)
    st = agent_status(port)
    assert st is not None and st["records"] == 64, st
    assert len(stream_seqs(p.nats.url)) == before, "a paused agent uploaded"
    doc = plane.desired(TENANT, DEVICE)
    assert doc is not None and doc.config.threshold == 0.0, "a change keeps the other settings"
    # a restart with the broker down: the agent runs as it was last told, from its disk
    p.agent.stop()
    p.mosquitto.stop()
    p.agent.start(timeout=20)
    c = _control(port)
    assert (c.get("paused"), c.get("threshold"), c.get("generation")) == (True, 0.0, doc.generation), c
    p.mosquitto.start()
    plane.set_config(TENANT, DEVICE, paused=False, upload_bytes_per_s=20_000)
    p.wait_drained()
    seqs = stream_seqs(p.nats.url)
    assert sorted(seqs[before:]) == list(range(r["first_seq"], r["last_seq"] + 1))
    # the upload cap (set with the resume): B bytes cannot leave in less than (B - burst) / rate
    sent0, t0 = (metric(port, "et_agent_upload_bytes_total") or 0.0), time.monotonic()
    for _ in range(3):
        post_windows(port, generate(1000, seed=6, fault_fraction=0.5).x)
    p.wait_drained(timeout=90)
    elapsed, sent = time.monotonic() - t0, (metric(port, "et_agent_upload_bytes_total") or 0.0) - sent0
    assert sent > 80_000, sent
    least = 0.9 * (sent - 20_000) / 20_000
    assert elapsed > least, f"{sent} bytes in {elapsed:.1f}s: the cap was not applied"


def test_a_signed_model_is_installed_a_bad_one_refused_and_the_running_one_keeps_working(
    setup: tuple[Pipeline, ControlPlane, int], fleet: Fleet, tmp_path: Path
) -> None:
    p, plane, port = setup
    v2 = new_prefilter(tmp_path / "v2", "2.0.0", seed=2)
    plane.push_model(TENANT, DEVICE, v2)
    _wait_control(port, lambda c: c.get("model", {}).get("state") == "active"
                  and c["model"]["version"] == "2.0.0", "model 2.0.0 active")  # fmt: skip
    st = agent_status(port)
    assert st is not None and st["model_version"] == "2.0.0"
    assert post_windows(port, _windows())["windows"] == 64

    # signed by another fleet's key: refused, 2.0.0 keeps running
    stranger = Fleet.init(tmp_path / "stranger")
    stranger.add_device(TENANT, DEVICE, tmp_path / "b2", broker_host="h", port=0, tls_port=0)
    _plane(stranger, p).push_model(TENANT, DEVICE, new_prefilter(tmp_path / "v3", "3.0.0", seed=3))
    _wait_control(port, lambda c: c.get("model", {}).get("state") == "refused", "a forged model refused")
    c = _control(port)
    assert "signature" in c["model"]["error"] and c["model"]["version"] == "2.0.0", c

    # properly signed, but the file is no model: installed nowhere, 2.0.0 keeps running
    junk = new_prefilter(tmp_path / "v4", "4.0.0", data=b"TFL3" + bytes(5000))
    plane.push_model(TENANT, DEVICE, junk)
    _wait_control(port, lambda c: c.get("model", {}).get("state") == "failed", "a broken model refused")
    assert _control(port)["model"]["version"] == "4.0.0"
    st = agent_status(port)
    assert st is not None and st["model_version"] == "2.0.0"
    assert post_windows(port, _windows())["windows"] == 64

    # a chunk replaced on the broker (same topic, other bytes): not taken, the transfer
    # waits until a good copy is there
    v5 = new_prefilter(tmp_path / "v5", "5.0.0", seed=5)
    u, chunks = model_update(TENANT, v5, chunk_bytes=2048)
    signed = sign_model(fleet_key(fleet), u)
    bad = [(topics.model_chunk_topic(TENANT, u.sha256, i), c) for i, c in enumerate(chunks)]
    bad[1] = (bad[1][0], bytes(len(chunks[1])))
    doc = ControlDoc(generation=int(time.time() * 1000) + 10_000, model=signed)
    ctl = topics.mqtt_topic(TENANT, DEVICE, "control")
    asyncio.run(publish_retained(plane.mqtt, [*bad, (ctl, encode_control(doc))]))
    _wait_control(port, lambda c: "does not match" in (c.get("model", {}).get("error") or ""),
                  "a tampered chunk refused")  # fmt: skip
    assert _control(port)["model"]["state"] == "downloading"
    asyncio.run(publish_retained(plane.mqtt, [(bad[1][0], chunks[1])]))
    _wait_control(port, lambda c: c.get("model", {}).get("version") == "5.0.0"
                  and c["model"]["state"] == "active", "model 5.0.0 active")  # fmt: skip

    # the installed model is damaged on disk: at the next start (no broker yet) the previous
    # one (2.0.0) runs; once the broker is back, the damaged model is fetched again and heals
    p.agent.stop()
    p.mosquitto.stop()
    slot = next(tmp_path.glob(f"agent/*.control/models/{u.sha256}"))
    (slot / "prefilter.tflite").write_bytes(b"\0" * 100)
    p.agent.start(timeout=20)
    st = agent_status(port)
    assert st is not None and st["model_version"] == "2.0.0", st
    assert post_windows(port, _windows())["windows"] == 64
    p.mosquitto.start()
    _wait_control(port, lambda c: c.get("model", {}).get("version") == "5.0.0"
                  and c["model"]["state"] == "active", "model 5.0.0 fetched again")  # fmt: skip
    st = agent_status(port)
    assert st is not None and st["model_version"] == "5.0.0", st


def fleet_key(fleet: Fleet):  # type: ignore[no-untyped-def]
    from edge_tier.control import load_signing_key

    return load_signing_key(fleet.root / "signing.key")


def test_an_interrupted_model_transfer_resumes_with_the_chunks_it_lacks(
    setup: tuple[Pipeline, ControlPlane, int], fleet: Fleet, tmp_path: Path
) -> None:
    p, plane, port = setup
    u, chunks = model_update(TENANT, new_prefilter(tmp_path / "v2", "2.0.0", seed=2), chunk_bytes=1024)
    assert len(chunks) >= 8
    doc = ControlDoc(generation=int(time.time() * 1000), model=sign_model(fleet_key(fleet), u))
    parts = [(topics.model_chunk_topic(TENANT, u.sha256, i), c) for i, c in enumerate(chunks)]
    half = len(parts) // 2
    ctl = topics.mqtt_topic(TENANT, DEVICE, "control")
    # the document and half the chunks reach the broker (the push was cut off) ...
    asyncio.run(publish_retained(plane.mqtt, [*parts[:half], (ctl, encode_control(doc))]))
    _wait_control(port, lambda c: c.get("model", {}).get("chunks_have") == half, f"{half} chunks on disk")
    # ... the agent dies (kill -9), the rest of the chunks arrive while it is down
    p.agent.kill()
    asyncio.run(publish_retained(plane.mqtt, parts[half:]))
    p.agent.start(timeout=20)
    _wait_control(port, lambda c: c.get("model", {}).get("state") == "active"
                  and c["model"]["version"] == "2.0.0", "model 2.0.0 active")  # fmt: skip
    m = _control(port)["model"]
    lacked = len(parts) - half
    assert m["chunks_fetched"] == lacked, f"fetched {m['chunks_fetched']} after the restart, lacked {lacked}"
    st = agent_status(port)
    assert st is not None and st["model_version"] == "2.0.0"
