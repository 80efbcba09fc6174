"""The on-device prefilter: raw windows in, kept feature vectors out.

Loads the ``.tflite`` named by a model manifest with LiteRT (``ai_edge_litert``),
or with ``tflite_runtime`` where that is what is installed (it needs numpy < 2),
after checking the file's sha256 against the manifest: a missing, corrupt or
mismatched model stops the agent at start with a message that says which file
and why. Inference is batched (the input is resized to the batch), and only the
embedding of a kept window leaves this module; the raw window is never stored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import AgentError
from edge_tier.model.features import spectrum_features
from edge_tier.model.manifest import ManifestError, load_model
from edge_tier.wire import Dtype

log = logging.getLogger(__name__)
FEATURE_SLICE = 64


class PrefilterError(AgentError):
    """A model or its manifest cannot be used; the message names the file and the reason."""


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
    except ImportError:
        raise PrefilterError(
            "no TFLite runtime: pip install ai-edge-litert (or tflite-runtime, which needs numpy < 2)"
        ) from None
    if int(np.__version__.split(".")[0]) >= 2:
        raise PrefilterError(
            f"tflite-runtime is installed but cannot run with numpy {np.__version__} (it was built for "
            "numpy 1.x): install ai-edge-litert instead, or pin numpy<2"
        )
    return Interpreter


@dataclass(frozen=True)
class Kept:
    """The windows the prefilter kept: their indices in the batch, scores and embeddings."""

    index: np.ndarray  # int64 [k]
    scores: np.ndarray  # float32 [k]
    embeddings: np.ndarray  # float32 [k, E]


class Prefilter:
    def __init__(
        self,
        manifest_path: str | Path,
        *,
        threshold: float | None = None,
        threads: int = 1,
        upload_dtype: Dtype = Dtype.FLOAT32,
    ) -> None:
        self.manifest_path = Path(manifest_path)
        try:
            model = load_model(self.manifest_path, "prefilter")
            self.model_path = model.path
            self.model_threshold = float(model.entry["threshold"])
            self.threshold = self.model_threshold if threshold is None else float(threshold)
            self.version = model.version
            self.window = int(model.manifest["signal"]["window"])
            # int8 upload: embedding = int8 value x scale (symmetric, from the training set's range)
            self.embedding_scale = float(model.entry.get("embedding_scale", 0.0))
        except ManifestError as e:
            raise PrefilterError(str(e)) from None
        except (KeyError, TypeError, ValueError) as e:
            raise PrefilterError(f"{self.manifest_path}: not a usable model manifest ({e!r})") from None
        data = model.data
        if upload_dtype is Dtype.INT8 and not self.embedding_scale > 0:
            raise PrefilterError(
                f"{self.manifest_path}: prefilter.embedding_scale is missing, so embeddings cannot be "
                'uploaded as int8 (set [prefilter] upload_dtype = "float32" or rebuild the models)'
            )
        self.upload_dtype = upload_dtype
        try:
            self._it = _interpreter_class()(model_content=data, num_threads=threads)
            self._it.allocate_tensors()
        except PrefilterError:
            raise
        except (ValueError, RuntimeError) as e:
            raise PrefilterError(f"{self.model_path}: not a loadable TFLite model ({e})") from None
        self._input = self._it.get_input_details()[0]
        outs = {o["name"]: o for o in self._it.get_output_details()}
        if "score" not in outs or "embedding" not in outs:
            raise PrefilterError(
                f"{self.model_path}: outputs {sorted(outs)}, expected 'score' and 'embedding'"
            )
        self._score, self._embedding = outs["score"], outs["embedding"]
        self.features = int(self._input["shape"][-1])
        self.embedding_dim = int(self._embedding["shape"][-1])
        self._batch = 0
        log.info(
            "prefilter %s v%s loaded (threshold %.4f)", self.model_path.name, self.version, self.threshold
        )

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores [n] and embeddings [n, E] for raw windows [n, window], in one call."""
        w = np.asarray(windows, dtype=np.float32)
        # Features in slices that stay in cache (the FFT temporaries of 256 windows do not).
        step = FEATURE_SLICE
        x = (
            spectrum_features(w)
            if len(w) <= step
            else np.concatenate([spectrum_features(w[i : i + step]) for i in range(0, len(w), step)])
        )
        if x.shape[1] != self.features:
            raise PrefilterError(f"{self.model_path}: takes {self.features} features, got {x.shape[1]}")
        if len(x) != self._batch:
            self._it.resize_tensor_input(self._input["index"], [len(x), self.features])
            self._it.allocate_tensors()
            self._batch = len(x)
        self._it.set_tensor(self._input["index"], x)
        self._it.invoke()
        return self._it.get_tensor(self._score["index"])[:, 0], self._it.get_tensor(self._embedding["index"])

    def encode(self, embeddings: np.ndarray, dtype: Dtype) -> tuple[bytes, float]:
        """Embeddings as the upload stores them, and the scale a reader multiplies int8 by."""
        if dtype is Dtype.INT8:
            s = self.embedding_scale
            q = np.clip(np.rint(embeddings / s), -127, 127).astype(np.int8)
            return q.tobytes(), s
        return np.ascontiguousarray(embeddings, dtype=dtype.np_dtype).tobytes(), 1.0

    def keep(self, windows: np.ndarray) -> Kept:
        scores, emb = self.score(windows)
        idx = np.flatnonzero(scores >= self.threshold)
        return Kept(idx, scores[idx].astype(np.float32), emb[idx].astype(np.float32))
