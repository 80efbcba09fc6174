"""The agent's footprint (issue 15): each command imports only its own modules, the daemon
nothing it needs only for an optional feature, and the prefilter's features no numpy.ma.

The imports are checked in a fresh interpreter: this test process has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge_tier.model.features import _row_median


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m in names or m.startswith(tuple(f"{n}." for n in names)))


# Never in the agent: the cloud side, the provisioning CLI, test tools.
CLOUD = ("cloud_ingest", "edge_provision", "onnxruntime", "nats", "hypothesis")


def test_cli_imports_no_command() -> None:
    # `edge-agent --help`, `install`: no numpy, pydantic, aiohttp, daemon or model tool
    heavy = (*CLOUD, "numpy", "pydantic", "aiohttp", "cryptography", "ai_edge_litert", "paho")
    mine = ("edge_agent.daemon", "edge_agent.model_tool", "edge_agent.store", "edge_agent.config")
    assert _loaded(_modules_after("import edge_agent.cli"), heavy + mine) == []


def test_daemon_imports_no_optional_feature() -> None:
    # cryptography only with [control] signing_key; the model tool only for `edge-agent model`;
    # the rescue only after a failed integrity check; the simulator's HTTP client never
    optional = (*CLOUD, "cryptography", "bcrypt", "edge_agent.model_tool", "edge_agent.rescue",
                "edge_agent.simulate", "edge_agent.sqlite_pages")  # fmt: skip
    assert _loaded(_modules_after("import edge_agent.cli, edge_agent.daemon"), optional) == []


def test_spectrum_features_import_no_masked_arrays() -> None:
    code = (
        "import numpy as np\nfrom edge_tier.model.features import spectrum_features\n"
        "spectrum_features(np.random.default_rng(0).standard_normal((4, 1024)))"
    )
    assert "numpy.ma" not in _modules_after(code)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 127, 128, 129, 384])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_median_is_np_median_to_the_bit(n: int, dtype: type) -> None:
    a: np.ndarray = np.random.default_rng(n).standard_normal((40, n)).astype(dtype)
    a[3, n // 2] = np.nan
    a[7, 0] = np.inf
    a[9, -1] = -np.inf
    a[11] = 1.0
    want = np.median(a, axis=1, keepdims=True)
    got = _row_median(a.copy())
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True)
