"""A zoo of small foreign-looking models, built with the real converters.

``python -m models.build.zoo --out tests/models/zoo`` (in a venv with
``pip install tensorflow-cpu scikit-learn skl2onnx onnx onnxruntime ai-edge-litert``).

The tests use these files to prove the agent and the workers accept models that are not
shaped like our own (int8/uint8/float32 TFLite with other tensor names, two outputs, a graph
with a hard-coded batch of 1; ONNX with ZipMap, float16 or rank-3 inputs, a regressor).

Standalone: it imports nothing of the repository, and at import time nothing but numpy, so a
test can import this module for the dataset recipes (:func:`classes16`, :func:`normal_logmel`,
:func:`kws_mfcc`, :func:`images32`, :func:`classes128`, :func:`regress16`) with only numpy
installed. TensorFlow, scikit-learn, skl2onnx, onnx, onnxruntime and ai_edge_litert are
imported inside the build and check functions.

Every file is trained on seeded synthetic data in a few seconds, converted, then loaded again
(LiteRT interpreter / onnxruntime) to write what was observed into ``zoo.json`` and
``README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0

# ---------------------------------------------------------------------------------------------
# Dataset recipes (pure numpy). Fixed "world" seeds define the class means / generators; the
# `seed` argument only draws the samples.
# ---------------------------------------------------------------------------------------------

CLASSES16_MEANS_SEED = 1616
CLASSES16_N_CLASSES = 6
CLASSES16_DIM = 16
CLASSES16_MEAN_SCALE = 2.0  # means ~ N(0, 2^2) per feature, samples ~ mean + N(0, 1)


def _gaussian_classes(
    n: int, seed: int, *, n_classes: int, dim: int, means_seed: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    means = np.random.default_rng(means_seed).normal(0.0, scale, size=(n_classes, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    x = means[y] + rng.normal(0.0, 1.0, size=(n, dim))
    return x.astype(np.float32), y.astype(np.int64)


def classes16_means() -> np.ndarray:
    """The 6 class means [6, 16] of :func:`classes16`."""
    rng = np.random.default_rng(CLASSES16_MEANS_SEED)
    return rng.normal(0.0, CLASSES16_MEAN_SCALE, size=(CLASSES16_N_CLASSES, CLASSES16_DIM))


def classes16(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [n, 16], y int64 [n] in 0..5: class means ``classes16_means()`` + N(0, 1).

    The dataset of every 16-feature ONNX classifier of the zoo (trained on ``classes16(1200, 0)``).
    """
    return _gaussian_classes(
        n,
        seed,
        n_classes=CLASSES16_N_CLASSES,
        dim=CLASSES16_DIM,
        means_seed=CLASSES16_MEANS_SEED,
        scale=CLASSES16_MEAN_SCALE,
    )


