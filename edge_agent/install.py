"""``edge-agent install --bundle DIR [--root ROOT]`` and ``uninstall [--purge]``.

Puts a device bundle (from ``edge-provision device add``) where the systemd unit expects
it: ``/etc/edge-agent`` (config and certificates 0644, the device key 0600, read by the
service as a systemd credential), the unit in ``/etc/systemd/system`` with ExecStart at
this installation's ``edge-agent``, and the queue in ``/var/lib/edge-agent``. Where
systemd runs (and ROOT is ``/``) it enables and starts the unit; elsewhere it prints
the commands to run. ``uninstall`` stops and removes the unit and config and keeps the
queue (records not yet delivered) unless told to ``--purge``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

from edge_agent.errors import AgentError

UNIT = "edge-agent.service"
SHIPPED_UNIT = Path(__file__).resolve().parents[1] / "systemd" / UNIT


class InstallError(AgentError):
    """The bundle or the target cannot be installed; the message says what and where."""


def _systemd_runs(root: Path) -> bool:
    return (
        root == Path("/") and Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None
    )


def _run_or_print(root: Path, commands: list[list[str]]) -> list[str]:
    if _systemd_runs(root):
        for cmd in commands:
            subprocess.run(cmd, check=True)
        return []
    return [" ".join(c) for c in commands]


def install(bundle: Path, root: Path = Path("/")) -> list[str]:
    """Install; the commands still to run (empty when systemd ran them)."""
    need = ["agent.toml", "ca.pem", "device.pem", "device.key"]
    missing = [n for n in need if not (bundle / n).is_file()]
    if missing:
        raise InstallError(f"{bundle}: not a device bundle (missing {', '.join(missing)})")
    try:
        cfg = tomllib.loads((bundle / "agent.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InstallError(f"{bundle / 'agent.toml'}: {e}") from None
    etc = root / "etc" / "edge-agent"
    etc.mkdir(parents=True, exist_ok=True)
    public = ["ca.pem", "device.pem"] + (["signing.pub"] if (bundle / "signing.pub").is_file() else [])
    for name in public:
        shutil.copyfile(bundle / name, etc / name)
        (etc / name).chmod(0o644)
    key = etc / "device.key"
    key.touch(mode=0o600)
    key.chmod(0o600)
    key.write_bytes((bundle / "device.key").read_bytes())
    mqtt = cfg.setdefault("mqtt", {})
    mqtt.update(tls_ca="/etc/edge-agent/ca.pem", tls_cert="/etc/edge-agent/device.pem")
    mqtt["tls_key"] = "/etc/edge-agent/device.key"  # the unit hands it over as a credential
    if "signing.pub" in public:  # the fleet key that model updates must be signed with
        cfg.setdefault("control", {})["signing_key"] = "/etc/edge-agent/signing.pub"
    cfg.setdefault("store", {}).setdefault("path", "/var/lib/edge-agent/queue.db")
    (etc / "agent.toml").write_text(tomli_w.dumps(cfg))
    (etc / "agent.toml").chmod(0o644)
    exe = shutil.which("edge-agent", path=str(Path(sys.executable).parent)) or shutil.which("edge-agent")
    if exe is None:
        raise InstallError("edge-agent is not on PATH nor beside this Python: install the package first")
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    (units / UNIT).write_text(SHIPPED_UNIT.read_text().replace("/usr/local/bin/edge-agent", exe))
    return _run_or_print(root, [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT]])


def uninstall(root: Path = Path("/"), *, purge: bool = False) -> list[str]:
    """Stop and remove the unit and config; the queue stays unless ``purge``."""
    todo = _run_or_print(root, [["systemctl", "disable", "--now", UNIT]])
    (root / "etc" / "systemd" / "system" / UNIT).unlink(missing_ok=True)
    shutil.rmtree(root / "etc" / "edge-agent", ignore_errors=True)
    if purge:
        # DynamicUser keeps state under /var/lib/private, reached through a symlink
        for d in (root / "var" / "lib" / "edge-agent", root / "var" / "lib" / "private" / "edge-agent"):
            if d.is_symlink():
                d.unlink()
            else:
                shutil.rmtree(d, ignore_errors=True)
    return todo + _run_or_print(root, [["systemctl", "daemon-reload"]])
