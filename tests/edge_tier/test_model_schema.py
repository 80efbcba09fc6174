"""The manifest schema (version 2, version 1 read as 2, the JSON Schema, errors naming fields) and
the preprocessing stages (their physics: a tone lands in its mel band, the DCT is orthonormal,
resize keeps a constant image constant)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_tier.errors import ManifestError
from edge_tier.model import preprocess
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.model.schema import (
    PreprocessSpec,
    WindowSpec,
    json_schema,
    manifest_json,
    parse_manifest,
    read_manifest,
)

DOCS = Path(__file__).parents[2] / "docs" / "models.md"


def _v1() -> dict[str, Any]:
    m = read_manifest(DEFAULT_MANIFEST)
    assert m.prefilter is not None and m.tier2 is not None
    p, t = m.prefilter, m.tier2
    return {
        "version": "1.0.0",
        "labels": m.labels,
        "signal": {"fs": 5120.0, "window": 1024},
        "prefilter": {
            "name": "prefilter", "version": p.version, "file": p.file, "sha256": p.sha256,
            "input": {"name": "x", "shape": [-1, 256], "dtype": "float32"},
            "threshold": p.threshold, "embedding_scale": p.embedding.scale,
        },
        "tier2": {
            "name": "tier2", "version": t.version, "file": t.file, "sha256": t.sha256,
            "input": {"name": "embedding", "shape": [-1, 16], "dtype": "float32"},
            "output": {"name": "probs"},
            "answer": {"label": {"name": "label"}, "confidence": {"name": "confidence"}},
        },
    }  # fmt: skip


def test_a_version_1_manifest_reads_as_the_version_2_it_means() -> None:
    v2 = read_manifest(DEFAULT_MANIFEST)
    migrated = parse_manifest(_v1(), "v1.json")
    assert migrated.prefilter is not None and v2.prefilter is not None
    assert migrated.prefilter.model_dump(exclude={"bytes"}) == v2.prefilter.model_dump(exclude={"bytes"})
    assert migrated.tier2 is not None and v2.tier2 is not None
    assert migrated.tier2.model_dump(exclude={"bytes"}) == v2.tier2.model_dump(exclude={"bytes"})


def test_manifest_json_round_trips() -> None:
    m = read_manifest(DEFAULT_MANIFEST)
    assert parse_manifest(json.loads(manifest_json(m)), "again") == m


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["prefilter"].pop("score"), r"prefilter\.score: Field required"),
        (lambda d: d["prefilter"]["score"].update(kind="median"), r"prefilter\.score\.kind"),
        (lambda d: d["prefilter"]["score"].update(kind="one_minus", index=None), r"needs score\.index"),
        (lambda d: d["prefilter"]["score"].update(target="x"), r"score\.target is for kind 'reconstruction'"),
        (lambda d: d["prefilter"].update(threshold=float("nan")), r"prefilter\.threshold"),
        (lambda d: d["prefilter"].update(file="../x.tflite"), r"prefilter\.file: .*beside the manifest"),
        (lambda d: d["prefilter"]["window"].update(shape=[]), r"prefilter\.window\.shape"),
        (lambda d: d["prefilter"]["embedding"].update(pool="median"), r"prefilter\.embedding\.pool"),
        (lambda d: d.update(schema_version=3), r"schema_version 3; this edge-tier reads 2"),
        (lambda d: (d.pop("prefilter"), d.pop("tier2")), r"names no model"),
    ],
)
def test_schema_errors_name_the_field(change: Any, message: str) -> None:
    doc = json.loads(DEFAULT_MANIFEST.read_text())
    change(doc)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(doc, "m.json")


def test_the_json_schema_and_docs_name_every_field() -> None:
    schema = json_schema()
    assert schema["$schema"].endswith("2020-12/schema") and "prefilter" in schema["properties"]
    defs = schema["$defs"]
    text = DOCS.read_text()
    for name in ("PrefilterSpec", "ScoreSpec", "EmbeddingSpec", "WindowSpec", "PreprocessSpec", "TensorSpec"):
        for field in defs[name]["properties"]:
            assert f"`{field}`" in text, f"docs/models.md does not explain {name}.{field}"
    for stage in preprocess.REGISTRY:
        assert f"`{stage}`" in text, f"docs/models.md does not list the stage {stage}"
        for param in preprocess.stage_params(stage):
            assert f"`{param}`" in text, f"docs/models.md does not explain {stage}'s {param}"


def _stage(name: str, window: list[int], item: tuple[int, ...] = (), **params: Any) -> preprocess.Stage:
    return preprocess.build_stage(
        PreprocessSpec(name=name, params=params), WindowSpec(shape=window), item, "p"
    )


def test_a_tone_lands_in_the_mel_band_of_its_frequency() -> None:
    sr, f = 16000, 1000.0
    t = np.arange(16000) / sr
    tone = np.sin(2 * np.pi * f * t).astype(np.float32)[None]
    mel = _stage("log_mel", [16000], sample_rate=sr, n_fft=512, hop_length=256, n_mels=40)(tone)
    assert mel.shape == (1, 1 + (16000 - 512) // 256, 40)
    hz = preprocess.mel_to_hz(np.linspace(preprocess.hz_to_mel(0), preprocess.hz_to_mel(sr / 2), 42))
    band = int(mel[0].mean(axis=0).argmax())
    assert hz[band] <= f <= hz[band + 2]  # the triangle of band k spans hz[k]..hz[k+2]


def test_mel_filters_have_unit_area_and_the_slaney_scale_is_continuous() -> None:
    fb = preprocess.mel_filterbank(16000, 1024, 40)
    hz_step = 16000 / 1024
    areas = fb.sum(axis=1) * hz_step
    assert np.allclose(areas, 1.0, rtol=0.15)  # Slaney normalisation: each filter integrates to ~1
    assert math.isclose(float(preprocess.hz_to_mel(1000.0)), 15.0)
    assert np.allclose(preprocess.mel_to_hz(preprocess.hz_to_mel(np.array([200.0, 1000.0, 4000.0]))),
                       [200.0, 1000.0, 4000.0])  # fmt: skip


def test_mfcc_is_the_orthonormal_dct_of_the_log_mel() -> None:
    d = preprocess._dct_ortho(13, 40)
    assert np.allclose(d @ d.T, np.eye(13), atol=1e-5)
    audio = np.random.default_rng(0).standard_normal((3, 16000)).astype(np.float32)
    kw: dict[str, Any] = {"sample_rate": 16000, "n_fft": 640, "hop_length": 320, "n_mels": 40}
    mfcc = _stage("mfcc", [16000], n_mfcc=10, **kw)(audio)
    mel = _stage("log_mel", [16000], **kw)(audio)
    assert mfcc.shape == (3, 49, 10)  # the keyword-spotting input: 49 frames x 10 coefficients
    assert np.allclose(mfcc, mel @ preprocess._dct_ortho(10, 40).T, atol=1e-3)


def test_image_resize_keeps_a_constant_frame_constant_and_normalises_per_channel() -> None:
    frame = np.full((2, 96, 96, 3), 128.0, np.float32)
    out = _stage("image", [96, 96, 3], (32, 32, 3), scale=1 / 255, mean=[0.5, 0.5, 0.0], std=0.25)(frame)
    assert out.shape == (2, 32, 32, 3)
    assert np.allclose(out[..., 0], (128 / 255 - 0.5) / 0.25, rtol=1e-4)
    assert np.allclose(out[..., 2], 128 / 255 / 0.25, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "window", "params", "message"),
    [
        ("log_mel", [16000], {}, r"needs params\.sample_rate"),
        ("log_mel", [100], {"sample_rate": 8000}, r"shorter than n_fft 1024"),
        ("mfcc", [16000], {"sample_rate": 16000, "n_mfcc": 50}, r"n_mfcc 50 is more than n_mels 40"),
        ("image", [32, 32], {}, r"takes \[height, width, channels\]"),
        ("image", [32, 32, 3], {"mean": [1, 2]}, r"params\.mean has 2 values for 3 channels"),
        ("spectrum", [32, 32], {}, r"takes 1-D windows"),
        ("log_mel", [16000], {"hop": 3}, r"p\.preprocess\.params: hop: Extra inputs"),
    ],
)
def test_stage_parameters_are_checked_at_load(
    name: str, window: list[int], params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        _stage(name, window, (32, 32, 3), **params)