def classes128(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [n, 128], y int64 [n] in 0..3 (two_heads_f32's data): means N(0, 0.5^2) + N(0, 1)."""
    return _gaussian_classes(n, seed, n_classes=4, dim=128, means_seed=128128, scale=0.5)


REGRESS16_W_SEED = 1617


def regress16(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [n, 16] ~ N(0, 1), y float32 [n] = x @ w + 0.5 + N(0, 0.1^2) (sk_regressor's data)."""
    w = np.random.default_rng(REGRESS16_W_SEED).normal(0.0, 1.0, size=CLASSES16_DIM)
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, size=(n, CLASSES16_DIM))
    y = x @ w + 0.5 + rng.normal(0.0, 0.1, size=n)
    return x.astype(np.float32), y.astype(np.float32)


LOGMEL_FRAMES = 5
LOGMEL_MELS = 128
LOGMEL_RANK = 6
LOGMEL_BASIS_SEED = 640


def _logmel_basis() -> tuple[np.ndarray, np.ndarray]:
    """Mean [640] and RANK smooth components [RANK, 640] of the 'normal machine sound'."""
    rng = np.random.default_rng(LOGMEL_BASIS_SEED)
    f = np.linspace(0.0, 1.0, LOGMEL_MELS)
    mean = 1.0 - 1.5 * f + 0.3 * np.cos(2 * np.pi * 1.5 * f)  # a falling log spectrum
    comps = []
    for k in range(LOGMEL_RANK):
        phase = rng.uniform(0, 2 * np.pi)
        curve = np.cos(np.pi * (k + 1) * f + phase)  # low-frequency cosine over the mel axis
        gains = 1.0 + 0.2 * rng.normal(size=LOGMEL_FRAMES)  # the same shape in every frame
        comps.append(np.concatenate([g * curve for g in gains]))
    return np.tile(mean, LOGMEL_FRAMES), np.asarray(comps)


def normal_logmel(n: int, seed: int) -> np.ndarray:
    """float32 [n, 640]: 5 frames x 128 mel bins of 'normal' data from a rank-6 smooth generator.

    mean + sum_k z_k * component_k + N(0, 0.05^2), z ~ N(0, 0.5^2); values roughly in [-2, 2].
    Anomalies for the autoencoders: e.g. ``rng.normal(0, 1, (n, 640))``.
    """
    mean, comps = _logmel_basis()
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 0.5, size=(n, LOGMEL_RANK))
    x = mean + z @ comps + rng.normal(0.0, 0.05, size=(n, LOGMEL_FRAMES * LOGMEL_MELS))
    return x.astype(np.float32)


KWS_FRAMES = 49
KWS_COEFFS = 10
KWS_CLASSES = 12


def kws_mfcc(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [n, 49, 10] (MFCC frames x coefficients), y int64 [n] in 0..11.

    Background N(0, 0.5^2); class k adds +2.0 in time segment k // 4 (frames 0-15, 16-31,
    32-48) and coefficient band k % 4 (coefficients 2b .. 2b+3 of 10, overlapping bands).
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, KWS_CLASSES, size=n)
    x = rng.normal(0.0, 0.5, size=(n, KWS_FRAMES, KWS_COEFFS))
    seg = [(0, 16), (16, 32), (32, KWS_FRAMES)]
    for i, k in enumerate(y):
        t0, t1 = seg[k // 4]
        b = k % 4
        x[i, t0:t1, 2 * b : 2 * b + 3] += 2.0
    return x.astype(np.float32), y.astype(np.int64)


def images32(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [n, 32, 32, 3] in [0, 1], y int64 [n] in 0..9 (img_uint8's data).

    Background U(0, 0.3); class k paints an 8x8 square at row 4 + 16 * (k // 5), column
    6 * (k % 5), in colour channel k % 3 (set to 1.0). The uint8 model takes round(x * 255).
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n)
    x = rng.uniform(0.0, 0.3, size=(n, 32, 32, 3))
    for i, k in enumerate(y):
        r, c = 4 + 16 * (k // 5), 6 * (k % 5)
        x[i, r : r + 8, c : c + 8, k % 3] = 1.0
    x[:, 0, 0, :] = 0.0  # every image spans exactly [0, 1]: uint8 input scale 1/255, zero point 0
    return x.astype(np.float32), y.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# TFLite builds (TensorFlow / Keras, imported lazily)
# ---------------------------------------------------------------------------------------------


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    return tf


def _keras_reset(seed: int = SEED) -> Any:
    tf = _tf()
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)  # python, numpy and tf.random
    tf.config.experimental.enable_op_determinism()
    return keras


def _convert(
    model: Any,
    rep: np.ndarray | None = None,
    io_type: Any = None,
    *,
    keras_model: bool = True,
    trackable: Any = None,
) -> bytes:
    """Keras model (or concrete function) -> .tflite bytes; full integer when ``rep`` is given."""
    tf = _tf()
    if keras_model:
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
    else:
        conv = tf.lite.TFLiteConverter.from_concrete_functions([model], trackable)
    if rep is not None:

        def gen() -> Iterator[list[np.ndarray]]:
            for row in rep:
                yield [row[None].astype(np.float32)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = gen
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = io_type
        conv.inference_output_type = io_type
    with _quiet():
        return bytes(conv.convert())


class _quiet:
    """Silences the converter's prints to stdout (the SavedModel 'endpoints' listing)."""

    def __enter__(self) -> None:
        sys.stdout.flush()
        self._fd = os.dup(1)
        self._null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self._null, 1)

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        os.dup2(self._fd, 1)
        os.close(self._fd)
        os.close(self._null)


def build_kws_int8() -> bytes:
    """DS-CNN-like keyword spotter (MLPerf Tiny KWS), [1,49,10,1] int8 -> 12 classes int8."""
    keras = _keras_reset()
    L = keras.layers
    inp = keras.Input((KWS_FRAMES, KWS_COEFFS, 1), batch_size=1, name="mfcc")
    h = L.Conv2D(16, (10, 4), strides=(2, 2), padding="same", activation="relu", name="conv1")(inp)
    h = L.DepthwiseConv2D((3, 3), padding="same", activation="relu", name="dw1")(h)
    h = L.Conv2D(32, (1, 1), activation="relu", name="pw1")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    out = L.Dense(KWS_CLASSES, activation="softmax", name="logits")(h)
    model = keras.Model(inp, out)
    x, y = kws_mfcc(1200, seed=0)
    # Trained through a copy with a free batch dimension (the exported model keeps batch_size=1).
    train = keras.Model(*_rebatch(keras, model))
    train.compile(optimizer=keras.optimizers.Adam(5e-3), loss="sparse_categorical_crossentropy")
    train.fit(x[..., None], y, epochs=12, batch_size=32, verbose=0, shuffle=True)
    return _convert(model, rep=x[:200, ..., None], io_type=_tf().int8)


def _rebatch(keras: Any, model: Any) -> tuple[Any, Any]:
    """A training graph with a free batch dimension that shares ``model``'s layers (and weights)."""
    inp = keras.Input(model.input_shape[1:])
    h = inp
    for layer in model.layers[1:]:
        h = layer(h)
    return inp, h


# The MLPerf Tiny / DCASE baseline has 128-wide layers; here 16 wide so that the float32 file
# stays small (640x128 float32 weights alone are 320 KB per layer).
AE_HIDDEN = 16


def _autoencoder(keras: Any) -> Any:
    L = keras.layers
    inp = keras.Input((LOGMEL_FRAMES * LOGMEL_MELS,), batch_size=1, name="logmel")
    h = L.Dense(AE_HIDDEN, activation="relu", name="enc1")(inp)
    h = L.Dense(8, activation="relu", name="bottleneck")(h)
    h = L.Dense(AE_HIDDEN, activation="relu", name="dec1")(h)
    out = L.Dense(LOGMEL_FRAMES * LOGMEL_MELS, name="recon")(h)
    model = keras.Model(inp, out)
    x = normal_logmel(2000, seed=0)
    train = keras.Model(*_rebatch(keras, model))
    train.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse")
    train.fit(x, x, epochs=25, batch_size=64, verbose=0, shuffle=True)
    return model


_AE_CACHE: dict[str, Any] = {}


def build_ae_f32() -> bytes:
    """Dense autoencoder (MLPerf Tiny anomaly detection, ToyADMOS/DCASE), float32 [1,640]."""
    keras = _keras_reset()
    model = _autoencoder(keras)
    _AE_CACHE["model"] = model
    return _convert(model)


def build_ae_int8() -> bytes:
    """The same trained autoencoder as ae_f32, full int8 in/out."""
    model = _AE_CACHE.get("model")
    if model is None:
        model = _autoencoder(_keras_reset())
    return _convert(model, rep=normal_logmel(200, seed=1), io_type=_tf().int8)


def build_img_uint8() -> bytes:
    """Small CNN image classifier (MLPerf Tiny IC / CIFAR-10 style), uint8 [1,32,32,3] -> 10 uint8."""
    keras = _keras_reset()
    L = keras.layers
    inp = keras.Input((32, 32, 3), batch_size=1, name="image")
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    h = L.MaxPooling2D(2, name="pool1")(h)
    h = L.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(h)
    h = L.MaxPooling2D(2, name="pool2")(h)
    h = L.Flatten(name="flat")(h)
    out = L.Dense(10, activation="softmax", name="classes")(h)
    model = keras.Model(inp, out)
    x, y = images32(800, seed=0)
    train = keras.Model(*_rebatch(keras, model))
    train.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    train.fit(x, y, epochs=4, batch_size=32, verbose=0, shuffle=True)
    return _convert(model, rep=x[:100], io_type=_tf().uint8)


def build_fixed_batch() -> bytes:
    """float32 [1,64] -> reshape to a hard-coded [1,-1,16] -> matmul [16,8] -> [1,4,8]."""
    tf = _tf()
    _keras_reset()
    mod = tf.Module()
    mod.w = tf.Variable(np.random.default_rng(64).normal(0, 0.25, size=(16, 8)).astype(np.float32))
    mod.b = tf.Variable(np.linspace(-0.5, 0.5, 8, dtype=np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 64], tf.float32, name="x")])
    def fixed(x: Any) -> Any:
        h = tf.reshape(x, [1, -1, 16])  # the leading 1 is baked into the graph
        return tf.nn.relu(tf.einsum("bti,io->bto", h, mod.w) + mod.b)

    mod.fixed = fixed
    return _convert(fixed.get_concrete_function(), keras_model=False, trackable=mod)


def build_waveform_nobatch() -> bytes:
    """float32 [1600] (a waveform, no batch dimension, as YAMNet-style audio embedders take it)
    -> 10 frames of 160 -> Dense 8 (the per-frame embedding) and Dense 3 softmax (per-frame
    scores): outputs [10, 8] and [10, 3], frames first, no batch anywhere."""
    tf = _tf()
    _keras_reset()
    rng = np.random.default_rng(1600)
    mod = tf.Module()
    mod.w1 = tf.Variable(rng.normal(0, 0.1, size=(160, 8)).astype(np.float32))
    mod.w2 = tf.Variable(rng.normal(0, 0.5, size=(8, 3)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1600], tf.float32, name="waveform")])
    def embed(x: Any) -> Any:
        frames = tf.reshape(x, [10, 160])
        emb = tf.nn.relu(tf.matmul(frames, mod.w1))
        return {"embeddings": emb, "scores": tf.nn.softmax(tf.matmul(emb, mod.w2))}

    mod.embed = embed
    return _convert(embed.get_concrete_function(), keras_model=False, trackable=mod)


