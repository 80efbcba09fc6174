"""The on-device prefilter: raw windows in, kept embeddings out, for any model its manifest describes.

A window goes through the manifest's preprocessing stage (``edge_tier.model.preprocess``),
into the model's input (quantized with the tensor's own parameters where it is int8 or
uint8), and out as a score (a class, the max or sum over classes, ``1 - class``, or a
reconstruction error) and an embedding (any tensor, pooled or flattened, or the score
tensor's values). Everything is checked at load, against the model itself, with a
trial batch: names, shapes, dtypes, class indices, the stage's output size, and whether
the batch dimension really resizes. A mismatch stops the agent at start naming the
manifest field and the tensor; at run time a window the model cannot take is refused
(``WindowRefused``, a 400 naming the stream and the shape) and nothing of it is queued.

The model's sha256 is checked against the manifest before anything is loaded, and only
the embedding of a kept window leaves this module; the raw window is never stored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.errors import BadRecord
from edge_agent.litert import LiteModel, ModelRunError, PrefilterError, Tensor
from edge_tier.model.manifest import ManifestError, load_model
from edge_tier.model.preprocess import build_stage
from edge_tier.model.schema import PrefilterSpec
from edge_tier.wire import Dtype

log = logging.getLogger(__name__)
FEATURE_SLICE = 64  # windows per preprocessing call: the temporaries of 64 stay in cache

__all__ = ["Kept", "Prefilter", "PrefilterError", "WindowRefused"]


class WindowRefused(BadRecord):
    """Windows this stream's model cannot take: the message names the stream and the shape."""


@dataclass(frozen=True)
class Kept:
    """The windows the prefilter kept: their indices in the batch, scores and embeddings."""

    index: np.ndarray  # int64 [k]
    scores: np.ndarray  # float32 [k]
    embeddings: np.ndarray  # float32 [k, E]


