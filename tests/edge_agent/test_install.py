"""edge-agent install/uninstall into a scratch root: files, modes, the unit, and the queue kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import load_agent_config
from edge_provision.fleet import Fleet
from tests.conftest import need_binary


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_install_puts_the_bundle_in_place_and_uninstall_keeps_the_queue(tmp_path: Path) -> None:
    fleet = Fleet.init(tmp_path / "fleet")
    fleet.add_device(
        "acme", "press-7", tmp_path / "bundle", broker_host="mqtt.example", port=1883, tls_port=8883
    )
    root = tmp_path / "root"
    r = cli("install", "--bundle", str(tmp_path / "bundle"), "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "now run: systemctl enable --now edge-agent.service" in r.stdout  # no systemd at this root
    etc = root / "etc" / "edge-agent"
    assert (etc / "device.key").stat().st_mode & 0o777 == 0o600
    assert (etc / "agent.toml").stat().st_mode & 0o777 == 0o644
    cfg = load_agent_config(etc / "agent.toml")
    assert (
        cfg.mqtt.tls_cert == "/etc/edge-agent/device.pem"
        and str(cfg.store.path) == "/var/lib/edge-agent/queue.db"
    )
    assert (cfg.device.tenant, cfg.device.device, cfg.mqtt.host) == ("acme", "press-7", "mqtt.example")
    assert cfg.control.signing_key == Path("/etc/edge-agent/signing.pub")
    assert (etc / "signing.pub").read_bytes() == (tmp_path / "fleet" / "signing.pub").read_bytes()
    unit = (root / "etc" / "systemd" / "system" / "edge-agent.service").read_text()
    assert (
        "ExecStart=/usr/local/bin" not in unit
        and "edge-agent run --config /etc/edge-agent/agent.toml" in unit
    )
    analyze = need_binary("systemd-analyze")
    unit_path = root / "etc/systemd/system/edge-agent.service"
    v = subprocess.run([analyze, "verify", str(unit_path)], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and not (v.stdout + v.stderr).strip(), v.stdout + v.stderr
    queue = root / "var" / "lib" / "edge-agent"
    queue.mkdir(parents=True)
    (queue / "queue.db").write_bytes(b"records not yet delivered")
    assert cli("uninstall", "--root", str(root)).returncode == 0
    assert not etc.exists() and not (root / "etc/systemd/system/edge-agent.service").exists()
    assert (queue / "queue.db").exists()
    assert cli("uninstall", "--root", str(root), "--purge").returncode == 0
    assert not queue.exists()


def test_an_incomplete_bundle_is_refused_saying_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "agent.toml").write_text("[device]\n")
    r = cli("install", "--bundle", str(tmp_path / "bundle"), "--root", str(tmp_path / "root"))
    assert r.returncode == 2 and "missing ca.pem, device.pem, device.key" in r.stderr
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("flag", ["--purge", ""])
def test_uninstall_of_nothing_is_harmless(tmp_path: Path, flag: str) -> None:
    assert cli("uninstall", "--root", str(tmp_path), *([flag] if flag else [])).returncode == 0
