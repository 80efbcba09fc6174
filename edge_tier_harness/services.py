"""Run edge-tier's own services as child processes (tests, demo, benchmarks).

They reuse the broker process machinery: a working directory with the config
(TOML) and log, readiness by a log line plus a listening port, and SIGTERM /
SIGKILL / restart for fault injection.
"""

from __future__ import annotations

import http.client
import json
import sys
from pathlib import Path
from typing import Any

import tomli_w

from edge_tier_harness.brokers import BrokerProcess


def agent_status(port: int, host: str = "127.0.0.1") -> dict[str, Any] | None:
    """The agent's ``GET /v1/status``, or None if it does not answer."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/v1/status")
        return json.loads(conn.getresponse().read())
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


def metric(port: int, name: str, host: str = "127.0.0.1") -> float | None:
    """The sum of the samples of Prometheus metric ``name`` (all labels) on a process's
    ``/metrics``; None if it does not answer or does not export it."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except (OSError, http.client.HTTPException, UnicodeDecodeError):
        return None
    finally:
        conn.close()
    try:
        values = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
    except ValueError:  # not a Prometheus page (another service on that port, say)
        return None
    return float(sum(values)) if values else None


def agent_drained(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing queued and nothing in flight: every record was receipted (or counted lost)."""
    st = agent_status(port, host)
    return (
        st is not None
        and st["records"] == 0
        and st["frames_in_flight"] == 0
        and not st.get("rescued_records")
    )


class ServiceProcess(BrokerProcess):
    module = ""
    command = "run"
    port_field = ("", "")  # (config section, key) that gets the port readiness waits for

    def __init__(self, workdir: Path | str, config: dict[str, Any], *, name: str, port: int | None = None):
        self.name = name
        super().__init__(workdir, port)
        self.config = config
        self._bind_port(self.port)

    def _bind_port(self, port: int) -> None:
        section, key = self.port_field
        self.config.setdefault(section, {})[key] = port

    def _executable(self) -> str:
        return sys.executable

    def _write_config(self) -> None:
        self._bind_port(self.port)
        self.config_path.write_bytes(tomli_w.dumps(self.config).encode())

    def _command(self, exe: str) -> list[str]:
        return [exe, "-m", self.module, self.command, "--config", str(self.config_path)]


class AgentProcess(ServiceProcess):
    """``edge-agent run``; its port is the local enqueue endpoint."""

    module = "edge_agent.cli"
    port_field = ("endpoint", "port")
    _ready_marker = "agent ready:"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"


class IngestProcess(ServiceProcess):
    """``cloud-ingest run``; its port is the Prometheus metrics port."""

    module = "cloud_ingest.cli"
    port_field = ("ingest", "metrics_port")
    _ready_marker = "ingest ready"


class WorkerProcess(ServiceProcess):
    """``cloud-ingest worker``; its port is the Prometheus metrics port."""

    module = "cloud_ingest.cli"
    command = "worker"
    port_field = ("worker", "metrics_port")
    _ready_marker = "worker ready"


class ApiProcess(ServiceProcess):
    """``cloud-ingest api``; its port is the API's."""

    module = "cloud_ingest.cli"
    command = "api"
    port_field = ("api", "port")
    _ready_marker = "api ready"
