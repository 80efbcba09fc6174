"""Tier two with models it has never seen: any ONNX classifier or regressor a manifest describes.

The converters' own files come from the model zoo (``tests/models/zoo``, built by
``models/build/zoo.py`` with skl2onnx and onnx: a logistic regression with and without
ZipMap, a Ridge regressor, a float16 MLP, a rank-3 MLP), checked on held-out data of their
dataset (``classes16``, ``regress16``). What the zoo lacks (int8/uint8 inputs with a scale,
double, ``[N, H, W, C]``, string classes, a fixed batch of 1, symbolic shapes that hide a
wrong width) are tiny graphs written here (``onnx_proto``). Every graph runs in the real
onnxruntime; every refusal is checked for the manifest field and the tensor it names.
Then the worker on a real nats-server: features of several streams, each answered by its
stream's model, and features no route takes dead-lettered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from cloud_ingest.api import records
from cloud_ingest.cli import main as cli_main
from cloud_ingest.config import IngestConfig
from cloud_ingest.errors import Tier2ModelError
from cloud_ingest.tier2 import Tier2Model
from cloud_ingest.worker import Work, Worker
from edge_tier import topics
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.wire import Dtype, ResultBatch, decode_frame, decode_results, encode_frame_parts
from edge_tier_harness.brokers import NatsServer
from models.build.zoo import classes16, regress16
from tests.cloud_ingest.onnx_proto import Node, model, tensor_type, zipmap_type
from tests.support import publish_features, running_worker, stored, wait_for_rows

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"
CPU = ["CPUExecutionProvider"]
SIX = ["c0", "c1", "c2", "c3", "c4", "c5"]
X16 = {"name": "X", "shape": [-1, 16]}  # skl2onnx's input


def manifest(
    dst: Path, model_file: str | bytes, *, name: str = "m", labels: list[str] | None = SIX, **tier2: Any
) -> Path:
    """A manifest beside a copy of the zoo's ``model_file`` (or these ONNX bytes), its tier2 entry
    made of ``tier2``; the manifest's path."""
    data = (ZOO / model_file).read_bytes() if isinstance(model_file, str) else model_file
    file = model_file if isinstance(model_file, str) else f"{name}.onnx"
    dst.mkdir(parents=True, exist_ok=True)
    (dst / file).write_bytes(data)
    entry = {"name": name, "version": "2.1.0", "file": file, "sha256": hashlib.sha256(data).hexdigest()}
    if labels is not None:
        entry["labels"] = labels
    path = dst / f"{name}.json"
    path.write_text(json.dumps({"schema_version": 2, "tier2": {**entry, **tier2}}))
    return path


def load(path: Path, **kw: Any) -> Tier2Model:
    return Tier2Model(path, providers=CPU, **kw)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


W16x6 = np.random.default_rng(16).normal(0, 1, (16, 6)).astype(np.float32)


def linear(
    inp: tuple[str, list[int | str]] = ("float32", ["N", 16]),
    pre: list[Node] | None = None,
    inits: dict[str, Any] | None = None,
    *,
    w: np.ndarray = W16x6,
    extra: Sequence[tuple[Node, tuple[str, bytes]]] = (),
) -> bytes:
    """x -> (pre: nodes ending in 'xf' [N, 16] float) -> MatMul W -> Softmax -> 'probs' [N, C]."""
    nodes = pre or [Node("Identity", ["x"], ["xf"])]
    nodes = [
        *nodes,
        Node("MatMul", ["xf", "W"], ["logits"]),
        Node("Softmax", ["logits"], ["probs"], {"axis": -1}),
    ]
    outputs = [("probs", tensor_type("float32", [inp[1][0], w.shape[1]]))]
    for node, out in extra:
        nodes.append(node)
        outputs.append(out)
    ml = 1 if any(n.domain == "ai.onnx.ml" for n in nodes) else None
    return model(nodes, [("x", tensor_type(*inp))], outputs, {"W": w, **(inits or {})}, ml_opset=ml)


# -- foreign models: real answers ------------------------------------------------------------


