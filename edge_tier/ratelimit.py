"""A token bucket, for rate limits on both sides: a tenant's share of tier two, an API
token's requests, a device's upload bytes per second."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``rate`` 0 means unlimited.

    Taking more tokens than there are is allowed (a message's record count is only
    known once fetched): the bucket goes into debt, and ``wait_s`` says how long
    until it is out of it.
    """

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(2 * rate, 1.0))
        self._clock = clock
        self._tokens = self.burst
        self._t = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now

    def wait_s(self) -> float:
        """Seconds until there is at least one whole token (0: take now)."""
        if not self.rate:
            return 0.0
        self._refill()
        return 0.0 if self._tokens >= 1 else (1.0 - self._tokens) / self.rate

    def take(self, n: float) -> None:
        if self.rate:
            self._refill()
            self._tokens -= n
