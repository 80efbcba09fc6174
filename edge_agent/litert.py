"""One ``.tflite`` model in LiteRT, seen as named tensors: quantized at the edges, batched where it can be.

LiteRT (``ai_edge_litert``, or ``tflite_runtime`` where that is what is installed)
knows tensors by index; a manifest names them. Here a name is a tensor's name as
``get_tensor_details()`` lists it (intermediate tensors too: the interpreter then
keeps them, ``experimental_preserve_all_tensors``) or a signature's input/output key
(``Identity``, ``output_0``). int8/uint8 tensors are quantized and dequantized with
their own scale and zero point, so callers see float32 only.

Whether the batch dimension really resizes is found out at load, not assumed: some
graphs hard-code it (a ``Reshape`` to ``[1, -1, 16]``) and then answer 32 windows with
one row of garbage instead of failing. Such a model runs batch 1 in a loop.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.errors import AgentError

log = logging.getLogger(__name__)
_QUANTIZED = (np.int8, np.uint8, np.int16)


class PrefilterError(AgentError):
    """A model or its manifest cannot be used; the message names the file, the field and the reason."""


class ModelRunError(AgentError):
    """The interpreter refused a batch (the caller says which stream and what it takes)."""


def interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
    except ImportError:
        raise PrefilterError(
            "no TFLite runtime: pip install ai-edge-litert (or tflite-runtime, which needs numpy < 2)"
        ) from None
    if int(np.__version__.split(".")[0]) >= 2:
        raise PrefilterError(
            f"tflite-runtime is installed but cannot run with numpy {np.__version__} (it was built for "
            "numpy 1.x): install ai-edge-litert instead, or pin numpy<2"
        )
    return Interpreter


@dataclass(frozen=True)
class Tensor:
    name: str
    index: int
    shape: tuple[int, ...]  # -1 where the model leaves a dimension open
    dtype: np.dtype[Any]
    scale: float
    zero_point: int
    role: str  # "input", "output" or "intermediate"

    @property
    def quantized(self) -> bool:
        return self.dtype.type in _QUANTIZED and self.scale > 0

    def describe(self) -> str:
        q = f", scale {self.scale:.6g}, zero point {self.zero_point}" if self.quantized else ""
        return f"{self.name!r} {list(self.shape)} {self.dtype}{q}"

    def to_model(self, x: np.ndarray) -> np.ndarray:
        """float values as this tensor holds them (quantized with its own parameters)."""
        if self.quantized:
            info = np.iinfo(self.dtype)
            q = np.rint(x / self.scale) + self.zero_point
            return np.clip(q, info.min, info.max).astype(self.dtype)
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            return np.clip(np.rint(x), info.min, info.max).astype(self.dtype)
        return np.ascontiguousarray(x, dtype=self.dtype)

    def to_float(self, q: np.ndarray) -> np.ndarray:
        if self.quantized:
            return (q.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)
        return q.astype(np.float32, copy=False)


def _tensor(d: dict[str, Any], role: str) -> Tensor:
    shape = d.get("shape_signature")
    if shape is None or len(shape) != len(d["shape"]):
        shape = d["shape"]
    scale, zp = d.get("quantization", (0.0, 0))
    return Tensor(
        str(d["name"]),
        int(d["index"]),
        tuple(int(x) for x in shape),
        np.dtype(d["dtype"]),
        float(scale),
        int(zp),
        role,
    )


class LiteModel:
    """The interpreter, its tensors by name, and ``run``: float in, the named tensors out as float."""

    def __init__(self, data: bytes, *, threads: int = 1, preserve_all: bool = False, where: str = "") -> None:
        self.where = where
        cls = interpreter_class()
        kwargs: dict[str, Any] = {"model_content": data, "num_threads": threads}
        if preserve_all:
            kwargs["experimental_preserve_all_tensors"] = True
        try:
            with warnings.catch_warnings():  # "for debugging only": here it is how a named tensor is read
                warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
                self._it = cls(**kwargs)
            self._it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise PrefilterError(f"{where}: not a loadable TFLite model ({e})") from None
        self.inputs = [_tensor(d, "input") for d in self._it.get_input_details()]
        self.outputs = [_tensor(d, "output") for d in self._it.get_output_details()]
        known = {t.index: t for t in (*self.inputs, *self.outputs)}
        self.tensors: dict[str, Tensor] = {}
        for d in self._it.get_tensor_details():
            t = known.get(int(d["index"])) or _tensor(d, "intermediate")
            if t.name:
                self.tensors.setdefault(t.name, t)
        for t in known.values():
            self.tensors[t.name] = t
        self._aliases(known)
        self._shape: tuple[int, ...] | None = None  # the input's shape as last allocated
        self.batched = True  # False: the input has no batch dimension, a window a call
        self.batch_resizes = True

    def _aliases(self, known: dict[int, Tensor]) -> None:
        """Signature keys (what converters print: ``Identity``, ``output_0``) name tensors too."""
        try:
            sigs = self._it._get_full_signature_list()
        except (AttributeError, RuntimeError, ValueError):
            return
        for sig in (sigs or {}).values():
            for group in ("inputs", "outputs"):
                for key, index in (sig.get(group) or {}).items():
                    t = known.get(int(index))
                    if t is not None:
                        self.tensors.setdefault(str(key), t)

    def ops(self) -> list[dict[str, Any]]:
        """The graph's ops in execution order (name, input and output tensor indices); the
        delegate's stand-in nodes left out. Empty where the runtime does not say."""
        try:
            return [o for o in self._it._get_ops_details() if o["op_name"] != "DELEGATE"]
        except (AttributeError, RuntimeError, ValueError):
            return []

    def tensor(self, name: str, field: str) -> Tensor:
        """The tensor named ``name``; PrefilterError naming the manifest ``field`` and what exists."""
        t = self.tensors.get(name)
        if t is None:
            ins = ", ".join(x.describe() for x in self.inputs)
            outs = ", ".join(x.describe() for x in self.outputs)
            raise PrefilterError(
                f"{self.where}: {field} names tensor {name!r}, which the model does not have (inputs: "
                f"{ins}; outputs: {outs}; `edge-agent model init` lists every tensor)"
            )
        return t

    def run(self, x: np.ndarray, want: list[Tensor]) -> list[np.ndarray]:
        """The tensors ``want`` (float32, dequantized) for input ``x`` (float, batch first)."""
        inp = self.inputs[0]
        if not self.batched:  # each window alone, its answers given the batch axis they lack
            parts = [[o[None] for o in self._invoke(inp.to_model(x[i]), want)] for i in range(len(x))]
        elif self.batch_resizes or len(x) == 1:
            return self._invoke(inp.to_model(x), want)
        else:
            parts = [self._invoke(inp.to_model(x[i : i + 1]), want) for i in range(len(x))]
        return [np.concatenate(col) for col in zip(*parts, strict=True)]

    def _invoke(self, q: np.ndarray, want: list[Tensor]) -> list[np.ndarray]:
        inp = self.inputs[0]
        try:
            if q.shape != self._shape:
                self._it.resize_tensor_input(inp.index, list(q.shape), strict=False)
                self._it.allocate_tensors()
                self._shape = q.shape
            self._it.set_tensor(inp.index, q)
            self._it.invoke()
            return [t.to_float(self._it.get_tensor(t.index)) for t in want]
        except (ValueError, RuntimeError) as e:
            self._shape = None  # the interpreter's state after a failed resize is not to be trusted
            raise ModelRunError(f"the interpreter refused input {list(q.shape)} {q.dtype}: {e}") from None

    def probe_batch(self, item: tuple[int, ...], want: list[Tensor]) -> None:
        """Batch 1 then 2 through the model: if 2 does not give each wanted tensor twice the rows
        of 1 (or fails), the batch dimension does not resize, and ``run`` loops batch 1."""
        one = self._invoke(self.inputs[0].to_model(np.zeros((1, *item), np.float32)), want)
        try:
            two = self._invoke(self.inputs[0].to_model(np.zeros((2, *item), np.float32)), want)
            got = str([list(b.shape) for b in two])
            ok = all(b.shape == (2, *a.shape[1:]) for a, b in zip(one, two, strict=True))
        except ModelRunError as e:
            got, ok = f"an error ({e})", False
        if not ok:
            self.batch_resizes = False
            log.warning(
                "%s: the batch dimension does not resize (a batch of 2 gives %s, 1 gives %s); "
                "running batch 1 in a loop",
                self.where,
                got,
                [list(a.shape) for a in one],
            )
