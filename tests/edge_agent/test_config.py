"""Tests for the agent's and the ingest's config loading, and ``edge-agent status``.

A bad config must stop the process with a message naming the file and the dotted field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_ingest.config import load_ingest_config
from edge_agent.cli import main as agent_main
from edge_agent.config import AgentConfig, EvictionPolicy, load_agent_config
from edge_agent.store import NewRecord, RecordKind, Store
from edge_tier.config import ConfigError
from edge_tier.wire import Dtype


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.upper().startswith(("EDGE_AGENT_", "CLOUD_INGEST_")):
            monkeypatch.delenv(key)
    yield


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def config_error(load, path: Path) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        load(path)
    return str(info.value)


# -- agent ------------------------------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    cfg = load_agent_config(None)
    assert cfg == AgentConfig()
    assert cfg.store.budget_bytes == 256 * 1024 * 1024
    assert cfg.store.policy is EvictionPolicy.LOWEST_SCORE
    assert cfg.store.synchronous == "FULL"
    assert cfg.mqtt.port == 1883 and cfg.device.device == "device-1"


def test_toml_values_are_applied(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        f"""
log_level = "DEBUG"
[device]
tenant = "acme"
device = "pump-7"
[mqtt]
host = "broker.local"
port = 8883
[store]
path = "{tmp_path / "q.db"}"
budget_bytes = 33554432
policy = "oldest"
synchronous = "normal"
[uplink]
window = 4
frame_max_bytes = 65536
[endpoint]
metadata_allow = ["site"]
""",
    )
    cfg = load_agent_config(p)
    assert (cfg.device.tenant, cfg.device.device) == ("acme", "pump-7")
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker.local", 8883)
    assert cfg.store.path == tmp_path / "q.db"
    assert cfg.store.budget_bytes == 33554432
    assert cfg.store.policy is EvictionPolicy.OLDEST
    assert cfg.store.synchronous == "NORMAL"
    assert (cfg.uplink.window, cfg.uplink.frame_max_bytes) == (4, 65536)
    assert cfg.endpoint.metadata_allow == ["site"]
    assert cfg.log_level == "DEBUG"


def test_env_beats_the_file_and_keeps_the_rest_of_the_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = write(tmp_path, '[mqtt]\nhost = "broker.local"\nport = 8883\n')
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", "1999")
    cfg = load_agent_config(p)
    assert cfg.mqtt.port == 1999
    assert cfg.mqtt.host == "broker.local"
    assert load_agent_config(None).mqtt.port == 1999


@pytest.mark.parametrize(
    "text, field",
    [
        ("[store]\nbogus = 1\n", "store.bogus"),
        ("[nope]\nx = 1\n", "nope"),
        ("colour = 'red'\n", "colour"),
        # bad values
        ("[store]\nbudget_bytes = -1\n", "store.budget_bytes"),
        ("[store]\nbudget_bytes = 1000\n", "store.budget_bytes"),
        ("[store]\npolicy = 'random'\n", "store.policy"),
        ("[store]\nsynchronous = 'OFF'\n", "store.synchronous"),
        ("[device]\ndevice = 'a/b'\n", "device.device"),
        ("[device]\ntenant = ''\n", "device.tenant"),
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ("[uplink]\ncompress = 'lz4'\n", "uplink.compress"),
        ("[endpoint]\nport = 'http'\n", "endpoint.port"),
        ("[prefilter]\nupload_dtype = 'int4'\n", "prefilter.upload_dtype"),
    ],
)
def test_unknown_key_or_bad_value_is_refused_naming_file_and_field(
    tmp_path: Path, text: str, field: str
) -> None:
    p = write(tmp_path, text)
    msg = config_error(load_agent_config, p)
    assert str(p) in msg
    assert f"{field}:" in msg


def test_missing_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    p = tmp_path / "nowhere" / "agent.toml"
    msg = config_error(load_agent_config, p)
    assert str(p) in msg and "not found" in msg


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "[store\nbudget_bytes = = 3\n")
    msg = config_error(load_agent_config, p)
    assert str(p) in msg and "TOML" in msg


def test_budget_must_hold_twice_the_send_window(tmp_path: Path) -> None:
    need = 2 * 8 * 1048576
    uplink = "[uplink]\nwindow = 8\nframe_max_bytes = 1048576\n"
    p = write(tmp_path, f"[store]\nbudget_bytes = {need - 1}\n{uplink}")
    msg = config_error(load_agent_config, p)
    assert str(p) in msg
    assert "store.budget_bytes" in msg and "uplink.window" in msg and "uplink.frame_max_bytes" in msg
    assert str(need) in msg
    p = write(tmp_path, f"[store]\nbudget_bytes = {need}\n{uplink}")
    assert load_agent_config(p).store.budget_bytes == need


def test_bad_env_value_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "[store]\npolicy = 'oldest'\n")
    monkeypatch.setenv("EDGE_AGENT_STORE__BUDGET_BYTES", "-5")
    msg = config_error(load_agent_config, p)
    assert "store.budget_bytes" in msg
    assert "EDGE_AGENT_STORE__BUDGET_BYTES" in msg


# -- ingest -----------------------------------------------------------------------------------


def test_ingest_defaults_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_ingest_config(None)
    assert cfg.nats.servers == ["nats://127.0.0.1:4222"] and cfg.mqtt.port == 1883
    p = write(
        tmp_path,
        """
