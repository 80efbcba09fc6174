"""A real full disk under the agent's queue (promises 1 and 2).

The queue lives on a small real filesystem (a loop-mounted ext4 image, or a tmpfs), far
smaller than the queue's byte budget, so the filesystem fills first: by the agent itself
while the broker is away, and by another process writing a file beside it. The agent must
never die or need a hand: it evicts by policy (``disk_full``), keeps taking records within
what fits, survives ``kill -9`` and restarts on the full disk, and once the uplink is back
delivers every acknowledged record that was not evicted: delivered + evicted = acknowledged.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import numpy as np
import pytest

from tests.support import agent_status, assert_exactly_once, drained, stream_seqs, wait_until

DIM = 256  # 1 KiB of float32 a record: a 20 MiB filesystem holds about 15k of them
BUDGET = 256 * 1024 * 1024  # the default: far more than the filesystem has


class Poster:
    """Posts batches of records (binary endpoint) and keeps what was acknowledged, by answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: list[int] = []
        self.answers: dict[int, int] = {}

    def post(self, n: int, seed: int) -> int:
        rng = np.random.default_rng(seed)
        scores = rng.random(n, dtype=np.float32)
        feats = rng.standard_normal((n, DIM), dtype=np.float32)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(
                "POST",
                f"/v1/records?stream=vibration&dim={DIM}",
                scores.astype("<f4").tobytes() + feats.astype("<f4").tobytes(),
                {"Content-Type": "application/x-edge-tier-features"},
            )
            resp = conn.getresponse()
            body: dict[str, Any] = json.loads(resp.read())
        finally:
            conn.close()
        self.answers[resp.status] = self.answers.get(resp.status, 0) + 1
        assert resp.status in (200, 503), f"answer {resp.status}: {body}"
        if resp.status == 200:
            self.acked.extend(range(body["first_seq"], body["last_seq"] + 1))
        return resp.status


def status(port: int) -> dict[str, Any]:
    st = agent_status(port)
    assert st is not None, "the agent does not answer"
    return st


def evicted_total(st: dict[str, Any]) -> int:
    return sum(st["evictions"].values())


def deliver_and_check(p: Any, poster: Poster) -> dict[str, Any]:
    """Bring the uplink back; every acknowledged record not evicted arrives, exactly once."""
    p.mosquitto.start()
    if not p.ingest.running:
        p.ingest.start(timeout=30)
    wait_until(lambda: drained(p.agent.port), 120, "the agent's queue to drain after the disk filled")
    st = status(p.agent.port)
    stored = stream_seqs(p.nats.url)
    evicted = evicted_total(st)
    assert len(stored) + evicted == len(poster.acked), (
        f"delivered {len(stored)} + evicted {evicted} != acknowledged {len(poster.acked)}"
    )
    assert_exactly_once(stored, set(stored) & set(poster.acked))
    assert set(stored) <= set(poster.acked)
    assert st["delivered"] == len(stored)
    print(f"acknowledged {len(poster.acked)} = delivered {len(stored)} + evicted {st['evictions']}; "
          f"answers {poster.answers}")  # fmt: skip
    return st


@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_agent_fills_a_small_disk_keeps_taking_records_and_drains_exactly(
    kind: str, small_fs: Any, make_pipeline: Any
) -> None:
    fs = small_fs(kind, 20)
    p = make_pipeline(
        agent={
            "store": {
                "path": str(fs.mountpoint / "queue.db"),
                "budget_bytes": BUDGET,
                "policy": "lowest_score",
            },
            "uplink": {"frame_max_records": 500, "frame_max_bytes": 256 * 1024, "window": 4},
        },
        start=False,
    )
    p.mosquitto.stop()  # the broker is away: everything stays on the device
    p.agent.start(timeout=30)
    poster = Poster(p.agent.port)
    for i in range(70):  # ~35 MiB into a 20 MiB filesystem
        assert poster.post(500, seed=i) == 200  # nothing is in flight, so eviction always makes room
    st = status(p.agent.port)
    assert st["evictions"].get("disk_full", 0) > 0, st
    assert st["disk_limited"] and st["effective_budget_bytes"] < 20 << 20, st
    assert st["bytes"] <= st["effective_budget_bytes"] * 1.05, st
    assert st["disk_reserve_held"], "the reserve stays held while the queue keeps to its ceiling"
    assert p.agent.running
    deliver_and_check(p, poster)
    assert p.agent.running


def test_another_process_fills_the_disk_and_the_agent_survives_kill_and_restart(
    small_fs: Any, make_pipeline: Any
) -> None:
    fs = small_fs("ext4", 24)
    p = make_pipeline(
        agent={
            "store": {"path": str(fs.mountpoint / "queue.db"), "budget_bytes": BUDGET, "policy": "oldest"},
            "uplink": {"frame_max_records": 500, "frame_max_bytes": 256 * 1024, "window": 4},
        },
        start=False,
    )
    p.mosquitto.stop()
    p.agent.start(timeout=30)
    poster = Poster(p.agent.port)
    for i in range(8):
        assert poster.post(500, seed=i) == 200
    hog = fs.fill()
    assert fs.free_bytes() < 64 * 1024
    # Full: the agent takes what fits by evicting (or answers 503 to retry), never dies.
    answers = [poster.post(200, seed=100 + i) for i in range(15)]
    assert 200 in answers, answers
    assert p.agent.running
    st = status(p.agent.port)
    assert st["evictions"].get("disk_full", 0) > 0, st
    # kill -9 on the full disk, and start again there: no crash loop.
    p.agent.kill()
    p.agent.start(timeout=30)
    assert status(p.agent.port)["records"] > 0
    for i in range(5):
        poster.post(200, seed=200 + i)
    assert p.agent.running
    deliver_and_check(p, poster)
    # Space comes back: the reserve is taken back, the ceiling lifts.
    hog.unlink()
    wait_until(lambda: status(p.agent.port)["disk_reserve_held"], 30, "the disk reserve to be taken back")
    before = len(poster.acked)
    for i in range(5):
        assert poster.post(500, seed=300 + i) == 200
    assert len(poster.acked) == before + 2500
    wait_until(lambda: drained(p.agent.port), 60, "the last records to drain")
    time.sleep(0.2)
    final = status(p.agent.port)
    assert final["delivered"] + evicted_total(final) == len(poster.acked)
