"""Synthetic vibration windows from rotating machines: the reproducible workload.

Real data sets cannot be downloaded here, so the models are trained and judged
on signals built from the physics that fault diagnosis relies on:

* every machine turns at a shaft frequency ``f_r`` (speed varies) and shows
  its running harmonics, plus broadband noise and sensor gain that vary by
  machine and load;
* **imbalance** raises the 1x component (growing with speed squared);
* **misalignment** raises 2x and 3x;
* **looseness** brings many harmonics, a 0.5x sub-harmonic and clipping;
* **bearing defects** strike a structural resonance (kHz) at the bearing's
  defect frequency: outer race at BPFO (about 3.58 x f_r), inner race at BPFI
  (about 5.42 x f_r, amplitude-modulated by the shaft), each impact an
  exponentially decaying burst with jitter.

Severity is drawn per window; at the low end faults hide under the healthy
spread of amplitude, noise and gain, so a single energy threshold does not
separate them (tests/models/test_generator.py checks that).

Everything is seeded: the same arguments give the same windows, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

CLASSES: tuple[str, ...] = (
    "healthy",
    "imbalance",
    "misalignment",
    "looseness",
    "bearing_outer",
    "bearing_inner",
)
HEALTHY = 0
BPFO, BPFI = 3.585, 5.415  # defect frequencies per shaft turn of a typical deep-groove bearing


@dataclass(frozen=True, slots=True)
class SignalSpec:
    """What a window is: sampling rate and length (0.2 s at 5120 Hz by default)."""

    fs: float = 5120.0
    window: int = 1024
    speed_hz: tuple[float, float] = (15.0, 60.0)  # shaft speed range (900-3600 rpm)
    load: tuple[float, float] = (0.2, 1.0)
    noise: tuple[float, float] = (0.02, 0.08)
    gain: tuple[float, float] = (0.7, 1.4)
    severity: tuple[float, float] = (0.3, 1.0)  # below ~0.3 some faults hide in the healthy spread


@dataclass(slots=True)
class Windows:
    """A batch of windows with their labels and operating conditions."""

    x: np.ndarray  # float32 [n, window], acceleration in g
    y: np.ndarray  # int64 [n], index into CLASSES
    speed_hz: np.ndarray
    load: np.ndarray
    severity: np.ndarray  # 0 for healthy windows
    spec: SignalSpec = field(default_factory=SignalSpec)

    def __len__(self) -> int:
        return len(self.y)


def generate(
    n: int,
    *,
    seed: int,
    fault_fraction: float = 0.3,
    spec: SignalSpec | None = None,
    classes: tuple[int, ...] | None = None,
) -> Windows:
    """``n`` windows; ``fault_fraction`` of them faulty, spread evenly over the fault classes.

    ``classes`` restricts the labels drawn (e.g. ``(0,)`` for healthy only).
    """
    spec = spec or SignalSpec()
    rng = np.random.default_rng(seed)
    faults = [c for c in (classes or range(len(CLASSES))) if c != HEALTHY]
    allow_healthy = classes is None or HEALTHY in classes
    is_fault = rng.random(n) < fault_fraction if allow_healthy and faults else np.full(n, not allow_healthy)
    y = np.where(is_fault, rng.choice(faults, size=n) if faults else HEALTHY, HEALTHY).astype(np.int64)
    return _render(y, rng, spec)


def _render(y: np.ndarray, rng: np.random.Generator, spec: SignalSpec) -> Windows:
    n = len(y)
    t = np.arange(spec.window) / spec.fs
    speed = rng.uniform(*spec.speed_hz, n)
    load = rng.uniform(*spec.load, n)
    noise = rng.uniform(*spec.noise, n)
    gain = rng.uniform(*spec.gain, n)
    severity = np.where(y == HEALTHY, 0.0, rng.uniform(*spec.severity, n))
    x = np.empty((n, spec.window), dtype=np.float64)
    for i in range(n):
        x[i] = _window(int(y[i]), t, speed[i], load[i], severity[i], noise[i], rng)
    x *= gain[:, None]
    return Windows(x.astype(np.float32), y, speed, load, severity, spec)


def _harmonics(t: np.ndarray, f: float, amps: list[float], rng: np.random.Generator) -> np.ndarray:
    out = np.zeros_like(t)
    for k, a in enumerate(amps, start=1):
        out += a * np.sin(2 * np.pi * k * f * t + rng.uniform(0, 2 * np.pi))
    return out


def _impacts(
    t: np.ndarray, rate: float, resonance: float, decay: float, rng: np.random.Generator
) -> np.ndarray:
    """Decaying bursts of a resonance at ``rate`` per second, with timing jitter."""
    out = np.zeros_like(t)
    period = 1.0 / rate
    start = rng.uniform(0, period)
    for k in range(int(t[-1] / period) + 2):
        t0 = start + k * period + rng.normal(0, 0.02 * period)
        dt = t - t0
        mask = dt >= 0
        out[mask] += np.exp(-decay * dt[mask]) * np.sin(2 * np.pi * resonance * dt[mask])
    return out


def _window(
    label: int, t: np.ndarray, fr: float, load: float, sev: float, noise: float, rng: np.random.Generator
) -> np.ndarray:
    base = 0.05 + 0.1 * load
    # Every machine: running harmonics of varying strength and broadband noise.
    a1, a2, a3 = base * rng.uniform(0.8, 1.2), base * rng.uniform(0.15, 0.35), base * rng.uniform(0.02, 0.1)
    name = CLASSES[label]
    if name == "imbalance":  # a heavy point on the rotor: the 1x line, stronger with speed
        a1 += base * (3.0 + 6.0 * sev) * (0.6 + 0.4 * min(1.0, (fr / 40.0) ** 2))
    elif name == "misalignment":  # the coupling bends twice (and thrice) per turn
        a2 += base * (0.8 + 2.5 * sev)
        a3 += base * (0.3 + 1.2 * sev)
    sig = _harmonics(t, fr, [a1, a2, a3], rng)
    sig += rng.normal(0, noise, t.shape)
    if name == "looseness":  # rattling: many harmonics, a half-order line, truncated peaks
        amps = [base * (0.3 + sev) * rng.uniform(0.5, 1.0) / k**0.5 for k in range(1, 11)]
        sig += _harmonics(t, fr, amps, rng)
        sig += base * (0.6 + 1.2 * sev) * np.sin(2 * np.pi * 0.5 * fr * t + rng.uniform(0, 2 * np.pi))
        limit = np.percentile(np.abs(sig), 100 - 8 * sev)
        sig = np.clip(sig, -limit, limit)
    elif name in ("bearing_outer", "bearing_inner"):
        resonance = rng.uniform(1200.0, 2200.0)
        decay = rng.uniform(250.0, 600.0)
        rate = (BPFO if name == "bearing_outer" else BPFI) * fr
        burst = _impacts(t, rate, resonance, decay, rng) * (0.4 + sev) * (0.25 + 0.25 * load)
        if name == "bearing_inner":
            burst *= 0.6 + 0.4 * np.cos(2 * np.pi * fr * t + rng.uniform(0, 2 * np.pi))
        sig += burst
    return sig


@dataclass
class Machine:
    """One simulated machine for ``edge-agent simulate``: mostly healthy, faults come and go."""

    seed: int
    spec: SignalSpec = field(default_factory=SignalSpec)
    fault_rate: float = 0.01  # chance per healthy window that a fault episode starts
    episode: tuple[int, int] = (5, 40)  # fault episode length in windows

    def windows(self) -> Iterator[tuple[np.ndarray, int]]:
        """Endless (window, label) pairs, reproducible from ``seed``."""
        rng = np.random.default_rng(self.seed)
        label, left = HEALTHY, 0
        while True:
            if left == 0:
                label = HEALTHY
                if rng.random() < self.fault_rate:
                    label = int(rng.integers(1, len(CLASSES)))
                    left = int(rng.integers(*self.episode))
            else:
                left -= 1
            w = _render(np.array([label]), rng, self.spec)
            yield w.x[0], label
