"""The unit files: `systemd-analyze verify` finds nothing wrong, and the agent's unit is
hardened to an exposure of at most 2.5 (`systemd-analyze security --offline=true`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need_binary

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def installed(unit: Path, dst: Path, instance: str = "") -> Path:
    """The unit as `edge-agent install` writes it: ExecStart at the installed console script."""
    bindir = Path(sys.executable).parent
    text = unit.read_text()
    for script in ("edge-agent", "cloud-ingest"):
        real = shutil.which(script, path=str(bindir)) or shutil.which(script)
        assert real, f"{script} is not installed (pip install -e .)"
        text = text.replace(f"/usr/local/bin/{script}", real)
    out = dst / unit.name.replace("@.", f"@{instance}.") if instance else dst / unit.name
    out.write_text(text)
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in UNITS.glob("*.service")))
def test_every_unit_verifies_without_a_word(tmp_path: Path, name: str) -> None:
    analyze = need_binary("systemd-analyze")
    unit = installed(UNITS / name, tmp_path, instance="1" if "@." in name else "")
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in UNITS.glob("*.service")))
def test_units_are_hardened(tmp_path: Path, name: str) -> None:
    analyze = need_binary("systemd-analyze")
    unit = installed(UNITS / name, tmp_path, instance="1" if "@." in name else "")
    r = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout


def test_the_agent_unit_is_notify_with_a_watchdog() -> None:
    text = (UNITS / "edge-agent.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=edge-agent",
    ):
        assert re.search(rf"^{re.escape(line)}", text, re.M), line
