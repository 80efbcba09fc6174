"""The agent as operators see it: retained status, last will, SIGTERM, MQTT 3.1.1 on NATS."""

from __future__ import annotations

import json
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_tier import topics
from edge_tier_harness.brokers import NatsServer
from edge_tier_harness.services import AgentProcess, IngestProcess
from tests.support import (
    DEVICE,
    TENANT,
    Pipeline,
    Producer,
    agent_config,
    assert_exactly_once,
    drained,
    ingest_config,
    stream_seqs,
    wait_until,
)


def deliver_through(ingest: IngestProcess, agent: AgentProcess, nats_url: str, batches: int) -> None:
    """Start the pair, enqueue, and check every acknowledged record arrived once; stop both."""
    try:
        ingest.start(timeout=20)
        agent.start(timeout=20)
        producer = Producer(agent.port)
        producer.run(batches=batches, size=100)
        wait_until(lambda: drained(agent.port), 60, "the queue to drain")
        assert_exactly_once(stream_seqs(nats_url), set(producer.acked))
    finally:
        agent.stop()
        ingest.stop()


class StatusWatcher:
    def __init__(self, port: int) -> None:
        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="status-watcher")
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(topics.mqtt_topic(TENANT, DEVICE, "status"), 1)
        self.c.loop_start()

    def _on(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.seen.append(json.loads(msg.payload))

    @property
    def last(self) -> dict[str, Any] | None:
        with self._lock:
            return self.seen[-1] if self.seen else None

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_status_is_retained_and_the_last_will_says_offline(make_pipeline) -> None:
    p: Pipeline = make_pipeline(
        agent={
            "store": {"budget_bytes": 256 * 1024, "policy": "oldest"},
            "uplink": {"frame_max_bytes": 16 * 1024, "window": 2},
        }
    )
    w = StatusWatcher(p.mosquitto.port)
    wait_until(lambda: (w.last or {}).get("state") == "online", 10, "an online status")
    p.ingest.stop()  # nothing is receipted: the backlog builds up and must show
    for i in range(40):  # 4000 x 128 bytes charged: twice the budget
        p.producer.post(100, seed=i)
    wait_until(
        lambda: (
            (w.last or {}).get("backlog_records", 0) > 0
            and (w.last or {}).get("evictions", {}).get("oldest", 0) > 0
        ),
        10,
        "a status that shows the backlog and the evictions",
    )
    p.agent.kill()  # no clean disconnect: the broker publishes the will
    wait_until(lambda: (w.last or {}).get("state") == "offline", 60, "the last will")
    w.close()
    late = StatusWatcher(p.mosquitto.port)  # a new subscriber gets the retained value
    wait_until(lambda: late.last is not None, 5, "the retained status")
    assert late.last["state"] == "offline"
    late.close()


def test_sigterm_flushes_and_exits_cleanly(make_pipeline, tmp_path) -> None:
    p: Pipeline = make_pipeline()
    p.ingest.stop()  # SIGTERM: ingest too drains and exits cleanly
    assert p.ingest.last_returncode == 0, p.ingest.log_tail()
    p.producer.run(batches=5, size=100)
    p.agent.stop()  # SIGTERM
    assert p.agent.last_returncode == 0, p.agent.log_tail()
    assert "stopped" in p.agent.log_path.read_text()
    p.ingest.start(timeout=20)
    p.agent.start(timeout=20)
    p.wait_drained()
    assert_exactly_once(stream_seqs(p.nats.url), set(p.producer.acked))


def test_embedded_mode_mqtt311_on_nats_own_listener(nats_mqtt_server: NatsServer, tmp_path) -> None:
    """The zero-install default: nats-server's MQTT listener (3.1.1 only) instead of mosquitto."""
    port = nats_mqtt_server.mqtt_port
    assert port is not None
    mqtt = {"version": "3.1.1"}
    ingest = IngestProcess(
        tmp_path / "ingest", ingest_config(port, nats_mqtt_server.url, mqtt=mqtt), name="cloud-ingest"
    )
    agent = AgentProcess(
        tmp_path / "agent", agent_config(tmp_path / "agent", port, mqtt=mqtt), name="edge-agent"
    )
    deliver_through(ingest, agent, nats_mqtt_server.url, batches=10)


def test_agent_over_mutual_tls(tmp_path) -> None:
    """The agent's TLS options against mosquitto requiring a client certificate."""
    from edge_tier_harness.brokers import Mosquitto, free_port
    from tests.tls import make_tls

    tls = make_tls(tmp_path / "tls", client_cn=DEVICE)
    tls_port = free_port()
    broker = Mosquitto(
        tmp_path / "mosquitto",
        extra_config=(
            f"listener {tls_port} 127.0.0.1\n"
            f"cafile {tls.ca}\ncertfile {tls.server_cert}\nkeyfile {tls.server_key}\n"
            "require_certificate true\nuse_identity_as_username true\n"
        ),
    )
    broker.start()
    nats = NatsServer(tmp_path / "nats")
    nats.start()
    ingest = IngestProcess(tmp_path / "ingest", ingest_config(broker.port, nats.url), name="cloud-ingest")
    mqtt = {"tls_ca": str(tls.ca), "tls_cert": str(tls.client_cert), "tls_key": str(tls.client_key)}
    agent = AgentProcess(
        tmp_path / "agent", agent_config(tmp_path / "agent", tls_port, mqtt=mqtt), name="edge-agent"
    )
    try:
        deliver_through(ingest, agent, nats.url, batches=5)
        # The broker took the device's identity from its certificate.
        assert f"as et-{TENANT}-{DEVICE} (p5, c0, k30, u'{DEVICE}')" in broker.log_path.read_text()
    finally:
        nats.stop()
        broker.stop()
