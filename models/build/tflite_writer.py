"""Write the prefilter as a full-int8 ``.tflite`` straight from trained weights.

The graph is ``x f32 -> QUANTIZE -> FC+RELU (h) -> FC (embedding) -> FC (logit)
-> LOGISTIC (score)``, with DEQUANTIZE on both outputs, so the device feeds and
reads float32 while all arithmetic is int8. Written with the flatbuffer schema
that ships inside ai-edge-litert (``schema_py_generated``), so no TensorFlow and
no converter toolchain are needed, and the output is byte-for-byte
reproducible. See models/TOOLING.md for why, and for the int8 rules followed.
"""

from __future__ import annotations

from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as S

Q = tuple[float, int]  # (scale, zero point)


def activation_q(lo: float, hi: float) -> Q:
    """Asymmetric int8 for an activation whose calibrated range is [lo, hi] (0 included)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 or 1e-8
    return scale, int(np.clip(round(-128 - lo / scale), -128, 127))


@dataclass(frozen=True)
class Dense:
    weight: np.ndarray  # [out, in] float32 (torch Linear layout)
    bias: np.ndarray  # [out] float32


@dataclass(frozen=True)
class PrefilterWeights:
    hidden: Dense  # in -> h, ReLU
    embed: Dense  # h -> embedding
    score: Dense  # embedding -> logit, then sigmoid
    # calibrated (lo, hi) of the input, hidden, embedding and logit activations
    ranges: dict[str, tuple[float, float]]


class _Graph:
    def __init__(self) -> None:
        self.model = S.ModelT()
        self.model.version = 3
        self.model.buffers = [S.BufferT()]  # buffer 0 must be empty
        self.model.operatorCodes = []
        self.tensors: list[S.TensorT] = []
        self.ops: list[S.OperatorT] = []
        self.codes: dict[int, int] = {}

    def tensor(
        self,
        name: str,
        shape: tuple[int, ...],
        ttype: int,
        q: Q | None = None,
        data: np.ndarray | None = None,
    ) -> int:
        t = S.TensorT()
        t.name, t.shape, t.type = name, list(shape), ttype
        if data is None:
            t.shapeSignature = [-1, *shape[1:]]
        b = S.BufferT()
        if data is not None:
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        self.model.buffers.append(b)
        t.buffer = len(self.model.buffers) - 1
        if q is not None:
            t.quantization = S.QuantizationParametersT()
            t.quantization.scale = [float(q[0])]
            t.quantization.zeroPoint = [int(q[1])]
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(
        self,
        code: int,
        ins: list[int],
        outs: list[int],
        version: int,
        options_type: int = 0,
        options: object = None,
    ) -> None:
        if code not in self.codes:
            oc = S.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
            self.codes[code] = len(self.model.operatorCodes)
            self.model.operatorCodes.append(oc)
        o = S.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self.codes[code], ins, outs
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self.ops.append(o)

    def dense(self, x: int, xq: Q, layer: Dense, outq: Q, name: str, relu: bool) -> int:
        w = layer.weight.astype(np.float64)
        ws = max(float(np.abs(w).max()), 1e-8) / 127
        wi = self.tensor(
            f"{name}/weights",
            w.shape,
            S.TensorType.INT8,
            (ws, 0),
            np.clip(np.round(w / ws), -127, 127).astype(np.int8),
        )
        bs = xq[0] * ws
        bi = self.tensor(
            f"{name}/bias",
            layer.bias.shape,
            S.TensorType.INT32,
            (bs, 0),
            np.round(layer.bias.astype(np.float64) / bs).astype(np.int32),
        )
        y = self.tensor(name, (1, w.shape[0]), S.TensorType.INT8, outq)
        opts = S.FullyConnectedOptionsT()
        opts.fusedActivationFunction = (
            S.ActivationFunctionType.RELU if relu else S.ActivationFunctionType.NONE
        )
        self.op(
            S.BuiltinOperator.FULLY_CONNECTED,
            [x, wi, bi],
            [y],
            4,
            S.BuiltinOptions.FullyConnectedOptions,
            opts,
        )
        return y


def write_prefilter(w: PrefilterWeights) -> bytes:
    """The ``.tflite`` bytes: input ``x`` f32 [B, in]; outputs ``score`` [B, 1], ``embedding`` [B, E]."""
    g = _Graph()
    n_in = w.hidden.weight.shape[1]
    n_emb = w.embed.weight.shape[0]
    q_in, q_h = activation_q(*w.ranges["input"]), activation_q(*w.ranges["hidden"])
    q_e, q_l = activation_q(*w.ranges["embedding"]), activation_q(*w.ranges["logit"])
    x = g.tensor("x", (1, n_in), S.TensorType.FLOAT32)
    xq = g.tensor("x_q", (1, n_in), S.TensorType.INT8, q_in)
    g.op(S.BuiltinOperator.QUANTIZE, [x], [xq], 2)
    h = g.dense(xq, q_in, w.hidden, q_h, "hidden", relu=True)
    e = g.dense(h, q_h, w.embed, q_e, "embedding_q", relu=False)
    lg = g.dense(e, q_e, w.score, q_l, "logit", relu=False)
    sq = g.tensor("score_q", (1, 1), S.TensorType.INT8, (1 / 256, -128))  # LOGISTIC's fixed int8 output
    g.op(S.BuiltinOperator.LOGISTIC, [lg], [sq], 2)
    score = g.tensor("score", (1, 1), S.TensorType.FLOAT32)
    emb = g.tensor("embedding", (1, n_emb), S.TensorType.FLOAT32)
    g.op(S.BuiltinOperator.DEQUANTIZE, [sq], [score], 2)
    g.op(S.BuiltinOperator.DEQUANTIZE, [e], [emb], 2)
    sg = S.SubGraphT()
    sg.tensors, sg.operators, sg.inputs, sg.outputs = g.tensors, g.ops, [x], [score, emb]
    sg.name = "prefilter"
    g.model.subgraphs = [sg]
    g.model.description = "edge-tier prefilter"
    fb = flatbuffers.Builder(1024)
    fb.Finish(g.model.Pack(fb), file_identifier=b"TFL3")
    return bytes(fb.Output())
