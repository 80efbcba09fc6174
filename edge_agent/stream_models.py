"""Each stream's model: ``[streams.NAME]``'s own, else the ``[prefilter]`` one.

A model is known by its key: ``prefilter`` (``DEFAULT_MODEL``) for the ``[prefilter]``
model, which serves every stream the config does not name, and the stream's name for
one of ``[streams]`` (whose model may be unset: that stream takes features only). Model
updates name the key they replace, and each key has its own store of installed updates
(``control/models`` for the default, ``control/models.NAME`` for a stream), so one
stream's rollout and rollback never touch another's model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge_agent.config import AgentConfig, PrefilterSettings
from edge_agent.model_store import ModelStore
from edge_agent.prefilter import Prefilter, PrefilterError
from edge_tier.control import DEFAULT_MODEL

log = logging.getLogger(__name__)


def load_prefilter(
    cfg: AgentConfig, manifest: Path, threshold: float | None = None, key: str = DEFAULT_MODEL
) -> Prefilter:
    """``key``'s model from ``manifest`` with its settings, tried on a batch of two windows."""
    p = settings(cfg, key)
    pf = Prefilter(
        manifest,
        threshold=threshold if threshold is not None else p.threshold,
        threads=p.threads,
        upload_dtype=p.dtype(),
        stream="" if key == DEFAULT_MODEL else key,
    )
    try:
        kept = pf.keep(np.zeros((2, *pf.window_shape), np.float32))
        if kept.embeddings.shape[1] != pf.embedding_dim:
            raise PrefilterError(f"{pf.model_path}: embeddings of {kept.embeddings.shape[1]} values")
    except (ValueError, RuntimeError) as e:
        raise PrefilterError(f"{pf.model_path}: loads, but fails on a dummy batch ({e})") from None
    return pf


def settings(cfg: AgentConfig, key: str) -> PrefilterSettings:
    return cfg.prefilter if key == DEFAULT_MODEL else cfg.streams[key]


class StreamModels:
    """The running model of each key, the sha256 of the update it came from, and their stores."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.keys = [DEFAULT_MODEL, *cfg.streams]
        self.stores = {
            k: ModelStore(cfg.control_path("models" if k == DEFAULT_MODEL else f"models.{k}"))
            for k in self.keys
        }
        self.running: dict[str, Prefilter | None] = dict.fromkeys(self.keys)
        self.active_sha: dict[str, str | None] = dict.fromkeys(self.keys)

    def key_of(self, stream: str) -> str:
        return stream if stream in self.cfg.streams else DEFAULT_MODEL

    def for_stream(self, stream: str) -> Prefilter | None:
        return self.running[self.key_of(stream)]

    @property
    def default(self) -> Prefilter | None:
        return self.running[DEFAULT_MODEL]

    def start(self, threshold_of: dict[str, float | None]) -> None:
        """Each key's model to start with: its installed update, else the one before it, else
        the configured one (whose failure stops the agent: PrefilterError)."""
        for key in self.keys:
            self.running[key], self.active_sha[key] = self._startup(key, threshold_of.get(key))

    def _startup(self, key: str, threshold: float | None) -> tuple[Prefilter | None, str | None]:
        store = self.stores[key]
        for sha, manifest in store.candidates():
            try:
                return load_prefilter(self.cfg, manifest, threshold, key), sha
            except PrefilterError as e:
                log.error(
                    "installed model %s of %s does not load (%s); rolling back to the one before it",
                    sha[:12],
                    key,
                    e,
                )
                store.demote(sha)
        configured = settings(self.cfg, key).manifest
        if configured is None:
            return None, None
        return load_prefilter(self.cfg, configured, threshold, key), None

    def status(self) -> dict[str, dict[str, object]]:
        """Each key's running model, for the agent's status."""
        return {
            k: {
                "model": pf.name,
                "version": pf.version,
                "sha256": self.active_sha[k],
                "threshold": pf.threshold,
                "window": list(pf.window_shape),
                "embedding_dim": pf.embedding_dim,
                "upload_dtype": pf.upload_dtype.name.lower(),
            }
            for k, pf in self.running.items()
            if pf is not None
        }
