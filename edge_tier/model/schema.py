"""The model manifest, version 2: what a model takes, how a raw window becomes that, what it answers.

One ``manifest.json`` describes a prefilter (``.tflite``, on the device) and/or a
tier-two model (``.onnx``, in the cloud), each beside the manifest. Everything a
runtime needs to use a model it has never seen is declared here and checked
against the model itself at load (``edge_agent.prefilter``, ``cloud_ingest.tier2``):

* ``window``: the shape of one raw window as producers post it (``[16000]`` samples
  of audio, ``[1024]`` of vibration, ``[96, 96, 3]`` pixels);
* ``preprocess``: a stage from the registry (``edge_tier.model.preprocess``) with its
  parameters, turning windows ``[n, *window]`` into the model's input;
* ``input``: the tensor and its shape with the batch dimension first, and dtype;
  int8/uint8 quantization is read from the model, never declared;
* ``score``: which tensor and how it becomes one number per window, and the threshold
  in that number's own range (a reconstruction error is not a probability);
* ``embedding``: which tensor (an intermediate one too) leaves the device, pooled or
  flattened, or none (the score tensor's values are uploaded);
* tier two: the input (with the cast and reshape from what devices upload), the
  output of classes or values (a tensor, or ZipMap's sequence of maps) and the labels.

The JSON Schema is :func:`json_schema` (``edge-agent model schema``); docs/models.md
explains each field. A manifest without ``schema_version`` is version 1 (the shape
the shipped models had before), read as the version 2 it means.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_tier.errors import ManifestError

SCHEMA_VERSION: Literal[2] = 2
TensorDtype = Literal["float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"]
_Name = Annotated[str, Field(min_length=1, max_length=256)]
_Dim = Annotated[int, Field(ge=-1, le=2**31 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """A tensor by name, with its shape (batch first; -1 for a dimension of any size) and dtype.

    ``batch = false``: the model's input has no batch dimension (a 1-D waveform of one
    window, say); ``shape`` is then one window's, and the model runs a window a call."""

    name: _Name
    shape: list[_Dim] = Field(min_length=1, max_length=8)
    dtype: TensorDtype = "float32"
    batch: bool = True

    @property
    def item_shape(self) -> tuple[int, ...]:
        """The shape of one window's slice: without the batch dimension."""
        return tuple(self.shape[1:] if self.batch else self.shape)


class WindowSpec(_Strict):
    """One raw window as a producer posts it (float32 samples, row-major)."""

    shape: list[Annotated[int, Field(ge=1, le=2**24)]] = Field(min_length=1, max_length=4)
    sample_rate: float | None = Field(None, gt=0, description="samples per second, where it means something")

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class PreprocessSpec(_Strict):
    """A stage of the registry by name (or ``module:function``), and its parameters."""

    name: _Name = "identity"
    params: dict[str, Any] = Field(default_factory=dict)


ScoreKind = Literal["class", "max", "sum", "one_minus", "reconstruction"]


class ScoreSpec(_Strict):
    """How one number per window comes out of the model.

    * ``class``: the value at ``index`` of ``tensor`` (flattened per window); a
      one-value tensor needs no index;
    * ``max`` / ``sum``: over ``classes`` (all when unset) of ``tensor``: "any fault"
      as the most likely fault, or the probability mass of the fault classes;
    * ``one_minus``: ``1 - tensor[index]``: the probability of "not healthy";
    * ``reconstruction``: the error between ``tensor`` and ``target`` (the model's
      input when unset), ``error`` per value, reduced over the window by ``reduction``.
    """

    tensor: _Name
    kind: ScoreKind = "class"
    index: int | None = Field(None, ge=0)
    classes: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    target: str | None = None
    error: Literal["squared", "absolute"] = "squared"
    reduction: Literal["mean", "sum", "max"] = "mean"

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ScoreSpec:
        if self.kind == "one_minus" and self.index is None:
            raise ValueError("score.kind 'one_minus' needs score.index (the class it is one minus)")
        if self.kind != "reconstruction" and self.target is not None:
            raise ValueError(f"score.target is for kind 'reconstruction', not {self.kind!r}")
        if self.kind not in ("max", "sum") and self.classes is not None:
            raise ValueError(f"score.classes is for kinds 'max' and 'sum', not {self.kind!r}")
        if self.kind in ("max", "sum", "reconstruction") and self.index is not None:
            raise ValueError(f"score.index is for kinds 'class' and 'one_minus', not {self.kind!r}")
        return self


