"""Tiny ONNX graphs for tests, written as protobuf bytes with numpy and nothing else.

The worker's venv has onnxruntime but not the ``onnx`` package, and the model zoo
(``tests/models/zoo``, built with skl2onnx and onnx) covers the converters' shapes but not
every input type tier two casts to (int8/uint8 with a scale, double, ``[N, H, W, C]``) nor
string labels. These graphs fill that gap: a few standard operators (opset 17, IR 8), each
graph loaded and run by the real onnxruntime in the tests, so an encoding mistake shows as
onnxruntime refusing the file.

Only the fields of ``onnx.proto`` that these graphs use are written (field numbers as in
onnx/onnx.proto3): ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto,
ValueInfoProto, TypeProto (tensor, sequence, map).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# TensorProto.DataType
ELEM = {
    "float32": 1,
    "uint8": 2,
    "int8": 3,
    "int32": 6,
    "int64": 7,
    "string": 8,
    "float16": 10,
    "float64": 11,
}
_NP = {np.dtype(k): v for k, v in ELEM.items() if k != "string"}

Dim = int | str


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int64: two's complement, ten bytes
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(num: int, wire: int) -> bytes:
    return _varint(num << 3 | wire)


def _int(num: int, v: int) -> bytes:
    return _key(num, 0) + _varint(v)


def _bytes(num: int, v: bytes | str) -> bytes:
    b = v.encode() if isinstance(v, str) else v
    return _key(num, 2) + _varint(len(b)) + b


def _float(num: int, v: float) -> bytes:
    return _key(num, 5) + struct.pack("<f", v)


def tensor(name: str, value: np.ndarray | Sequence[str]) -> bytes:
    """A TensorProto: a numpy array (raw_data), or a list of strings (string_data)."""
    if isinstance(value, np.ndarray):
        raw = np.ascontiguousarray(value, value.dtype.newbyteorder("<")).tobytes()
        dims = b"".join(_int(1, d) for d in value.shape)
        return dims + _int(2, _NP[value.dtype]) + _bytes(8, name) + _bytes(9, raw)
    strings = b"".join(_bytes(6, s) for s in value)
    return _int(1, len(value)) + _int(2, ELEM["string"]) + strings + _bytes(8, name)


def _shape(dims: Sequence[Dim]) -> bytes:
    return b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)


def tensor_type(elem: str, dims: Sequence[Dim]) -> bytes:
    """TypeProto with a tensor_type (field 1)."""
    return _bytes(1, _int(1, ELEM[elem]) + _bytes(2, _shape(dims)))


def zipmap_type(key: str) -> bytes:
    """TypeProto seq(map(key, tensor(float))), ZipMap's output."""
    value = _bytes(1, _int(1, ELEM["float32"]))  # a scalar tensor without a shape, as skl2onnx writes it
    map_type = _bytes(5, _int(1, ELEM[key]) + _bytes(2, value))
    return _bytes(4, _bytes(1, map_type))


def value_info(name: str, type_proto: bytes) -> bytes:
    return _bytes(1, name) + _bytes(2, type_proto)


def _attribute(name: str, v: int | float | str | bytes | Sequence[int] | Sequence[str]) -> bytes:
    a = _bytes(1, name)
    if isinstance(v, bool | int):
        return a + _int(3, int(v)) + _int(20, 2)
    if isinstance(v, float):
        return a + _float(2, v) + _int(20, 1)
    if isinstance(v, str | bytes):
        return a + _bytes(4, v) + _int(20, 3)
    items = list(v)
    if all(isinstance(x, str) for x in items):
        return a + b"".join(_bytes(9, str(x)) for x in items) + _int(20, 8)
    return a + b"".join(_int(8, int(x)) for x in items) + _int(20, 7)


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, int | float | str | Sequence[int] | Sequence[str]] = field(default_factory=dict)
    domain: str = ""

    def encode(self, i: int) -> bytes:
        b = b"".join(_bytes(1, x) for x in self.inputs) + b"".join(_bytes(2, x) for x in self.outputs)
        b += _bytes(3, f"n{i}_{self.op}") + _bytes(4, self.op)
        b += b"".join(_bytes(5, _attribute(k, v)) for k, v in self.attrs.items())
        return b + (_bytes(7, self.domain) if self.domain else b"")


def model(
    nodes: list[Node],
    inputs: list[tuple[str, bytes]],
    outputs: list[tuple[str, bytes]],
    initializers: dict[str, np.ndarray | Sequence[str]] | None = None,
    *,
    opset: int = 17,
    ml_opset: int | None = None,
) -> bytes:
    """ModelProto bytes of one graph: ``inputs``/``outputs`` as (name, TypeProto bytes)."""
    g = b"".join(_bytes(1, n.encode(i)) for i, n in enumerate(nodes)) + _bytes(2, "test")
    g += b"".join(_bytes(5, tensor(k, v)) for k, v in (initializers or {}).items())
    g += b"".join(_bytes(11, value_info(n, t)) for n, t in inputs)
    g += b"".join(_bytes(12, value_info(n, t)) for n, t in outputs)
    m = _int(1, 8) + _bytes(2, "edge-tier-tests") + _bytes(7, g) + _bytes(8, _int(2, opset))
    if ml_opset is not None:
        m += _bytes(8, _bytes(1, "ai.onnx.ml") + _int(2, ml_opset))
    return m