def test_a_skl2onnx_zipmap_classifier_answers_held_out_records_like_its_tensor_twin(tmp_path: Path) -> None:
    x, y = classes16(400, seed=3)
    zipmap = load(
        manifest(
            tmp_path / "a",
            "sk_logreg_zipmap.onnx",
            input=X16,
            output="output_probability",
        )
    )
    with_label = load(
        manifest(
            tmp_path / "b",
            "sk_logreg_zipmap.onnx",
            input=X16,
            output="output_probability",
            answer={"label": "output_label"},
        )
    )
    tensor = load(
        manifest(
            tmp_path / "c",
            "sk_logreg_nozipmap.onnx",
            input=X16,
            output="probabilities",
            answer={"label": "label"},
        )
    )
    p = zipmap.probs(x)
    assert p.shape == (400, 6) and p.dtype == np.float32 and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(p, tensor.probs(x), atol=1e-6)
    for m in (zipmap, with_label, tensor):
        a = m.answer(x)
        assert a.label_index.shape == a.confidences.shape == (400,) and a.values is None
        assert np.mean(a.label_index == y) >= 0.97, m.name
        assert np.allclose(a.confidences, p.max(axis=1), atol=1e-6)
        assert m.labels == SIX
    assert zipmap.describe()["answer"]["label"].startswith("argmax of 'output_probability' seq(map(int64")
    # one record, and more than max_batch: sliced, the same answers
    sliced = load(
        manifest(
            tmp_path / "d",
            "sk_logreg_zipmap.onnx",
            input=X16,
            output="output_probability",
        ),
        max_batch=64,
    )
    assert (sliced.answer(x).label_index == zipmap.answer(x).label_index).all()
    assert sliced.answer(x[5:6]).label_index.tolist() == zipmap.answer(x).label_index[5:6].tolist()


def test_zipmap_and_label_tensors_of_string_classes_follow_the_manifests_label_order(tmp_path: Path) -> None:
    """skl2onnx on string classes: ZipMap(string -> p) and a string output_label. The manifest's
    labels in another order: columns and indices follow the manifest."""
    classes = ["f", "e", "d", "c", "b", "a"]  # the model's order
    onnx = linear(
        extra=[
            (
                Node("ZipMap", ["probs"], ["zm"], {"classlabels_strings": classes}, domain="ai.onnx.ml"),
                ("zm", zipmap_type("string")),
            ),
            (
                Node("ArgMax", ["probs"], ["idx"], {"axis": 1, "keepdims": 0}),
                ("idx", tensor_type("int64", ["N"])),
            ),
            (
                Node("Gather", ["names", "idx"], ["label"], {"axis": 0}),
                ("label", tensor_type("string", ["N"])),
            ),
        ],
        inits={"names": classes},
    )
    x = np.random.default_rng(1).normal(0, 1, (300, 16)).astype(np.float32)
    ref = softmax(x @ W16x6)
    labels = ["a", "b", "c", "d", "e", "f"]
    zm = load(
        manifest(tmp_path / "z", onnx, labels=labels, input={"name": "x", "shape": [-1, 16]}, output="zm")
    )
    assert np.allclose(zm.probs(x), ref[:, ::-1], atol=1e-6)  # label "a" is the model's last class
    want = [classes[i] for i in ref.argmax(axis=1)]
    assert [zm.labels[i] for i in zm.answer(x).label_index] == want
    named = load(
        manifest(
            tmp_path / "s",
            onnx,
            labels=labels,
            input={"name": "x", "shape": [-1, 16]},
            output="zm",
            answer={"label": "label"},
        )
    )
    a = named.answer(x)
    assert [named.labels[i] for i in a.label_index] == want
    assert np.allclose(a.confidences, ref.max(axis=1), atol=1e-6)
    # without labels in the manifest, the ZipMap's classes are the labels (onnxruntime's maps are sorted)
    bare = load(
        manifest(tmp_path / "n", onnx, labels=None, input={"name": "x", "shape": [-1, 16]}, output="zm")
    )
    assert bare.labels == sorted(classes) and [bare.labels[i] for i in bare.answer(x).label_index] == want


def test_a_regressor_answers_its_values(tmp_path: Path) -> None:
    x, y = regress16(300, seed=3)
    m = load(
        manifest(
            tmp_path,
            "sk_regressor.onnx",
            labels=["load_kn"],
            kind="regressor",
            input=X16,
            output="variable",
        )
    )
    a = m.answer(x)
    assert a.values is not None and a.values.shape == (300,)
    assert float(np.sqrt(np.mean((a.values - y) ** 2))) < 0.2  # noise is 0.1
    assert m.labels == ["load_kn"] and (a.label_index == 0).all() and (a.confidences == 0).all()
    assert m.describe()["answer"] == {"value": "'variable' tensor(float) [?, 1]"}


