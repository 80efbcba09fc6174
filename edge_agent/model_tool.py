"""``edge-agent model init | check | schema``: make a manifest for a user's ``.tflite``, and try it.

``init`` reads the model's tensors and graph and picks defaults that work, saying what
it chose and why: the one input; as the score, a one-value output as it is, the max over
a classifier's classes, or, for an output shaped like the input (an autoencoder), the
reconstruction error; as the embedding, the activation that feeds the last weighted
layer (the penultimate layer of a classifier), the bottleneck of an autoencoder, or a
second output. Every choice can be given instead. The manifest it writes is then loaded
exactly as the agent would (``check``), so what ``init`` writes, the agent takes.

``check`` loads a manifest as the agent does and runs it on given windows (``.npy``) or
on generated ones of the right shape: shapes, score range, what the threshold keeps, a
threshold and an int8 scale suggested from real windows, and samples/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.litert import LiteModel, PrefilterError, Tensor
from edge_agent.prefilter import Prefilter
from edge_tier.errors import ManifestError
from edge_tier.model.schema import SCHEMA_VERSION, json_schema, parse_manifest

# ops after which a tensor is still "the class scores" (activation, casts, reshapes)
_PASS_THROUGH = {
    "SOFTMAX",
    "LOGISTIC",
    "QUANTIZE",
    "DEQUANTIZE",
    "RESHAPE",
    "SQUEEZE",
    "LOG_SOFTMAX",
    "RELU",
    "RELU6",
    "TANH",
    "CAST",
    "IDENTITY",
}
_WEIGHTED = {"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL", "CONV_3D", "TRANSPOSE_CONV"}


def _size(t: Tensor, batched: bool = True) -> int:
    """Values per window: every dimension after the batch (all of them, where there is none)."""
    dims = t.shape[1:] if batched else t.shape
    return int(np.prod([abs(d) for d in dims], dtype=np.int64)) if dims else 1


def has_batch(t: Tensor) -> bool:
    """Whether an input's first dimension is a batch: a 1-D input is one window's samples, and a
    first dimension fixed above 1 is part of the window."""
    return len(t.shape) > 1 and t.shape[0] in (1, -1)


class Graph:
    """The model's ops in execution order: who makes each tensor."""

    def __init__(self, lite: LiteModel, batched: bool = True) -> None:
        self.lite, self.batched = lite, batched
        ops = self.ops = lite.ops()
        self.maker = {int(t): o for o in ops for t in o["outputs"]}
        self.by_index = {t.index: t for t in lite.tensors.values()}

    def activations(self) -> list[Tensor]:
        """Tensors that ops make per window (batch first), in execution order."""
        out = []
        for o in self.ops:
            for i in o["outputs"]:
                t = self.by_index.get(int(i))
                if t is not None and (not self.batched or (len(t.shape) >= 2 and t.shape[0] in (1, -1))):
                    out.append(t)
        return out

    def maker_of(self, t: Tensor) -> str:
        o = self.maker.get(t.index)
        return "" if o is None else str(o["op_name"])

    def feeding_last_weighted(self, t: Tensor) -> Tensor | None:
        """Walking back from ``t`` through activations and casts, the input of the first weighted op."""
        seen = 0
        while seen < 64:
            seen += 1
            o = self.maker.get(t.index)
            if o is None:
                return None
            src = self.by_index.get(int(o["inputs"][0]))
            if src is None:
                return None
            if o["op_name"] in _WEIGHTED:
                return src
            if o["op_name"] not in _PASS_THROUGH:
                return None
            t = src
        return None