class EmbeddingSpec(_Strict):
    """What leaves the device for a kept window.

    ``tensor`` is any tensor of the model, intermediate ones included; unset, the
    score tensor's values are uploaded. ``pool``: ``flatten`` keeps every value;
    ``mean`` / ``max`` pool every axis between the batch and the last (channels), so a
    ``[n, h, w, c]`` feature map becomes ``[n, c]``. ``scale``: int8 upload, value =
    int8 x scale (symmetric); unset, an int8-quantized tensor's own scale serves.
    """

    tensor: str | None = None
    pool: Literal["flatten", "mean", "max"] = "flatten"
    scale: float | None = Field(None, gt=0)


class _ModelFileSpec(_Strict):
    name: _Name
    version: Annotated[str, Field(min_length=1, max_length=64)]
    file: _Name
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: int | None = Field(None, ge=1)
    labels: list[str] = Field(default_factory=list)

    @field_validator("file")
    @classmethod
    def _beside(cls, v: str) -> str:
        if Path(v).name != v or v in (".", ".."):
            raise ValueError(f"must be a file name beside the manifest, not a path ({v!r})")
        return v


class PrefilterSpec(_ModelFileSpec):
    """The device's model (``.tflite``): window -> preprocess -> input -> score, embedding."""

    window: WindowSpec
    preprocess: PreprocessSpec = PreprocessSpec()
    input: TensorSpec
    score: ScoreSpec
    threshold: float = Field(allow_inf_nan=False)
    embedding: EmbeddingSpec = EmbeddingSpec()


class Tier2InputSpec(_Strict):
    """Tier two's input: the model's input tensor (``shape`` batch first, as the model declares it).

    Uploads are float32 ``[n, dim]`` (int8 ones dequantized first). ``reshape`` (the shape of
    one record, without the batch dimension) makes them what a model of another rank takes:
    ``[1, 16]`` for ``[N, 1, 16]``, ``[32, 32, 3]`` for ``[N, 32, 32, 3]``. They are then cast to
    ``dtype``: float16, float32, float64 (ONNX double) as they are; int8 and uint8 quantized with
    ``scale`` and ``zero_point`` (q = round(value / scale) + zero_point, saturated), which the
    manifest must give for such an input (an ONNX graph input carries no quantization).
    """

    name: _Name
    shape: list[_Dim] = Field(min_length=1, max_length=8)
    # tier two feeds floats, or ints quantized with scale and zero_point; nothing else
    dtype: Literal["float32", "float16", "float64", "int8", "uint8"] = "float32"
    reshape: list[Annotated[int, Field(ge=-1, le=2**31 - 1)]] | None = Field(None, min_length=1, max_length=7)
    scale: float | None = Field(None, gt=0, allow_inf_nan=False)
    zero_point: int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Tier2InputSpec:
        quantized = self.dtype in ("int8", "uint8")
        if quantized and self.scale is None:
            raise ValueError(
                f"an {self.dtype} input needs scale (and zero_point, default 0): "
                "value = (q - zero_point) x scale"
            )
        if not quantized and (self.scale is not None or self.zero_point is not None):
            raise ValueError(f"scale and zero_point are for int8/uint8 inputs, not {self.dtype}")
        lo, hi = (-128, 127) if self.dtype == "int8" else (0, 255)
        if self.zero_point is not None and not lo <= self.zero_point <= hi:
            raise ValueError(f"zero_point {self.zero_point} is outside {self.dtype}'s {lo}..{hi}")
        if self.reshape is not None:
            if len(self.reshape) != len(self.shape) - 1:
                raise ValueError(
                    f"reshape {self.reshape} is one record's shape (without the batch dimension), "
                    f"so it has one dimension fewer than shape {self.shape} (the model's input)"
                )
            if self.reshape.count(-1) > 1:
                raise ValueError(f"reshape {self.reshape} has more than one -1")
            for i, (r, s) in enumerate(zip(self.reshape, self.shape[1:], strict=True)):
                if r == 0 or (r > 0 and s > 0 and r != s):
                    raise ValueError(
                        f"reshape {self.reshape} and shape {self.shape} differ at dimension {i + 1}"
                    )
        return self


class AnswerSpec(_Strict):
    """Label and/or confidence computed in the graph, one value per record (``[N]`` or ``[N, 1]``).

    ``label``: an int64 class index (into the labels) or a string label (skl2onnx's
    ``output_label``); ``confidence``: a float. One of them may be left out: the label is then
    the argmax of ``tier2.output``, the confidence that label's probability.
    """

    label: str | None = Field(None, min_length=1, max_length=256)
    confidence: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one_at_least(self) -> AnswerSpec:
        if self.label is None and self.confidence is None:
            raise ValueError("answer names neither label nor confidence: leave answer out instead")
        return self


