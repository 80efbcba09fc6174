"""On-device prefilter throughput: raw windows in, kept embeddings out.

The same seeded windows (half of them faulty) go through, in one run:

* ``raw LiteRT``: what a hand-written loop does with ``ai_edge_litert`` on the same
  ``.tflite``: ``spectrum_features`` on the batch, ``set_tensor``, ``invoke``,
  ``get_tensor`` (the interpreter resized once per batch size);
* ``ours``: ``edge_agent.prefilter.Prefilter.keep`` (manifest-checked model, the
  same features, threshold, the kept rows' scores and embeddings),

at batch sizes 1 (one sample per call: the naive way) to 256. Each figure is
windows per second; ``x one-per-call`` divides by raw LiteRT at batch 1, and
``ours / raw`` compares ours with raw LiteRT at the same batch size (goal >= 0.5).
Run as ``python -m bench.bench_prefilter``.

``--zoo`` adds one row per kind of model the manifest describes (tests/models/zoo, built
with TensorFlow's converter): an int8 keyword spotter on MFCC windows and on raw audio
through the ``mfcc`` stage, an int8 autoencoder scored by its reconstruction error, a
uint8 image classifier (whose batch does not resize: batch 1 in a loop), and a
two-output classifier with an intermediate embedding; each ``Prefilter.keep`` at batch 1
(one window per call) and 64, in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from bench.figures import save_json
from edge_agent.prefilter import Prefilter
from edge_tier.model.features import spectrum_features
from edge_tier.model.generator import generate
from edge_tier.model.manifest import DEFAULT_MANIFEST, load_model

BATCHES = (1, 8, 64, 256)


def raw_litert(windows: np.ndarray, batch: int, threads: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=load_model(DEFAULT_MANIFEST, "prefilter").data, num_threads=threads)
    inp = it.get_input_details()[0]
    outs = it.get_output_details()
    it.resize_tensor_input(inp["index"], [batch, inp["shape"][-1]])
    it.allocate_tensors()
    n = len(windows) - len(windows) % batch
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        it.set_tensor(inp["index"], spectrum_features(windows[i : i + batch]))
        it.invoke()
        for o in outs:
            it.get_tensor(o["index"])
    return n / (time.perf_counter() - t0)


def ours(windows: np.ndarray, batch: int, threads: int) -> float:
    pf = Prefilter(DEFAULT_MANIFEST, threads=threads)
    n = len(windows) - len(windows) % batch
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        pf.keep(windows[i : i + batch])
    return n / (time.perf_counter() - t0)


ZOO = Path(__file__).parents[1] / "tests" / "models" / "zoo"
ZOO_CASES = [  # (label, model, model init arguments, window maker)
    ("keyword spotter, int8, MFCC in", "kws_int8", ["--score-class", "1", "--threshold", "0.5"]),
    ("keyword spotter, int8, raw audio -> mfcc", "kws_int8", [
        "--preprocess", "mfcc", "--window", "16000", "--sample-rate", "16000", "--param", "n_fft=640",
        "--param", "hop_length=320", "--param", "n_mels=40", "--param", "n_mfcc=10", "--threshold", "0.5"]),
    ("autoencoder, int8, reconstruction error", "ae_int8", ["--threshold", "0.5"]),
    ("image classifier, uint8 (batch 1 in a loop)", "img_uint8", ["--threshold", "0.5"]),
    ("two heads, intermediate embedding", "two_heads_f32", [
        "--embedding", "functional_1/hidden_1/MatMul;functional_1/hidden_1/Relu;"
        "functional_1/hidden_1/BiasAdd",
        "--threshold", "0.5"]),
]  # fmt: skip


def zoo_rows(windows: int, threads: int, repeat: int) -> list[dict[str, object]]:
    import tempfile

    from edge_agent.cli import main as agent_main

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, model, extra) in enumerate(ZOO_CASES):
            out = Path(tmp) / str(i) / "manifest.json"
            if agent_main(["model", "init", str(ZOO / f"{model}.tflite"), "--out", str(out), *extra]) != 0:
                raise SystemExit(f"model init failed for {model}")
            pf = Prefilter(out, threads=threads, upload_dtype=None)
            rng = np.random.default_rng(3)
            w = rng.standard_normal((windows, *pf.window_shape)).astype(np.float32)
            speed = {}
            for batch in (1, 64):
                best = 0.0
                for _ in range(repeat):
                    n = len(w) - len(w) % batch
                    t0 = time.perf_counter()
                    for j in range(0, n, batch):
                        pf.keep(w[j : j + batch])
                    best = max(best, n / (time.perf_counter() - t0))
                speed[batch] = best
            rows.append(
                {"model": label, "window": list(pf.window_shape), "batch1": speed[1], "batch64": speed[64]}
            )
    print("\n| model | window | batch 1 windows/s | batch 64 windows/s | batch 64 / batch 1 |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['window']} | {r['batch1']:,.0f} | {r['batch64']:,.0f} | "
              f"{float(r['batch64']) / float(r['batch1']):.1f} |")  # type: ignore[arg-type]  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_prefilter", description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4096, help="windows per contender")
    ap.add_argument("--threads", type=int, default=1, help="interpreter threads (a device core)")
    ap.add_argument("--repeat", type=int, default=5, help="best of N runs per cell")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--zoo", action="store_true", help="also one row per kind of model (tests/models/zoo)")
    ap.add_argument("--zoo-windows", type=int, default=512)
    args = ap.parse_args(argv)
    print(f"# generating {args.windows} windows ...", file=sys.stderr, flush=True)
    windows = generate(args.windows, seed=11, fault_fraction=0.5).x
    raw_litert(windows[:512], 64, args.threads)  # warm-up: caches, allocator, CPU clock
    ours(windows[:512], 64, args.threads)
    rows = []
    for batch in BATCHES:
        print(f"# batch {batch} ...", file=sys.stderr, flush=True)
        raw = our = 0.0
        for _ in range(args.repeat):  # alternate, so that both see the same machine weather
            raw = max(raw, raw_litert(windows, batch, args.threads))
            our = max(our, ours(windows, batch, args.threads))
        rows.append({"batch": batch, "raw_litert": raw, "ours": our})
    base = rows[0]["raw_litert"]
    print("| batch | raw LiteRT windows/s | ours windows/s | ours x one-per-call | ours / raw |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['raw_litert']:,.0f} | {r['ours']:,.0f} | "
            f"{r['ours'] / base:.1f} | {r['ours'] / r['raw_litert']:.2f} |"
        )
    print(
        f"\n{args.windows} windows of 1024 samples, {args.threads} interpreter thread(s), best of "
        f"{args.repeat}; one-per-call = raw LiteRT at batch 1 ({base:,.0f}/s). Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs."
    )
    zoo = zoo_rows(args.zoo_windows, args.threads, args.repeat) if args.zoo else []
    save_json(args.json, {"rows": rows, "threads": args.threads, "zoo": zoo})
    return 0


if __name__ == "__main__":
    sys.exit(main())