def _parse_params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise PrefilterError(f"--param {item!r}: give NAME=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _shape(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace("x", ",").split(",") if x]
    except ValueError:
        raise PrefilterError(f"--window {text!r}: give the window's shape as 16000 or 96,96,3") from None


class Chooser:
    """What ``init`` picks, with the reason for each choice (printed, and kept in the manifest's notes)."""

    def __init__(self, lite: LiteModel, args: argparse.Namespace) -> None:
        self.why: list[str] = []
        if len(lite.inputs) != 1:
            raise PrefilterError(f"{args.model}: {len(lite.inputs)} inputs; a prefilter takes one")
        self.input = lite.inputs[0]
        self.batched = has_batch(self.input)
        self.lite, self.args, self.graph = lite, args, Graph(lite, self.batched)

    def size(self, t: Tensor) -> int:
        return _size(t, self.batched)

    def say(self, line: str) -> None:
        self.why.append(line)

    def score(self) -> tuple[Tensor, dict[str, Any]]:
        a, outs = self.args, self.lite.outputs
        t = self.lite.tensor(a.score_tensor, "--score-tensor") if a.score_tensor else self._score_output(outs)
        kind = a.score or ("class" if a.score_class is not None else None)
        if kind is None:
            if self.size(t) == self.size(self.input) and len(outs) == 1:
                kind = "reconstruction"
                self.say(
                    f"score: reconstruction error (mean squared) of {t.describe()}, shaped like the input "
                    "(an autoencoder)"
                )
            elif self.size(t) == 1:
                kind = "class"
                self.say(f"score: the one value of {t.describe()}")
            else:
                kind = "max"
                self.say(
                    f"score: the max class probability of {t.describe()} ({self.size(t)} classes); "
                    "--score-class N scores one class, --score one_minus --score-class N 'not N'"
                )
        else:
            self.say(f"score: {kind} of {t.describe()}")
        spec: dict[str, Any] = {"tensor": t.name, "kind": kind}
        if kind in ("class", "one_minus"):
            spec["index"] = a.score_class or 0
        if kind in ("max", "sum") and a.classes:
            spec["classes"] = [int(x) for x in a.classes.split(",")]
        return t, spec

    def _score_output(self, outs: list[Tensor]) -> Tensor:
        if len(outs) == 1:
            return outs[0]
        probs = [t for t in outs if self.graph.maker_of(t) in ("SOFTMAX", "LOGISTIC")]
        probs = probs or [t for t in outs if self._made_by_probability(t)]
        chosen = probs[0] if probs else min(outs, key=self.size)
        self.say(
            f"score tensor: {chosen.describe()} of the outputs "
            f"{[t.name for t in outs]} ({'made by a softmax/sigmoid' if probs else 'the smallest'})"
        )
        return chosen

    def _made_by_probability(self, t: Tensor) -> bool:
        o = self.graph.maker.get(t.index)
        while o is not None and o["op_name"] in ("DEQUANTIZE", "QUANTIZE", "RESHAPE"):
            src = self.graph.by_index.get(int(o["inputs"][0]))
            o = None if src is None else self.graph.maker.get(src.index)
        return o is not None and o["op_name"] in ("SOFTMAX", "LOGISTIC")

    def embedding(self, score: Tensor, kind: str) -> dict[str, Any]:
        a = self.args
        if a.embedding == "none":
            self.say("embedding: none, the score tensor's values are uploaded")
            return {}
        if a.embedding:
            t = self.lite.tensor(a.embedding, "--embedding")
            self.say(f"embedding: {t.describe()} (given)")
            return {"tensor": t.name, "pool": a.pool or _default_pool(t, self.batched)}
        others = [t for t in self.lite.outputs if t.index != score.index]
        if others:
            t = others[0]
            why = "the other output"
        elif kind == "reconstruction":
            acts = [x for x in self.graph.activations() if 1 < self.size(x) < self.size(self.input)]
            t = min(acts, key=self.size) if acts else score
            why = "the bottleneck (the smallest activation)" if acts else "the output (no activation found)"
        else:
            found = self.graph.feeding_last_weighted(score)
            t = found if found is not None and found.index != self.input.index else score
            why = "the activation feeding the last layer" if t is not score else "the score tensor"
        pool = a.pool or _default_pool(t, self.batched)
        self.say(f"embedding: {t.describe()}, {why}" + (f", {pool}-pooled" if pool != "flatten" else ""))
        return {"tensor": t.name, "pool": pool}


def _default_pool(t: Tensor, batched: bool = True) -> str:
    return "mean" if len(t.shape) > (2 if batched else 1) else "flatten"


def cmd_init(args: argparse.Namespace) -> int:
    model = Path(args.model)
    try:
        data = model.read_bytes()
    except OSError as e:
        raise PrefilterError(f"{model}: cannot read ({e.strerror})") from None
    lite = LiteModel(data, where=str(model))
    c = Chooser(lite, args)
    inp = c.input
    item = [abs(d) for d in (inp.shape[1:] if c.batched else inp.shape)]
    window = _shape(args.window) if args.window else item
    preprocess = args.preprocess or "identity"
    if args.preprocess is None and int(np.prod(window)) != int(np.prod(item)):
        raise PrefilterError(f"--window {window} is not the input's {item} values: name a --preprocess stage")
    c.say(f"input: {inp.describe()}; windows of {window} through '{preprocess}'")
    score_t, score = c.score()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    beside = out.parent / model.name
    if beside.resolve() != model.resolve():
        shutil.copyfile(model, beside)
        c.say(f"copied {model} to {beside}, beside the manifest")
    labels = _labels(args.labels)
    entry: dict[str, Any] = {
        "name": args.name or model.stem,
        "version": args.version,
        "file": model.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "labels": labels,
        "window": {"shape": window, **({"sample_rate": args.sample_rate} if args.sample_rate else {})},
        "preprocess": {"name": preprocess, "params": _parse_params(args.param)},
        "input": {"name": inp.name, "shape": [-1, *item] if c.batched else item, "dtype": str(inp.dtype)}
        | ({} if c.batched else {"batch": False}),
        "score": score,
        "threshold": 0.5 if args.threshold is None else args.threshold,
        "embedding": c.embedding(score_t, score["kind"]),
    }
    doc = {"schema_version": SCHEMA_VERSION, "version": args.version, "prefilter": entry}
    parse_manifest(doc, out)  # the schema's own check before anything is run
    out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.threshold is None:
        windows = _windows(args.windows, window)
        pf = Prefilter(out, upload_dtype=None)
        scores, emb = pf.score(windows)
        entry["threshold"] = _suggest(scores, args.keep)
        if args.windows:
            entry["embedding"]["scale"] = _scale(emb)
        src = "the given windows" if args.windows else "generated windows (set it from real ones: --windows)"
        c.say(f"threshold: {entry['threshold']:.6g}, keeping {args.keep:.0%} of {src}")
        out.write_text(json.dumps(doc, indent=2) + "\n")
    pf = Prefilter(out, upload_dtype=None)  # as the agent loads it: what init writes, check takes
    for line in c.why:
        print(line)
    print(
        f"wrote {out}: score {list(pf.window_shape)} -> 1, embedding {pf.embedding_dim} values, "
        + _batching(pf)
    )
    return 0


def _batching(pf: Prefilter) -> str:
    if pf.batch_resizes:
        return "batched"
    if not pf.spec.input.batch:
        return "one window a call (the input has no batch dimension)"
    return "batch 1 in a loop (the batch dimension does not resize)"


def _labels(text: str | None) -> list[str]:
    if not text:
        return []
    p = Path(text)
    if p.is_file():
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return [x.strip() for x in text.split(",")]


def _windows(path: str | None, shape: list[int] | tuple[int, ...], n: int = 256) -> np.ndarray:
    if path:
        try:
            w = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise PrefilterError(f"{path}: not a .npy array ({e})") from None
        return np.asarray(w, np.float32)
    rng = np.random.default_rng(0)
    if len(shape) == 3:  # camera frames: pixels
        return rng.uniform(0, 255, (n, *shape)).astype(np.float32)
    return rng.standard_normal((n, *shape)).astype(np.float32)


def _suggest(scores: np.ndarray, keep: float) -> float:
    return float(np.quantile(scores, 1.0 - keep)) if len(scores) else 0.5


def _scale(emb: np.ndarray) -> float:
    m = float(np.abs(emb).max()) if emb.size else 0.0
    return m / 127 if m > 0 else 1.0


def cmd_check(args: argparse.Namespace) -> int:
    pf = Prefilter(args.manifest, upload_dtype=None, threads=args.threads)
    windows = pf.check_windows(_windows(args.windows, pf.window_shape))
    scores, emb = pf.score(windows)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        pf.score(windows)
        reps += 1
    rate = reps * len(windows) / max(time.perf_counter() - t0, 1e-9)
    kept = float(np.mean(scores >= pf.threshold))
    report: dict[str, Any] = {
        "manifest": str(args.manifest),
        "model": pf.name,
        "version": pf.version,
        "windows": {"shape": list(windows.shape), "source": args.windows or "generated"},
        "input": pf.input_tensor.describe(),
        "preprocess": pf.spec.preprocess.name,
        "batch_resizes": pf.batch_resizes,
        "score": {
            "kind": pf.spec.score.kind,
            "tensor": pf.spec.score.tensor,
            "shape": list(scores.shape),
            "min": float(scores.min()),
            "p50": float(np.median(scores)),
            "p99": float(np.quantile(scores, 0.99)),
            "max": float(scores.max()),
        },
        "threshold": pf.threshold,
        "kept": kept,
        "embedding": {
            "tensor": pf.embedding_tensor.name,
            "shape": list(emb.shape),
            "upload_dtype": pf.upload_dtype.name.lower(),
        },
        "samples_per_s": rate,
    }
    if args.windows:
        report["suggested"] = {
            "threshold": _suggest(scores, args.keep),
            "keep": args.keep,
            "embedding_scale": _scale(emb),
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{pf.name} v{pf.version}: {report['input']}, preprocess {report['preprocess']}, {_batching(pf)}")
    sc = report["score"]
    print(f"windows      {list(windows.shape)} ({report['windows']['source']})")
    print(
        f"score        {sc['kind']} of {sc['tensor']!r}: shape {sc['shape']}, min {sc['min']:.4g}, "
        f"median {sc['p50']:.4g}, p99 {sc['p99']:.4g}, max {sc['max']:.4g}"
    )
    print(f"threshold    {pf.threshold:.6g}: keeps {kept:.1%}")
    print(
        f"embedding    {report['embedding']['tensor']!r}: shape {list(emb.shape)}, uploaded as "
        f"{report['embedding']['upload_dtype']}"
    )
    if "suggested" in report:
        sg = report["suggested"]
        print(
            f"suggested    threshold {sg['threshold']:.6g} (keeps {args.keep:.0%} of these windows), "
            f"embedding.scale {sg['embedding_scale']:.6g}"
        )
    print(f"speed        {rate:,.0f} samples/s (batch {len(windows)}, {args.threads} thread)")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


__all__ = ["ManifestError", "cmd_check", "cmd_init", "cmd_schema"]