def test_fp16_and_rank3_inputs_are_cast_and_reshaped(tmp_path: Path) -> None:
    x, y = classes16(400, seed=4)
    fp16 = load(
        manifest(
            tmp_path / "h",
            "mlp_fp16.onnx",
            input={"name": "input", "shape": [-1, 16], "dtype": "float16"},
            output="probs",
        )
    )
    rank3 = load(
        manifest(
            tmp_path / "r",
            "mlp_rank3.onnx",
            input={"name": "x", "shape": [-1, 1, 16], "reshape": [1, 16]},
            output="probs",
        )
    )
    assert (fp16.dim, rank3.dim) == (16, 16) and rank3.feed.record_shape == (1, 16)
    a16, a3 = fp16.answer(x), rank3.answer(x)
    assert np.mean(a16.label_index == y) >= 0.97 and np.mean(a3.label_index == y) >= 0.97
    assert np.allclose(a16.confidences, a3.confidences, atol=5e-3)  # the same MLP, float16 vs float32
    # IOBinding (what a GPU worker uses) binds the cast and reshaped inputs alike
    for m, a in ((fp16, a16), (rank3, a3)):
        bound = load(m.manifest, io_binding=True, max_batch=64)
        assert bound.io_binding
        b = bound.answer(x)
        assert (b.label_index == a.label_index).all() and np.allclose(b.confidences, a.confidences, atol=1e-6)
    zipmap = load(
        manifest(tmp_path / "z", "sk_logreg_zipmap.onnx", input=X16, output="output_probability"),
        io_binding=True,
    )
    assert not zipmap.io_binding  # a sequence of maps cannot be bound: a plain run


def _int8_model() -> bytes:
    pre = [Node("DequantizeLinear", ["x", "s", "zp"], ["xf"])]
    return linear(("int8", ["N", 16]), pre, {"s": np.array(0.05, np.float32), "zp": np.array(3, np.int8)})


