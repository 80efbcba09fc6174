"""The tier-two model: onnxruntime over uploaded embeddings, batched, on the best provider there is.

Providers are tried in the configured order (CUDA, then CPU by default); one
this host's onnxruntime build lacks is skipped with a warning, so the same
config runs on a GPU host (``pip install '.[worker-gpu]'``, onnxruntime-gpu)
and a CPU one (``.[worker]``). On a GPU the input and output are bound once
per call with IOBinding, and a warm-up at start pays CUDA's first-call costs
(kernel selection, memory arena) before any real message waits on them.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from cloud_ingest.errors import Tier2ModelError
from edge_tier.model.manifest import ManifestError, load_model

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider")


def _onnxruntime():  # type: ignore[no-untyped-def]
    try:
        import onnxruntime
    except ImportError:
        raise Tier2ModelError(
            "onnxruntime is not installed: pip install 'edge-tier[worker]' (CPU) or "
            "'edge-tier[worker-gpu]' (onnxruntime-gpu, CUDA)"
        ) from None
    return onnxruntime


class Tier2Model:
    """The verified tier-two model in one onnxruntime session; ``classify`` takes any batch size."""

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
        ort = _onnxruntime()
        try:
            model = load_model(manifest, "tier2")
            self.path = model.path
            self.version = model.version
            self.name = str(model.entry.get("name", "tier2"))
            self.labels = model.labels
            self._in = str(model.entry["input"]["name"])
            self._out = str(model.entry["output"]["name"])
            answer = model.entry.get("answer") or {}
            # label and confidence computed in the graph, where the model has them
            self._answer = (
                [str(answer["label"]["name"]), str(answer["confidence"]["name"])] if answer else None
            )
        except ManifestError as e:
            raise Tier2ModelError(str(e)) from None
        except (KeyError, TypeError) as e:
            raise Tier2ModelError(f"{manifest}: tier2 entry lacks {e} (input/output names)") from None
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
            self.session = ort.InferenceSession(model.data, sess_options=opts, providers=chosen)
        except Exception as e:  # onnxruntime raises its own classes (Fail, InvalidGraph, ...)
            raise Tier2ModelError(f"{self.path}: onnxruntime cannot load it ({e})") from None
        # A provider that fails to initialise (say, no CUDA driver) is dropped silently by
        # onnxruntime: report what the session really runs on.
        self.providers = self.session.get_providers()
        self.on_gpu = self.providers[0] in GPU_PROVIDERS
        self.io_binding = self.on_gpu if io_binding is None else io_binding
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if self._in not in inputs or not {self._out, *(self._answer or [])} <= set(outputs):
            raise Tier2ModelError(
                f"{self.path}: has inputs {sorted(inputs)} and outputs {sorted(outputs)}, the manifest "
                f"names {self._in!r} and {[self._out, *(self._answer or [])]}"
            )
        self.dim = int(inputs[self._in].shape[-1])
        classes = outputs[self._out].shape[-1]
        if isinstance(classes, int) and classes != len(self.labels):
            raise Tier2ModelError(
                f"{self.path}: {classes} classes, but {len(self.labels)} labels in the manifest"
            )
        self.max_batch = max_batch
        if warmup:
            t0 = time.perf_counter()
            for n in sorted({1, min(8, max_batch), max_batch}):
                self.probs(np.zeros((n, self.dim), np.float32))
            log.info(
                "tier-two %s v%s on %s (IOBinding %s), warmed up in %.0f ms",
                self.path.name,
                self.version,
                self.providers[0],
                "on" if self.io_binding else "off",
                1000 * (time.perf_counter() - t0),
            )

    def _run(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        if not self.io_binding:
            return self.session.run(outputs, {self._in: x})
        binding = self.session.io_binding()
        binding.bind_cpu_input(self._in, x)
        for name in outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _batched(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"embeddings of shape {x.shape}, the model takes [n, {self.dim}]")
        if len(x) <= self.max_batch:
            return self._run(x, outputs)
        step = self.max_batch
        parts = [self._run(x[i : i + step], outputs) for i in range(0, len(x), step)]
        return [np.concatenate(col) for col in zip(*parts, strict=True)]

    def probs(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities [n, classes] for embeddings [n, dim], max_batch rows per call."""
        return self._batched(x, [self._out])[0]

    def classify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class index [n], confidence [n]); ValueError if the model gives non-finite answers."""
        if self._answer is not None:
            idx, conf = self._batched(x, self._answer)
        else:
            p = self.probs(x)
            idx, conf = p.argmax(axis=1), p.max(axis=1)
        # max propagates NaN, and probabilities are <= 1: one finite sum means all are finite
        if not math.isfinite(float(conf.sum())):
            raise ValueError("the model gave non-finite probabilities")
        return idx, conf
