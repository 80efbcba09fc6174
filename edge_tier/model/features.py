"""From a raw vibration window to the prefilter's input: a 256-bin log spectrum.

Runs on the device before the prefilter, so it is numpy only and batched. The
spectrum is taken relative to each window's own median level, so sensor gain
and mounting (a constant factor) do not shift the input.
"""

from __future__ import annotations

import numpy as np

BINS = 256
FS = 5120.0  # the sample rate the features assume (edge_tier.model.generator.SignalSpec)
ENVELOPE_FROM_HZ = 900.0


def spectrum_features(windows: np.ndarray, bins: int = BINS) -> np.ndarray:
    """float32 [n, bins] from float [n, window], in three parts:

    * ``bins/2`` lines of the spectrum over the shaft orders, at full resolution:
      imbalance, misalignment and looseness show there;
    * ``bins/8`` wide bands covering the rest of the spectrum, on the same scale:
      the energy of a bearing's struck resonance;
    * ``3 bins/8`` lines of the envelope spectrum of the band above
      ``ENVELOPE_FROM_HZ``: bearing impacts as lines at their defect frequency, which
      tells outer from inner race (the classic diagnosis).

    Spectra are logs relative to a median level of their own, so gain does not shift them.
    """
    x = np.asarray(windows, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"windows must be [n, window], not shape {x.shape}")
    n, length = x.shape
    n_low, n_band = bins // 2, bins // 8
    n_env = bins - n_low - n_band
    if length < 2 * (n_low + n_band) + 2:
        raise ValueError(f"window length {length} is too short for {bins} features")
    x = x - x.mean(axis=1, keepdims=True)
    hann = np.hanning(length).astype(np.float32)
    mag = np.abs(np.fft.rfft(x * hann, axis=1))[:, 1:]
    low, rest = mag[:, :n_low], mag[:, n_low:]
    per = rest.shape[1] // n_band
    bands = rest[:, : per * n_band].reshape(n, n_band, per).mean(axis=2)
    level = _row_median(np.log10(low + 1e-6))
    shaft = np.log10(np.concatenate([low, bands], axis=1) + 1e-6) - level
    spec = np.fft.rfft(x, axis=1)
    spec[:, : int(ENVELOPE_FROM_HZ * length / FS)] = 0
    env = np.abs(np.fft.irfft(spec, n=length, axis=1))
    env_mag = np.abs(np.fft.rfft((env - env.mean(axis=1, keepdims=True)) * hann, axis=1))[:, 1 : n_env + 1]
    return np.concatenate([shaft, _relative_log(env_mag)], axis=1).astype(np.float32)


def _relative_log(mag: np.ndarray) -> np.ndarray:
    logmag = np.log10(mag + 1e-6)
    return logmag - _row_median(logmag)


def _row_median(a: np.ndarray) -> np.ndarray:
    """``np.median(a, axis=1, keepdims=True)`` for a 2-D ``a``, computed as numpy does (partition,
    then the mean of the middle one or two; NaN where a row holds one), the same values to the
    bit, but without np.median's masked-array check, which imports numpy.ma (1.3 MB resident)
    into the agent at its first window."""
    n = a.shape[1]
    half = n // 2
    middle = [half - 1, half] if n % 2 == 0 else [half]
    part = np.partition(a, [*middle, -1], axis=1)  # NaNs sort last
    med = np.mean(part[:, middle[0] : half + 1], axis=1, keepdims=True)
    med[np.isnan(part[:, -1])] = np.nan
    return med
