"""Rate limits: a token bucket per API key, and per address for failures.

A key may make ``rate`` requests a second with bursts up to ``burst``. Failed
authentication (a wrong API key, a wrong webhook token) is limited per client
address, so guessing secrets is slow while Locally's own deliveries, which
authenticate, are never held back. Limits are per process: with several
processes behind a balancer, each enforces its share.
"""

from __future__ import annotations

import math
import time

__all__ = ["RateLimiter", "retry_after"]


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class RateLimiter:
    """Token buckets by name; ``rate`` of 0 turns the limit off."""

    def __init__(
        self, rate: float, burst: float, *, max_buckets: int = 100_000
    ) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, _Bucket] = {}
        self._max_buckets = max_buckets

    def take(self, name: str) -> float | None:
        """Spend one token of ``name``'s bucket.

        Returns ``None`` when allowed, else the seconds until a token is back.
        """
        if self.rate <= 0:
            return None
        now = time.monotonic()
        bucket = self._buckets.get(name)
        if bucket is None:
            if len(self._buckets) >= self._max_buckets:
                self._forget_full(now)
            bucket = self._buckets[name] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(
                self.burst, bucket.tokens + (now - bucket.updated) * self.rate
            )
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled says nothing a new one would not; drop
        # those so a flood of addresses cannot grow memory without bound.
        full = [
            name
            for name, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * self.rate >= self.burst
        ]
        for name in full:
            del self._buckets[name]
        if len(self._buckets) >= self._max_buckets:
            self._buckets.clear()


def retry_after(seconds: float) -> str:
    """Return a Retry-After value: whole seconds, at least one."""
    return str(max(1, math.ceil(seconds)))
