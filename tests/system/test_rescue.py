"""A queue file damaged on the device: its records are rescued and delivered exactly once.

Real mosquitto, real nats-server -js, the agent and ingest as child processes. The damaged
queue holds records the cloud already has (their receipts' deletes were lost with the
damage) and records it never saw; the fresh queue takes new ones meanwhile.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from edge_agent.store import kinds_path
from tests.support import Pipeline, agent_status, assert_exactly_once, stream_seqs

PAGE = 65536


def _files(queue: Path) -> list[Path]:
    return [queue, kinds_path(queue), queue.with_name(queue.name + "-wal")]


def test_a_damaged_queue_is_rescued_and_nothing_is_delivered_twice(make_pipeline, tmp_path: Path) -> None:
    p: Pipeline = make_pipeline(start=False)
    queue = tmp_path / "agent" / "queue.db"
    snap = tmp_path / "snapshot"
    snap.mkdir()
    p.ingest.start(timeout=20)
    p.mosquitto.stop()
    p.agent.start(timeout=20)
    p.producer.run(batches=10, size=200)  # R1: delivered below, then "forgotten" by the damage
    delivered_before = set(p.producer.acked)
    p.agent.stop()
    for f in _files(queue):
        if f.exists():
            shutil.copy2(f, snap / f.name)
    p.mosquitto.restart()
    p.agent.start(timeout=20)
    p.wait_drained()
    assert_exactly_once(stream_seqs(p.nats.url), delivered_before)
    p.agent.stop()

    # The queue as it was before those receipts, plus records the cloud never saw (R2).
    for f in _files(queue):
        f.unlink(missing_ok=True)
        if (snap / f.name).exists():
            shutil.copy2(snap / f.name, f)
    p.mosquitto.stop()
    p.agent.start(timeout=20)
    p.producer.run(batches=10, size=200, seed_base=100)
    p.agent.stop()
    size = queue.stat().st_size
    with open(queue, "r+b") as f:  # the head of a page of chunk rows near the end: garbage
        f.seek((size // PAGE - 2) * PAGE)
        f.write(bytes(range(256)) * 4)

    p.mosquitto.restart()
    p.agent.start(timeout=20)
    log = p.agent.log_path.read_text()
    assert "failed its integrity check" in log and "rescued" in log
    p.producer.run(batches=3, size=100, seed_base=200)  # R3, into the fresh queue
    p.wait_drained(timeout=60)
    st = agent_status(p.agent.port)
    assert st is not None
    lost = st["evictions"].get("corrupt", 0)
    assert st["evictions"].get("unverifiable", 0) == 0
    stored = stream_seqs(p.nats.url)  # both subjects: the chain's and the rescued one
    assert len(stored) == len(set(stored)), "a record reached JetStream twice"
    missing = set(p.producer.acked) - set(stored)
    assert len(missing) == lost, f"{len(missing)} records missing, {lost} counted as lost"
    assert not set(stored) - set(p.producer.acked)
    aside = [x for x in queue.parent.glob("queue.db.corrupt-*") if x.name.endswith(".rescued.json")]
    report = json.loads(aside[0].read_text())
    assert report["lost_records"] == lost and report["records"] + lost == len(p.producer.acked) - 300
    print(f"rescued {report['records']} records ({len(delivered_before)} of them already in JetStream), "
          f"lost {lost} in {report['lost_chunks']} unreadable chunks; none twice")  # fmt: skip

    # recover is refused while the agent runs, and finds nothing left to do once it is stopped
    cfg = p.agent.config_path
    cli = [sys.executable, "-m", "edge_agent.cli", "recover", "--config", str(cfg)]
    source = str(aside[0]).removesuffix(".rescued.json")
    busy = subprocess.run([*cli, "--again", source], capture_output=True, text=True, timeout=30)
    assert busy.returncode == 2 and "in use by another process" in busy.stderr, busy
    p.agent.stop()
    idle = subprocess.run(cli, capture_output=True, text=True, timeout=30)
    assert idle.returncode == 0 and "nothing to recover" in idle.stdout, idle
