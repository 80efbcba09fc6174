"""The tier-two model: any ONNX classifier or regressor its manifest describes, checked at load, batched.

The manifest's ``tier2`` entry (``edge_tier.model.schema.Tier2Spec``) is checked against the
onnxruntime session before any message waits on it, and every mismatch stops the worker at
start with a :class:`Tier2ModelError` that names the manifest field and the tensor:

* **input**: uploads are float32 ``[n, dim]`` (int8 uploads are dequantized by the worker);
  ``tier2.input.reshape`` gives one record's shape for a model of another rank (``[N, 1, D]``,
  ``[N, H, W, C]``), and the values are cast to the input's element type: float16, float32,
  double, or int8/uint8 quantized with the manifest's ``scale`` and ``zero_point``. The name,
  element type, rank and fixed sizes must agree with the session's input; a model whose batch
  dimension is fixed to 1 is run one record a call, and says so.
* **output**, for a classifier: class probabilities ``[N, C]``, or skl2onnx's ZipMap (a
  sequence of maps, class -> probability), turned into ``[N, C]`` in the labels' order;
  ``tier2.answer`` may name a label tensor (an int64 class index, or a string label) and/or a
  confidence tensor, each one value per record (``[N]`` or ``[N, 1]``), computed in the graph;
  what it leaves out comes from the probabilities (argmax, and that class's probability).
  For a regressor (``kind = "regressor"``): one value per record, ``[N]`` or ``[N, 1]``.
* a **probe** (one call on zeros) then checks what the static shapes cannot say: symbolic
  dimensions, the ZipMap's classes against the labels.

Providers are tried in the configured order (CUDA, then CPU by default); one
this host's onnxruntime build lacks is skipped with a warning, so the same
config runs on a GPU host (``pip install '.[worker-gpu]'``, onnxruntime-gpu)
and a CPU one (``.[worker]``). On a GPU the input and output are bound once
per call with IOBinding (tensor outputs only: a ZipMap or string output is read
with a plain run), and a warm-up at start pays CUDA's first-call costs
(kernel selection, memory arena) before any real message waits on them.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cloud_ingest.errors import Tier2ModelError
from edge_tier.errors import ManifestError
from edge_tier.model.manifest import load_model
from edge_tier.model.schema import Tier2InputSpec, Tier2Spec

log = logging.getLogger(__name__)


class Refuse(Protocol):
    """The error for a manifest field (``tier2.input.reshape``) and its value, where it has one."""

    def __call__(self, field: str, message: str, value: object = None) -> Tier2ModelError: ...


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider")
# onnxruntime's type strings -> the manifest's dtype names
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}
FLOAT_TENSORS = ("tensor(float)", "tensor(float16)", "tensor(double)")
LABEL_TENSORS = ("tensor(int64)", "tensor(int32)", "tensor(string)")
ZIPMAP = re.compile(r"^seq\(map\((int64|string),\s*tensor\(float\)\)\)$")


def _onnxruntime():  # type: ignore[no-untyped-def]
    try:
        import onnxruntime
    except ImportError:
        raise Tier2ModelError(
            "onnxruntime is not installed: pip install 'edge-tier[worker]' (CPU) or "
            "'edge-tier[worker-gpu]' (onnxruntime-gpu, CUDA)"
        ) from None
    return onnxruntime


def shape_text(shape: Any) -> str:
    """An onnxruntime shape as ``[N, 16]`` (symbolic dimensions by name, unknown ones as ``?``)."""
    if not isinstance(shape, list | tuple):
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def tensor_text(arg: Any) -> str:
    """A session input or output as ``'probs' tensor(float) [N, 6]`` (sequences without a shape)."""
    if not str(arg.type).startswith("tensor("):
        return f"{arg.name!r} {arg.type}"
    return f"{arg.name!r} {arg.type} {shape_text(arg.shape)}"


def _fixed(d: Any) -> bool:
    return isinstance(d, int) and d > 0


def _per_record(shape: Any) -> bool:
    """A static shape that may be one value per record: ``[N]`` or ``[N, 1]`` (or unknown)."""
    if not isinstance(shape, list) or not shape:
        return not isinstance(shape, list)  # no shape at all: the probe decides
    return len(shape) == 1 or (len(shape) == 2 and (shape[1] == 1 or not _fixed(shape[1])))


@dataclass(frozen=True, slots=True)
class Answers:
    """The answers for a batch: a label index [n] into ``Tier2Model.labels`` and a confidence
    [n] per record; for a regressor also ``values`` [n] (its labels: one, confidences: 0)."""

    label_index: np.ndarray
    confidences: np.ndarray
    values: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class Feed:
    """How uploads ``[n, dim]`` float32 become the model's input: reshape, then cast or quantize."""

    name: str
    dtype: np.dtype[Any]
    record_shape: tuple[int, ...]
    dim: int
    scale: float | None = None
    zero_point: int = 0
    fixed_batch: int | None = None  # the model takes exactly this many records a call (1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.reshape((len(x), *self.record_shape))
        if self.scale is not None:
            info = np.iinfo(self.dtype)
            q = np.rint(x / np.float32(self.scale)) + np.float32(self.zero_point)
            return np.clip(q, info.min, info.max).astype(self.dtype)
        return x if x.dtype == self.dtype else x.astype(self.dtype)


