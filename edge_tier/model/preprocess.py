"""Preprocessing stages: raw windows ``[n, *window]`` (float32) in, a model's input out.

A manifest names its stage (``preprocess.name``) and gives its parameters
(``preprocess.params``); each stage declares them as a pydantic model, so a wrong or
unknown parameter stops the agent at load with the field's name. The registry:

* ``identity`` (alias ``reshape``): the window as it is; the runtime reshapes it to the
  input's shape (``[n, 490]`` feeds ``[n, 49, 10, 1]``);
* ``spectrum``: the vibration stage of the shipped model (``edge_tier.model.features``);
* ``log_mel``: framed, Hann-windowed power spectrum on a mel filterbank (the Slaney
  scale and area normalisation librosa uses by default), in dB or natural log:
  ``[n, frames, n_mels]``;
* ``mfcc``: ``log_mel`` in dB, then an orthonormal DCT-II over the mel axis:
  ``[n, frames, n_mfcc]``;
* ``image``: ``[n, h, w, c]`` pixels resized (bilinear) to the model's size and
  normalised ``(x * scale - mean) / std`` per channel;
* ``package.module:function``: a user's own stage, called as ``function(windows, **params)``.

Numpy only, batched, so it runs on the device without a DSP library (librosa and its
numba would outweigh the agent).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_tier.errors import ManifestError
from edge_tier.model.features import spectrum_features
from edge_tier.model.schema import PreprocessSpec, WindowSpec, describe_errors

Stage = Callable[[np.ndarray], np.ndarray]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(_Params):
    pass


class SpectrumParams(_Params):
    bins: int = Field(256, ge=8, le=65536)


class LogMelParams(_Params):
    sample_rate: float | None = Field(None, gt=0, description="default: the window's sample_rate")
    n_fft: int = Field(1024, ge=16, le=1 << 16)
    win_length: int | None = Field(None, ge=16, description="default: n_fft")
    hop_length: int = Field(512, ge=1)
    n_mels: int = Field(64, ge=1, le=1024)
    fmin: float = Field(0.0, ge=0)
    fmax: float | None = Field(None, gt=0, description="default: sample_rate / 2")
    power: float = Field(2.0, gt=0)
    log: Literal["db", "ln", "none"] = "db"
    amin: float = Field(1e-10, gt=0, description="floor under the spectrum before the log")
    frames: int | None = Field(None, ge=1, description="pad or crop to this many frames")
    center: bool = False  # True: pad the window by n_fft/2 each side, as librosa's default


class MfccParams(LogMelParams):
    n_mfcc: int = Field(13, ge=1, le=1024)
    n_mels: int = Field(40, ge=1, le=1024)


class ImageParams(_Params):
    height: int | None = Field(None, ge=1, description="default: the input's")
    width: int | None = Field(None, ge=1, description="default: the input's")
    scale: float = 1.0  # x * scale first: 1/255 for [0, 1]
    mean: float | list[float] = 0.0
    std: float | list[float] = 1.0


@dataclass(frozen=True)
class _Entry:
    params: type[_Params]
    make: Callable[[Any, WindowSpec, tuple[int, ...]], Stage]


def _identity(p: NoParams, window: WindowSpec, item: tuple[int, ...]) -> Stage:
    return lambda w: w


def _spectrum(p: SpectrumParams, window: WindowSpec, item: tuple[int, ...]) -> Stage:
    if len(window.shape) != 1:
        raise ValueError(f"takes 1-D windows, and window.shape is {window.shape}")
    return lambda w: spectrum_features(w, p.bins)


def _sample_rate(p: LogMelParams, window: WindowSpec) -> float:
    sr = p.sample_rate or window.sample_rate
    if sr is None:
        raise ValueError("needs params.sample_rate (or window.sample_rate)")
    return sr


def _log_mel(p: LogMelParams, window: WindowSpec, item: tuple[int, ...]) -> Stage:
    if len(window.shape) != 1:
        raise ValueError(f"takes 1-D windows of samples, and window.shape is {window.shape}")
    sr = _sample_rate(p, window)
    win = p.win_length or p.n_fft
    if win > p.n_fft:
        raise ValueError(f"win_length {win} is longer than n_fft {p.n_fft}")
    if not p.center and window.shape[0] < p.n_fft:
        raise ValueError(f"windows of {window.shape[0]} samples are shorter than n_fft {p.n_fft}")
    fb = mel_filterbank(sr, p.n_fft, p.n_mels, p.fmin, p.fmax)
    hann = np.zeros(p.n_fft, np.float32)
    lpad = (p.n_fft - win) // 2
    hann[lpad : lpad + win] = _periodic_hann(win)
    return lambda w: _log_mel_of(w, p, fb, hann)


def _periodic_hann(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def _log_mel_of(w: np.ndarray, p: LogMelParams, fb: np.ndarray, hann: np.ndarray) -> np.ndarray:
    if p.center:
        w = np.pad(w, ((0, 0), (p.n_fft // 2, p.n_fft // 2)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(w, p.n_fft, axis=1)[:, :: p.hop_length]
    spec = np.abs(np.fft.rfft(frames * hann, axis=2)) ** p.power  # [n, frames, bins]
    mel = spec @ fb.T  # [n, frames, n_mels]
    if p.log == "db":
        mel = 10.0 * np.log10(np.maximum(mel, p.amin))
    elif p.log == "ln":
        mel = np.log(np.maximum(mel, p.amin))
    if p.frames is not None:
        have = mel.shape[1]
        mel = mel[:, : p.frames] if have >= p.frames else np.pad(mel, ((0, 0), (0, p.frames - have), (0, 0)))
    return mel.astype(np.float32)


def _mfcc(p: MfccParams, window: WindowSpec, item: tuple[int, ...]) -> Stage:
    if p.log != "db":
        raise ValueError("mfcc takes the log-mel in dB (params.log = 'db')")
    if p.n_mfcc > p.n_mels:
        raise ValueError(f"n_mfcc {p.n_mfcc} is more than n_mels {p.n_mels}")
    mel = _log_mel(p, window, item)
    dct = _dct_ortho(p.n_mfcc, p.n_mels)
    return lambda w: (mel(w) @ dct.T).astype(np.float32)


def _dct_ortho(n_out: int, n_in: int) -> np.ndarray:
    """DCT-II with orthonormal scaling (scipy's ``dct(type=2, norm='ortho')``), as a matrix."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    m = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * math.sqrt(2.0 / n_in)
    m[0] /= math.sqrt(2.0)
    return m.astype(np.float32)


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """The Slaney mel scale: linear to 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(
        f >= min_log_hz, min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep, f / f_sp
    )


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    sr: float, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular filters [n_mels, 1 + n_fft/2] on the Slaney scale, each of unit area."""
    fmax = sr / 2 if fmax is None else fmax
    if not fmin < fmax <= sr / 2:
        raise ValueError(f"needs fmin < fmax <= sample_rate / 2, not {fmin}, {fmax} at {sr} Hz")
    fft_hz = np.linspace(0, sr / 2, 1 + n_fft // 2)
    hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(hz)
    ramps = hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return weights.astype(np.float32)


def _image(p: ImageParams, window: WindowSpec, item: tuple[int, ...]) -> Stage:
    if len(window.shape) != 3:
        raise ValueError(f"takes [height, width, channels] windows, and window.shape is {window.shape}")
    h = p.height or (item[0] if len(item) == 3 else None)
    w = p.width or (item[1] if len(item) == 3 else None)
    if h is None or w is None or h < 1 or w < 1:
        raise ValueError(f"needs params.height and params.width (the input's item shape is {list(item)})")
    c = window.shape[2]
    mean = np.asarray(p.mean, np.float32).reshape(-1)
    std = np.asarray(p.std, np.float32).reshape(-1)
    for name, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, c):
            raise ValueError(f"params.{name} has {len(v)} values for {c} channels")
    if (std == 0).any():
        raise ValueError("params.std must not be 0")
    ys, xs = _bilinear(window.shape[0], h), _bilinear(window.shape[1], w)

    def stage(x: np.ndarray) -> np.ndarray:
        if (h, w) != tuple(window.shape[:2]):
            x = _resize(x, ys, xs)
        return ((x * p.scale - mean) / std).astype(np.float32)

    return stage


def _bilinear(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (low, high) and weights of each destination row (half-pixel centres)."""
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, src - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def _resize(x: np.ndarray, ys: tuple[np.ndarray, ...], xs: tuple[np.ndarray, ...]) -> np.ndarray:
    (y0, y1, wy), (x0, x1, wx) = ys, xs
    rows = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]


REGISTRY: dict[str, _Entry] = {
    "identity": _Entry(NoParams, _identity),
    "reshape": _Entry(NoParams, _identity),
    "spectrum": _Entry(SpectrumParams, _spectrum),
    "log_mel": _Entry(LogMelParams, _log_mel),
    "mfcc": _Entry(MfccParams, _mfcc),
    "image": _Entry(ImageParams, _image),
}


def stage_params(name: str) -> dict[str, Any]:
    """The declared parameters of a registered stage, as JSON Schema properties."""
    return dict(REGISTRY[name].params.model_json_schema().get("properties", {}))


def build_stage(spec: PreprocessSpec, window: WindowSpec, item: tuple[int, ...], where: str) -> Stage:
    """The stage ``spec`` names, its parameters checked; ``item`` is the input's shape without
    the batch (what image sizes default to). ManifestError naming ``where``.preprocess.…"""
    field = f"{where}.preprocess"
    if ":" in spec.name:
        return _user_stage(spec, field)
    entry = REGISTRY.get(spec.name)
    if entry is None:
        raise ManifestError(
            f"{field}.name: no stage {spec.name!r}; the registry has {sorted(REGISTRY)} "
            "(or give 'package.module:function')"
        )
    try:
        params = entry.params.model_validate(spec.params)
    except ValidationError as e:
        raise ManifestError(f"{field}.params: {describe_errors(e)}") from None
    try:
        return entry.make(params, window, item)
    except ValueError as e:
        raise ManifestError(f"{field} ({spec.name}): {e}") from None


def _user_stage(spec: PreprocessSpec, field: str) -> Stage:
    module_name, _, fn_name = spec.name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except ImportError as e:
        raise ManifestError(f"{field}.name: cannot import {module_name!r} ({e})") from None
    except AttributeError:
        raise ManifestError(f"{field}.name: {module_name!r} has no {fn_name!r}") from None
    if not callable(fn):
        raise ManifestError(f"{field}.name: {spec.name} is not a function")
    try:
        inspect.signature(fn).bind(np.zeros(1), **spec.params)
    except TypeError as e:
        raise ManifestError(f"{field}.params: {spec.name} does not take them ({e})") from None
    except ValueError:
        pass  # no signature to check (a builtin): the trial batch at load will tell
    params = dict(spec.params)
    return lambda w: np.asarray(fn(w, **params))