def build_two_heads_f32() -> bytes:
    """float32 [1,128] -> Dense(32) 'hidden' -> Dense(4) softmax + Dense(16) embedding."""
    keras = _keras_reset()
    L = keras.layers
    inp = keras.Input((128,), batch_size=1, name="features")
    h = L.Dense(32, activation="relu", name="hidden")(inp)
    probs = L.Dense(4, activation="softmax", name="probs")(h)
    emb = L.Dense(16, name="embedding")(h)
    model = keras.Model(inp, [probs, emb])
    x, y = classes128(800, seed=0)
    tinp = keras.Input((128,))
    th = model.get_layer("hidden")(tinp)
    train = keras.Model(tinp, model.get_layer("probs")(th))  # the embedding head stays untrained
    train.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    train.fit(x, y, epochs=4, batch_size=32, verbose=0, shuffle=True)
    return _convert(model)


# ---------------------------------------------------------------------------------------------
# ONNX builds (scikit-learn + skl2onnx, onnx.helper)
# ---------------------------------------------------------------------------------------------

ONNX_OPSET = 17
ONNX_ML_OPSET = 3
ONNX_IR_VERSION = 8  # opset 17's IR version: loads in onnxruntime >= 1.13 (the project pins >= 1.20)

_SK_CACHE: dict[str, Any] = {}