class Tier2Spec(_ModelFileSpec):
    """The cloud's model (``.onnx``): a classifier (labels and a confidence per record) or a
    regressor (``kind = "regressor"``: the value as the answer, no labels)."""

    kind: Literal["classifier", "regressor"] = "classifier"
    input: Tier2InputSpec
    output: _Name  # probabilities [n, classes], ZipMap's sequence of maps, or values [n] / [n, 1]
    answer: AnswerSpec | None = None

    @model_validator(mode="after")
    def _answer_of_a_classifier(self) -> Tier2Spec:
        if self.kind == "regressor" and self.answer is not None:
            raise ValueError("answer is for classifiers: a regressor's answer is its output's value")
        return self


class Manifest(_Strict):
    schema_version: Literal[2] = SCHEMA_VERSION
    version: str = ""
    labels: list[str] = Field(default_factory=list)  # the models' own lists win
    prefilter: PrefilterSpec | None = None
    tier2: Tier2Spec | None = None

    model_config = ConfigDict(extra="allow", frozen=True)  # notes, reports: kept, not read

    @model_validator(mode="after")
    def _one_model(self) -> Manifest:
        if self.prefilter is None and self.tier2 is None:
            raise ValueError("names no model: give 'prefilter' and/or 'tier2'")
        return self

    def labels_of(self, spec: PrefilterSpec | Tier2Spec) -> list[str]:
        return spec.labels or self.labels


def _from_v1(doc: dict[str, Any]) -> dict[str, Any]:
    """A version 1 manifest (fixed tensor names, the vibration spectrum) as version 2."""
    out: dict[str, Any] = {k: v for k, v in doc.items() if k not in ("signal", "prefilter", "tier2")}
    out["schema_version"] = SCHEMA_VERSION
    signal = doc.get("signal") or {}
    if isinstance(p := doc.get("prefilter"), dict):
        inp = p.get("input") or {"name": "x", "shape": [-1, 256], "dtype": "float32"}
        out["prefilter"] = {
            **{k: p[k] for k in ("name", "version", "file", "sha256", "bytes", "threshold") if k in p},
            "window": {"shape": [signal.get("window", 1024)], "sample_rate": signal.get("fs", 5120.0)},
            "preprocess": {"name": "spectrum", "params": {"bins": int(inp["shape"][-1])}},
            "input": inp,
            "score": {"tensor": "score", "kind": "class", "index": 0},
            "embedding": {"tensor": "embedding", "scale": p.get("embedding_scale")},
        }
        out["prefilter"].setdefault("name", "prefilter")
        out["prefilter"].setdefault("version", doc.get("version") or "0")
    if isinstance(t := doc.get("tier2"), dict):
        out["tier2"] = {k: t[k] for k in ("name", "version", "file", "sha256", "bytes") if k in t}
        out["tier2"].setdefault("name", "tier2")
        out["tier2"].setdefault("version", doc.get("version") or "0")
        out["tier2"]["input"] = t.get("input")
        out["tier2"]["output"] = (t.get("output") or {}).get("name")
        if isinstance(a := t.get("answer"), dict):
            out["tier2"]["answer"] = {k: (a.get(k) or {}).get("name") for k in ("label", "confidence")}
    return out


def parse_manifest(doc: Any, where: str | Path) -> Manifest:
    """The manifest ``doc`` (parsed JSON), version 1 read as 2; ManifestError naming each field."""
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: a manifest is a JSON object, not {type(doc).__name__}")
    if "schema_version" not in doc:
        doc = _from_v1(doc)
    elif doc["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(
            f"{where}: schema_version {doc['schema_version']!r}; this edge-tier reads {SCHEMA_VERSION} "
            "(and 1, without the field)"
        )
    try:
        return Manifest.model_validate(doc)
    except ValidationError as e:
        raise ManifestError(f"{where}: {describe_errors(e)}") from None


def describe_errors(e: ValidationError) -> str:
    """pydantic's errors as ``field.path: message``, one after another."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
        parts.append(f"{loc or '(top)'}: {err['msg']}")
    return "; ".join(parts)


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: model manifest not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{path}: not a readable JSON manifest ({e})") from None
    return parse_manifest(doc, path)


def manifest_json(m: Manifest) -> str:
    return json.dumps(m.model_dump(mode="json", exclude_none=True), indent=2) + "\n"


def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (draft 2020-12), for editors and CI checks of users' manifests."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "edge-tier model manifest"
    return schema
