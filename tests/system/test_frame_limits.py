"""Frame limits that work together (promise 1): no valid record is dropped for frame size.

The cloud tells the device its limit in every receipt (v2 ``limits``); a frame over it gets
TOO_LARGE (stored nowhere) and the device cuts it again, smaller, with the same chain ends.
Tried across feature widths (the widths that broke: 2833, 2929, 3031 floats, whose frames
of whole chunks fell just over NATS's default 1 MB) and NATS ``max_payload`` values, with
the agent's and ingest's defaults, and with the limit falling under a running agent.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.config import UplinkSettings
from edge_tier_harness.brokers import Mosquitto, NatsServer
from edge_tier_harness.services import AgentProcess, IngestProcess
from tests.conftest import need_binary
from tests.support import (
    agent_config,
    agent_status,
    assert_exactly_once,
    drained,
    ingest_config,
    stream_seqs,
    wait_until,
)

DEFAULT_FRAME = UplinkSettings().frame_max_bytes


def post(port: int, n: int, dim: int, seed: int) -> tuple[int, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    body = (
        rng.random(n, dtype=np.float32).tobytes() + rng.standard_normal((n, dim), dtype=np.float32).tobytes()
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST",
            f"/v1/records?stream=vibration&dim={dim}",
            body,
            {"Content-Type": "application/x-edge-tier-features"},
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def status(port: int) -> dict[str, Any]:
    st = agent_status(port)
    assert st is not None, "the agent does not answer"
    return st


class Stack:
    """mosquitto, a nats-server with a given max_payload, ingest and an agent, all defaults for
    frame sizes (the agent's ``uplink.frame_max_bytes`` and ingest's ``max_frame_bytes``)."""

    def __init__(self, tmp: Path, max_payload: int) -> None:
        need_binary("mosquitto")
        need_binary("nats-server")
        self.mosquitto = Mosquitto(tmp / "mosquitto")
        self.nats = NatsServer(tmp / "nats", max_payload=max_payload)
        self.mosquitto.start()
        self.nats.start()
        self.ingest = IngestProcess(
            tmp / "ingest", ingest_config(self.mosquitto.port, self.nats.url), name="cloud-ingest"
        )
        cfg = agent_config(
            tmp / "agent",
            self.mosquitto.port,
            store={"budget_bytes": 64 << 20},
            uplink={"frame_max_records": 4096, "frame_max_bytes": DEFAULT_FRAME, "window": 8},
        )
        self.agent = AgentProcess(tmp / "agent", cfg, name="edge-agent")
        self.ingest.start(timeout=20)
        self.agent.start(timeout=20)
        self.acked: list[int] = []

    def send(self, n: int, dim: int, seed: int) -> None:
        code, body = post(self.agent.port, n, dim, seed)
        assert code == 200, body
        self.acked.extend(range(body["first_seq"], body["last_seq"] + 1))

    def check_all_delivered(self) -> dict[str, Any]:
        wait_until(lambda: drained(self.agent.port), 90, "the agent's queue to drain")
        stored = stream_seqs(self.nats.url)
        assert_exactly_once(stored, set(self.acked))
        st = status(self.agent.port)
        assert st["evictions"] == {}, f"records lost: {st['evictions']}"
        return st

    def close(self) -> None:
        for p in (self.agent, self.ingest, self.nats, self.mosquitto):
            p.stop()


@pytest.fixture
def stack(tmp_path: Path) -> Any:
    made: list[Stack] = []

    def make(max_payload: int) -> Stack:
        s = Stack(tmp_path / f"stack-{len(made)}", max_payload)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize(
    ("max_payload", "dims"),
    [
        (1024 * 1024, [2833, 2929, 3031, 16]),  # NATS's default: the widths that were dropped
        (64 * 1024, [3031, 700, 16]),  # a small server: frames learned from receipts
        (8 * 1024 * 1024, [3031, 16000]),
    ],
)
def test_every_width_is_delivered_whatever_the_nats_max_payload(
    stack: Any, max_payload: int, dims: list[int]
) -> None:
    s = stack(max_payload)
    for i, dim in enumerate(dims):
        s.send(200, dim, seed=i)
    st = s.check_all_delivered()
    assert st["frame_max_bytes"] <= max_payload - 4096, st


def test_the_limit_falls_under_a_running_agent_and_records_are_cut_again(stack: Any) -> None:
    s = stack(1024 * 1024)
    s.send(200, 3031, seed=1)
    s.check_all_delivered()
    assert status(s.agent.port)["frame_max_bytes"] == min(DEFAULT_FRAME, 1024 * 1024 - 4096)
    # The cloud's server now takes 64 KiB: what the agent cut for 1 MiB is too large.
    s.mosquitto.stop()  # hold uploads while the server changes
    s.send(300, 3031, seed=2)
    s.nats.max_payload = 64 * 1024
    s.nats.restart()
    s.mosquitto.start()
    s.send(100, 3031, seed=3)
    st = s.check_all_delivered()
    assert st["frame_max_bytes"] == 64 * 1024 - 4096, st
    # A record no frame of the new limit can carry is refused whole, with the limit named.
    code, body = post(s.agent.port, 3, 20_000, seed=4)
    assert code == 413, body
    assert str(64 * 1024 - 4096) in body["detail"], body
    assert status(s.agent.port)["records"] == 0
