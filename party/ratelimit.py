"""Per-caller token buckets: a caller may spend ``burst`` at once and ``rate`` per second
on average."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBuckets:
    """One bucket per caller, full at first; not thread-safe (the handler holds its lock).

    Parameters
    ----------
    rate : tokens added per second.
    burst : the bucket's capacity.
    clock : seconds, monotonic (injectable for tests).
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._level: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at time)

    def take(self, caller: str, amount: int) -> float | None:
        """Spend ``amount`` tokens and return ``None``, or spend nothing and return the
        seconds until they would be there (``inf`` when ``amount`` exceeds the burst)."""
        now = self.clock()
        tokens, then = self._level.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if amount <= tokens:
            self._level[caller] = (tokens - amount, now)
            return None
        self._level[caller] = (tokens, now)
        return math.inf if amount > self.burst else (amount - tokens) / self.rate
