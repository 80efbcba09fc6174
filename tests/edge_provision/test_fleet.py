"""edge-provision: the fleet directory, device bundles, and a real mosquitto run on the broker
config it renders (ACL by identity, client certificates, revocation)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import load_agent_config
from edge_provision.fleet import Fleet, FleetError
from edge_tier_harness.brokers import free_port
from tests.conftest import in_ci, need_binary


def test_init_writes_private_files_private_and_refuses_to_overwrite(tmp_path: Path) -> None:
    fleet = Fleet.init(tmp_path / "fleet")
    for name in ("ca.key", "signing.key", "registry.db", "et-ingest.password", "et-provision.password"):
        assert (tmp_path / "fleet" / name).stat().st_mode & 0o777 == 0o600, name
    with pytest.raises(FleetError, match="already a fleet directory"):
        Fleet.init(tmp_path / "fleet")
    with pytest.raises(FleetError, match="not a fleet directory"):
        Fleet(tmp_path / "elsewhere")
    info = fleet.add_device(
        "acme", "press-7", tmp_path / "b", broker_host="broker.example", port=1883, tls_port=8883
    )
    cert = x509.load_pem_x509_certificate((tmp_path / "b" / "device.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "acme/press-7"
    assert format(cert.serial_number, "x") == info.serial
    assert (tmp_path / "b" / "device.key").stat().st_mode & 0o777 == 0o600
    cfg = load_agent_config(tmp_path / "b" / "agent.toml")
    assert (cfg.device.tenant, cfg.device.device, cfg.mqtt.host, cfg.mqtt.port) == (
        "acme",
        "press-7",
        "broker.example",
        8883,
    )
    assert cfg.mqtt.tls_key == str(tmp_path / "b" / "device.key")  # relative to the bundle
    assert cfg.control.signing_key == tmp_path / "b" / "signing.pub"  # model updates are checked with it
    with pytest.raises(FleetError, match="already registered"):
        fleet.add_device("acme", "press-7", tmp_path / "b2", broker_host="h", port=1, tls_port=2)


@pytest.mark.parametrize("bad", ["a/b", "a+b", "a#", "a\x00b", "x" * 65, "", "a.b"])
def test_device_ids_that_would_break_topics_are_refused(tmp_path: Path, bad: str) -> None:
    fleet = Fleet.init(tmp_path / "fleet")
    with pytest.raises(ValueError, match="device id"):
        fleet.add_device("acme", bad, tmp_path / "b", broker_host="h", port=1, tls_port=2)
    assert fleet.devices() == []


def test_the_cli_round_trip(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "edge_provision.cli", "--fleet", str(tmp_path / "f"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=tmp_path)

    assert run("init", str(tmp_path / "f")).returncode == 0
    assert (
        run("device", "add", "acme", "d1").returncode == 0 and (tmp_path / "acme-d1" / "agent.toml").exists()
    )
    r = run("device", "add", "acme", "bad/id")
    assert r.returncode == 2 and "device id 'bad/id'" in r.stderr
    assert "acme/d1" in run("device", "list").stdout
    assert run("device", "revoke", "acme", "d1").returncode == 0
    r = run("device", "revoke", "acme", "d1")
    assert r.returncode == 2 and "already revoked" in r.stderr
    # --broker-user root: as root, user "mosquitto" could not reach tmp_path (see below)
    r = run("broker-config", "--out", str(tmp_path / "broker"), "--broker-user", "root")
    assert r.returncode == 0, r.stderr
    assert "acme/d1" not in (tmp_path / "broker" / "passwd").read_text()


# -- a real mosquitto on the rendered config -----------------------------------------------


class Broker:
    def __init__(self, fleet: Fleet, out: Path) -> None:
        self.fleet, self.out = fleet, out
        self.port, self.tls_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # tmp_path is in a 0700 directory of root's: user "mosquitto" could not reach the files
        # (test_the_printed_mosquitto_command_runs_as_root_... renders for that user)
        user = "root" if os.geteuid() == 0 else None
        files = self.fleet.broker_files(
            self.out, host="127.0.0.1", port=self.port, tls_port=self.tls_port, user=user
        )
        log = open(self.out / "mosquitto.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [need_binary("mosquitto"), "-c", str(files["conf"])], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.tls_port), 0.2).close()
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                assert self.proc.poll() is None, (self.out / "mosquitto.log").read_text()[-2000:]
                time.sleep(0.05)
        raise AssertionError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)


class Client:
    """A paho client that records what it receives and whether it got in."""

    def __init__(self, broker: Broker, *, user: str | None = None, password: str | None = None,
                 bundle: Path | None = None, client_id: str = "") -> None:  # fmt: skip
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or (user or "tls"))
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, u, f, rc, p: setattr(self, "rc", rc)
        self.rc: Any = None
        port = broker.port
        if bundle is not None:
            self.c.tls_set(str(bundle / "ca.pem"), str(bundle / "device.pem"), str(bundle / "device.key"))
            port = broker.tls_port
        if user is not None:
            self.c.username_pw_set(user, password)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        deadline = time.monotonic() + 5
        while self.rc is None and time.monotonic() < deadline:
            time.sleep(0.02)

    @property
    def admitted(self) -> bool:
        return self.rc is not None and not self.rc.is_failure

    def _on_message(self, c: Any, u: Any, m: Any) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload)))

    def sub(self, topic: str) -> None:
        self.c.subscribe(topic, 1)
        time.sleep(0.2)

    def pub(self, topic: str, payload: bytes = b"x") -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


FleetBroker = tuple[Fleet, Broker, dict[str, str]]


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[tuple[Fleet, Broker, dict[str, str]]]:
    need_binary("mosquitto")
    fleet = Fleet.init(tmp_path / "fleet")
    for d in ("a", "b"):
        fleet.add_device("acme", d, tmp_path / f"bundle-{d}", broker_host="127.0.0.1", port=0, tls_port=0)
    passwords = {
        "et-ingest": (tmp_path / "fleet" / "et-ingest.password").read_text(),
        "et-provision": (tmp_path / "fleet" / "et-provision.password").read_text(),
        "app-acme": fleet.add_user("app-acme", "app", "acme"),
        "app-globex": fleet.add_user("app-globex", "app", "globex"),
    }
    for d in ("a", "b"):
        passwords[f"acme/{d}"] = _bundle_password(tmp_path / f"bundle-{d}")
    broker = Broker(fleet, tmp_path / "broker")
    broker.start()
    try:
        yield fleet, broker, passwords
    finally:
        broker.stop()


def _bundle_password(bundle: Path) -> str:
    import tomllib

    return str(tomllib.loads((bundle / "password.toml").read_text())["mqtt"]["password"])


def test_a_device_writes_only_its_own_topics_over_password_and_certificate(
    fleet_broker: FleetBroker, tmp_path: Path
) -> None:
    _, broker, pw = fleet_broker
    ingest = Client(broker, user="et-ingest", password=pw["et-ingest"])
    ingest.sub("et/+/+/up")
    a = Client(broker, user="acme/a", password=pw["acme/a"])
    a_tls = Client(broker, bundle=tmp_path / "bundle-a", client_id="et-acme-a")
    assert ingest.admitted and a.admitted and a_tls.admitted
    for c, tag in ((a, b"pw"), (a_tls, b"tls")):
        c.pub("et/acme/a/up", b"own-" + tag)
        c.pub("et/acme/b/up", b"forged-" + tag)  # B's topic: the broker must drop it
    time.sleep(0.5)
    assert sorted(ingest.got) == [("et/acme/a/up", b"own-pw"), ("et/acme/a/up", b"own-tls")]
    # a device cannot read another's receipts, nor anyone's uploads
    a.sub("et/acme/b/receipt")
    a.sub("et/+/+/up")
    ingest.pub("et/acme/b/receipt", b"for b")
    Client(broker, user="acme/b", password=pw["acme/b"]).pub("et/acme/b/up", b"b's")
    time.sleep(0.5)
    assert a.got == []
    for c in (ingest, a, a_tls):
        c.close()


def test_an_application_reads_only_its_tenants_results(
    fleet_broker: FleetBroker,
) -> None:
    _, broker, pw = fleet_broker
    ingest = Client(broker, user="et-ingest", password=pw["et-ingest"])
    mine = Client(broker, user="app-acme", password=pw["app-acme"])
    other = Client(broker, user="app-globex", password=pw["app-globex"])
    mine.sub("et/acme/+/results")
    other.sub("et/acme/+/results")
    other.sub("et/+/+/results")
    ingest.pub("et/acme/a/results", b"r1")
    other.pub("et/acme/a/results", b"forged")  # an app may not write results either
    time.sleep(0.5)
    assert mine.got == [("et/acme/a/results", b"r1")] and other.got == []
    for c in (ingest, mine, other):
        c.close()


def test_a_revoked_device_cannot_connect_with_password_or_certificate(
    fleet_broker: FleetBroker, tmp_path: Path
) -> None:
    fleet, broker, pw = fleet_broker
    fleet.revoke_device("acme", "b")
    broker.stop()
    broker.start()  # the operator re-renders the config and restarts (or reloads) the broker
    assert not Client(broker, user="acme/b", password=pw["acme/b"]).admitted
    try:  # TLS 1.3 may refuse in the handshake or right after it: never a CONNACK
        admitted = Client(broker, bundle=tmp_path / "bundle-b", client_id="et-acme-b").admitted
    except (ssl.SSLError, OSError):
        admitted = False
    assert not admitted, "a revoked certificate got in"
    ok = Client(broker, bundle=tmp_path / "bundle-a", client_id="et-acme-a")
    assert ok.admitted
    ok.close()


def test_rotation_keeps_the_old_certificate_for_the_overlap_only(
    fleet_broker: FleetBroker, tmp_path: Path
) -> None:
    fleet, broker, pw = fleet_broker
    old = tmp_path / "bundle-a-old"
    (tmp_path / "bundle-a").rename(old)
    where = {"broker_host": "127.0.0.1", "port": 0, "tls_port": 0}
    fleet.rotate_device("acme", "a", tmp_path / "bundle-a", overlap_s=3600, **where)
    broker.stop()
    broker.start()
    for bundle in (old, tmp_path / "bundle-a"):  # inside the overlap: both certificates work
        c = Client(broker, bundle=bundle, client_id="et-acme-a")
        assert c.admitted, bundle
        c.close()
    assert Client(broker, user="acme/a", password=_bundle_password(tmp_path / "bundle-a")).admitted
    assert not Client(broker, user="acme/a", password=pw["acme/a"]).admitted  # one password per user
    fleet.rotate_device("acme", "a", tmp_path / "bundle-a3", overlap_s=0, **where)
    broker.stop()
    broker.start()
    for bundle, ok in ((tmp_path / "bundle-a", False), (tmp_path / "bundle-a3", True)):
        try:
            admitted = Client(broker, bundle=bundle, client_id="et-acme-a").admitted
        except (ssl.SSLError, OSError):
            admitted = False
        assert admitted is ok, bundle


def test_model_push_and_control_set_reach_the_devices_named_and_no_one_else(
    fleet_broker: FleetBroker, tmp_path: Path
) -> None:

    from edge_tier.control import decode_control
    from edge_tier.model.manifest import DEFAULT_MANIFEST

    _, broker, pw = fleet_broker
    a = Client(broker, user="acme/a", password=pw["acme/a"])
    b = Client(broker, user="acme/b", password=pw["acme/b"])
    app = Client(broker, user="app-globex", password=pw["app-globex"])
    a.sub("et/acme/a/control")
    a.sub("et/acme/_models/+/+")
    b.sub("et/acme/a/control")  # another device's control: the ACL says no
    app.sub("et/acme/_models/+/+")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "edge_provision.cli", "--fleet", str(tmp_path / "fleet"), *args,
               "--port", str(broker.port)]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    r = cli("model", "push", "acme", "a", str(DEFAULT_MANIFEST), "--chunk-bytes", "4096")
    assert r.returncode == 0, r.stderr
    time.sleep(0.5)
    docs = [decode_control(p).unverified() for t, p in a.got if t == "et/acme/a/control"]
    chunks = sorted(t for t, _ in a.got if "/_models/" in t)
    assert len(docs) == 1 and docs[0].model is not None and docs[0].model.counter == 1
    sha = docs[0].model.sha256
    assert chunks == [f"et/acme/_models/{sha}/{i}" for i in range(3)]
    assert b.got == [] and app.got == [], "another device or tenant read a's update"
    # a device may not write model chunks (it would feed its neighbours)
    a.pub(f"et/acme/_models/{sha}/0", b"forged")
    time.sleep(0.3)
    for c in (a, b):  # the password listener makes the username the client id: one session each
        c.close()
    a = Client(broker, user="acme/a", password=pw["acme/a"])
    a.sub(f"et/acme/_models/{sha}/0")
    assert a.got and a.got[0][1] != b"forged"
    # a config change for the whole tenant keeps a's model and reaches b too
    r = cli("control", "set", "acme", "--all", "--pause", "--threshold", "0.4")
    assert r.returncode == 0, r.stderr
    b = Client(broker, user="acme/b", password=pw["acme/b"])
    b.sub("et/acme/b/control")
    a.got.clear()
    a.sub("et/acme/a/control")
    new = decode_control(a.got[-1][1]).unverified()
    assert new.config.paused and new.config.threshold == 0.4 and new.model == docs[0].model
    assert new.generation > docs[0].generation and (new.tenant, new.device) == ("acme", "a")
    assert decode_control(b.got[-1][1]).unverified().config.paused
    # refresh: the same desired state, a higher generation, a new expiry
    r = cli("control", "refresh", "acme", "a", "--valid-days", "2")
    assert r.returncode == 0, r.stderr
    a.got.clear()
    a.sub("et/acme/a/control")
    again = decode_control(a.got[-1][1]).unverified()
    assert again.generation > new.generation and (again.config, again.model) == (new.config, new.model)
    assert abs(again.expires_ms - again.issued_ms - 2 * 86_400_000) < 1000
    r = cli("control", "set", "acme", "a", "--all", "--pause")
    assert r.returncode == 2 and "one DEVICE, or --all" in r.stderr
    r = cli("model", "push", "acme", "nope", str(DEFAULT_MANIFEST))
    assert r.returncode == 2 and "acme/nope: not registered" in r.stderr
    # the ingest user may not write control topics any more: the broker drops what it sends
    r = cli("control", "set", "acme", "a", "--pause", "--user", "et-ingest")
    a.got.clear()
    a.sub("et/acme/a/control")
    assert decode_control(a.got[-1][1]).unverified().generation == again.generation, r
    for c in (a, b, app):
        c.close()


def test_the_embedded_nats_config_scopes_each_device_as_the_mosquitto_acl_does(tmp_path: Path) -> None:
    import asyncio
    from types import SimpleNamespace

    import nats

    exe = need_binary("nats-server")
    fleet = Fleet.init(tmp_path / "fleet")
    for d in ("a", "b", "gone"):
        fleet.add_device("acme", d, tmp_path / f"bundle-{d}", broker_host="127.0.0.1", port=0, tls_port=0)
    fleet.revoke_device("acme", "gone")
    pw = {d: _bundle_password(tmp_path / f"bundle-{d}") for d in ("a", "b", "gone")}
    pw["et-ingest"] = (tmp_path / "fleet" / "et-ingest.password").read_text()
    pw["et-provision"] = (tmp_path / "fleet" / "et-provision.password").read_text()
    pw["app-globex"] = fleet.add_user("app-globex", "app", "globex")
    port, mqtt_port = free_port(), free_port()
    conf = fleet.nats_config(tmp_path / "nats", port=port, mqtt_port=mqtt_port)
    assert conf.stat().st_mode & 0o777 == 0o600 and pw["a"] not in conf.read_text()
    log = open(tmp_path / "nats.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", mqtt_port), 0.2).close()
                break
            except OSError:
                alive = proc.poll() is None and time.monotonic() < deadline
                assert alive, (tmp_path / "nats.log").read_text()
                time.sleep(0.05)
        broker: Any = SimpleNamespace(port=mqtt_port)
        ingest = Client(broker, user="et-ingest", password=pw["et-ingest"], client_id="ingest")
        ingest.sub("et/+/+/up")
        # only the provision user writes model chunks and control documents
        for topic in ("et/acme/_models/f00/0", "et/acme/a/control"):
            ingest.c.publish(topic, b"forged", qos=1, retain=True).wait_for_publish(5)
        prov = Client(broker, user="et-provision", password=pw["et-provision"], client_id="provision")
        assert prov.admitted
        prov.c.publish("et/acme/_models/f00/0", b"chunk", qos=1, retain=True).wait_for_publish(5)
        prov.c.publish("et/acme/a/control", b"doc", qos=1, retain=True).wait_for_publish(5)
        prov.close()
        a = Client(broker, user="acme/a", password=pw["a"], client_id="et-acme-a")
        app = Client(broker, user="app-globex", password=pw["app-globex"], client_id="app")
        assert ingest.admitted and a.admitted and app.admitted
        assert not Client(broker, user="acme/gone", password=pw["gone"], client_id="x").admitted
        assert not Client(broker, user="acme/a", password=pw["b"], client_id="y").admitted
        a.sub("et/acme/_models/+/+")
        a.sub("et/acme/a/control")
        a.sub("et/acme/b/receipt")
        app.sub("et/acme/+/results")
        a.pub("et/acme/a/up", b"own")
        a.pub("et/acme/b/up", b"forged")
        ingest.pub("et/acme/b/receipt", b"for b")
        ingest.pub("et/acme/a/results", b"acme's")
        time.sleep(0.5)
        assert ingest.got == [("et/acme/a/up", b"own")]
        assert sorted(a.got) == [("et/acme/_models/f00/0", b"chunk"), ("et/acme/a/control", b"doc")]
        assert app.got == []

        async def jetstream() -> int:  # ingest and workers use JetStream as that user
            nc = await nats.connect(f"nats://127.0.0.1:{port}", user="et-ingest", password=pw["et-ingest"])
            try:
                info = await nc.jetstream().account_info()
                return int(info.streams)
            finally:
                await nc.close()

        assert asyncio.run(jetstream()) >= 0
        for c in (ingest, a, app):
            c.close()
    finally:
        proc.terminate()
        proc.wait(5)


def test_only_the_provisioning_identity_writes_control_documents_and_model_chunks(
    fleet_broker: FleetBroker,
) -> None:
    """An ingest-role (or app, or device) credential cannot write a device's control topic or
    a tenant's model chunks, not even over the retained copies; the provision user can."""
    fleet, broker, pw = fleet_broker
    pw["ingest-2"] = fleet.add_user("ingest-2", "ingest", None)
    broker.stop()
    broker.start()
    a = Client(broker, user="acme/a", password=pw["acme/a"])
    a.sub("et/acme/a/control")
    a.sub("et/acme/_models/+/+")
    sha = "ab" * 32
    for user in ("et-ingest", "ingest-2", "app-acme", "acme/b"):
        c = Client(broker, user=user, password=pw[user])
        assert c.admitted, user
        c.c.publish("et/acme/a/control", b"forged by " + user.encode(), qos=1, retain=True).wait_for_publish(
            5
        )
        c.c.publish(f"et/acme/_models/{sha}/0", b"forged", qos=1, retain=True).wait_for_publish(5)
        c.close()
    time.sleep(0.5)
    assert a.got == [], "the broker let another identity write control or model topics"
    prov = Client(broker, user="et-provision", password=pw["et-provision"])
    prov.c.publish("et/acme/a/control", b"doc", qos=1, retain=True).wait_for_publish(5)
    prov.c.publish(f"et/acme/_models/{sha}/0", b"chunk", qos=1, retain=True).wait_for_publish(5)
    time.sleep(0.5)
    assert sorted(a.got) == [("et/acme/_models/" + sha + "/0", b"chunk"), ("et/acme/a/control", b"doc")]
    # the provision user reads nothing: it is no back door into uploads or receipts
    prov.sub("et/+/+/up")
    Client(broker, user="acme/b", password=pw["acme/b"]).pub("et/acme/b/up", b"b's")
    time.sleep(0.3)
    assert prov.got == []
    for c in (a, prov):
        c.close()


