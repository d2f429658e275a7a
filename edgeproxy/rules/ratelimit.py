"""Token-bucket rate limits (sans-IO: ``now`` is passed in): the public routes, the replayer.

Owns: the bucket arithmetic and a bounded map of buckets by key (client IP,
custom domain). One instance per worker process: limits are per worker, so a
node with N workers admits up to N times the configured rate (documented).
Must not import: anything of ours.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["TokenBuckets"]


class TokenBuckets:
    """``rate`` tokens per second per key, up to ``burst`` saved; ``rate <= 0`` disables.

    Memory is bounded by ``max_keys``: the least recently seen key is forgotten
    first, which can only make the limit more lenient for that key, never stricter.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, updated)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key`` if it has one."""
        return self.wait(key, now) == 0.0

    def wait(self, key: str, now: float) -> float:
        """Take one token for ``key`` and return 0.0, or return the seconds until it will
        have one (taking nothing): a caller that may wait sleeps that long and asks again."""
        if self.rate <= 0:
            return 0.0
        tokens, updated = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        delay = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            delay = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)  # re-inserted last: most recently seen
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return delay

    def __len__(self) -> int:
        return len(self._buckets)