[nats]
servers = ["nats://a:4222", "nats://b:4222"]
[mqtt]
host = "broker"
port = 8883
[ingest]
instance = "3"
shared_group = "g"
[streams]
replicas = 3
""",
        "ingest.toml",
    )
    cfg = load_ingest_config(p)
    assert cfg.nats.servers == ["nats://a:4222", "nats://b:4222"]
    assert (cfg.ingest.instance, cfg.ingest.shared_group, cfg.streams.replicas) == ("3", "g", 3)
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker", 8883)
    monkeypatch.setenv("CLOUD_INGEST_MQTT__PORT", "1999")
    cfg = load_ingest_config(p)
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker", 1999)
    monkeypatch.setenv("CLOUD_INGEST_WORKER__MAX_BATCH", "64")
    monkeypatch.setenv("CLOUD_INGEST_WORKER__TENANT_RATES", '{"acme": 500}')
    cfg = load_ingest_config(p)
    assert cfg.worker.max_batch == 64 and cfg.worker.tenant_rates == {"acme": 500}
    assert cfg.worker.manifest.name == "manifest.json" and cfg.worker.manifest.exists()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[ingest]\nbogus = 1\n", "ingest.bogus:"),
        ("[streams]\nreplicas = 9\n", "streams.replicas:"),
        ("[nats]\nconnect_timeout_s = 0\n", "nats.connect_timeout_s:"),
        ("[worker]\ntenants = ['a/b']\n", "worker.tenants:"),
        ("[worker]\nmax_batch = 0\n", "worker.max_batch:"),
        ("[worker]\nbackoff_s = []\n", "worker.backoff_s:"),
        ("[worker]\ninstance = 'w 1'\n", "worker.instance:"),
        ("[worker]\ntenant_rate = -5\n", "worker.tenant_rate:"),
        ("[ingest\n", "TOML"),
    ],
)
def test_ingest_bad_config_names_file_and_field(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text, "ingest.toml")
    msg = config_error(load_ingest_config, p)
    assert str(p) in msg and needle in msg


def test_ingest_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "ingest.toml"
    msg = config_error(load_ingest_config, p)
    assert str(p) in msg and "not found" in msg


# -- edge-agent status ------------------------------------------------------------------------

KIND = RecordKind("vib", Dtype.FLOAT32, 1024)  # 4160 bytes per record


def _queue_with_history(tmp_path: Path) -> tuple[Path, Path]:
    db = tmp_path / "q.db"
    p = write(
        tmp_path,
        f"""
[device]
tenant = "acme"
device = "pump-7"
[store]
path = "{db}"
budget_bytes = 65536
policy = "oldest"
[uplink]
window = 8
frame_max_bytes = 4096
""",
    )
    cfg = load_agent_config(p)
    store = Store(cfg.store, frame_max_records=1)
    try:
        feats = b"\0" * 4096
        for _ in range(4):
            store.append_many([(KIND, [NewRecord(feats, 0.5) for _ in range(5)])])  # 20 > 15 fit
        frame = store.next_frame(2, 1 << 20)
        assert frame is not None
        store.finish_frame(frame.first_seq, frame.last_seq)
        st = store.stats()
        assert (st.records, st.evictions, st.delivered) == (13, {"oldest": 5}, 2)
    finally:
        store.close()
    return p, db


def test_status_prints_depth_bytes_and_evictions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p, db = _queue_with_history(tmp_path)
    assert agent_main(["status", "--config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "acme/pump-7" in out and str(db) in out
    assert f"13 records, {13 * 4160} of 65536 bytes" in out
    assert "oldest=5" in out
    assert "delivered     2 records" in out
    assert "corrupt" not in out


def test_status_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p, _ = _queue_with_history(tmp_path)
    assert agent_main(["status", "--config", str(p), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["records"] == 13 and d["bytes"] == 13 * 4160 and d["budget_bytes"] == 65536
    assert d["evictions"] == {"oldest": 5} and d["delivered"] == 2
    assert d["oldest_age_s"] is not None and d["oldest_age_s"] >= 0


@pytest.mark.parametrize("case", ["bad-value", "missing-config", "missing-queue"])
def test_status_with_a_bad_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    if case == "bad-value":
        p = write(tmp_path, "[store]\npolicy = 'random'\n")
        needles = [str(p), "store.policy"]
    elif case == "missing-config":
        p = tmp_path / "absent.toml"
        needles = [str(p), "not found"]
    else:
        p = write(tmp_path, f"[store]\npath = '{tmp_path / 'none.db'}'\n")
        needles = [str(tmp_path / "none.db"), "no queue file"]
    assert agent_main(["status", "--config", str(p)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("edge-agent: ")
    for needle in needles:
        assert needle in captured.err


def test_status_on_a_damaged_queue_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "q.db"
    db.write_bytes(b"this is not a database" * 1000)
    p = write(tmp_path, f"[store]\npath = '{db}'\n")
    assert agent_main(["status", "--config", str(p)]) == 2
    assert str(db) in capsys.readouterr().err
