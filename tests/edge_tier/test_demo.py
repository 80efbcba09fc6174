"""``make demo`` (README command 1): the whole pipeline ends with nothing lost or doubled, even
with every part killed once, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")
pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from tests.conftest import need_binary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LIVE = re.compile(r"^\s*\d+s\s+\d+\s+\d+\s+[\d.]+%")  # a line of the view: t, windows/s, kept/s, drop


def _ours(workdir: Path) -> list[int]:
    """Processes whose command line names ``workdir`` (the demo's children all do)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(workdir).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _reap(workdir: Path) -> None:
    """Whatever a failed run left behind: killed, so that it cannot hold ports for the next test."""
    for pid in _ours(workdir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_the_demo_with_chaos_ends_with_nothing_lost_and_nothing_doubled(tmp_path: Path) -> None:
    need_binary("nats-server")
    cmd = [sys.executable, "-m", "edge_tier.demo", "--devices", "2", "--seconds", "12", "--chaos", "--json",
           "--workdir", str(tmp_path / "demo")]  # fmt: skip
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    finally:
        _reap(tmp_path / "demo")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["lost"] == 0 and s["duplicated"] == 0, s
    assert 0 < s["kept"] == s["results"] < s["emitted"], s
    # the agents delivered what they acknowledged, and what a killed one took unacknowledged
    assert s["delivered"] == s["kept"] + s["unacknowledged_answered"], s
    assert s["faults_kept"] >= 0.9 * s["faults"] > 0, s
    assert 0 < s["wire_bytes"] < s["raw_bytes"] / 50, s
    view = r.stderr
    for event in ("killed broker", "killed ingest", "killed worker", "killed device"):
        assert event in view, f"{event!r} never happened:\n{view[-2000:]}"
    assert "lost         0" in view and "curl -s -H" in view and "mosquitto_sub" in view
    assert _ours(tmp_path / "demo") == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path, sig: signal.Signals) -> None:
    need_binary("nats-server")
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "edge_tier.demo", "--devices", "2", "--seconds", "60",
           "--workdir", str(work)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _interrupt_and_check(proc, work, sig)
    finally:
        proc.kill()
        _reap(work)


def _interrupt_and_check(proc: subprocess.Popen[str], work: Path, sig: signal.Signals) -> None:
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 90
    for line in proc.stdout:  # wait for the live view: everything is up and running
        lines.append(line)
        if LIVE.match(line) or time.monotonic() > deadline:
            break
    assert any(LIVE.match(x) for x in lines), "".join(lines)
    assert len(_ours(work)) >= 6  # nats-server, ingest, worker, api, 2 agents (and the demo)
    os.kill(proc.pid, sig)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "stopping (Ctrl-C)" in rest
    assert _ours(work) == [], "processes left behind"
