"""The model manifest (``manifest.json``, beside the models it names): each model file, checked.

Both tiers load their model through :func:`load_model`, which reads the
manifest, finds the entry (``prefilter`` or ``tier2``), and returns the file's
bytes only if their sha256 matches the manifest. Every failure says which file
and why, so a device or worker with a missing, corrupt or replaced model stops
at start instead of running the wrong thing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from edge_tier.errors import ManifestError

# The shipped models: the repository's models/, installed as this data package (pyproject.toml).
DEFAULT_MANIFEST = Path(str(files("edge_tier.model.shipped") / "manifest.json"))


@dataclass(frozen=True)
class ModelFile:
    """One verified model: its manifest entry, the whole manifest, and the file's bytes."""

    path: Path
    data: bytes
    entry: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.entry.get("version", self.manifest.get("version", "")))

    @property
    def labels(self) -> list[str]:
        return [str(x) for x in self.manifest.get("labels", [])]


def load_model(manifest_path: str | Path, key: str) -> ModelFile:
    """The model named by ``manifest[key]``, after checking its sha256."""
    manifest_path = Path(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
        entry = manifest[key]
        path = manifest_path.parent / entry["file"]
        expected = str(entry["sha256"])
    except FileNotFoundError:
        raise ManifestError(f"{manifest_path}: model manifest not found") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{manifest_path}: not a usable model manifest ({e!r})") from None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the {key} model ({e.strerror})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ManifestError(
            f"{path}: sha256 {actual[:16]}... does not match the manifest's "
            f"{expected[:16]}... (corrupt or replaced file); refusing to load it"
        )
    return ModelFile(path, data, entry, manifest)
