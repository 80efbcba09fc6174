"""The token bucket (tenant shares, API rate limits, device upload rate), on a clock the test turns."""

from __future__ import annotations

import pytest

from edge_tier.ratelimit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    b = TokenBucket(1000, burst=500, clock=clock)
    assert b.wait_s() == 0
    b.take(500)
    assert b.wait_s() == pytest.approx(0.001)
    b.take(1500)  # a message bigger than what was left: debt
    assert b.wait_s() == pytest.approx(1.501)
    clock.t += 1.5
    assert b.wait_s() == pytest.approx(0.001)
    clock.t += 10  # idle time refills only up to the burst
    assert b.wait_s() == 0
    b.take(500)
    assert b.wait_s() > 0


def test_rate_zero_is_unlimited() -> None:
    b = TokenBucket(0)
    b.take(10**9)
    assert b.wait_s() == 0


def test_the_default_burst_is_two_seconds_of_rate() -> None:
    clock = Clock()
    b = TokenBucket(100, clock=clock)
    b.take(199)
    assert b.wait_s() == 0
    b.take(1)
    assert b.wait_s() > 0
