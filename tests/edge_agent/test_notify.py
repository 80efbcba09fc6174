"""The agent speaks systemd's notify protocol: READY=1 once it serves, WATCHDOG=1 while its
event loop runs, and no pings from a hung loop (so systemd would restart it)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from edge_agent.notify import Notifier
from edge_tier_harness.brokers import Mosquitto
from edge_tier_harness.services import AgentProcess
from tests.support import agent_config


def receive(sock: socket.socket, seconds: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return got


def test_ready_then_watchdog_pings_that_stop_when_the_loop_hangs(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        agent = AgentProcess(
            tmp_path / "agent", agent_config(tmp_path / "agent", mosquitto.port), name="agent"
        )
        agent.env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}  # ping every 0.1 s
        agent.start(timeout=20)
        try:
            first = receive(sock, 1.0)
            ready = [m for m in first if "READY=1" in m]
            assert ready and "STATUS=serving acme/press-7" in ready[0]
            assert sum("WATCHDOG=1" in m for m in first) >= 5
            agent.pause()  # SIGSTOP: a hung loop
            try:
                receive(sock, 0.2)  # what was already on its way
                assert receive(sock, 0.6) == [], "pings came from a stopped process"
            finally:
                agent.resume()
            assert any("WATCHDOG=1" in m for m in receive(sock, 0.5))
        finally:
            agent.stop()
        assert any("STOPPING=1" in m for m in receive(sock, 0.5))


def test_without_systemd_nothing_is_sent_and_abstract_sockets_are_understood() -> None:
    quiet = Notifier({})
    assert not quiet.enabled and quiet.watchdog_s is None
    quiet.notify("READY=1")  # a no-op
    abstract = Notifier({"NOTIFY_SOCKET": "@/org/systemd/notify", "WATCHDOG_USEC": "30000000"})
    assert abstract.address == "\0/org/systemd/notify" and abstract.watchdog_s == 15.0
    other = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_s is None  # the watchdog is another process's