def _logreg() -> Any:
    if "logreg" not in _SK_CACHE:
        from sklearn.linear_model import LogisticRegression

        x, y = classes16(1200, seed=0)
        _SK_CACHE["logreg"] = LogisticRegression(max_iter=500, random_state=SEED).fit(x, y)
    return _SK_CACHE["logreg"]


def _sk_to_onnx(est: Any, options: dict[int, Any] | None = None) -> bytes:
    from skl2onnx import to_onnx

    x, _ = classes16(4, seed=0)
    onx = to_onnx(est, x, options=options, target_opset={"": ONNX_OPSET, "ai.onnx.ml": ONNX_ML_OPSET})
    onx.ir_version = ONNX_IR_VERSION
    # skl2onnx collects the opsets in a set: sort them so that the bytes do not depend on
    # PYTHONHASHSEED.
    ops = sorted((o.domain, o.version) for o in onx.opset_import)
    del onx.opset_import[:]
    for domain, version in ops:
        onx.opset_import.add(domain=domain, version=version)
    return bytes(onx.SerializeToString())


def build_sk_logreg_zipmap() -> bytes:
    """LogisticRegression, skl2onnx defaults: output_label int64 [N], output_probability ZipMap."""
    return _sk_to_onnx(_logreg())


def build_sk_logreg_nozipmap() -> bytes:
    """The same LogisticRegression with zipmap=False: output_probability float [N, 6]."""
    clf = _logreg()
    return _sk_to_onnx(clf, options={id(clf): {"zipmap": False}})


def build_sk_regressor() -> bytes:
    """Ridge regression 16 -> 1, skl2onnx defaults (output `variable` [N, 1])."""
    from sklearn.linear_model import Ridge

    x, y = regress16(1000, seed=0)
    return _sk_to_onnx(Ridge(alpha=1.0, random_state=SEED).fit(x, y))


