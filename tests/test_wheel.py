"""The wheel as a user installs it: built from the tree, installed into an empty directory
(not the editable checkout), then imported from elsewhere. It must carry every package of
the tree, only the product's top-level names (no ``models``, no ``tests``), and find the
shipped models through its own data package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = {"edge_tier", "edge_agent", "cloud_ingest", "edge_provision", "edge_tier_harness"}
NOT_SHIPPED = {"models/build"}  # the build scripts stay in the repository


def _tree_packages() -> set[str]:
    """Every directory of the product's trees with an ``__init__.py``, as a dotted name;
    ``models/`` is the data package edge_tier.model.shipped."""
    found = set()
    for top in [*TOP_LEVEL, "models"]:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or any(rel.startswith(n) for n in NOT_SHIPPED):
                continue
            found.add(
                rel.replace("models", "edge_tier/model/shipped", 1) if rel.startswith("models") else rel
            )
    return {p.replace("/", ".") for p in found}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache")
    shutil.copytree(ROOT, src / "tree", ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    # No build isolation: the test environment's setuptools builds it, nothing is downloaded.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=src / "tree",
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("edge_tier-*.whl")
    return whl


def test_wheel_holds_every_package_and_only_product_names(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == TOP_LEVEL
    shipped = {"/".join(n.split("/")[:-1]).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    missing = _tree_packages() - shipped
    assert not missing, f"packages of the tree not in the wheel (add them to pyproject.toml): {missing}"


def test_installed_wheel_finds_the_shipped_models(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import json, edge_tier.model.manifest as m\n"
        "man = json.loads(m.DEFAULT_MANIFEST.read_text())\n"
        "keys = ('prefilter', 'tier2')\n"
        "files = [str(m.DEFAULT_MANIFEST.parent / man[k]['file']) for k in keys]\n"
        "[m.load_model(m.DEFAULT_MANIFEST, k) for k in keys]  # each file's sha256 checked\n"
        "print(json.dumps({'manifest': str(m.DEFAULT_MANIFEST), 'files': files}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    # -I would drop PYTHONPATH; -S keeps the editable checkout's path hook out of sys.path.
    run = subprocess.run(
        [sys.executable, "-S", "-c", f"import site, sys\nsys.path.extend(site.getsitepackages())\n{probe}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["manifest"].startswith(str(target)), found
    assert found["files"] and all(Path(f).is_file() for f in found["files"]), found
    assert not (target / "models").exists()
