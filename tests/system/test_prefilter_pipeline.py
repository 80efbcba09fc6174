"""Raw windows in at the device, embeddings in JetStream, and no raw byte anywhere on the way."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")

from edge_tier import topics
from edge_tier.model.generator import HEALTHY, generate
from tests.support import Pipeline, assert_exactly_once, post_windows, stream_messages, stream_seqs

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.json"


def test_raw_windows_never_reach_disk_or_wire(make_pipeline, tmp_path: Path) -> None:
    p: Pipeline = make_pipeline(agent={"prefilter": {"manifest": str(MANIFEST)}})
    wire: list[bytes] = []
    lock = threading.Lock()
    spy = paho.Client(CallbackAPIVersion.VERSION2, client_id="wire-spy")
    spy.on_message = lambda c, u, m: (lock.acquire(), wire.append(bytes(m.payload)), lock.release())
    spy.connect("127.0.0.1", p.mosquitto.port)
    spy.subscribe("et/#", 1)
    spy.loop_start()
    try:
        w = generate(400, seed=21, fault_fraction=0.5)
        x = w.x.copy()
        # A marker no feature vector would contain: the same 16 samples at the start of every window.
        marker = np.linspace(1.2345, 1.2346, 16, dtype=np.float32)
        x[:, :16] = marker
        acked: set[int] = set()
        kept = 0
        for chunk in np.array_split(x, 4):
            r = post_windows(p.agent.port, chunk)
            kept += r["kept"]
            if r["kept"]:
                acked |= set(range(r["first_seq"], r["last_seq"] + 1))
        fault = (w.y != HEALTHY).sum()
        assert 0.9 * fault <= kept < len(w), f"kept {kept} of {len(w)} windows ({fault} faulty)"
        p.wait_drained()
        assert_exactly_once(stream_seqs(p.nats.url), acked)
    finally:
        spy.loop_stop()
        spy.disconnect()
    needle = marker.tobytes()[:32]
    qdir = tmp_path / "agent"
    for f in qdir.iterdir():
        if f.name.startswith("queue.db"):
            assert needle not in f.read_bytes(), f"raw samples written to {f.name}"
    with lock:
        assert wire and all(needle not in payload for payload in wire), "raw samples went over MQTT"
    assert all(needle not in (m.data or b"") for m in stream_messages(p.nats.url, topics.FEATURES_STREAM))
