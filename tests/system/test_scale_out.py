"""The scale-out path: a 3-node JetStream cluster (streams with 3 replicas), two ingest
processes on one MQTT 5 shared subscription, two tier-two workers. One NATS node is
killed (kill -9) mid-run, and every record still gets its result exactly once."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import nats.errors
import pytest

pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from edge_tier import topics
from edge_tier.wire import ResultBatch, decode_results
from edge_tier_harness.brokers import Mosquitto, NatsCluster
from edge_tier_harness.services import AgentProcess, IngestProcess, WorkerProcess, agent_drained, metric
from tests.conftest import need_binary
from tests.support import (
    TENANT,
    Producer,
    Subscriber,
    agent_config,
    assert_exactly_once,
    ingest_config,
    result_keys,
    results,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _results(url: str) -> list[ResultBatch]:
    """ET_RESULTS as one node serves it; [] while the cluster elects new leaders (timeouts)."""
    try:
        return results(url)
    except (nats.errors.Error, TimeoutError):
        return []


@pytest.fixture
def cluster(tmp_path: Path) -> NatsCluster:
    need_binary("nats-server")
    c = NatsCluster(tmp_path / "nats", 3)
    c.start()
    yield c  # type: ignore[misc]
    c.stop()


def test_every_result_exactly_once_when_a_nats_node_dies_mid_run(
    tmp_path: Path, mosquitto: Mosquitto, cluster: NatsCluster
) -> None:
    base = ingest_config(mosquitto.port, cluster.urls[0], streams={"replicas": 3})
    base["nats"]["servers"] = cluster.urls
    procs: list[AgentProcess | IngestProcess | WorkerProcess] = []
    app: Subscriber | None = None

    def with_(section: str, **values: object) -> dict[str, object]:
        cfg = copy.deepcopy(base)
        cfg.setdefault(section, {}).update(values)
        return cfg

    ingests = [
        IngestProcess(tmp_path / f"ingest-{i}", with_("ingest", instance=str(i)), name=f"ingest-{i}")
        for i in range(2)
    ]
    workers = [
        WorkerProcess(
            tmp_path / f"worker-{i}",
            with_("worker", instance=str(i), max_wait_ms=5.0, discover_s=0.2, ack_wait_s=3.0, prefetch=8),
            name=f"worker-{i}",
        )
        for i in range(2)
    ]
    agents = []
    for i in range(3):
        cfg = agent_config(tmp_path / f"agent-{i}", mosquitto.port, device={"device": f"dev-{i}"},
                           uplink={"frame_max_records": 20})  # fmt: skip
        agents.append(AgentProcess(tmp_path / f"agent-{i}", cfg, name=f"agent-{i}"))
    try:
        for p in (*ingests, *workers, *agents):
            p.start(timeout=30)
            procs.append(p)
        app = Subscriber(
            mosquitto.port, topics.mqtt_filter("results", TENANT), "an-app"
        )  # relayed at least once
        producers = [Producer(a.port) for a in agents]
        threads = [
            threading.Thread(target=pr.run, args=(60, 20), kwargs={"pause": 0.05, "seed_base": 1000 * i})
            for i, pr in enumerate(producers)
        ]
        for t in threads:
            t.start()
        survivor = cluster.urls[1]
        wait_until(lambda: len(_results(survivor)) >= 10, 60, "the first results")
        cluster.nodes[0].kill()  # the first node started: the meta leader, most likely
        for t in threads:
            t.join(120)
        wait_until(lambda: all(agent_drained(a.port) for a in agents), 120, "every queue to drain")
        want = {(TENANT, f"dev-{i}", s) for i, pr in enumerate(producers) for s in pr.acked}
        wait_until(lambda: len(set(result_keys(_results(survivor)))) >= len(want), 120, "every result")
        keys = result_keys(results(survivor))  # settled: a failure to read now is a failure
        for i, pr in enumerate(producers):
            assert pr.errors == 0, f"agent {i} refused records"
            assert_exactly_once([s for (_, d, s) in keys if d == f"dev-{i}"], set(pr.acked))
        assert set(keys) == want and len(keys) == len(want) == 3 * 60 * 20

        def relayed() -> set[tuple[str, str, int]]:
            return set(result_keys([decode_results(p) for p in app.payloads()]))

        wait_until(lambda: relayed() == want, 60, "every result relayed to MQTT across the node's death")
        # both ingests committed frames and both workers wrote results: the load was shared
        for p in ingests:
            assert (metric(p.port, "et_ingest_records_committed_total") or 0) > 0, f"{p.name} did nothing"
        for p in workers:
            assert (metric(p.port, "et_worker_records_total") or 0) > 0, f"{p.name} did nothing"
    finally:
        for p in reversed(procs):
            p.stop()
        if app is not None:
            app.close()
