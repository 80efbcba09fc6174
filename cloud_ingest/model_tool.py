"""``cloud-ingest model check``: load a tier-two model as the worker does, and try it.

The manifest's ``tier2`` entry is loaded and checked exactly as a worker loads it at start
(:class:`cloud_ingest.tier2.Tier2Model`: names, element types, shapes, the probe), then run on
the given features (``.npy``, ``[n, features]``, as devices upload them) or on generated ones
of the right shape. It prints the model's input and output tensors, how uploads are fed to
it (reshape, cast, quantization), what the answer is made of, the answers' shapes, a few
sample answers and records/s. Exit code 0 when the worker could use it, 2 with the reason
when it could not (the same message that stops a worker at start).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud_ingest.errors import ModelCheckError

DEFAULT_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _features(path: str | None, dim: int, n: int = 256) -> np.ndarray:
    """The features to run: the file's ``[n, dim]`` (``[n, *record]`` flattened), or N(0, 1) ones."""
    if path is None:
        return np.random.default_rng(0).normal(0.0, 1.0, (n, dim)).astype(np.float32)
    try:
        x = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ModelCheckError(f"{path}: not a readable .npy array ({e})") from None
    if x.dtype.kind not in "fiu":
        raise ModelCheckError(f"{path}: features of dtype {x.dtype}; they are numbers (float32 as uploaded)")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim < 2 or len(x) == 0 or int(np.prod(x.shape[1:])) != dim:
        raise ModelCheckError(f"{path}: features of shape {list(x.shape)}; the model takes [n, {dim}]")
    x = np.ascontiguousarray(x.reshape(len(x), dim), np.float32)
    if not np.isfinite(x).all():
        raise ModelCheckError(f"{path}: holds non-finite features (a worker dead-letters such uploads)")
    return x


def _samples(model: Any, a: Any, k: int = 5) -> list[dict[str, Any]]:
    out = []
    for i in range(min(k, len(a.label_index))):
        if a.values is not None:
            out.append({"record": i, "value": float(a.values[i])})
        else:
            label = model.labels[int(a.label_index[i])]
            out.append({"record": i, "label": label, "confidence": round(float(a.confidences[i]), 5)})
    return out


def _speed(model: Any, x: np.ndarray, seconds: float) -> float:
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < seconds:
        model.answer(x)
        reps += 1
    return reps * len(x) / max(time.perf_counter() - t0, 1e-9)


def cmd_check(args: argparse.Namespace) -> int:
    from cloud_ingest.tier2 import Tier2Model

    model = Tier2Model(args.manifest, providers=args.providers, threads=args.threads)
    x = _features(args.features, model.dim, args.records)
    try:
        a = model.answer(x)
    except ValueError as e:
        raise ModelCheckError(f"{args.manifest}: the model cannot answer these features: {e}") from None
    shapes = {"labels": list(a.label_index.shape), "confidences": list(a.confidences.shape)}
    if a.values is not None:
        shapes = {"values": list(a.values.shape)}
    report = {
        **model.describe(),
        "features": {"shape": list(x.shape), "source": args.features or "generated, N(0, 1)"},
        "answer_shapes": shapes,
        "samples": _samples(model, a),
        "records_per_s": _speed(model, x, args.seconds),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def _print(r: dict[str, Any]) -> None:
    def shape(dims: list[Any]) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"

    def tensors(items: list[dict[str, Any]]) -> str:
        return "; ".join(
            f"{t['name']!r} {t['type']}" + ("" if t["shape"] is None else f" {shape(t['shape'])}")
            for t in items
        )

    f = r["feed"]
    print(f"{r['model']} v{r['version']}: {r['kind']} {r['file']} on {r['providers'][0]}")
    print(f"inputs       {tensors(r['inputs'])}")
    print(f"outputs      {tensors(r['outputs'])}")
    quant = f", quantized with scale {f['scale']:g}, zero point {f['zero_point']}" if "scale" in f else ""
    batch = ", one record a call (fixed batch of 1)" if "fixed_batch" in f else ""
    print(
        f"feed         uploads [n, {f['features']}] -> {f['input']!r} {f['dtype']} "
        f"[n, {', '.join(map(str, f['record_shape']))}]{quant}{batch}"
    )
    for part, source in r["answer"].items():
        print(f"{part:<12} {source}")
    if r["kind"] == "classifier":
        print(f"labels       {', '.join(r['labels'])} ({len(r['labels'])})")
    print(f"features     {r['features']['shape']} ({r['features']['source']})")
    print(f"answers      {', '.join(f'{k} {v}' for k, v in r['answer_shapes'].items())}")
    for s in r["samples"]:
        what = f"{s['value']:.6g}" if "value" in s else f"{s['label']} ({s['confidence']:.3f})"
        print(f"  record {s['record']:<4} {what}")
    print(f"speed        {r['records_per_s']:,.0f} records/s (batches of {r['features']['shape'][0]})")


def add_parser(sub: Any) -> None:
    m = sub.add_parser("model", help="check a tier-two model and its manifest")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    c = msub.add_parser("check", help="load a manifest's tier2 model as a worker does and run it on features")
    c.add_argument("manifest", metavar="MANIFEST.json")
    c.add_argument(
        "--features", metavar="FILE.npy", help="[n, features] as devices upload them (default: generated)"
    )
    c.add_argument("--records", type=int, default=256, help="how many generated records (without --features)")
    c.add_argument(
        "--providers",
        nargs="+",
        default=DEFAULT_PROVIDERS,
        metavar="PROVIDER",
        help="onnxruntime providers, in order",
    )
    c.add_argument("--threads", type=int, default=1, help="intra-op threads (worker.threads)")
    c.add_argument("--seconds", type=float, default=1.0, help="how long to measure records/s")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_check)