def _prod(shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(shape)


class Prefilter:
    """One stream's model. ``upload_dtype`` None: int8 where a scale is known, else float16."""

    def __init__(
        self,
        manifest_path: str | Path,
        *,
        threshold: float | None = None,
        threads: int = 1,
        upload_dtype: Dtype | None = Dtype.FLOAT32,
        stream: str = "",
    ) -> None:
        self.manifest_path = Path(manifest_path)
        self.stream = stream
        try:
            model = load_model(self.manifest_path, "prefilter")
        except ManifestError as e:
            raise PrefilterError(str(e)) from None
        spec = self.spec = model.spec
        self.model_path, self.version, self.name, self.labels = (
            model.path,
            spec.version,
            spec.name,
            model.labels,
        )
        self.model_threshold = spec.threshold
        self.threshold = spec.threshold if threshold is None else float(threshold)
        self.window_shape = tuple(spec.window.shape)
        self.window = spec.window.size  # samples per window, flattened
        where = f"{self.model_path}"
        score_names = [spec.score.tensor, spec.embedding.tensor, spec.score.target]
        names = [n for n in score_names if n is not None]
        self._lite = LiteModel(model.data, threads=threads, where=where)
        if any(self._lite.tensors.get(n, _NONE).role == "intermediate" for n in names):
            self._lite = LiteModel(model.data, threads=threads, preserve_all=True, where=where)
        self._input = self._check_input(spec)
        self.item_shape = self._item_shape(spec)
        try:
            self._stage = build_stage(spec.preprocess, spec.window, self.item_shape, "prefilter")
        except ManifestError as e:
            raise PrefilterError(f"{where}: {e}") from None
        self._score_t = self._lite.tensor(spec.score.tensor, "prefilter.score.tensor")
        self._emb_t = (
            self._lite.tensor(spec.embedding.tensor, "prefilter.embedding.tensor")
            if spec.embedding.tensor is not None
            else self._score_t
        )
        self._target_t = (
            self._lite.tensor(spec.score.target, "prefilter.score.target") if spec.score.target else None
        )
        self._want = [self._score_t, self._emb_t] + ([self._target_t] if self._target_t else [])
        self._check_stage()
        if spec.input.batch:
            self._lite.probe_batch(self.item_shape, self._want)
        else:
            self._lite.batched = self._lite.batch_resizes = False
        self._check_outputs()
        self.embedding_scale = self._embedding_scale()
        self.upload_dtype = self._upload_dtype(upload_dtype)
        log.info(
            "prefilter %s v%s loaded for stream %r: windows %s -> %s -> %s, score %s of %r "
            "(threshold %.6g), embedding %d values of %r uploaded as %s%s",
            self.model_path.name,
            self.version,
            stream or "(default)",
            list(self.window_shape),
            spec.preprocess.name,
            self._input.describe(),
            spec.score.kind,
            spec.score.tensor,
            self.threshold,
            self.embedding_dim,
            self._emb_t.name,
            self.upload_dtype.name.lower(),
            "" if self._lite.batch_resizes else " (batch 1 in a loop)",
        )

    @property
    def batch_resizes(self) -> bool:
        """False: the model's batch dimension does not resize, and it runs batch 1 in a loop."""
        return self._lite.batch_resizes

    @property
    def input_tensor(self) -> Tensor:
        return self._input

    @property
    def embedding_tensor(self) -> Tensor:
        return self._emb_t

    # -- load-time checks ---------------------------------------------------------------------

    def _fail(self, field: str, msg: str) -> PrefilterError:
        return PrefilterError(f"{self.model_path}: {field}: {msg}")

    def _check_input(self, spec: PrefilterSpec) -> Tensor:
        lite = self._lite
        if len(lite.inputs) != 1:
            raise self._fail(
                "prefilter.input",
                f"the model has {len(lite.inputs)} inputs "
                f"({', '.join(t.describe() for t in lite.inputs)}); a prefilter takes one",
            )
        t = lite.tensor(spec.input.name, "prefilter.input.name")
        if t.role != "input":
            raise self._fail(
                "prefilter.input.name",
                f"{t.describe()} is not the model's input (that is {lite.inputs[0].describe()})",
            )
        if len(spec.input.shape) != len(t.shape):
            raise self._fail(
                "prefilter.input.shape",
                f"{spec.input.shape} has {len(spec.input.shape)} dimensions, "
                f"the model's input {t.describe()} {len(t.shape)}",
            )
        lead = 1 if spec.input.batch else 0
        if spec.input.batch and (spec.input.shape[0] not in (-1, 1) or t.shape[0] not in (-1, 1)):
            raise self._fail(
                "prefilter.input.shape",
                f"the first dimension is the batch (-1 or 1): the manifest "
                f"says {spec.input.shape[0]}, the model's input {t.describe()} (a model without a batch "
                "dimension: prefilter.input.batch = false)",
            )
        for i, (a, b) in enumerate(zip(spec.input.shape[lead:], t.shape[lead:], strict=True), start=lead):
            if a != -1 and b != -1 and a != b:
                raise self._fail(
                    f"prefilter.input.shape[{i}]", f"{a}, but the model's input is {t.describe()}"
                )
        if np.dtype(spec.input.dtype) != t.dtype:
            raise self._fail(
                "prefilter.input.dtype", f"{spec.input.dtype}, but the model's input is {t.describe()}"
            )
        return t

    def _item_shape(self, spec: PrefilterSpec) -> tuple[int, ...]:
        dims = []
        lead = 1 if spec.input.batch else 0
        pairs = zip(spec.input.shape[lead:], self._input.shape[lead:], strict=True)
        for i, (a, b) in enumerate(pairs, start=lead):
            d = b if b != -1 else a
            if d == -1:
                raise self._fail(
                    f"prefilter.input.shape[{i}]", "open in the model and in the manifest: give it"
                )
            dims.append(d)
        return tuple(dims)

    def _check_stage(self) -> None:
        try:
            x = np.asarray(self._stage(np.zeros((1, *self.window_shape), np.float32)))
        except Exception as e:  # a user's stage may raise anything; it is named here, at load
            raise self._fail(
                "prefilter.preprocess",
                f"{self.spec.preprocess.name!r} fails on a window "
                f"of {list(self.window_shape)} ({type(e).__name__}: {e})",
            ) from None
        if x.ndim < 1 or len(x) != 1 or _prod(x.shape[1:]) != _prod(self.item_shape):
            raise self._fail(
                "prefilter.preprocess",
                f"{self.spec.preprocess.name!r} makes {list(x.shape[1:])} of a "
                f"window of {list(self.window_shape)}, but prefilter.input takes {list(self.item_shape)} "
                f"({_prod(self.item_shape)} values)",
            )

    def _check_outputs(self) -> None:
        s = self.spec.score
        out = self._lite.run(np.zeros((1, *self.item_shape), np.float32), self._want)
        size = int(out[0].size)
        if s.index is not None and s.index >= size:
            raise self._fail(
                "prefilter.score.index",
                f"{s.index}, but {self._score_t.describe()} has {size} values per window",
            )
        if s.kind == "class" and s.index is None and size != 1:
            raise self._fail(
                "prefilter.score.index",
                f"needed: {self._score_t.describe()} has {size} "
                "values per window (or use kind 'max' or 'sum')",
            )
        if s.classes is not None and max(s.classes) >= size:
            raise self._fail(
                "prefilter.score.classes",
                f"{s.classes}, but {self._score_t.describe()} has {size} values per window",
            )
        if s.kind == "reconstruction":
            target = out[2].size if self._target_t is not None else _prod(self.item_shape)
            of = self._target_t.describe() if self._target_t is not None else "the model's input"
            if target != size:
                raise self._fail(
                    "prefilter.score",
                    f"reconstruction of {of} ({target} values) by "
                    f"{self._score_t.describe()} ({size} values) cannot be compared",
                )
        self.embedding_dim = int(self._pool(out[1]).shape[1])

    def _embedding_scale(self) -> float | None:
        if self.spec.embedding.scale is not None:
            return self.spec.embedding.scale
        t = self._emb_t
        if t.quantized:  # the tensor's own range, symmetric: every value it can hold fits
            info = np.iinfo(t.dtype)
            return max(abs(info.min - t.zero_point), abs(info.max - t.zero_point)) * t.scale / 127
        return None

    def _upload_dtype(self, asked: Dtype | None) -> Dtype:
        if asked is None:
            return Dtype.INT8 if self.embedding_scale else Dtype.FLOAT16
        if asked is Dtype.INT8 and not self.embedding_scale:
            raise PrefilterError(
                f"{self.manifest_path}: prefilter.embedding.scale is missing (and {self._emb_t.describe()} "
                "is not int8-quantized), so embeddings cannot be uploaded as int8: set upload_dtype = "
                '"auto" or "float16", or the scale (`edge-agent model check --windows` suggests one)'
            )
        return asked

    # -- running ------------------------------------------------------------------------------

    def _refused(self, n: int, why: str) -> WindowRefused:
        return WindowRefused(
            f"stream {self.stream or '(default)'!r}: model {self.name} v{self.version} takes windows of "
            f"{list(self.window_shape)} float32 samples ([n, {', '.join(map(str, self.window_shape))}]); "
            f"{why}"
        )

    def check_windows(self, windows: np.ndarray) -> np.ndarray:
        """``windows`` as [n, *window] float32 (flat rows of the window's size are reshaped)."""
        w = np.asarray(windows, dtype=np.float32)
        if w.ndim == 2 and w.shape[1] == self.window and len(self.window_shape) > 1:
            w = w.reshape(len(w), *self.window_shape)
        if w.ndim < 1 or not len(w) or tuple(w.shape[1:]) != self.window_shape:
            raise self._refused(0, f"got {list(w.shape)}")
        return w

    def _inputs(self, w: np.ndarray) -> np.ndarray:
        try:
            parts = [
                np.asarray(self._stage(w[i : i + FEATURE_SLICE])) for i in range(0, len(w), FEATURE_SLICE)
            ]
            x = parts[0] if len(parts) == 1 else np.concatenate(parts)
            return x.reshape(len(w), *self.item_shape).astype(np.float32, copy=False)
        except Exception as e:  # a user's stage may raise anything: this request is refused, whole
            raise self._refused(
                len(w), f"preprocessing {self.spec.preprocess.name!r} failed ({type(e).__name__}: {e})"
            ) from None

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores [n] and embeddings [n, E] for raw windows [n, *window], batched."""
        w = self.check_windows(windows)
        x = self._inputs(w)
        try:
            out = self._lite.run(x, self._want)
        except ModelRunError as e:
            raise self._refused(len(w), str(e)) from None
        n = len(w)
        if any(len(o) != n for o in out):
            raise self._refused(n, f"the model answered {[list(o.shape) for o in out]} for {n} windows")
        return self._scores(out, x), self._pool(out[1])

    def _scores(self, out: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        s = self.spec.score
        n = len(x)
        t = out[0].reshape(n, -1)
        if s.kind == "class":
            v = t[:, s.index or 0]
        elif s.kind == "one_minus":
            v = 1.0 - t[:, s.index or 0]
        elif s.kind in ("max", "sum"):
            sel = t if s.classes is None else t[:, s.classes]
            v = sel.max(axis=1) if s.kind == "max" else sel.sum(axis=1)
        else:
            target = (out[2] if self._target_t is not None else x).reshape(n, -1)
            d = t - target
            e = d * d if s.error == "squared" else np.abs(d)
            v = {"mean": e.mean, "sum": e.sum, "max": e.max}[s.reduction](axis=1)
        return np.asarray(v, dtype=np.float32)

    def _pool(self, e: np.ndarray) -> np.ndarray:
        pool = self.spec.embedding.pool
        if pool == "flatten" or e.ndim <= 2:
            return e.reshape(len(e), -1)
        axes = tuple(range(1, e.ndim - 1))
        return (e.mean(axis=axes) if pool == "mean" else e.max(axis=axes)).astype(np.float32)

    def encode(self, embeddings: np.ndarray, dtype: Dtype) -> tuple[bytes, float]:
        """Embeddings as the upload stores them, and the scale a reader multiplies int8 by."""
        if dtype is Dtype.INT8:
            s = self.embedding_scale
            assert s is not None  # _upload_dtype refused int8 without one
            q = np.clip(np.rint(embeddings / s), -127, 127).astype(np.int8)
            return q.tobytes(), s
        return np.ascontiguousarray(embeddings, dtype=dtype.np_dtype).tobytes(), 1.0

    def keep(self, windows: np.ndarray) -> Kept:
        scores, emb = self.score(windows)
        idx = np.flatnonzero(scores >= self.threshold)
        return Kept(idx, scores[idx].astype(np.float32), emb[idx].astype(np.float32))


_NONE = Tensor("", -1, (), np.dtype(np.float32), 0.0, 0, "none")
