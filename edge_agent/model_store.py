"""Model updates on the device's disk: chunks as they arrive, verified models, the active one.

```
models/incoming/{sha256}/{index}            chunks received so far, each checked on arrival
models/{sha256}/manifest.json, prefilter.tflite   a complete model, checked whole
models/active.json                          {"current": sha256, "previous": sha256 | null}
```

``active.json`` is replaced atomically, so a power cut during a swap leaves the old or
the new model active, never neither. The previous model is kept for a rollback; older
ones are removed. Chunks on disk survive a restart, so a transfer resumes where it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from edge_agent.files import write_atomic
from edge_tier.control import ModelRefused, ModelUpdate

log = logging.getLogger(__name__)
MODEL_FILE = "prefilter.tflite"


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._active = root / "active.json"

    # -- which model is active -------------------------------------------------------------

    def _pointer(self) -> dict[str, str | None]:
        try:
            data = json.loads(self._active.read_text())
            return {"current": data.get("current"), "previous": data.get("previous")}
        except (OSError, ValueError, AttributeError):
            return {"current": None, "previous": None}

    def manifest(self, sha256: str | None) -> Path | None:
        path = self.root / sha256 / "manifest.json" if sha256 else None
        return path if path is not None and path.exists() else None

    @property
    def current(self) -> str | None:
        return self._pointer()["current"]

    def candidates(self) -> list[tuple[str, Path]]:
        """The installed models to try at start, newest first: (sha256, manifest path)."""
        p = self._pointer()
        out = []
        for sha in (p["current"], p["previous"]):
            path = self.manifest(sha)
            if sha and path is not None:
                out.append((sha, path))
        return out

    def activate(self, sha256: str) -> None:
        """Make ``sha256`` current; the current one becomes previous, older ones go."""
        p = self._pointer()
        previous = p["current"] if p["current"] != sha256 else p["previous"]
        write_atomic(self._active, json.dumps({"current": sha256, "previous": previous}).encode())
        keep = {sha256, previous, "incoming"}
        for d in self.root.iterdir():
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def demote(self, sha256: str) -> None:
        """``sha256`` failed to load: the previous model (or the configured one) takes over."""
        p = self._pointer()
        if p["current"] == sha256:
            write_atomic(self._active, json.dumps({"current": p["previous"], "previous": None}).encode())
        shutil.rmtree(self.root / sha256, ignore_errors=True)

    # -- an update in transfer ----------------------------------------------------------------

    def _chunk_dir(self, u: ModelUpdate) -> Path:
        return self.incoming / u.sha256

    def chunks_have(self, u: ModelUpdate) -> set[int]:
        """Indices of the chunks already on disk and intact (a damaged one is removed)."""
        d = self._chunk_dir(u)
        have: set[int] = set()
        if not d.is_dir():
            return have
        for f in d.iterdir():
            if not f.name.isdigit() or int(f.name) >= len(u.chunks):
                f.unlink(missing_ok=True)  # a .tmp left by a crash, or not ours
                continue
            i = int(f.name)
            if hashlib.sha256(f.read_bytes()).hexdigest() == u.chunks[i]:
                have.add(i)
            else:
                log.warning("model %s chunk %d on disk is damaged; fetching it again", u.version, i)
                f.unlink(missing_ok=True)
        return have

    def put_chunk(self, u: ModelUpdate, index: int, data: bytes) -> None:
        if not 0 <= index < len(u.chunks):
            raise ModelRefused(f"model {u.version}: chunk {index} of {len(u.chunks)} does not exist")
        start, end = u.chunk_range(index)
        if len(data) != end - start or hashlib.sha256(data).hexdigest() != u.chunks[index]:
            raise ModelRefused(
                f"model {u.version}: chunk {index} ({len(data)} bytes) does not match its signed sha256"
            )
        d = self._chunk_dir(u)
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / str(index), data)

    def install(self, u: ModelUpdate) -> Path:
        """Join the chunks into ``models/{sha256}/`` (checked whole); its manifest's path."""
        d = self._chunk_dir(u)
        data = b"".join((d / str(i)).read_bytes() for i in range(len(u.chunks)))
        if hashlib.sha256(data).hexdigest() != u.sha256 or len(data) != u.bytes:
            shutil.rmtree(d, ignore_errors=True)
            raise ModelRefused(f"model {u.version}: the joined chunks do not match the signed sha256")
        slot = self.root / u.sha256
        slot.mkdir(exist_ok=True)
        write_atomic(slot / MODEL_FILE, data)
        manifest = {
            **u.manifest,
            "prefilter": {**u.manifest["prefilter"], "file": MODEL_FILE},
        }  # no other path
        write_atomic(slot / "manifest.json", json.dumps(manifest, indent=2).encode())
        shutil.rmtree(d, ignore_errors=True)
        return slot / "manifest.json"