def _mlp() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A 16 -> 32 relu -> 6 MLP trained by scikit-learn on classes16 (weights, biases)."""
    if "mlp" not in _SK_CACHE:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        x, y = classes16(1200, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=200, random_state=SEED).fit(x, y)
        _SK_CACHE["mlp"] = (mlp.coefs_, mlp.intercepts_)
    return _SK_CACHE["mlp"]


def _onnx_model(nodes: list[Any], inp: Any, out: Any, inits: list[Any], name: str) -> bytes:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, [inp], [out], initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="edge-tier-zoo"
    )
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def build_mlp_fp16() -> bytes:
    """float16 input [N,16]; MatMul/Add/Relu/MatMul/Add in float16; Cast; Softmax -> probs f32 [N,6]."""
    from onnx import TensorProto, helper, numpy_helper

    (w1, w2), (b1, b2) = _mlp()
    f16 = np.float16
    inits = [
        numpy_helper.from_array(w1.astype(f16), "W1"),
        numpy_helper.from_array(b1.astype(f16), "B1"),
        numpy_helper.from_array(w2.astype(f16), "W2"),
        numpy_helper.from_array(b2.astype(f16), "B2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["l0"]),
        helper.make_node("Add", ["l0", "B2"], ["logits16"]),
        helper.make_node("Cast", ["logits16"], ["logits"], to=TensorProto.FLOAT),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["N", CLASSES16_DIM])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES16_N_CLASSES])
    return _onnx_model(nodes, inp, out, inits, "mlp_fp16")


def build_mlp_rank3() -> bytes:
    """float32 input [N,1,16]; Flatten; MatMul/Add/Relu/MatMul/Add/Softmax -> probs f32 [N,6]."""
    from onnx import TensorProto, helper, numpy_helper

    (w1, w2), (b1, b2) = _mlp()
    f32 = np.float32
    inits = [
        numpy_helper.from_array(w1.astype(f32), "W1"),
        numpy_helper.from_array(b1.astype(f32), "B1"),
        numpy_helper.from_array(w2.astype(f32), "W2"),
        numpy_helper.from_array(b2.astype(f32), "B2"),
    ]
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["l0"]),
        helper.make_node("Add", ["l0", "B2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, CLASSES16_DIM])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES16_N_CLASSES])
    return _onnx_model(nodes, inp, out, inits, "mlp_rank3")


# ---------------------------------------------------------------------------------------------
# Checks: load every file back, run it, record what was observed
# ---------------------------------------------------------------------------------------------


def _np_dtype(d: Any) -> str:
    return np.dtype(d).name


def _tensor(t: dict[str, Any]) -> dict[str, Any]:
    scale, zp = t["quantization"]
    return {
        "name": t["name"],
        "index": int(t["index"]),
        "shape": [int(v) for v in t["shape"]],
        "shape_signature": [int(v) for v in t.get("shape_signature", t["shape"])],
        "dtype": _np_dtype(t["dtype"]),
        "quantization": {"scale": float(scale), "zero_point": int(zp)},
    }


def _quantize(x: np.ndarray, t: dict[str, Any]) -> np.ndarray:
    scale, zp = t["quantization"]
    dt = np.dtype(t["dtype"])
    if dt == np.float32:
        return x.astype(np.float32)
    info = np.iinfo(dt)
    return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dt)


def _dequantize(q: np.ndarray, t: dict[str, Any]) -> np.ndarray:
    scale, zp = t["quantization"]
    if np.dtype(t["dtype"]) == np.float32:
        return q.astype(np.float32)
    return ((q.astype(np.float32) - zp) * scale).astype(np.float32)


def _interp(content: bytes, preserve: bool = False) -> Any:
    import warnings

    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = Interpreter(model_content=content, experimental_preserve_all_tensors=preserve)
    it.allocate_tensors()
    return it


def _run_tflite(content: bytes, xs: np.ndarray) -> list[list[np.ndarray]]:
    """Runs each row of ``xs`` (float, batch of 1); returns per row the dequantized outputs."""
    it = _interp(content)
    tin = it.get_input_details()[0]
    outs = it.get_output_details()
    res = []
    for row in xs:
        it.set_tensor(tin["index"], _quantize(row[None], tin))
        it.invoke()
        res.append([_dequantize(it.get_tensor(o["index"]), o) for o in outs])
    return res


_INTERMEDIATES = {
    "kws_int8.tflite": ["gap", "pw1"],
    "ae_f32.tflite": ["bottleneck"],
    "ae_int8.tflite": ["bottleneck"],
    "img_uint8.tflite": ["pool2"],
    "two_heads_f32.tflite": ["hidden"],
    "fixed_batch.tflite": ["Reshape"],
}


def _intermediates(name: str, content: bytes, sample: np.ndarray) -> list[dict[str, Any]]:
    """Finds the named intermediates in get_tensor_details() and tries to read them after invoke
    with experimental_preserve_all_tensors=True."""
    it = _interp(content, preserve=True)
    tin = it.get_input_details()[0]
    io = {t["index"] for t in it.get_input_details() + it.get_output_details()}
    it.set_tensor(tin["index"], _quantize(sample[None], tin))
    it.invoke()
    found = []
    for t in it.get_tensor_details():
        if t["index"] in io or not any(
            f"/{k}" in t["name"] or t["name"].startswith(k) for k in _INTERMEDIATES[name]
        ):
            continue
        shape = [int(v) for v in t["shape"]]
        if len(shape) < 2 or shape[0] != 1:  # weights and biases, not activations
            continue
        entry = _tensor(t)
        try:
            v = it.get_tensor(t["index"])
            entry["read_with_preserve_all_tensors"] = {
                "ok": True,
                "shape": list(v.shape),
                "dtype": v.dtype.name,
                "nonzero": int(np.count_nonzero(v)),
            }
        except ValueError as e:
            entry["read_with_preserve_all_tensors"] = {"ok": False, "error": str(e)}
        entry["read_without_preserve_all_tensors"] = _read_plain(content, sample, t["index"])
        found.append(entry)
    return found


def _read_plain(content: bytes, sample: np.ndarray, index: int) -> dict[str, Any]:
    """The same read from an interpreter made without experimental_preserve_all_tensors."""
    it = _interp(content)
    tin = it.get_input_details()[0]
    it.set_tensor(tin["index"], _quantize(sample[None], tin))
    it.invoke()
    try:
        v = it.get_tensor(index)
    except ValueError as e:
        return {"ok": False, "error": str(e)}
    return {"ok": True, "shape": list(v.shape), "dtype": v.dtype.name}


def _tflite_facts(content: bytes) -> dict[str, Any]:
    it = _interp(content)
    sigs = it.get_signature_list()
    full = it._get_full_signature_list()
    return {
        "inputs": [_tensor(t) for t in it.get_input_details()],
        "outputs": [_tensor(t) for t in it.get_output_details()],
        "signatures": {
            k: {
                "inputs": {n: int(i) for n, i in v["inputs"].items()},
                "outputs": {n: int(i) for n, i in v["outputs"].items()},
            }
            for k, v in full.items()
        },
        "signature_list": sigs,
        "n_tensors": len(it.get_tensor_details()),
    }


def _fixed_batch_resize(content: bytes) -> dict[str, Any]:
    it = _interp(content)
    tin = it.get_input_details()[0]
    tout = it.get_output_details()[0]
    obs: dict[str, Any] = {"resize_to": [32, 64]}
    try:
        it.resize_tensor_input(tin["index"], [32, 64])
        it.allocate_tensors()
        x = np.random.default_rng(5).normal(size=(32, 64)).astype(np.float32)
        it.set_tensor(tin["index"], x)
        it.invoke()
        y = it.get_tensor(it.get_output_details()[0]["index"])
        obs.update(
            ok=True,
            output_shape=list(y.shape),
            output_shape_after_resize=[int(v) for v in it.get_output_details()[0]["shape"]],
            output_shape_before_resize=[int(v) for v in tout["shape"]],
        )
    except (ValueError, RuntimeError) as e:
        obs.update(ok=False, error=str(e))
    return obs


def check_tflite(name: str, content: bytes) -> dict[str, Any]:
    facts = _tflite_facts(content)
    obs: dict[str, Any] = {}
    if name == "kws_int8.tflite":
        x, y = kws_mfcc(200, seed=1)
        pred = np.array([np.argmax(o[0]) for o in _run_tflite(content, x[..., None])])
        obs = {"dataset": "kws_mfcc(200, seed=1)", "accuracy": float(np.mean(pred == y))}
        sample = x[0, ..., None]
    elif name in ("ae_f32.tflite", "ae_int8.tflite"):
        normal = normal_logmel(100, seed=1)
        noise = np.random.default_rng(2).normal(0.0, 1.0, size=(100, 640)).astype(np.float32)
        e_n = [
            float(np.mean((o[0][0] - x) ** 2))
            for o, x in zip(_run_tflite(content, normal), normal, strict=True)
        ]
        e_a = [
            float(np.mean((o[0][0] - x) ** 2))
            for o, x in zip(_run_tflite(content, noise), noise, strict=True)
        ]
        obs = {
            "dataset": "normal_logmel(100, seed=1) vs default_rng(2).normal(0, 1, (100, 640))",
            "mse_normal_mean": float(np.mean(e_n)),
            "mse_normal_max": float(np.max(e_n)),
            "mse_noise_mean": float(np.mean(e_a)),
            "mse_noise_min": float(np.min(e_a)),
        }
        sample = normal[0]
    elif name == "img_uint8.tflite":
        x, y = images32(200, seed=1)
        pred = np.array([np.argmax(o[0]) for o in _run_tflite(content, x)])
        obs = {"dataset": "images32(200, seed=1)", "accuracy": float(np.mean(pred == y))}
        sample = x[0]
    elif name == "fixed_batch.tflite":
        sample = np.random.default_rng(5).normal(size=64).astype(np.float32)
        obs = {"resize": _fixed_batch_resize(content)}
    elif name == "two_heads_f32.tflite":
        x, y = classes128(200, seed=1)
        out = _run_tflite(content, x)
        probs_pos = next(i for i, o in enumerate(facts["outputs"]) if o["shape"][-1] == 4)
        pred = np.array([np.argmax(o[probs_pos]) for o in out])
        obs = {
            "dataset": "classes128(200, seed=1)",
            "accuracy": float(np.mean(pred == y)),
            "probs_output_position": probs_pos,
        }
        sample = x[0]
    elif name == "waveform_nobatch.tflite":
        sample = np.random.default_rng(6).normal(size=1600).astype(np.float32)
        obs = {"input": "one waveform [1600], no batch dimension; outputs frames first"}
    else:
        raise ValueError(name)
    # (the intermediates are read with a batch axis; the waveform model has none)
    facts["intermediates"] = (
        [] if name == "waveform_nobatch.tflite" else _intermediates(name, content, sample)
    )
    facts["observed"] = obs
    return facts


def _ort_type(v: Any) -> dict[str, Any]:
    shape = [s if isinstance(s, int) or s is None else str(s) for s in v.shape]
    return {"name": v.name, "shape": shape, "type": v.type}


def check_onnx(name: str, content: bytes) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(content)
    sess = ort.InferenceSession(content, providers=["CPUExecutionProvider"])
    facts: dict[str, Any] = {
        "ir_version": int(model.ir_version),
        "opset": {o.domain or "ai.onnx": int(o.version) for o in model.opset_import},
        "inputs": [_ort_type(v) for v in sess.get_inputs()],
        "outputs": [_ort_type(v) for v in sess.get_outputs()],
    }
    iname = sess.get_inputs()[0].name
    if name == "sk_regressor.onnx":
        x, y = regress16(200, seed=1)
        (pred,) = sess.run(None, {iname: x})
        facts["observed"] = {
            "dataset": "regress16(200, seed=1)",
            "output_shape": list(pred.shape),
            "rmse": float(np.sqrt(np.mean((pred[:, 0] - y) ** 2))),
        }
        return facts
    x, y = classes16(200, seed=1)
    if name == "mlp_fp16.onnx":
        feed = x.astype(np.float16)
    elif name == "mlp_rank3.onnx":
        feed = x[:, None, :]
    else:
        feed = x
    outs = sess.run(None, {iname: feed})
    if name.startswith("sk_logreg"):
        label, proba = outs
        pred = label
        kind = type(proba).__name__ + (f"[{type(proba[0]).__name__}]" if isinstance(proba, list) else "")
        facts["observed"] = {"output_probability_python_type": kind}
        if isinstance(proba, list):
            facts["observed"]["output_probability_first_row"] = {
                str(k): round(float(v), 4) for k, v in proba[0].items()
            }
        else:
            facts["observed"]["output_probability_shape"] = list(proba.shape)
    else:
        pred = np.argmax(outs[0], axis=1)
        facts["observed"] = {"probs_shape": list(outs[0].shape), "probs_dtype": outs[0].dtype.name}
    facts["observed"].update(dataset="classes16(200, seed=1)", accuracy=float(np.mean(pred == y)))
    return facts


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

ZOO: list[tuple[str, Callable[[], bytes], str]] = [
    ("kws_int8.tflite", build_kws_int8, "MLPerf Tiny keyword spotting (DS-CNN on 49x10 MFCC), full int8"),
    (
        "ae_f32.tflite",
        build_ae_f32,
        "MLPerf Tiny anomaly detection (ToyADMOS/DCASE dense AE on 5x128 log-mel),"
        " 640-16-8-16-640 (the reference is 128 wide), f32",
    ),
    ("ae_int8.tflite", build_ae_int8, "the same anomaly-detection autoencoder, full int8"),
    (
        "img_uint8.tflite",
        build_img_uint8,
        "MLPerf Tiny image classification (CIFAR-10 style CNN), uint8 in/out",
    ),
    ("fixed_batch.tflite", build_fixed_batch, "a graph with a hard-coded batch of 1 in a Reshape"),
    (
        "waveform_nobatch.tflite",
        build_waveform_nobatch,
        "an audio embedder on a 1-D waveform, no batch",
    ),
    ("two_heads_f32.tflite", build_two_heads_f32, "a classifier with two outputs (probs + embedding), f32"),
    ("sk_logreg_zipmap.onnx", build_sk_logreg_zipmap, "scikit-learn LogisticRegression, skl2onnx defaults"),
    ("sk_logreg_nozipmap.onnx", build_sk_logreg_nozipmap, "the same LogisticRegression, zipmap=False"),
    ("sk_regressor.onnx", build_sk_regressor, "scikit-learn Ridge regressor, skl2onnx defaults"),
    ("mlp_fp16.onnx", build_mlp_fp16, "an MLP with a float16 graph input"),
    ("mlp_rank3.onnx", build_mlp_rank3, "an MLP with a rank-3 [N,1,16] input"),
]

REBUILD = "python -m models.build.zoo --out tests/models/zoo"
PIP = "pip install tensorflow-cpu scikit-learn skl2onnx onnx onnxruntime ai-edge-litert"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for dist in (
        "tensorflow-cpu",
        "keras",
        "numpy",
        "scikit-learn",
        "skl2onnx",
        "onnx",
        "onnxruntime",
        "ai-edge-litert",
    ):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _short(t: dict[str, Any]) -> str:
    q = t.get("quantization", {})
    qs = f" q=({q['scale']:.6g}, {q['zero_point']})" if q and q.get("scale") else ""
    shape = t.get("shape_signature", t.get("shape"))
    dtype = t.get("dtype", t.get("type"))
    return f"`{t['name']}` {dtype} {shape}{qs}"


def _readme(entries: dict[str, Any], vers: dict[str, str], seconds: float) -> str:
    lines = [
        "# Model zoo: foreign-looking models built with the real converters",
        "",
        "Built by `models/build/zoo.py` (TFLite: `tf.lite.TFLiteConverter`; ONNX: skl2onnx and",
        "`onnx.helper`), seeded, on synthetic data whose recipes are functions of that module",
        "(`classes16`, `classes128`, `regress16`, `normal_logmel`, `kws_mfcc`, `images32`: pure numpy).",
        "Every file's sha256, size and tensors as observed by loading it (ai_edge_litert /",
        "onnxruntime) are in `zoo.json`.",
        "",
        f"Rebuild (about {seconds:.0f} s here), from the repository root, in a venv with `{PIP}`:",
        "",
        f"    {REBUILD}",
        "",
        "Versions used: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".",
        "",
        "| file | imitates | inputs | outputs |",
        "|---|---|---|---|",
    ]
    for name, _, what in ZOO:
        e = entries[name]
        ins = "; ".join(_short(t) for t in e["inputs"])
        outs = "; ".join(_short(t) for t in e["outputs"])
        lines.append(f"| `{name}` ({e['bytes']} B) | {what} | {ins} | {outs} |")
    fb = entries["fixed_batch.tflite"]["observed"]["resize"]
    lines += [
        "",
        "Observed:",
        "",
        f"- `fixed_batch.tflite`, `resize_tensor_input(input, [32, 64])` + `allocate_tensors()` +"
        f" `invoke()` with ai_edge_litert: ok={fb.get('ok')}, output shape {fb.get('output_shape')}"
        f" (before the resize {fb.get('output_shape_before_resize')}); a batch-32 caller expecting"
        " (32, 4, 8) gets the rows folded into the first sample instead of an error.",
    ]
    for name, _, _ in ZOO:
        obs = entries[name].get("observed", {})
        shown = {k: v for k, v in obs.items() if k != "resize"}
        if shown:
            lines.append(f"- `{name}`: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
    lines += ["", "Signatures (`_get_full_signature_list()`: signature key -> tensor):", ""]
    for name, _, _ in ZOO:
        e = entries[name]
        if "signatures" not in e:
            continue
        names = {t["index"]: t["name"] for t in e["inputs"] + e["outputs"]}
        for key, sig in e["signatures"].items():
            ins = ", ".join(f"`{k}` -> `{names.get(i, i)}`" for k, i in sig["inputs"].items())
            outs = ", ".join(f"`{k}` -> `{names.get(i, i)}`" for k, i in sig["outputs"].items())
            order = ", ".join(f"`{t['name']}`" for t in e["outputs"])
            lines.append(
                f"- `{name}` `{key}`: inputs {ins}; outputs {outs} (get_output_details order: {order})"
            )
    lines += [
        "",
        "Intermediate tensors (read with `Interpreter(model_content=..., "
        "experimental_preserve_all_tensors=True)` after `invoke()`):",
        "",
    ]
    for name, _, _ in ZOO:
        for t in entries[name].get("intermediates", []):
            r = t["read_with_preserve_all_tensors"]
            p = t["read_without_preserve_all_tensors"]
            plain = "ok" if p["ok"] else f"fails: {p['error']}"
            lines.append(f"- `{name}`: {_short(t)}: read ok={r['ok']}; without the flag {plain}")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("tests/models/zoo"))
    ap.add_argument("--only", nargs="*", help="build only these file names (zoo.json and README not written)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    entries: dict[str, Any] = {}
    for name, build, what in ZOO:
        if args.only and name not in args.only:
            continue
        t = time.monotonic()
        content = build()
        (args.out / name).write_bytes(content)
        facts = check_tflite(name, content) if name.endswith(".tflite") else check_onnx(name, content)
        entries[name] = {
            "imitates": what,
            "sha256": hashlib.sha256(content).hexdigest(),
            "bytes": len(content),
            **facts,
        }
        seen = {k: _fmt(v) for k, v in facts.get("observed", {}).items() if k != "dataset"}
        print(f"{name}: {len(content)} B in {time.monotonic() - t:.1f} s {seen}", file=sys.stderr)
    seconds = time.monotonic() - t0
    if args.only:
        return 0
    vers = versions()
    doc = {
        "built_by": REBUILD,
        "versions": vers,
        "datasets": {
            "classes16": {
                "means_seed": CLASSES16_MEANS_SEED,
                "mean_scale": CLASSES16_MEAN_SCALE,
                "classes": CLASSES16_N_CLASSES,
                "dim": CLASSES16_DIM,
                "train": "classes16(1200, seed=0)",
            },
            "regress16": {"w_seed": REGRESS16_W_SEED, "train": "regress16(1000, seed=0)"},
            "normal_logmel": {
                "basis_seed": LOGMEL_BASIS_SEED,
                "rank": LOGMEL_RANK,
                "train": "normal_logmel(2000, 0)",
            },
            "kws_mfcc": {"train": "kws_mfcc(1200, seed=0)"},
            "images32": {"train": "images32(800, seed=0)"},
            "classes128": {"train": "classes128(800, seed=0)"},
        },
        "models": entries,
    }
    (args.out / "zoo.json").write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    (args.out / "README.md").write_text(_readme(entries, vers, seconds))
    print(f"zoo built in {seconds:.1f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
