"""The spine's promise under faults: every acknowledged record reaches JetStream exactly once.

Each test runs real mosquitto, real nats-server -js, and the agent and ingest
as child processes, injects one fault, and compares the set of seqs in the
features stream with the set the agent acknowledged to its producer.
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import time
from typing import Any

from edge_agent.config import StoreSettings
from edge_agent.store import Store
from edge_tier import topics
from edge_tier_harness.brokers import BrokerProcess
from tests.support import (
    Pipeline,
    agent_status,
    assert_exactly_once,
    stream_messages,
    stream_seqs,
    wait_until,
)


def _delivered(p: Pipeline) -> int:
    st = agent_status(p.agent.port)
    return st["delivered"] if st else 0


def test_records_reach_jetstream_exactly_once(make_pipeline) -> None:
    p: Pipeline = make_pipeline()
    p.producer.run(batches=20, size=100)
    p.wait_drained()
    assert len(p.producer.acked) == 2000
    assert_exactly_once(stream_seqs(p.nats.url), set(p.producer.acked))


def test_agent_kill9_during_upload(make_pipeline) -> None:
    p: Pipeline = make_pipeline(agent={"uplink": {"frame_max_records": 20, "window": 2}})
    p.mosquitto.pause()  # hold uploads back so the kill lands with frames in flight
    p.producer.run(batches=30, size=100)
    p.mosquitto.resume()
    wait_until(lambda: _delivered(p) >= 200, 30, "some deliveries")
    p.agent.kill()
    assert agent_status(p.agent.port) is None
    p.agent.start(timeout=20)
    p.wait_drained()
    assert_exactly_once(stream_seqs(p.nats.url), set(p.producer.acked))


def test_agent_kill9_during_enqueue(make_pipeline, tmp_path) -> None:
    p: Pipeline = make_pipeline()
    stop = threading.Event()
    t = threading.Thread(target=p.producer.run, kwargs={"batches": 10_000, "size": 50, "stop": stop})
    t.start()
    wait_until(lambda: len(p.producer.acked) >= 1500, 30, "enqueues to flow")
    p.agent.kill()
    stop.set()
    t.join(10)
    # What the queue committed: acknowledged or not, it must now be delivered exactly once.
    store = Store(StoreSettings(path=tmp_path / "agent" / "queue.db"), readonly=True)
    queued = {r[0] for r in store.records()}
    store.close()
    before = set(stream_seqs(p.nats.url))
    p.agent.start(timeout=20)
    p.wait_drained()
    stored = stream_seqs(p.nats.url)
    assert set(p.producer.acked) <= set(stored), "an acknowledged record was lost"
    assert_exactly_once(stored, queued | before)


def _kill9_mid_stream(p: Pipeline, victim: BrokerProcess, down_s: float) -> None:
    """Enqueue steadily; once records flow, kill -9 one process, bring it back, then check."""
    t = threading.Thread(target=p.producer.run, kwargs={"batches": 40, "size": 50, "pause": 0.02})
    t.start()
    wait_until(lambda: _delivered(p) >= 300, 30, "some deliveries")
    victim.kill()
    time.sleep(down_s)
    victim.start(timeout=20)
    t.join(60)
    p.wait_drained(timeout=90)
    assert_exactly_once(stream_seqs(p.nats.url), set(p.producer.acked))


def test_mosquitto_kill9_and_restart_mid_stream(make_pipeline) -> None:
    p: Pipeline = make_pipeline()
    _kill9_mid_stream(p, p.mosquitto, 0.5)


def test_ingest_kill9_mid_stream(make_pipeline) -> None:
    p: Pipeline = make_pipeline()
    _kill9_mid_stream(p, p.ingest, 0.5)


def test_nats_kill9_and_restart_mid_stream(make_pipeline) -> None:
    p: Pipeline = make_pipeline()
    _kill9_mid_stream(p, p.nats, 1.0)


def test_silent_partition_with_resends_stays_exactly_once(make_pipeline) -> None:
    """The broker hangs with its sockets open (SIGSTOP) longer than the receipt timeout: the
    agent re-sends into the void, and every copy arrives at once when the broker wakes."""
    p: Pipeline = make_pipeline(agent={"uplink": {"receipt_timeout_s": 0.5}})
    p.producer.run(batches=5, size=100)
    p.mosquitto.pause()
    p.producer.run(batches=10, size=100)
    time.sleep(2.0)  # several receipt timeouts: the same frames are sent again and again
    p.mosquitto.resume()
    p.wait_drained()
    assert_exactly_once(stream_seqs(p.nats.url), set(p.producer.acked))
    resent = [line for line in p.agent.log_path.read_text().splitlines() if "re-sent upload" in line]
    assert resent, "the partition should have caused re-sends"


def test_outage_past_budget_counts_every_eviction(make_pipeline) -> None:
    budget = 256 * 1024
    p: Pipeline = make_pipeline(
        agent={
            "store": {"budget_bytes": budget, "policy": "lowest_score"},
            "uplink": {"frame_max_records": 50, "frame_max_bytes": 16 * 1024, "window": 2},
        }
    )
    p.mosquitto.stop()
    peak = 0
    for i in range(40):
        assert p.producer.post(100, seed=i) is not None
        st = agent_status(p.agent.port)
        assert st is not None
        peak = max(peak, st["bytes"])
    assert peak <= budget, f"queue held {peak} bytes, over its {budget}-byte budget"
    st = agent_status(p.agent.port)
    evicted = st["evictions"].get("lowest_score", 0)
    assert evicted > 0, "the outage should have forced evictions"
    p.mosquitto.restart()
    p.wait_drained()
    stored = stream_seqs(p.nats.url)
    assert len(stored) == len(set(stored)), "duplicates in the stream"
    assert set(stored) <= set(p.producer.acked)
    st = agent_status(p.agent.port)
    assert len(stored) + st["evictions"]["lowest_score"] == len(p.producer.acked) == 4000


def test_corrupt_queue_is_moved_aside_and_the_agent_starts(make_pipeline, tmp_path) -> None:
    p: Pipeline = make_pipeline(start=False)
    qdir = tmp_path / "agent"
    qdir.mkdir(parents=True, exist_ok=True)
    (qdir / "queue.db").write_bytes(b"this is not an sqlite database" * 100)
    p.ingest.start(timeout=20)
    p.agent.start(timeout=20)
    aside = [x for x in qdir.glob("queue.db.corrupt-*") if not x.name.endswith((".json", ".kinds"))]
    assert aside and aside[0].read_bytes().startswith(b"this is not")
    assert "failed its integrity check" in p.agent.log_path.read_text()
    st = agent_status(p.agent.port)
    assert st is not None and st["corrupt_resets"] == 1
    p.producer.run(batches=3, size=100)
    p.wait_drained()
    assert_exactly_once(stream_seqs(p.nats.url), set(p.producer.acked))


def test_a_damaged_frame_is_dropped_counted_and_does_not_block_the_queue(make_pipeline, tmp_path) -> None:
    p: Pipeline = make_pipeline()
    p.mosquitto.stop()  # nothing may leave before the damage
    p.producer.run(batches=2, size=100)
    p.agent.kill()
    p.mosquitto.restart()
    # Damage the queue behind the agent's back: one kind's scale no frame header can carry.
    db = sqlite3.connect(tmp_path / "agent" / "queue.db")
    db.execute("UPDATE kinds SET scale = 2.0")
    db.commit()
    db.close()
    damaged = set(p.producer.acked)
    p.agent.start(timeout=20)
    p.producer.acked.clear()
    p.producer.run(batches=2, size=100, seed_base=100)  # a new kind row: scale 1.0 again
    p.wait_drained()
    st = agent_status(p.agent.port)
    assert st is not None and st["evictions"].get("unencodable") == len(damaged)
    assert "cannot be encoded" in p.agent.log_path.read_text()
    assert_exactly_once(stream_seqs(p.nats.url), set(p.producer.acked))


def test_frames_over_the_cloud_limit_are_cut_again_and_delivered(make_pipeline) -> None:
    """Ingest takes frames of 4 KiB: the device's bigger frames get TOO_LARGE, are cut again
    with the same chain ends and are delivered, none lost, none dead-lettered."""
    p: Pipeline = make_pipeline(
        agent={"uplink": {"frame_max_records": 40, "window": 2}},
        ingest={"ingest": {"max_frame_bytes": 4096}},
    )
    p.mosquitto.pause()  # let the batches queue up, cut for the agent's own limit
    assert p.producer.post(80, meta={"label": "x" * 100}) is not None
    p.producer.run(batches=3, size=40, seed_base=10)
    p.mosquitto.resume()
    p.wait_drained()
    st = agent_status(p.agent.port)
    assert st is not None and st["evictions"] == {}, st
    assert st["frame_max_bytes"] == 4096
    assert_exactly_once(stream_seqs(p.nats.url), set(p.producer.acked))
    assert len(p.producer.acked) == 200
    assert stream_messages(p.nats.url, topics.DEADLETTER_STREAM) == []
    assert "cut again" in p.agent.log_path.read_text()


def _post_dim(p: Pipeline, n: int, dim: int) -> tuple[int, dict[str, Any]]:
    body = {"stream": "vibration", "records": [{"features": [0.5] * dim, "score": 0.5} for _ in range(n)]}
    conn = http.client.HTTPConnection("127.0.0.1", p.agent.port, timeout=10)
    try:
        conn.request("POST", "/v1/records", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_rejected_frames_are_counted_and_the_chain_recovers(make_pipeline) -> None:
    """Ingest takes dim <= 8: frames of wider records are rejected (no cut helps), dropped and
    counted on the device, which re-chains, refuses such records from then on (413) and goes on."""
    p: Pipeline = make_pipeline(
        agent={"uplink": {"frame_max_records": 40, "window": 2}},
        ingest={"ingest": {"max_dim": 8}},
    )
    p.mosquitto.pause()
    assert p.producer.post(80) is not None  # dim 16, queued before the device knows the limit
    rejected = set(p.producer.acked)
    p.producer.acked.clear()
    p.mosquitto.resume()
    wait_until(lambda: (agent_status(p.agent.port) or {}).get("evictions", {}).get("rejected") == 80,
               30, "the rejected frames to be counted")  # fmt: skip
    code, problem = _post_dim(p, 5, 16)
    assert code == 413 and "max_dim 8" in problem["detail"], problem
    for _ in range(3):
        code, body = _post_dim(p, 40, 8)
        assert code == 200, body
        p.producer.acked.extend(range(body["first_seq"], body["last_seq"] + 1))
    p.wait_drained()
    st = agent_status(p.agent.port)
    assert st is not None and st["evictions"] == {"rejected": len(rejected)}
    assert_exactly_once(stream_seqs(p.nats.url), set(p.producer.acked))
    dlq = stream_messages(p.nats.url, topics.DEADLETTER_STREAM)
    assert len(dlq) == 2 and all("dim" in m.headers[topics.H_REASON] for m in dlq)
