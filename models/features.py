"""From a raw vibration window to the prefilter's input: a 256-bin log spectrum.

Runs on the device before the prefilter, so it is numpy only and batched. The
spectrum is taken relative to each window's own median level, so sensor gain
and mounting (a constant factor) do not shift the input.
"""

from __future__ import annotations

import numpy as np

BINS = 256


def spectrum_features(windows: np.ndarray, bins: int = BINS) -> np.ndarray:
    """float32 [n, bins] from float [n, window] (window = 2 x bins x k for some k >= 1)."""
    x = np.asarray(windows, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"windows must be [n, window], not shape {x.shape}")
    n, length = x.shape
    if length % (2 * bins):
        raise ValueError(f"window length {length} is not a multiple of {2 * bins}")
    x = x - x.mean(axis=1, keepdims=True)
    mag = np.abs(np.fft.rfft(x * np.hanning(length).astype(np.float32), axis=1))[:, 1:]  # drop DC
    # Full resolution where the shaft orders live (the first half of the bins), pooled
    # above, where resonances and bearing impacts spread energy over wide bands.
    half = bins // 2
    low = mag[:, :half]
    high = mag[:, half:]
    k = high.shape[1] // half
    pooled = np.concatenate([low, high[:, : k * half].reshape(n, half, k).mean(axis=2)], axis=1)
    logmag = np.log10(pooled + 1e-6)
    return (logmag - np.median(logmag, axis=1, keepdims=True)).astype(np.float32)
