"""The synthetic workload: reproducible, physically plausible, and not trivially separable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edge_tier.model.generator import BPFI, BPFO, CLASSES, HEALTHY, Machine, SignalSpec, generate

SPEC = SignalSpec()


def line(w: np.ndarray, freqs: np.ndarray, fs: float = SPEC.fs) -> np.ndarray:
    """Per window: the spectral line nearest each window's frequency, over the noise floor."""
    spec = np.abs(np.fft.rfft(w * np.hanning(w.shape[1]), axis=1))
    bins = np.clip(np.rint(freqs * w.shape[1] / fs).astype(int), 0, spec.shape[1] - 1)
    near = [spec[np.arange(len(w)), np.clip(bins + d, 0, spec.shape[1] - 1)] for d in (-1, 0, 1)]
    return np.max(near, axis=0) / np.median(spec, axis=1)


def envelope(x: np.ndarray, fs: float = SPEC.fs) -> np.ndarray:
    """Envelope of the high band (above 900 Hz), where bearing impacts ring."""
    spec = np.fft.rfft(x, axis=1)
    spec[:, np.fft.rfftfreq(x.shape[1], 1 / fs) < 900] = 0
    return np.abs(np.fft.irfft(spec, n=x.shape[1], axis=1))


def only(label: str, n: int = 200, seed: int = 3) -> object:
    return generate(n, seed=seed, classes=(CLASSES.index(label),))


def test_same_seed_same_windows_other_seed_other_windows() -> None:
    a, b, c = generate(64, seed=7), generate(64, seed=7), generate(64, seed=8)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    assert a.x.dtype == np.float32 and a.x.shape == (64, SPEC.window) and np.isfinite(a.x).all()


def test_fault_fraction_and_every_class_appears() -> None:
    w = generate(3000, seed=1, fault_fraction=0.4)
    share = np.mean(w.y != HEALTHY)
    assert 0.35 < share < 0.45
    assert set(np.unique(w.y)) == set(range(len(CLASSES)))
    assert (w.severity[w.y == HEALTHY] == 0).all() and (w.severity[w.y != HEALTHY] > 0).all()


def test_imbalance_raises_1x_misalignment_2x_looseness_half_order() -> None:
    h, imb, mis, loose = only("healthy"), only("imbalance"), only("misalignment"), only("looseness")
    assert np.median(line(imb.x, imb.speed_hz)) > 1.5 * np.median(line(h.x, h.speed_hz))
    assert np.median(line(mis.x, 2 * mis.speed_hz)) > 3 * np.median(line(h.x, 2 * h.speed_hz))
    assert np.median(line(loose.x, 0.5 * loose.speed_hz)) > 4 * np.median(line(h.x, 0.5 * h.speed_hz))


def test_bearing_impacts_repeat_at_their_defect_frequency() -> None:
    h, outer, inner = only("healthy"), only("bearing_outer"), only("bearing_inner")
    floor = np.median(line(envelope(h.x), BPFO * h.speed_hz))
    assert np.median(line(envelope(outer.x), BPFO * outer.speed_hz)) > 2.5 * floor
    assert np.median(line(envelope(inner.x), BPFI * inner.speed_hz)) > 1.8 * floor
    # and not at the other bearing's frequency
    assert np.median(line(envelope(outer.x), BPFI * outer.speed_hz)) < 1.3 * floor


def test_one_energy_threshold_does_not_separate_faults_from_healthy() -> None:
    w = generate(4000, seed=11, fault_fraction=0.5)
    rms = np.sqrt(np.mean(w.x.astype(np.float64) ** 2, axis=1))
    faulty = w.y != HEALTHY
    best = max(np.mean((rms > th) == faulty) for th in np.quantile(rms, np.linspace(0.01, 0.99, 99)))
    assert best < 0.85, f"RMS alone separates the classes ({best:.2%}): the task would be trivial"


@pytest.mark.parametrize("seed", [0, 1])
def test_machine_stream_is_reproducible_and_mostly_healthy(seed: int) -> None:
    a = list(itertools.islice(Machine(seed).windows(), 300))
    b = list(itertools.islice(Machine(seed).windows(), 300))
    assert all(np.array_equal(x1, x2) and y1 == y2 for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    labels = np.array([y for _, y in a])
    assert 0.5 < np.mean(labels == HEALTHY) < 1.0
    # faults come in episodes, not single windows
    runs = [len(list(g)) for k, g in itertools.groupby(labels) if k != HEALTHY]
    assert runs and np.mean(runs) >= 3
