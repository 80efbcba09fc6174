"""What the tests, the benchmarks and the demo share: configs for a local agent and ingest,
waiting on a condition, and reading a process's CPU time. One copy, above the services.

The configs are the small, fast-reconnecting settings a loopback run wants; callers override
any section with keyword arguments (``store={"budget_bytes": ...}`` merges into ``[store]``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_tier.wire import Dtype, encode_frame_parts

__all__ = [
    "DEVICE",
    "TENANT",
    "CpuMeter",
    "agent_config",
    "cpu_seconds",
    "ingest_config",
    "percentiles_ms",
    "temp_dir",
    "wait_until",
]

TENANT = "acme"
DEVICE = "press-7"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _merged(cfg: dict[str, Any], sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def agent_config(workdir: Path, mqtt_port: int, **sections: dict[str, Any]) -> dict[str, Any]:
    """An agent's config as a dict (the TOML's tables): queue in ``workdir``, broker on loopback."""
    cfg: dict[str, Any] = {
        "log_level": "INFO",  # the readiness line is logged at INFO
        "device": {"tenant": TENANT, "device": DEVICE},
        "mqtt": {"port": mqtt_port, "backoff_min_s": 0.05, "backoff_max_s": 0.5},
        "store": {"path": str(workdir / "queue.db"), "budget_bytes": 16 * 1024 * 1024},
        "uplink": {
            "frame_max_records": 100,
            "frame_max_bytes": 256 * 1024,
            "window": 4,
            "receipt_timeout_s": 2.0,
            "status_interval_s": 0.5,
        },
    }
    return _merged(cfg, sections)


def ingest_config(mqtt_port: int, nats_url: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """An ingest's config as a dict: MQTT and NATS on loopback."""
    cfg: dict[str, Any] = {
        "log_level": "INFO",
        "mqtt": {"port": mqtt_port, "backoff_min_s": 0.05, "backoff_max_s": 0.5},
        "nats": {"servers": [nats_url]},
        "ingest": {"publish_timeout_s": 2.0},
    }
    return _merged(cfg, sections)


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``pred`` until it holds; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds; 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat(5)


class CpuMeter:
    """CPU seconds each named process spent between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self._t0: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._t0 = {k: cpu_seconds(p) for k, p in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used = {k: cpu_seconds(p) - self._t0[k] for k, p in self.pids.items()}
        return self.used


def percentiles_ms(seconds: np.ndarray) -> dict[str, float]:
    """p50, p99 and max of durations in seconds, as milliseconds; empty for no values."""
    if seconds.size == 0:
        return {}
    p50, p99 = np.percentile(seconds, [50, 99])
    return {"p50": float(p50) * 1000, "p99": float(p99) * 1000, "max": float(seconds.max()) * 1000}


@contextlib.contextmanager
def temp_dir(base: Path | None, prefix: str, keep: bool = False) -> Iterator[Path]:
    """A fresh directory under ``base`` (the system's temp dir if None), removed after unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=base))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def upload_frame(tenant: str, device: str, first: int, prev: int, features: np.ndarray) -> bytes:
    """An upload frame of records ``first ..`` (one a row of ``features``, float32), as a device sends."""
    x = np.ascontiguousarray(features, dtype="<f4")
    n, now = len(x), int(time.time() * 1000)
    return encode_frame_parts(
        tenant=tenant,
        device=device,
        prev_seq=prev,
        stream="vibration",
        model="pf",
        model_version="1",
        schema_version=1,
        created_ms=now,
        dtype=Dtype.FLOAT32,
        dim=x.shape[1],
        seqs=range(first, first + n),
        scores=[0.5] * n,
        times_ms=[now] * n,
        feature_blobs=[row.tobytes() for row in x],
    )
