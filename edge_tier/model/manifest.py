"""Loading a model named by its manifest (``manifest.json``, beside the models it names): checked.

Both tiers load their model through :func:`load_model`, which reads the manifest
(``edge_tier.model.schema``: every field checked, version 1 read as 2), finds the
entry (``prefilter`` or ``tier2``), and returns the file's bytes only if their sha256
matches the manifest. Every failure says which file, which field and why, so a device
or worker with a missing, corrupt or replaced model stops at start instead of running
the wrong thing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Generic, Literal, TypeVar, overload

from edge_tier.errors import ManifestError
from edge_tier.model.schema import Manifest, PrefilterSpec, Tier2Spec, read_manifest

# The shipped models: the repository's models/, installed as this data package (pyproject.toml).
DEFAULT_MANIFEST = Path(str(files("edge_tier.model.shipped") / "manifest.json"))

S = TypeVar("S", PrefilterSpec, Tier2Spec)


@dataclass(frozen=True)
class ModelFile(Generic[S]):
    """One verified model: its manifest entry, the whole manifest, and the file's bytes."""

    path: Path
    data: bytes
    spec: S
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels_of(self.spec)


@overload
def load_model(manifest_path: str | Path, key: Literal["prefilter"]) -> ModelFile[PrefilterSpec]: ...
@overload
def load_model(manifest_path: str | Path, key: Literal["tier2"]) -> ModelFile[Tier2Spec]: ...
def load_model(manifest_path: str | Path, key: str) -> ModelFile[PrefilterSpec] | ModelFile[Tier2Spec]:
    """The model named by ``manifest[key]``, after checking its sha256."""
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    spec = getattr(manifest, key)
    if spec is None:
        raise ManifestError(f"{manifest_path}: names no {key} model (no {key!r} entry)")
    path = manifest_path.parent / spec.file
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the {key} model ({e.strerror})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256:
        raise ManifestError(
            f"{path}: sha256 {actual[:16]}... does not match the manifest's "
            f"{spec.sha256[:16]}... (corrupt or replaced file); refusing to load it"
        )
    return ModelFile(path, data, spec, manifest)
