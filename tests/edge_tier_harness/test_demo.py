"""``make demo`` (README command 1): the whole pipeline ends with nothing lost or doubled, even
with every part killed once, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")
pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from tests.conftest import in_ci, need_binary

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
    cmd = [sys.executable, "-m", "edge_tier_harness.demo", "--devices", "2", "--seconds", "12",
           "--chaos", "--json", "--workdir", str(tmp_path / "demo")]  # fmt: skip
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
    cmd = [sys.executable, "-m", "edge_tier_harness.demo", "--devices", "2", "--seconds", "60",
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


# -- --serve: every printed command, run as printed -----------------------------------------

REPO = Path(__file__).resolve().parents[2]  # where `make demo` runs


def _need_tool(name: str, package: str) -> None:
    if shutil.which(name) is None:
        msg = f"`{name}` not found: apt-get install {package}"
        if in_ci():
            pytest.fail(f"{msg} (CI=true: a failure, not a skip)")
        pytest.skip(msg)


def _newcomers_env() -> dict[str, str]:
    """A shell after a fresh clone and `make demo`: no virtualenv activated, so the venv's
    scripts are not on PATH."""
    venv_bin = os.path.dirname(sys.executable)
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and os.path.abspath(d) != venv_bin]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": os.pathsep.join(path)}


def _reader(stream: IO[str] | None) -> queue.Queue[str | None]:
    """The lines of ``stream`` as a thread reads them (None at the end)."""
    assert stream is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _until(
    lines: queue.Queue[str | None], pred: Callable[[str], bool], within: float, seen: list[str]
) -> str:
    """The first line from ``lines`` that ``pred`` takes, within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(
                f"nothing matching within {within}s; got:\n{''.join(seen)[-3000:]}"
            ) from None
        if line is None:
            raise AssertionError(f"the output ended; got:\n{''.join(seen)[-3000:]}")
        seen.append(line)
        if pred(line):
            return line


def _streams(script: str, env: dict[str, str], pred: Callable[[str], bool], within: float = 15.0) -> str:
    """Run a command that goes on printing (curl -N, mosquitto_sub) in bash, as typed: the
    first line of its output that ``pred`` takes; then the command is ended (Ctrl-C)."""
    proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        return _until(_reader(proc.stdout), pred, within, [])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def _event_after(seq: int) -> Callable[[str], bool]:
    """Takes an SSE ``id:`` line of an event after stream sequence ``seq``."""
    return lambda line: (m := re.match(r"^id: (\d+)$", line)) is not None and int(m[1]) > seq


def test_serve_every_printed_command_works_as_printed(tmp_path: Path) -> None:
    """``make demo ARGS=--serve`` from a fresh clone: each "try next" command, typed as printed
    into a shell without the virtualenv, works, and the live ones show live answers."""
    need_binary("nats-server")
    _need_tool("curl", "curl")
    _need_tool("mosquitto_sub", "mosquitto-clients")
    work, env = tmp_path / "demo", _newcomers_env()
    cmd = [sys.executable, "-m", "edge_tier_harness.demo", "--devices", "2", "--seconds", "4", "--serve",
           "--workdir", str(work)]  # fmt: skip
    demo = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out: list[str] = []
        lines = _reader(demo.stdout)
        _until(lines, lambda x: x.startswith("running until Ctrl-C"), 150, out)
        text = "".join(out)
        assert "lost         0" in text and "duplicated   0" in text, text
        block = text[text.index("\ntry next") :].splitlines()[2:]
        printed = [x[2:] for x in block if x.startswith("  ")]
        export, commands = printed[0], printed[1:]
        assert export.startswith("export TOKEN=et_"), printed
        assert "mosquitto-clients" in text, "nothing says where mosquitto_sub comes from"
        assert len(commands) == 5, printed
        ran: set[str] = set()
        for command in commands:
            script = f"{export}\n{command}"
            if "/v1/stream" in command:  # the last answers again, then new ones as they come
                after = int(re.search(r"Last-Event-ID: (\d+)", command).group(1))  # type: ignore[union-attr]
                _streams(script, env, _event_after(after + 3))
                ran.add("stream")
            elif command.startswith("mosquitto_sub "):  # results are not retained: this one is live
                line = _streams(script, env, lambda x: x.startswith("{"))
                assert json.loads(line)["tenant"] == "demo", line
                ran.add("mqtt")
            else:
                r = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                                   timeout=60)  # fmt: skip
                assert r.returncode == 0, f"{command}\n{r.stdout}{r.stderr}"
                if command.startswith("curl ") and "/results" in command:
                    assert json.loads(r.stdout)["results"], r.stdout
                    ran.add("results")
                elif command.startswith("curl "):
                    assert {d["device"] for d in json.loads(r.stdout)["devices"]} == {"device-0", "device-1"}
                    ran.add("devices")
                else:
                    assert " status --config " in command and "demo/device-0" in r.stdout, r.stdout
                    ran.add("status")
        assert ran == {"stream", "mqtt", "results", "devices", "status"}, commands
        demo.send_signal(signal.SIGINT)  # Ctrl-C: the way out of --serve
        demo.wait(60)
        rest: list[str] = []
        with contextlib.suppress(AssertionError):
            _until(lines, lambda x: False, 5, rest)
        assert demo.returncode == 0, "".join(out + rest)
        assert "stopping (Ctrl-C)" in "".join(rest)
        assert _ours(work) == [], "processes left behind"
    finally:
        demo.kill()
        _reap(work)
