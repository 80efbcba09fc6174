"""A broker that will not talk is said so: no CONNACK to MQTT 5, a refused CONNACK.

The peers are real: nats-server's MQTT listener (3.1.1 only), mosquitto with a password
file, and, for the broker that drops an MQTT 5 CONNECT without a word (RabbitMQ 3.10's MQTT
plugin), a plain TCP server that reads the CONNECT and closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_tier.mqtt import NO_CONNACK_HINT_AFTER, V5_HINT, MqttBridge, MqttSettings
from edge_tier_harness.brokers import Mosquitto, NatsServer
from tests.conftest import need_binary

LOGGER = "edge_tier.mqtt"


class SilentCloser:
    """Accepts, reads the CONNECT, closes: never a CONNACK. Records each CONNECT's protocol level."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.levels: list[int] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(2.0)
                try:
                    data = conn.recv(1024)
                except OSError:
                    continue
                # fixed header, remaining length (1 byte for a small CONNECT), "\0\4MQTT", level
                if len(data) > 8 and data[0] == 0x10 and data[2:8] == b"\x00\x04MQTT":
                    self.levels.append(data[8])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def silent_closer() -> Iterator[SilentCloser]:
    server = SilentCloser()
    yield server
    server.close()


def _run_bridge(
    settings: MqttSettings, until: float, done: Callable[[MqttBridge], bool] | None = None
) -> MqttBridge:
    """Runs a bridge for at most ``until`` seconds, or until ``done(bridge)`` is true."""

    async def go() -> MqttBridge:
        bridge = MqttBridge(settings, client_id="diag", name="diag")
        await bridge.start()
        deadline = time.monotonic() + until
        for _ in iter(lambda: time.monotonic() < deadline and not (done and done(bridge)), False):
            await asyncio.sleep(0.05)  # polling what the session did: no event to wait on
        await bridge.stop()
        return bridge

    return asyncio.run(go())


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_mqtt5_connects_dropped_without_connack_say_the_broker_may_not_speak_mqtt5(
    silent_closer: SilentCloser, caplog: pytest.LogCaptureFixture
) -> None:
    settings = MqttSettings(port=silent_closer.port, version="5", backoff_min_s=0.05, backoff_max_s=0.2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _run_bridge(settings, 10.0, lambda b: any(V5_HINT in m for m in _messages(caplog)))
    msgs = _messages(caplog)
    hinted = [i for i, m in enumerate(msgs) if V5_HINT in m]
    assert hinted, f"no hint {V5_HINT!r} after {len(silent_closer.levels)} dropped CONNECTs: {msgs}"
    assert set(silent_closer.levels) == {5}, silent_closer.levels  # they were MQTT 5 CONNECTs
    # the hint comes after N dropped connections in a row, not at the first (a broker restarting)
    assert len([m for m in msgs[: hinted[0]] if "lost" in m]) == NO_CONNACK_HINT_AFTER - 1, msgs
    hint = next(r for r in caplog.records if V5_HINT in r.getMessage())
    assert hint.levelno == logging.WARNING
    assert f"127.0.0.1:{silent_closer.port}" in hint.getMessage() and "no CONNACK" in hint.getMessage()


def test_mqtt311_connects_dropped_without_connack_do_not_blame_the_version(
    silent_closer: SilentCloser, caplog: pytest.LogCaptureFixture
) -> None:
    settings = MqttSettings(port=silent_closer.port, version="3.1.1", backoff_min_s=0.05, backoff_max_s=0.2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _run_bridge(settings, 10.0, lambda b: len(silent_closer.levels) > NO_CONNACK_HINT_AFTER + 1)
    assert len(silent_closer.levels) > NO_CONNACK_HINT_AFTER + 1 and set(silent_closer.levels) == {4}
    assert not [m for m in _messages(caplog) if "MQTT 5" in m]


def test_mqtt5_against_a_311_only_broker_says_set_version_and_311_connects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-server's MQTT listener speaks 3.1.1 only; it answers an MQTT 5 CONNECT with
    "unacceptable protocol version", which is conclusive at once."""
    need_binary("nats-server")
    broker = NatsServer(tmp_path / "nats", mqtt_port=0)
    broker.start()
    try:
        assert broker.mqtt_port is not None
        with caplog.at_level(logging.INFO, logger=LOGGER):
            _run_bridge(
                MqttSettings(port=broker.mqtt_port, version="5"),
                10.0,
                lambda b: any(V5_HINT in m for m in _messages(caplog)),
            )
            refusals = [m for m in _messages(caplog) if "refused" in m]
            assert refusals and V5_HINT in refusals[0], _messages(caplog)
            assert "reason code 132" in refusals[0], refusals[0]
            # and what the hint says works
            up = _run_bridge(
                MqttSettings(port=broker.mqtt_port, version="3.1.1"), 10.0, lambda b: b.connected.is_set()
            )
            assert up.connections == 1
    finally:
        broker.stop()


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """mosquitto that admits user ``dev`` with password ``right`` only."""
    need_binary("mosquitto")
    passwd = need_binary("mosquitto_passwd")
    pw = tmp_path / "passwords"
    pw.write_text("")
    subprocess.run([passwd, "-b", str(pw), "dev", "right"], check=True, capture_output=True)
    broker = Mosquitto(tmp_path / "mosquitto", extra_config=f"allow_anonymous false\npassword_file {pw}\n")
    broker.start()
    yield broker
    broker.stop()


def _connections(broker: Mosquitto) -> int:
    return broker.log_path.read_text(errors="replace").count("New connection from")


@pytest.mark.parametrize(("version", "code"), [("5", "reason code 135"), ("3.1.1", "return code 5")])
def test_a_refused_connack_is_logged_with_its_reason_code_and_not_retried_at_full_speed(
    password_broker: Mosquitto, caplog: pytest.LogCaptureFixture, version: str, code: str
) -> None:
    # production backoff (0.2 s floor, doubling): before this, 4-6 tries in these 3 s
    settings = MqttSettings(port=password_broker.port, version=version, username="dev", password="wrong")
    before = _connections(password_broker)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _run_bridge(settings, 3.0)
    tries = _connections(password_broker) - before
    refusals = [r for r in caplog.records if r.name == LOGGER and "refused" in r.getMessage()]
    assert refusals, _messages(caplog)
    text = refusals[0].getMessage()
    # mosquitto 2.0 says "not authorized" for a wrong password too
    assert "Not authorized" in text and code in text and "as dev" in text, text
    assert f"127.0.0.1:{password_broker.port}" in text and "credentials" in text, text
    assert refusals[0].levelno == logging.WARNING
    assert 1 <= tries <= 2, f"{tries} connection attempts in 3 s after a refusal: {_messages(caplog)}"
    assert not [m for m in _messages(caplog) if "lost" in m]  # a refusal is not a lost connection

    # the right password gets in: the refusal was about the credentials
    ok = settings.model_copy(update={"password": "right"})
    assert _run_bridge(ok, 10.0, lambda b: b.connected.is_set()).connections == 1


def test_the_refusal_backoff_still_jitters_and_keeps_below_the_cap() -> None:
    settings = MqttSettings(refused_backoff_s=5.0, backoff_max_s=30.0)
    bridge = MqttBridge(settings, client_id="diag", name="diag")
    waits: list[float] = []
    for attempt in (1, 2, 3, 10, 30):
        for _ in range(50):
            waits.append(bridge.backoff_delay(attempt, "refused", floor=settings.refused_backoff_s))
    assert min(waits) >= 5.0 and max(waits) <= 30.0
    assert len({round(w, 3) for w in waits[:50]}) > 10  # not one lock-step delay for a fleet
    capped = MqttBridge(MqttSettings(refused_backoff_s=5.0, backoff_max_s=1.0), client_id="x", name="x")
    waits.append(capped.backoff_delay(1, "refused", floor=5.0))
    assert waits[-1] == 1.0  # backoff_max_s still bounds every wait