# -- broker-config as printed: the listeners' address, mosquitto started as root -----------


def _provision(tmp_path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edge_provision.cli", "--fleet", str(tmp_path / "fleet"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd or tmp_path)


def _printed(stdout: str, program: str) -> str:
    """The line of ``stdout`` that starts ``program``: a command to run as printed."""
    lines = [x for x in stdout.splitlines() if x.startswith(program + " ")]
    assert len(lines) == 1, stdout
    return lines[0]


def _listening(port: int) -> set[str]:
    """The local addresses a TCP socket listens on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            rows = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)  # the kernel writes each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def _wait_listening(proc: subprocess.Popen[bytes], ports: list[int], log: Path) -> None:
    deadline = time.monotonic() + 10
    while not all(_listening(p) for p in ports):
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"not listening on {ports}:\n{log.read_text()[-2000:]}"
        time.sleep(0.05)


def _shell_env(*programs: str) -> dict[str, str]:
    """The environment of an operator's shell that has ``programs`` on its PATH."""
    dirs = [os.path.dirname(need_binary(p)) for p in programs]
    return {**os.environ, "PATH": os.pathsep.join([*dirs, os.environ.get("PATH", "")])}


def test_broker_config_binds_the_host_or_bind_and_says_so(tmp_path: Path) -> None:
    Fleet.init(tmp_path / "fleet")
    root = ("--broker-user", "root")  # files only: no broker runs here
    r = _provision(tmp_path, "broker-config", "--out", "b1", *root)
    assert r.returncode == 0, r.stderr
    conf = (tmp_path / "b1" / "mosquitto.conf").read_text()
    assert "listener 8883 127.0.0.1\n" in conf and "listener 1883 127.0.0.1\n" in conf, conf
    nats = (tmp_path / "b1" / "nats.conf").read_text()
    assert 'host: "127.0.0.1"\nport: 4222' in nats and 'mqtt { host: "127.0.0.1", port: 1883 }' in nats
    assert "listeners on 127.0.0.1: 1883 (passwords), 8883 (client certificates)" in r.stderr
    # the printed paths are absolute: the command works from any directory
    assert _printed(r.stdout, "mosquitto") == f"mosquitto -c {tmp_path / 'b1' / 'mosquitto.conf'}"
    r = _provision(tmp_path, "broker-config", "--out", "b2", "--host", "broker.example", "--bind", "0.0.0.0",
                   *root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    conf = (tmp_path / "b2" / "mosquitto.conf").read_text()
    assert "listener 8883 0.0.0.0\n" in conf and "listener 1883 0.0.0.0\n" in conf, conf
    assert "listeners on 0.0.0.0 (every interface)" in r.stderr
    server = x509.load_pem_x509_certificate((tmp_path / "b2" / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "broker.example" in names.get_values_for_type(x509.DNSName)
    assert "--bind ADDR" in _provision(tmp_path, "broker-config", "--help").stdout


def _need_root() -> None:
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("CI=true runs as root: mosquitto started as root is what this test is about")
        pytest.skip("needs root: mosquitto drops privileges only when started as root")


def test_the_printed_mosquitto_command_runs_as_root_and_admits_the_rendered_credentials(
    tmp_path: Path,
) -> None:
    """``mosquitto -c ...`` exactly as ``broker-config`` printed it, started as root (as CI
    and a fresh Debian box run it): mosquitto drops to user "mosquitto" and must still read
    the password file and server key; it listens on the printed address only."""
    _need_root()
    env = _shell_env("mosquitto")
    fleet = Fleet.init(tmp_path / "fleet")
    fleet.add_device("acme", "a", tmp_path / "bundle-a", broker_host="127.0.0.1", port=0, tls_port=0)
    port, tls_port = free_port(), free_port()
    out = Path(tempfile.mkdtemp(prefix="et-broker-"))  # tmp_path's parents are root's 0700 dirs
    proc = None
    try:
        out.chmod(0o755)
        r = _provision(tmp_path, "broker-config", "--out", str(out), "--port", str(port),
                       "--tls-port", str(tls_port))  # fmt: skip
        assert r.returncode == 0, r.stderr
        command = _printed(r.stdout, "mosquitto")
        log = out / "mosquitto.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen(command, shell=True, env=env, stdout=f, stderr=f, start_new_session=True)
        _wait_listening(proc, [port, tls_port], log)
        assert _listening(port) == {"127.0.0.1"} and _listening(tls_port) == {"127.0.0.1"}
        time.sleep(0.3)  # mosquitto reads the password file after it drops to its user
        assert proc.poll() is None, log.read_text()
        broker: Any = SimpleNamespace(port=port, tls_port=tls_port)
        ingest_pw = (tmp_path / "fleet" / "et-ingest.password").read_text()
        ingest = Client(broker, user="et-ingest", password=ingest_pw)
        device = Client(broker, user="acme/a", password=_bundle_password(tmp_path / "bundle-a"))
        tls = Client(broker, bundle=tmp_path / "bundle-a", client_id="et-acme-a-tls")
        assert ingest.admitted and device.admitted and tls.admitted, log.read_text()
        assert not Client(broker, user="et-ingest", password="wrong").admitted
        ingest.sub("et/+/+/up")
        tls.pub("et/acme/a/up", b"over tls")
        time.sleep(0.3)
        assert ingest.got == [("et/acme/a/up", b"over tls")]
        for c in (ingest, device, tls):
            c.close()
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        shutil.rmtree(out, ignore_errors=True)


def test_broker_config_as_root_says_when_the_broker_user_cannot_read_the_files(tmp_path: Path) -> None:
    _need_root()
    need_binary("mosquitto")  # its Debian package makes the user "mosquitto"
    Fleet.init(tmp_path / "fleet")
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    r = _provision(tmp_path, "broker-config", "--out", str(hidden / "broker"))
    assert r.returncode == 2 and f"{hidden}: mosquitto, started as root, runs as 'mosquitto'" in r.stderr
    assert "--broker-user root" in r.stderr and not (hidden / "broker").exists()
    r = _provision(tmp_path, "broker-config", "--out", str(hidden / "broker"), "--broker-user", "nobody-here")
    assert r.returncode == 2 and "broker user 'nobody-here' does not exist" in r.stderr
    r = _provision(tmp_path, "broker-config", "--out", str(hidden / "broker"), "--broker-user", "root")
    assert r.returncode == 0 and "\nuser root\n" in (hidden / "broker" / "mosquitto.conf").read_text()


def test_model_push_is_silent_on_stderr_after_success_and_a_lost_broker_still_warns(
    fleet_broker: FleetBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    from edge_tier.model.manifest import DEFAULT_MANIFEST
    from edge_tier.mqtt import MqttBridge, MqttSettings

    _, broker, pw = fleet_broker
    r = _provision(tmp_path, "model", "push", "acme", "a", str(DEFAULT_MANIFEST), "--port", str(broker.port))
    assert r.returncode == 0 and "model" in r.stdout, r.stderr
    assert r.stderr == "", "a clean disconnect after success is no news"

    async def lose_the_broker() -> None:
        settings = MqttSettings(port=broker.port, username="et-provision", password=pw["et-provision"])
        bridge = MqttBridge(settings, client_id="et-provision", clean=True, name="probe")
        await bridge.start()
        try:
            await asyncio.wait_for(bridge.connected.wait(), 10)
            await asyncio.to_thread(broker.stop)
            while bridge.connected.is_set():
                await asyncio.wait_for(bridge.wait_state_change(), 10)
        finally:
            await bridge.stop()

    with caplog.at_level(logging.WARNING, logger="edge_tier.mqtt"):
        asyncio.run(lose_the_broker())
    assert [r.getMessage() for r in caplog.records].count("probe: disconnected") == 1
    broker.start()  # the fixture stops it at the end