def test_int8_uint8_image_and_double_inputs_are_quantized_reshaped_and_cast(tmp_path: Path) -> None:
    x = np.random.default_rng(2).normal(0, 2, (500, 16)).astype(np.float32)
    x[0, :4] = [100.0, -100.0, 6.5, -6.5]  # beyond int8's reach at this scale: saturated

    def ref(xf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = softmax(xf.astype(np.float32) @ W16x6)
        return p.argmax(axis=1), p.max(axis=1)

    i8 = load(
        manifest(
            tmp_path / "i8",
            _int8_model(),
            input={"name": "x", "shape": [-1, 16], "dtype": "int8", "scale": 0.05, "zero_point": 3},
            output="probs",
        )
    )
    q = np.clip(np.rint(x / 0.05) + 3, -128, 127)
    idx, conf = ref((q - 3) * 0.05)
    a = i8.answer(x)
    assert (a.label_index == idx).all() and np.allclose(a.confidences, conf, atol=1e-5)
    assert (load(i8.manifest, io_binding=True).answer(x).label_index == idx).all()
    assert i8.describe()["feed"] == {
        "input": "x",
        "features": 16,
        "record_shape": [16],
        "dtype": "int8",
        "scale": 0.05,
        "zero_point": 3,
    }

    image = linear(
        ("uint8", ["N", 4, 4, 1]),
        [Node("DequantizeLinear", ["x", "s", "zp"], ["xd"]), Node("Flatten", ["xd"], ["xf"], {"axis": 1})],
        {"s": np.array(1 / 32, np.float32), "zp": np.array(128, np.uint8)},
    )
    u8 = load(
        manifest(
            tmp_path / "u8",
            image,
            input={
                "name": "x",
                "shape": [-1, 4, 4, 1],
                "reshape": [4, 4, 1],
                "dtype": "uint8",
                "scale": 1 / 32,
                "zero_point": 128,
            },
            output="probs",
        )
    )
    q = np.clip(np.rint(x * 32) + 128, 0, 255)
    idx, conf = ref((q - 128) / 32)
    a = u8.answer(x)
    assert (a.label_index == idx).all() and np.allclose(a.confidences, conf, atol=1e-5)

    double = linear(("float64", ["N", 16]), [Node("Cast", ["x"], ["xf"], {"to": 1})])
    f64 = load(
        manifest(
            tmp_path / "f64",
            double,
            input={"name": "x", "shape": [-1, 16], "dtype": "float64"},
            output="probs",
        )
    )
    idx, conf = ref(x)
    a = f64.answer(x)
    assert (a.label_index == idx).all() and np.allclose(a.confidences, conf, atol=1e-5)


def test_a_model_with_a_batch_of_one_runs_record_by_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one = linear(("float32", [1, 16]))
    m = load(manifest(tmp_path, one, input={"name": "x", "shape": [1, 16]}, output="probs"))
    assert "takes one record a call" in caplog.text
    x = np.random.default_rng(3).normal(0, 1, (7, 16)).astype(np.float32)
    a = m.answer(x)
    assert (a.label_index == (x @ W16x6).argmax(axis=1)).all()


def test_the_shipped_model_still_answers_in_the_graph(tmp_path: Path) -> None:
    m = load(DEFAULT_MANIFEST)
    assert m.describe()["answer"] == {
        "label": "'label' tensor(int64) [batch]",
        "confidence": "'confidence' tensor(float) [batch]",
    }
    assert m._fetch == ["label", "confidence"]  # one call, no numpy: the probabilities are not fetched


# -- refused at load, naming the field and the tensor -----------------------------------------


def _two_inputs() -> bytes:
    return model(
        [Node("Add", ["a", "b"], ["xf"]), Node("MatMul", ["xf", "W"], ["probs"])],
        [("a", tensor_type("float32", ["N", 16])), ("b", tensor_type("float32", ["N", 16]))],
        [("probs", tensor_type("float32", ["N", 6]))],
        {"W": W16x6},
    )


R16 = "'probabilities' tensor(float) [?, 6]"
# (id, zoo file or a graph of _graph, the tier2 entry, what the message must say)
REFUSED: list[tuple[str, str, dict[str, Any], list[str]]] = [
    # the issue's case: confidence pointed at the probabilities
    (
        "confidence [N,6]",
        "sk_logreg_nozipmap.onnx",
        {
            "input": X16,
            "output": "probabilities",
            "answer": {"label": "label", "confidence": "probabilities"},
        },
        ['tier2.answer.confidence = "probabilities"', f"{R16} is not a confidence", "[N] or [N, 1]"],
    ),
    # ... and a graph whose symbolic shape hides it: caught by the probe
    (
        "confidence [N,C]=12",
        "__symbolic__",
        {
            "input": {"name": "x", "shape": [-1, 16]},
            "output": "wide",
            "answer": {"confidence": "wide"},
            "labels": None,
        },
        ['tier2.answer.confidence = "wide"', "'wide' tensor(float) [N, C] gives shape [2, 12] for 2 records"],
    ),
    (
        "label is probabilities",
        "sk_logreg_nozipmap.onnx",
        {"input": X16, "output": "probabilities", "answer": {"label": "probabilities"}},
        ['tier2.answer.label = "probabilities"', f"{R16} is not a label"],
    ),
    (
        "output is the label",
        "sk_logreg_zipmap.onnx",
        {"input": X16, "output": "output_label"},
        ['tier2.output = "output_label"', "'output_label' tensor(int64) [?] is not class probabilities"],
    ),
    (
        "classifier on a regressor",
        "sk_regressor.onnx",
        {"input": X16, "output": "variable"},
        ['tier2.output = "variable"', "'variable' tensor(float) [?, 1]", 'set tier2.kind = "regressor"'],
    ),
    (
        "regressor on probabilities",
        "sk_logreg_nozipmap.onnx",
        {"kind": "regressor", "input": X16, "output": "probabilities"},
        ['tier2.output = "probabilities"', f"{R16} is not one float value per record"],
    ),
    (
        "no such output",
        "sk_logreg_nozipmap.onnx",
        {"input": X16, "output": "probs"},
        ['tier2.output = "probs": the model has no such output', f"'label' tensor(int64) [?], {R16}"],
    ),
    (
        "no such input",
        "sk_logreg_nozipmap.onnx",
        {"input": {"name": "input", "shape": [-1, 16]}, "output": "probabilities"},
        ['tier2.input.name = "input": the model has no such input', "its inputs: 'X' tensor(float) [?, 16]"],
    ),
    (
        "two inputs",
        "__two_inputs__",
        {"input": {"name": "a", "shape": [-1, 16]}, "output": "probs"},
        ["tier2.input.name: the model takes 2 inputs", "'b' tensor(float) [N, 16]"],
    ),
    (
        "fp16 declared float32",
        "mlp_fp16.onnx",
        {"input": {"name": "input", "shape": [-1, 16]}, "output": "probs"},
        [
            'tier2.input.dtype = "float32"',
            "'input' tensor(float16) [N, 16] is float16",
            'set tier2.input.dtype = "float16"',
        ],
    ),
    (
        "int8 declared float32",
        "__int8__",
        {"input": {"name": "x", "shape": [-1, 16]}, "output": "probs"},
        [
            'tier2.input.dtype = "float32"',
            "'x' tensor(int8) [N, 16] is int8",
            'set tier2.input.dtype = "int8" and tier2.input.scale, zero_point',
        ],
    ),
    (
        "int8 without scale",
        "__int8__",
        {"input": {"name": "x", "shape": [-1, 16], "dtype": "int8"}, "output": "probs"},
        ["tier2.input: Value error, an int8 input needs scale (and zero_point, default 0)"],
    ),
    (
        "int64 input",
        "__int64__",
        {"input": {"name": "x", "shape": [-1, 16]}, "output": "probs"},
        ["tier2.input.dtype: the model's input 'x' tensor(int64) [N, 16] is not one tier two can feed"],
    ),
    (
        "rank 3 without reshape",
        "mlp_rank3.onnx",
        {"input": {"name": "x", "shape": [-1, 1, 16]}, "output": "probs"},
        [
            "tier2.input.reshape: the model's input 'x' tensor(float) [N, 1, 16] takes records of rank 2",
            "set tier2.input.reshape",
            "e.g. [1, 16]",
        ],
    ),
    (
        "rank 3 as rank 2",
        "mlp_rank3.onnx",
        {"input": {"name": "x", "shape": [-1, 16]}, "output": "probs"},
        [
            "tier2.input.shape = [-1, 16]: rank 2",
            "but the model's input 'x' tensor(float) [N, 1, 16] has rank 3",
            "set tier2.input.shape to the model's ([-1, 1, 16]) and tier2.input.reshape",
            "([1, 16])",
        ],
    ),
    (
        "reshape of the wrong size",
        "mlp_rank3.onnx",
        {"input": {"name": "x", "shape": [-1, -1, -1], "reshape": [2, 8]}, "output": "probs"},
        [
            "tier2.input.reshape = [2, 8]: dimension 1 is 2",
            "the model's input 'x' tensor(float) [N, 1, 16] has 1",
        ],
    ),
    (
        "features of the wrong size",
        "sk_logreg_nozipmap.onnx",
        {"input": {"name": "X", "shape": [-1, 12]}, "output": "probabilities"},
        [
            "tier2.input.shape = [-1, 12]: dimension 1 is 12",
            "the model's input 'X' tensor(float) [?, 16] has 16",
        ],
    ),
    (
        "labels: 6 classes, 5 labels",
        "sk_logreg_nozipmap.onnx",
        {"input": X16, "output": "probabilities", "labels": SIX[:5]},
        [f"tier2.labels: the model's output {R16} has 6 classes, the manifest names 5 labels"],
    ),
    (
        "zipmap: 6 classes, 5 labels",
        "sk_logreg_zipmap.onnx",
        {"input": X16, "output": "output_probability", "labels": SIX[:5]},
        [
            "tier2.labels: the model's ZipMap 'output_probability' has 6 classes [0, 1, 2, 3, 4, 5]",
            "names 5 labels",
        ],
    ),
    (
        "answer of a regressor",
        "sk_regressor.onnx",
        {"kind": "regressor", "input": X16, "output": "variable", "answer": {"label": "variable"}},
        ["tier2: Value error, answer is for classifiers"],
    ),
]


def _symbolic() -> bytes:
    """'probs' [N, 16] sliced to 12 columns by a count computed from the data: onnxruntime's
    shape inference cannot see it, the output stays [N, C]."""
    nodes = [
        Node("Mul", ["xf", "zeros"], ["xz"]),
        Node("ReduceSum", ["xz"], ["zero"], {"keepdims": 0}),
        Node("Add", ["zero", "twelve"], ["kf"]),
        Node("Cast", ["kf"], ["k"], {"to": 7}),
        Node("Unsqueeze", ["k", "ax0"], ["k1"]),
        Node("Slice", ["probs", "starts", "k1", "axes"], ["wide"]),
    ]
    inits = {
        "zeros": np.zeros(16, np.float32),
        "twelve": np.array(12, np.float32),
        "ax0": np.array([0]),
        "starts": np.array([0]),
        "axes": np.array([1]),
    }
    pre = [Node("Identity", ["x"], ["xf"])]
    core = [Node("MatMul", ["xf", "W"], ["logits"]), Node("Softmax", ["logits"], ["probs"], {"axis": -1})]
    return model(
        [*pre, *core, *nodes],
        [("x", tensor_type("float32", ["N", 16]))],
        [("wide", tensor_type("float32", ["N", "C"]))],
        {"W": np.ones((16, 16), np.float32), **inits},
    )


def _graph(key: str) -> bytes:
    if key == "__symbolic__":
        return _symbolic()
    if key == "__two_inputs__":
        return _two_inputs()
    if key == "__int8__":
        return _int8_model()
    assert key == "__int64__"
    return linear(("int64", ["N", 16]), [Node("Cast", ["x"], ["xf"], {"to": 1})])


@pytest.mark.parametrize(("case", "file", "tier2", "says"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_manifest_the_model_does_not_fit_is_refused_at_load(
    tmp_path: Path, case: str, file: str, tier2: dict[str, Any], says: list[str]
) -> None:
    path = manifest(tmp_path, _graph(file) if file.startswith("__") else file, **tier2)
    with pytest.raises(Tier2ModelError) as e:
        load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: "), message
    for part in says:
        assert part in message, message


def test_a_string_label_the_manifest_does_not_know_is_refused_at_load(tmp_path: Path) -> None:
    onnx = linear(
        extra=[
            (
                Node("ArgMax", ["probs"], ["idx"], {"axis": 1, "keepdims": 0}),
                ("idx", tensor_type("int64", ["N"])),
            ),
            (
                Node("Gather", ["names", "idx"], ["label"], {"axis": 0}),
                ("label", tensor_type("string", ["N"])),
            ),
        ],
        inits={"names": ["cat", "dog", "cow", "hen", "pig", "owl"]},
        w=np.zeros((16, 6), np.float32),
    )
    path = manifest(
        tmp_path, onnx, input={"name": "x", "shape": [-1, 16]}, output="probs", answer={"label": "label"}
    )
    with pytest.raises(
        Tier2ModelError,
        match=r"tier2\.answer\.label = \"label\": 'label' tensor\(string\) \[N\]: "
        r"the model answered label 'cat', not one of \['c0'",
    ):
        load(path)


def test_a_worker_with_an_unusable_routed_model_exits_2_at_start(tmp_path: Path) -> None:
    bad = manifest(
        tmp_path / "bad",
        "sk_logreg_nozipmap.onnx",
        input=X16,
        output="probabilities",
        answer={"confidence": "probabilities"},
    )
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(
        '[nats]\nservers = ["nats://127.0.0.1:1"]\n'
        f'[[worker.models]]\nmanifest = "{bad}"\nstreams = ["audio"]\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "cloud_ingest.cli", "worker", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "worker.models[0]: " in r.stderr and 'tier2.answer.confidence = "probabilities"' in r.stderr


# -- cloud-ingest model check -------------------------------------------------------------------


def test_model_check_runs_a_manifest_on_given_and_generated_features(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = manifest(
        tmp_path,
        "sk_logreg_zipmap.onnx",
        input=X16,
        output="output_probability",
        answer={"label": "output_label"},
    )
    x, y = classes16(64, seed=9)
    np.save(tmp_path / "features.npy", x)
    base = ["model", "check", str(path), "--providers", "CPUExecutionProvider", "--seconds", "0.05"]
    assert cli_main([*base, "--features", str(tmp_path / "features.npy"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "m" and report["version"] == "2.1.0" and report["kind"] == "classifier"
    assert report["inputs"] == [{"name": "X", "type": "tensor(float)", "shape": [None, 16]}]
    assert {o["name"]: o["type"] for o in report["outputs"]} == {
        "output_label": "tensor(int64)",
        "output_probability": "seq(map(int64,tensor(float)))",
    }
    assert report["answer"]["label"] == "'output_label' tensor(int64) [?]"
    assert report["answer_shapes"] == {"labels": [64], "confidences": [64]}
    assert [s["label"] for s in report["samples"]] == [SIX[i] for i in y[:5]]
    assert report["records_per_s"] > 0 and report["features"]["shape"] == [64, 16]

    assert cli_main(base) == 0  # generated features, text
    out = capsys.readouterr().out
    for line in (
        "inputs       'X' tensor(float) [?, 16]",
        "feed         uploads [n, 16] -> 'X' float32 [n, 16]",
        "label        'output_label' tensor(int64) [?]",
        "answers      labels [256], confidences [256]",
        "records/s",
    ):
        assert line in out, out

    reg = manifest(tmp_path / "r", "sk_regressor.onnx", kind="regressor", input=X16, output="variable")
    assert (
        cli_main(
            ["model", "check", str(reg), "--providers", "CPUExecutionProvider", "--json", "--seconds", "0.05"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["answer_shapes"] == {"values": [256]} and "value" in report["samples"][0]


def test_model_check_says_why_a_model_is_unusable_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = manifest(tmp_path, "mlp_rank3.onnx", input={"name": "x", "shape": [-1, 1, 16]}, output="probs")
    assert cli_main(["model", "check", str(bad), "--providers", "CPUExecutionProvider"]) == 2
    err = capsys.readouterr().err
    assert "cloud-ingest: " in err and "tier2.input.reshape" in err and "e.g. [1, 16]" in err
    good = manifest(tmp_path / "g", "sk_logreg_nozipmap.onnx", input=X16, output="probabilities")
    np.save(tmp_path / "narrow.npy", np.zeros((4, 8), np.float32))
    assert (
        cli_main(
            [
                "model",
                "check",
                str(good),
                "--providers",
                "CPUExecutionProvider",
                "--features",
                str(tmp_path / "narrow.npy"),
            ]
        )
        == 2
    )
    assert "narrow.npy: features of shape [4, 8]; the model takes [n, 16]" in capsys.readouterr().err


# -- the worker: one model per route, one call per model per batch -----------------------------


def stream_frame(stream: str, first: int, x: np.ndarray, *, device: str, prefilter: str = "pf") -> bytes:
    n = len(x)
    return encode_frame_parts(
        tenant="acme",
        device=device,
        prev_seq=first - 1,
        stream=stream,
        model=prefilter,
        model_version="1",
        schema_version=1,
        created_ms=1,
        dtype=Dtype.FLOAT32,
        dim=x.shape[1],
        seqs=list(range(first, first + n)),
        scores=[0.5] * n,
        times_ms=[1] * n,
        feature_blobs=[row.astype("<f4").tobytes() for row in x],
    )


def test_one_inference_call_per_model_per_batch_in_the_batchs_order(tmp_path: Path) -> None:
    a = load(manifest(tmp_path / "a", "sk_logreg_nozipmap.onnx", name="a", input=X16, output="probabilities"))
    b = load(
        manifest(
            tmp_path / "b", "sk_regressor.onnx", name="b", kind="regressor", input=X16, output="variable"
        )
    )
    calls: list[tuple[str, int]] = []
    for m in (a, b):
        real = m.answer
        m.answer = lambda x, m=m, real=real: (calls.append((m.name, len(x))), real(x))[1]  # type: ignore[method-assign]
    x, _ = classes16(12, seed=5)
    batch = []
    for i, m in enumerate([a, b, a, b]):
        f = decode_frame(stream_frame("s", 1 + 3 * i, x[3 * i : 3 * i + 3], device=f"d{i}"))
        batch.append(Work(None, f, f.upload_id, x[3 * i : 3 * i + 3], m))  # type: ignore[arg-type]
    out = Worker(IngestConfig()).infer(batch)
    assert sorted(calls) == [("a", 6), ("b", 6)]
    assert [o.work for o in out] == batch
    assert [o.values is None for o in out] == [True, False, True, False]
    assert np.allclose(out[3].values, b.probs(x[9:12]))  # type: ignore[arg-type]
    assert (out[2].labels == a.answer(x[6:9]).label_index).all()  # type: ignore[union-attr]


def test_features_of_each_stream_are_answered_by_that_streams_model(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """vibration -> the shipped model (fallback), audio -> a skl2onnx ZipMap classifier for tenant
    acme, temperature -> a regressor; camera has no route: dead-lettered, naming tenant and stream."""
    zip_manifest = manifest(
        tmp_path / "zip",
        "sk_logreg_zipmap.onnx",
        name="sk-logreg",
        input=X16,
        output="output_probability",
        answer={"label": "output_label"},
    )
    reg_manifest = manifest(
        tmp_path / "reg",
        "sk_regressor.onnx",
        name="ridge",
        kind="regressor",
        labels=["load_kn"],
        input=X16,
        output="variable",
    )
    x, y = classes16(40, seed=11)
    xr, yr = regress16(40, seed=11)
    vib = np.random.default_rng(0).normal(0, 4, (40, 16)).astype(np.float32)
    sent = {
        "vibration": [
            stream_frame("vibration", 1 + 10 * i, vib[10 * i : 10 * i + 10], device="v") for i in range(4)
        ],
        "audio": [stream_frame("audio", 1 + 10 * i, x[10 * i : 10 * i + 10], device="a") for i in range(4)],
        "temperature": [
            stream_frame("temperature", 1 + 20 * i, xr[20 * i : 20 * i + 20], device="t") for i in range(2)
        ],
        "camera": [stream_frame("camera", 1, x[:5], device="c")],
    }
    routes = [
        {"manifest": str(zip_manifest), "tenants": ["acme"], "streams": ["audio"]},
        {"manifest": str(reg_manifest), "streams": ["temperature"], "prefilters": ["pf"]},
        {"manifest": str(DEFAULT_MANIFEST), "streams": ["vibration"]},
    ]

    async def scenario() -> tuple[list[ResultBatch], list[Any]]:
        await publish_features(nats_server.url, [f for frames in sent.values() for f in frames])
        async with running_worker(
            nats_server.url, models=routes, manifest="", max_deliveries=1, max_batch=512, max_wait_ms=50
        ):
            got = await wait_for_rows(nats_server.url, 120)
            deadline = time.monotonic() + 10
            while not (dlq := await stored(nats_server.url, topics.DEADLETTER_STREAM)):
                assert time.monotonic() < deadline, "the unrouted frame was not dead-lettered"
                await asyncio.sleep(0.1)
            return got, dlq

    got, dlq = asyncio.run(scenario())
    by_stream: dict[str, list[ResultBatch]] = {}
    for b in got:
        by_stream.setdefault(b.stream, []).append(b)
    assert sorted(by_stream) == ["audio", "temperature", "vibration"]
    assert {(b.model, b.model_version) for b in by_stream["audio"]} == {("sk-logreg", "2.1.0")}
    assert {(b.model, b.model_version) for b in by_stream["temperature"]} == {("ridge", "2.1.0")}
    shipped = load(DEFAULT_MANIFEST, warmup=False)
    assert {(b.model, b.model_version) for b in by_stream["vibration"]} == {("tier2", shipped.version)}

    audio = sorted(by_stream["audio"], key=lambda b: b.seqs[0])
    assert [label for b in audio for label in b.labels] == [SIX[i] for i in y]  # held-out, all right
    assert all(b.v == 1 and b.values is None for b in audio)
    temp = sorted(by_stream["temperature"], key=lambda b: b.seqs[0])
    values = np.array([v for b in temp for v in b.values or []])
    assert all(b.v == 2 and set(b.labels) == {"load_kn"} and set(b.confidences) == {0.0} for b in temp)
    assert values.shape == (40,) and float(np.sqrt(np.mean((values - yr) ** 2))) < 0.25
    assert records(temp[0], 7)[0]["value"] == temp[0].values[0]  # type: ignore[index]
    vib_labels = [
        label for b in sorted(by_stream["vibration"], key=lambda b: b.seqs[0]) for label in b.labels
    ]
    assert vib_labels == [shipped.labels[i] for i in shipped.answer(vib).label_index]

    assert len(dlq) == 1 and dlq[0].subject == topics.dlq_subject("worker", "acme", "c")
    reason = dlq[0].headers[topics.H_REASON]
    assert "no model" in reason and "tenant 'acme', stream 'camera'" in reason, reason
    assert decode_results(json.dumps(json.loads(temp[0].model_dump_json()))) == temp[0]