@dataclass(slots=True)
class _Classes:
    """What a classifier's outputs mean: labels, and how the model's classes map onto them."""

    labels: list[str]
    zipmap_keys: list[Any] | None = None  # the ZipMap's classes, in its order
    columns: np.ndarray | None = None  # ZipMap column of each label (string classes)
    values: np.ndarray | None = None  # int class values (ZipMap keys) when they are not 0..C-1
    positions: dict[str, int] = field(default_factory=dict)

    def index(self, raw: np.ndarray) -> np.ndarray:
        """Label indices [n] from a label tensor [n] / [n, 1]: int64 class indices or strings."""
        v = raw.reshape(len(raw))
        if v.dtype.kind in "OUS":
            uniq, inverse = np.unique(v.astype(str), return_inverse=True)
            unknown = [s for s in uniq.tolist() if s not in self.positions]
            if unknown:
                raise ValueError(f"the model answered label {unknown[0]!r}, not one of {self.labels}")
            return np.array([self.positions[s] for s in uniq.tolist()], np.int64)[inverse]
        idx = v.astype(np.int64)
        if self.values is not None:
            order = np.argsort(self.values)
            at = np.searchsorted(self.values[order], idx).clip(0, len(order) - 1)
            if not (self.values[order][at] == idx).all():
                bad = idx[self.values[order][at] != idx][0]
                raise ValueError(f"the model answered class {bad}, not one of its classes {self.zipmap_keys}")
            idx = order[at]
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.labels)):
            bad = idx[(idx < 0) | (idx >= len(self.labels))][0]
            raise ValueError(f"the model answered class {bad}; the manifest has {len(self.labels)} labels")
        return idx

    def probs(self, raw: Any) -> np.ndarray:
        """Probabilities [n, C] from a tensor, or from ZipMap's list of {class: probability}."""
        if not isinstance(raw, list):
            return np.asarray(raw, np.float32)
        p = np.array([list(m.values()) for m in raw], np.float32).reshape(len(raw), -1)
        return p if self.columns is None else p[:, self.columns]


