"""Rebuild both models from scratch: ``python -m models.build`` (needs the ``train`` extra).

1. Seeded windows from ``edge_tier.model.generator`` (train / validation / held-out test).
2. The prefilter, a 256->32->16->1 MLP over ``edge_tier.model.features`` spectra, trained to
   score faults (with an auxiliary fault-class head, not shipped, so that its
   16-d embedding carries what tier two needs); written as a full-int8 ``.tflite``.
3. Its threshold: the highest that keeps >= ``--keep-faults`` of validation faults,
   judged on the *int8 model's* scores.
4. Tier two, a 16->64->64->6 MLP over the int8 model's embeddings of kept windows,
   exported to ONNX.
5. ``manifest.json`` (names, versions, sha256, shapes, threshold, labels) and
   ``REPORT.md`` with held-out figures, all measured on the shipped artifacts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from edge_tier.model.features import BINS, spectrum_features
from edge_tier.model.generator import CLASSES, HEALTHY, SignalSpec, generate
from models.build.tflite_writer import Dense, PrefilterWeights, write_prefilter

HERE = Path(__file__).resolve().parent.parent  # models/
VERSION = "1.0.0"


def _torch():  # type: ignore[no-untyped-def]
    try:
        import torch
    except ImportError:
        sys.exit("models.build needs the training extra: pip install -e '.[train]'")
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    return torch


def train_prefilter(xtr: np.ndarray, ytr: np.ndarray, epochs: int) -> PrefilterWeights:
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = nn.Linear(BINS, 32)
            self.embed = nn.Linear(32, 16)
            self.score = nn.Linear(16, 1)
            self.aux = nn.Linear(16, len(CLASSES))  # training only

        def forward(self, x):  # type: ignore[no-untyped-def]
            h = torch.relu(self.hidden(x))
            e = self.embed(h)
            return h, e, self.score(e).squeeze(1), self.aux(torch.relu(e))

    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-2)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    fault = (y != HEALTHY).float()
    pos_weight = torch.tensor(3.0)  # missing a fault costs more than keeping a healthy window
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(256):
            _, _, logit, aux = net(x[idx])
            loss = nn.functional.binary_cross_entropy_with_logits(logit, fault[idx], pos_weight=pos_weight)
            loss = loss + 1.0 * nn.functional.cross_entropy(aux, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        h, e, logit, _ = net(x)

    def rng(a):  # type: ignore[no-untyped-def]
        a = a.numpy()
        return float(np.percentile(a, 0.1)), float(np.percentile(a, 99.9))

    def dense(layer) -> Dense:  # type: ignore[no-untyped-def]
        return Dense(layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy())

    return PrefilterWeights(
        hidden=dense(net.hidden),
        embed=dense(net.embed),
        score=dense(net.score),
        ranges={"input": rng(x), "hidden": rng(h), "embedding": rng(e), "logit": rng(logit)},
    )


def run_tflite(model: bytes, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model, num_threads=1)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], [len(x), x.shape[1]])
    it.allocate_tensors()
    it.set_tensor(inp["index"], x.astype(np.float32))
    it.invoke()
    out = {o["name"]: it.get_tensor(o["index"]) for o in it.get_output_details()}
    return out["score"][:, 0], out["embedding"]


def train_tier2(etr: np.ndarray, ytr: np.ndarray, epochs: int, path: Path) -> None:
    torch = _torch()
    nn = torch.nn
    net = nn.Sequential(
        nn.Linear(etr.shape[1], 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, len(CLASSES))
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = torch.from_numpy(etr.astype(np.float32)), torch.from_numpy(ytr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(256):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model = nn.Sequential(net, nn.Softmax(dim=1)).eval()
    torch.onnx.export(
        model,
        (x[:4],),
        str(path),
        dynamo=True,
        external_data=False,
        input_names=["embedding"],
        output_names=["probs"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    add_answer_outputs(path)


def add_answer_outputs(path: Path) -> None:
    """Append ``label`` (ArgMax) and ``confidence`` (ReduceMax) outputs to the graph, so the
    worker's answer comes out of the same onnxruntime call as the probabilities (per-call numpy
    work would cost as much as the model at small batch sizes)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(path))
    g = m.graph
    if {o.name for o in g.output} >= {"label", "confidence"}:
        return
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    g.node.append(helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0))
    if opset >= 18:
        g.initializer.append(helper.make_tensor("answer_axes", TensorProto.INT64, [1], [1]))
        g.node.append(helper.make_node("ReduceMax", ["probs", "answer_axes"], ["confidence"], keepdims=0))
    else:
        g.node.append(helper.make_node("ReduceMax", ["probs"], ["confidence"], axes=[1], keepdims=0))
    g.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]))
    g.output.append(helper.make_tensor_value_info("confidence", TensorProto.FLOAT, ["batch"]))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def run_onnx(path: Path, e: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"embedding": e.astype(np.float32)})[0]


def macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    f1s = []
    for c in range(k):
        tp, fp, fn = np.sum((p == c) & (y == c)), np.sum((p == c) & (y != c)), np.sum((p != c) & (y == c))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.build", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--train", type=int, default=24000)
    ap.add_argument("--test", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=12, help="prefilter epochs")
    ap.add_argument("--tier2-epochs", type=int, default=60)
    ap.add_argument("--keep-faults", type=float, default=0.985)
    args = ap.parse_args(argv)
    t0 = time.time()
    spec = SignalSpec()
    tr, va, te = (
        generate(n, seed=s, fault_fraction=0.5, spec=spec)
        for n, s in ((args.train, 101), (args.test, 202), (args.test, 303))
    )
    ftr, fva, fte = (spectrum_features(w.x) for w in (tr, va, te))
    print(f"data: {len(tr)} / {len(va)} / {len(te)} windows in {time.time() - t0:.0f}s", file=sys.stderr)

    weights = train_prefilter(ftr, tr.y, args.epochs)
    prefilter = write_prefilter(weights)
    pf_path = args.out / "prefilter.tflite"
    pf_path.write_bytes(prefilter)

    s_va, _ = run_tflite(prefilter, fva)
    faults_va = np.sort(s_va[va.y != HEALTHY])
    threshold = float(faults_va[int(np.floor((1 - args.keep_faults) * len(faults_va)))])
    s_te, e_te = run_tflite(prefilter, fte)
    kept_te = s_te >= threshold
    fault_te = te.y != HEALTHY
    fault_kept = float(np.mean(kept_te[fault_te]))
    healthy_dropped = float(np.mean(~kept_te[~fault_te]))

    s_tr, e_tr = run_tflite(prefilter, ftr)
    kept_tr = s_tr >= threshold
    t2_path = args.out / "tier2.onnx"
    train_tier2(e_tr[kept_tr], tr.y[kept_tr], args.tier2_epochs, t2_path)
    pred = run_onnx(t2_path, e_te[kept_te]).argmax(axis=1)
    f1 = macro_f1(te.y[kept_te], pred, len(CLASSES))
    # What the device uploads with [prefilter] upload_dtype = "int8": symmetric, the scale
    # covering the kept training embeddings (the tflite output is itself on an int8 grid).
    emb_scale = float(np.abs(e_tr[kept_tr]).max()) / 127
    e_q = np.clip(np.round(e_te[kept_te] / emb_scale), -127, 127).astype(np.float32) * emb_scale
    f1_int8 = macro_f1(te.y[kept_te], run_onnx(t2_path, e_q).argmax(axis=1), len(CLASSES))

    raw_bytes = te.x.shape[1] * 4  # a float32 window
    up_bytes = 16 + 8 + 8 + 4  # int8 embedding + seq + time + score, per kept record
    # schema 2 (edge_tier.model.schema, docs/models.md): every tensor and stage named
    manifest = {
        "schema_version": 2,
        "version": VERSION,
        "labels": list(CLASSES),
        "prefilter": {
            "name": "prefilter",
            "version": VERSION,
            "file": pf_path.name,
            "sha256": sha256(pf_path),
            "bytes": pf_path.stat().st_size,
            "window": {"shape": [spec.window], "sample_rate": spec.fs},
            # shaft-order lines, wide bands, envelope spectrum (edge_tier.model.features)
            "preprocess": {"name": "spectrum", "params": {"bins": BINS}},
            "input": {"name": "x", "shape": [-1, BINS], "dtype": "float32"},
            "score": {"tensor": "score", "kind": "class", "index": 0},
            "threshold": threshold,
            "embedding": {"tensor": "embedding", "pool": "flatten", "scale": emb_scale},
        },
        "tier2": {
            "name": "tier2",
            "version": VERSION,
            "file": t2_path.name,
            "sha256": sha256(t2_path),
            "bytes": t2_path.stat().st_size,
            "kind": "classifier",
            "input": {"name": "embedding", "shape": [-1, 16], "dtype": "float32"},
            "output": "probs",
            "answer": {"label": "label", "confidence": "confidence"},
        },
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    kept_share = float(np.mean(kept_te))
    ratio = kept_share * up_bytes / raw_bytes
    report = f"""# Model report (held-out test set, measured on the shipped artifacts)

Rebuild: `python -m models.build` (seeded and reproducible; about a minute on a 2-core VM).

| figure | value | target |
|---|---:|---:|
| fault windows kept by the prefilter | {fault_kept:.2%} | >= 98 % |
| healthy windows dropped by the prefilter | {healthy_dropped:.2%} | >= 80 % |
| tier-two macro-F1 on kept windows | {f1:.3f} | >= 0.9 |
| the same, embedding uploaded as int8 | {f1_int8:.3f} | >= 0.9 |
| prefilter size | {pf_path.stat().st_size:,} bytes | < 100 KB |
| upload bytes / raw bytes (test set: {np.mean(fault_te):.0%} faults) | {ratio:.4f} | |

Test set: {len(te)} windows (seed 303, half faulty, all {len(CLASSES) - 1} fault classes);
threshold {threshold:.4f}, chosen on a separate validation set (seed 202) to keep
{args.keep_faults:.1%} of its faults. Upload bytes count a kept record as its int8
embedding plus seq, time and score; a raw window is {spec.window} float32 samples.
"""
    (args.out / "REPORT.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
