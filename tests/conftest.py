"""Shared fixtures: real brokers (mosquitto, nats-server) and the Hypothesis profile.

Broker fixtures skip the test when the broker binary is missing, except in CI
(``CI=true``), where a missing broker fails the test instead.

Function-scoped fixtures give each test a fresh broker in its own ``tmp_path``; the test may
``kill()``, ``pause()``, ``stop()`` and ``restart()`` it (same ports, same data directory).
Session-scoped fixtures share one broker across the session: faster, but a test must not
fault-inject on them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edge_tier_harness.brokers import BrokerError, BrokerProcess, Mosquitto, NatsServer, require_binary
from edge_tier_harness.services import AgentProcess, IngestProcess
from tests.support import Pipeline, Producer, SmallFilesystem, agent_config, ingest_config

B = TypeVar("B", bound=BrokerProcess)

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; tests that need it import it themselves
    pass
else:
    settings.register_profile(
        "ci",
        deadline=None,
        max_examples=50,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=1000)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def need_binary(name: str) -> str:
    """Path of broker binary ``name``; skip the test if missing (fail it in CI)."""
    try:
        return require_binary(name)
    except BrokerError as exc:
        if in_ci():
            pytest.fail(f"{exc} (CI=true: a missing broker is a failure, not a skip)")
        pytest.skip(str(exc))


def _run(broker: B) -> Iterator[B]:
    need_binary(broker.binary)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# -- function scope: fresh broker per test, fault injection allowed ------------------------


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto with persistence, in ``tmp_path / "mosquitto"``."""
    yield from _run(Mosquitto(tmp_path / "mosquitto"))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A running nats-server with JetStream (file store), in ``tmp_path / "nats"``."""
    yield from _run(NatsServer(tmp_path / "nats"))


@pytest.fixture
def nats_mqtt_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A running nats-server with JetStream and its MQTT 3.1.1 listener (``.mqtt_port``)."""
    yield from _run(NatsServer(tmp_path / "nats-mqtt", mqtt_port=0))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str, int], SmallFilesystem]]:
    """Mounts real small filesystems ("ext4" on a loop device, or "tmpfs") of a size in MiB.
    Skips where mounting is not allowed; in CI (root on Debian) that is a failure."""
    mounted: list[SmallFilesystem] = []

    def make(kind: str = "ext4", size_mib: int = 20) -> SmallFilesystem:
        fs = SmallFilesystem(tmp_path, kind, size_mib)
        try:
            fs.mount()
        except OSError as exc:
            if in_ci():
                pytest.fail(f"cannot mount a small {kind} filesystem ({exc}); CI=true: a failure, not a skip")
            pytest.skip(f"cannot mount a small {kind} filesystem: {exc}")
        mounted.append(fs)
        return fs

    yield make
    for fs in mounted:
        fs.unmount()


# -- session scope: shared, do not kill/stop/restart ---------------------------------------


@pytest.fixture(scope="session")
def mosquitto_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One mosquitto for the whole session. No fault injection on it."""
    workdir = tmp_path_factory.mktemp("mosquitto-session")
    yield from _run(Mosquitto(workdir))


@pytest.fixture(scope="session")
def nats_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server with JetStream for the whole session. No fault injection on it."""
    workdir = tmp_path_factory.mktemp("nats-session")
    yield from _run(NatsServer(workdir))


@pytest.fixture(scope="session")
def nats_mqtt_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server with JetStream and the MQTT listener for the whole session."""
    workdir = tmp_path_factory.mktemp("nats-mqtt-session")
    yield from _run(NatsServer(workdir, mqtt_port=0))


@pytest.fixture
def make_pipeline(
    tmp_path: Path, mosquitto: Mosquitto, nats_server: NatsServer
) -> Iterator[Callable[..., Pipeline]]:
    """Agent + ingest child processes on this test's brokers; options per config section."""
    started: list[Any] = []

    def make(
        agent: dict[str, Any] | None = None, ingest: dict[str, Any] | None = None, start: bool = True
    ) -> Pipeline:
        a = AgentProcess(
            tmp_path / "agent",
            agent_config(tmp_path / "agent", mosquitto.port, **(agent or {})),
            name="edge-agent",
        )
        i = IngestProcess(
            tmp_path / "ingest",
            ingest_config(mosquitto.port, nats_server.url, **(ingest or {})),
            name="cloud-ingest",
        )
        started.extend([a, i])
        if start:
            i.start(timeout=20)
            a.start(timeout=20)
        return Pipeline(mosquitto, nats_server, a, i, Producer(a.port))

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def ingest_only(make_pipeline: Callable[..., Pipeline]) -> Callable[..., Pipeline]:
    """Ingest alone on this test's brokers (a plain MQTT client plays the device)."""

    def make(**ingest: Any) -> Pipeline:
        p: Pipeline = make_pipeline(ingest=ingest, start=False)
        p.ingest.start(timeout=20)
        return p

    return make