class Tier2Model:
    """The verified tier-two model in one onnxruntime session; ``answer`` takes any batch size."""

    def __init__(
        self,
        manifest: str | Path,
        *,
        providers: list[str] | tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider"),
        io_binding: bool | None = None,
        threads: int = 1,
        spin: bool = False,
        max_batch: int = 512,
        warmup: bool = True,
    ) -> None:
        try:
            model = load_model(manifest, "tier2")
        except ManifestError as e:
            raise Tier2ModelError(str(e)) from None
        self.manifest = Path(manifest)
        self.path = model.path
        self.spec: Tier2Spec = model.spec
        self.version = model.version
        self.name = model.spec.name
        self.kind = model.spec.kind
        self.max_batch = max_batch
        self.session = _session(model.data, self.path, providers, threads, spin)
        # A provider that fails to initialise (say, no CUDA driver) is dropped silently by
        # onnxruntime: report what the session really runs on.
        self.providers: list[str] = self.session.get_providers()
        self.on_gpu = self.providers[0] in GPU_PROVIDERS
        self.inputs = list(self.session.get_inputs())
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.feed = _check_input(self.spec.input, self.inputs, self._where)
        self.dim = self.feed.dim
        self._out = self.spec.output
        answer = self.spec.answer
        self._label = answer.label if answer else None
        self._confidence = answer.confidence if answer else None
        self._check_outputs(len(model.labels))
        # what each call fetches: the answer tensors, and the probabilities where one is missing
        wanted = [n for n in (self._label, self._confidence) if n]
        self._fetch = wanted if len(wanted) == 2 else [*wanted, self._out]
        self.io_binding = False  # the probe reads every output as it is
        self._classes = self._probe(model.labels)
        self.labels = self._classes.labels
        unbindable = [n for n in self._fetch if ORT_DTYPES.get(self.outputs[n].type, "string") == "string"]
        self.io_binding = (self.on_gpu if io_binding is None else io_binding) and not unbindable
        if io_binding and unbindable:
            log.warning(
                "%s: IOBinding off: it binds numeric tensors, and %s is not one",
                self.path.name,
                tensor_text(self.outputs[unbindable[0]]),
            )
        if self.feed.fixed_batch == 1:
            log.warning(
                "%s: its input %s takes one record a call: batches run one record at a time",
                self.path.name,
                tensor_text(self._input_arg),
            )
        if warmup:
            self._warm_up()

    # -- load-time checks -------------------------------------------------------------------

    def _where(self, field: str, message: str, value: object = None) -> Tier2ModelError:
        named = field if value is None else f"{field} = {json.dumps(value)}"
        return Tier2ModelError(f"{self.manifest}: {named}: {message} (model {self.path.name})")

    @property
    def _input_arg(self) -> Any:
        return next(i for i in self.inputs if i.name == self.feed.name)

    @property
    def _labels_field(self) -> str:
        return "tier2.labels" if self.spec.labels else "labels"

    def _output(self, field_name: str, name: str) -> Any:
        if name not in self.outputs:
            have = ", ".join(tensor_text(o) for o in self.outputs.values())
            raise self._where(field_name, f"the model has no such output; its outputs: {have}", name)
        return self.outputs[name]

    def _check_outputs(self, n_labels: int) -> None:
        out = self._output("tier2.output", self._out)
        if self.kind == "regressor":
            if out.type not in FLOAT_TENSORS or not _per_record(out.shape):
                raise self._where(
                    "tier2.output",
                    f"the model's output {tensor_text(out)} is not one float value per record "
                    "([N] or [N, 1]), a regressor's answer",
                    self._out,
                )
            return
        zipmap = ZIPMAP.match(str(out.type))
        probs = out.type in FLOAT_TENSORS and len(out.shape or []) == 2 and out.shape[1] != 1
        if not zipmap and not probs:
            hint = ' (one value per record: a regressor? set tier2.kind = "regressor")'
            raise self._where(
                "tier2.output",
                f"the model's output {tensor_text(out)} is not class probabilities [N, classes] "
                "nor ZipMap's seq(map(int64|string, tensor(float)))"
                + (hint if out.type in FLOAT_TENSORS and _per_record(out.shape) else ""),
                self._out,
            )
        if not zipmap and _fixed(out.shape[1]) and n_labels and out.shape[1] != n_labels:
            raise self._where(
                self._labels_field,
                f"the model's output {tensor_text(out)} has {out.shape[1]} classes, "
                f"the manifest names {n_labels} labels",
            )
        if self._label is not None:
            arg = self._output("tier2.answer.label", self._label)
            if arg.type not in LABEL_TENSORS or not _per_record(arg.shape):
                raise self._where(
                    "tier2.answer.label",
                    f"the model's output {tensor_text(arg)} is not a label: one value per record "
                    "([N] or [N, 1]), an int64 class index or a string",
                    self._label,
                )
        if self._confidence is not None:
            arg = self._output("tier2.answer.confidence", self._confidence)
            if arg.type not in FLOAT_TENSORS or not _per_record(arg.shape):
                raise self._where(
                    "tier2.answer.confidence",
                    f"the model's output {tensor_text(arg)} is not a confidence: one float value per "
                    "record ([N] or [N, 1])",
                    self._confidence,
                )

    def _probe(self, labels: list[str]) -> _Classes:
        """One call on zeros: the shapes the session's symbolic dimensions hid, and the classes."""
        n = self.feed.fixed_batch or 2
        names = list(dict.fromkeys([*self._fetch, self._out]))
        try:
            got = dict(zip(names, self._session_run(names, np.zeros((n, self.dim), np.float32)), strict=True))
        except Exception as e:  # onnxruntime raises its own classes (Fail, InvalidArgument, ...)
            raise self._where("tier2.input", f"the model fails on {n} records of zeros: {e}") from None
        fields = [
            ("tier2.output", self._out),
            ("tier2.answer.label", self._label),
            ("tier2.answer.confidence", self._confidence),
        ]
        for field_name, name in fields:
            value = got.get(name) if name else None
            per_record = field_name != "tier2.output" or self.kind == "regressor"
            if isinstance(value, np.ndarray) and per_record and value.shape not in ((n,), (n, 1)):
                raise self._where(
                    field_name,
                    f"the model's output {tensor_text(self.outputs[name])} gives shape {list(value.shape)} "
                    f"for {n} records: it must be one value per record ([N] or [N, 1])",
                    name,
                )
        if self.kind == "regressor":
            quantity = self.spec.labels[0] if len(self.spec.labels) == 1 else ""
            return _Classes([quantity])
        classes = self._classes_of(got[self._out], labels, n)
        classes.positions = {label: i for i, label in enumerate(classes.labels)}
        if self._label is not None:
            try:
                classes.index(got[self._label])
            except ValueError as e:
                raise self._where(
                    "tier2.answer.label", f"{tensor_text(self.outputs[self._label])}: {e}", self._label
                ) from None
        return classes

    def _classes_of(self, probs: Any, labels: list[str], n: int) -> _Classes:
        where = self._labels_field
        if not isinstance(probs, list):
            if probs.ndim != 2 or len(probs) != n:
                raise self._where(
                    "tier2.output",
                    f"the model's output {tensor_text(self.outputs[self._out])} gives shape "
                    f"{list(probs.shape)} for {n} records: class probabilities are [N, classes]",
                    self._out,
                )
            c = probs.shape[1]
            if labels and c != len(labels):
                raise self._where(
                    where, f"the model gives {c} class probabilities, the manifest names {len(labels)} labels"
                )
            return _Classes(labels or [str(i) for i in range(c)])
        keys = list(probs[0].keys()) if probs else []
        if all(isinstance(k, str) for k in keys):
            if labels and sorted(keys) != sorted(labels):
                raise self._where(
                    where,
                    f"the model's ZipMap {self._out!r} has classes {keys}, "
                    f"the manifest's labels are {labels}",
                )
            labels = labels or keys
            columns = np.array([keys.index(label) for label in labels])
            identity = (columns == np.arange(len(keys))).all()
            return _Classes(labels, keys, None if identity else columns)
        if labels and len(keys) != len(labels):
            raise self._where(
                where,
                f"the model's ZipMap {self._out!r} has {len(keys)} classes {keys}, "
                f"the manifest names {len(labels)} labels",
            )
        values = np.array(keys, np.int64)
        plain = (values == np.arange(len(values))).all()
        return _Classes(labels or [str(k) for k in keys], keys, None, None if plain else values)

    def _warm_up(self) -> None:
        t0 = time.perf_counter()
        sizes = {1} if self.feed.fixed_batch else {1, min(8, self.max_batch), self.max_batch}
        for n in sorted(sizes):
            try:
                self._batched(np.zeros((n, self.dim), np.float32), self._fetch)
            except Exception as e:  # onnxruntime raises its own classes
                raise self._where(
                    "tier2.input", f"the model fails at warm-up on {n} records of zeros: {e}"
                ) from None
        log.info(
            "tier-two %s v%s (%s) on %s (IOBinding %s), warmed up in %.0f ms",
            self.name,
            self.version,
            self.path.name,
            self.providers[0],
            "on" if self.io_binding else "off",
            1000 * (time.perf_counter() - t0),
        )

    # -- running ----------------------------------------------------------------------------

    def _session_run(self, outputs: list[str], x: np.ndarray) -> list[Any]:
        feed = {self.feed.name: self.feed(x)}
        if not self.io_binding:
            return list(self.session.run(outputs, feed))
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.feed.name, feed[self.feed.name])
        for name in outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def _run(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        got = self._session_run(outputs, x)
        return [self._classes.probs(v) if isinstance(v, list) else v for v in got]

    def _batched(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"embeddings of shape {x.shape}, the model takes [n, {self.dim}]")
        step = self.feed.fixed_batch or self.max_batch
        if len(x) <= step:
            return self._run(x, outputs)
        parts = [self._run(x[i : i + step], outputs) for i in range(0, len(x), step)]
        return [np.concatenate(col) for col in zip(*parts, strict=True)]

    def probs(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities [n, classes] for embeddings [n, dim] (a ZipMap's too), max_batch rows
        per call; a regressor's values [n]."""
        (p,) = self._batched(x, [self._out])
        return p.reshape(len(p)) if self.kind == "regressor" else p

    def answer(self, x: np.ndarray) -> Answers:
        """The answers for embeddings [n, dim]; ValueError if the model gives non-finite answers
        or a label that is not one of the labels."""
        got = dict(zip(self._fetch, self._batched(x, self._fetch), strict=True))
        n = len(x)
        if self.kind == "regressor":
            values = np.asarray(got[self._out]).reshape(n)
            if not math.isfinite(float(values.sum())):
                raise ValueError("the model gave non-finite values")
            return Answers(np.zeros(n, np.int64), np.zeros(n, np.float32), values)
        probs = got.get(self._out)
        if self._label is not None:
            idx = self._classes.index(got[self._label])
        else:
            assert probs is not None
            idx = probs.argmax(axis=1)
        if self._confidence is not None:
            conf = np.asarray(got[self._confidence], np.float32).reshape(n)
        else:
            assert probs is not None
            conf = probs[np.arange(n), idx]
        # max propagates NaN, and probabilities are <= 1: one finite sum means all are finite
        if not math.isfinite(float(conf.sum())):
            raise ValueError("the model gave non-finite probabilities")
        return Answers(idx, conf)

    def classify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class index [n], confidence [n]); ValueError if the model gives non-finite answers."""
        a = self.answer(x)
        return a.label_index, a.confidences

    # -- what it is -------------------------------------------------------------------------

    def answer_source(self) -> dict[str, str]:
        """What each part of the answer is made from, in words."""
        if self.kind == "regressor":
            return {"value": tensor_text(self.outputs[self._out])}
        probs = tensor_text(self.outputs[self._out])
        label = tensor_text(self.outputs[self._label]) if self._label else f"argmax of {probs}"
        if self._confidence:
            confidence = tensor_text(self.outputs[self._confidence])
        else:
            confidence = f"the label's probability in {probs}"
        return {"label": label, "confidence": confidence}

    def describe(self) -> dict[str, Any]:
        """The model as loaded and checked: tensors, how uploads are fed, what the answer is made of."""
        f = self.feed
        return {
            "manifest": str(self.manifest),
            "file": str(self.path),
            "model": self.name,
            "version": self.version,
            "kind": self.kind,
            "providers": self.providers,
            "io_binding": self.io_binding,
            "inputs": [_arg(i) for i in self.inputs],
            "outputs": [_arg(o) for o in self.outputs.values()],
            "feed": {
                "input": f.name,
                "features": f.dim,
                "record_shape": list(f.record_shape),
                "dtype": str(f.dtype),
                **({"scale": f.scale, "zero_point": f.zero_point} if f.scale is not None else {}),
                **({"fixed_batch": f.fixed_batch} if f.fixed_batch else {}),
            },
            "answer": self.answer_source(),
            "labels": self.labels,
        }


def _arg(a: Any) -> dict[str, Any]:
    shape = a.shape if str(a.type).startswith("tensor(") else None
    return {"name": a.name, "type": a.type, "shape": shape}


def _session(
    data: bytes, path: Path, providers: list[str] | tuple[str, ...], threads: int, spin: bool
) -> Any:
    ort = _onnxruntime()
    available = ort.get_available_providers()
    chosen = [p for p in providers if p in available]
    for p in providers:
        if p not in available:
            log.warning(
                "%s is not in this onnxruntime build (%s)%s",
                p,
                ", ".join(available),
                ": install the worker-gpu extra (onnxruntime-gpu)" if p in GPU_PROVIDERS else "",
            )
    if not chosen:
        raise Tier2ModelError(f"none of the providers {list(providers)} is available (have {available})")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    # onnxruntime's pool threads busy-wait after each call by default: a worker answering
    # a small batch every few ms then keeps every core busy for nothing (bench_system).
    # One thread (the caller's) has no pool to spin, and is as fast for this model.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=chosen)
    except Exception as e:  # onnxruntime raises its own classes (Fail, InvalidGraph, ...)
        raise Tier2ModelError(f"{path}: onnxruntime cannot load it ({e})") from None


def _check_input(spec: Tier2InputSpec, inputs: list[Any], where: Refuse) -> Feed:
    """The session's input against ``tier2.input``: name, element type, rank, sizes, reshape."""
    by_name = {i.name: i for i in inputs}
    have = ", ".join(tensor_text(i) for i in inputs)
    if spec.name not in by_name:
        raise where("tier2.input.name", f"the model has no such input; its inputs: {have}", spec.name)
    if len(inputs) > 1:
        raise where("tier2.input.name", f"the model takes {len(inputs)} inputs ({have}); tier two feeds one")
    arg = by_name[spec.name]
    dtype = ORT_DTYPES.get(str(arg.type))
    if dtype not in ("float32", "float16", "float64", "int8", "uint8"):
        raise where(
            "tier2.input.dtype",
            f"the model's input {tensor_text(arg)} is not one tier two can feed: float16, float32, "
            "double, or int8/uint8 (with input.scale and input.zero_point)",
        )
    if spec.dtype != dtype:
        hint = " and tier2.input.scale, zero_point" if dtype in ("int8", "uint8") else ""
        raise where(
            "tier2.input.dtype",
            f'the model\'s input {tensor_text(arg)} is {dtype}: set tier2.input.dtype = "{dtype}"{hint}',
            spec.dtype,
        )
    shape = list(arg.shape) if isinstance(arg.shape, list) else None
    if shape is not None:
        _check_shape(spec, shape, arg, where)
    record = _record_shape(spec, shape, arg, where)
    batch = shape[0] if shape else None
    if _fixed(batch) and batch != 1:
        raise where(
            "tier2.input.shape",
            f"the model's input {tensor_text(arg)} takes exactly {batch} records a call; "
            "export it with a dynamic (or 1) batch dimension",
        )
    return Feed(
        name=spec.name,
        dtype=np.dtype(dtype),
        record_shape=record,
        dim=math.prod(record),
        scale=spec.scale,
        zero_point=spec.zero_point or 0,
        fixed_batch=1 if batch == 1 else None,
    )


def _check_shape(spec: Tier2InputSpec, shape: list[Any], arg: Any, where: Refuse) -> None:
    if len(spec.shape) != len(shape):
        raise where(
            "tier2.input.shape",
            f"rank {len(spec.shape)}, but the model's input {tensor_text(arg)} has rank {len(shape)}: "
            f"set tier2.input.shape to the model's ({[d if _fixed(d) else -1 for d in shape]})"
            + (
                f" and tier2.input.reshape to one record's shape, without the batch dimension "
                f"({[d if _fixed(d) else -1 for d in shape[1:]]})"
                if len(shape) != 2 and spec.reshape is None
                else ""
            ),
            spec.shape,
        )
    for i, (declared, actual) in enumerate(zip(spec.shape, shape, strict=True)):
        if i and declared > 0 and _fixed(actual) and declared != actual:
            raise where(
                "tier2.input.shape",
                f"dimension {i} is {declared}, the model's input {tensor_text(arg)} has {actual}",
                spec.shape,
            )


def _record_shape(spec: Tier2InputSpec, shape: list[Any] | None, arg: Any, where: Refuse) -> tuple[int, ...]:
    """One record's shape as the model takes it: ``input.reshape``, sizes filled from the model."""
    model_record = shape[1:] if shape is not None else [None] * (len(spec.shape) - 1)
    declared = spec.shape[1:]
    if spec.reshape is None:
        if len(model_record) != 1:
            suggest = [d if _fixed(d) else -1 for d in model_record]
            raise where(
                "tier2.input.reshape",
                f"the model's input {tensor_text(arg)} takes records of rank {len(model_record)}, "
                "uploads are [n, features]: set tier2.input.reshape (one record's shape, without the "
                f"batch dimension), e.g. {suggest}",
            )
        reshape = [-1]
    else:
        reshape = list(spec.reshape)
    record = []
    for i, r in enumerate(reshape):
        sizes: list[int] = [d for d in (r, declared[i], model_record[i]) if isinstance(d, int) and d > 0]
        if not sizes:
            field_name = "tier2.input.shape" if spec.reshape is None else "tier2.input.reshape"
            raise where(
                field_name,
                f"dimension {i + 1} of the model's input {tensor_text(arg)} has no fixed size: give it in "
                f"{field_name} (uploads have a fixed number of features per record)",
            )
        if any(s != sizes[0] for s in sizes):
            raise where(
                "tier2.input.reshape" if spec.reshape else "tier2.input.shape",
                f"dimension {i + 1} is {sizes[0]}, the model's input {tensor_text(arg)} has {sizes[-1]}",
                spec.reshape or spec.shape,
            )
        record.append(int(sizes[0]))
    return tuple(record)
