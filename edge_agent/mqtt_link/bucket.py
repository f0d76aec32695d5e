"""A token bucket: the rate at which the outbox sender replays its backlog after a reconnect."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, holding at most ``burst``.

    Args:
        rate: Tokens added per second.
        burst: Capacity; also the number of tokens right after :meth:`reset`.
        clock: Monotonic clock in seconds; tests inject their own.
    """

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def reset(self) -> None:
        """Fill the bucket to its burst size."""
        self._tokens = self.burst
        self._stamp = self._clock()

    def take(self, wanted: int) -> int:
        """Take up to ``wanted`` whole tokens; return how many were taken."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        got = min(wanted, int(self._tokens))
        self._tokens -= got
        return max(got, 0)

    def give_back(self, count: int) -> None:
        """Return tokens taken but not used."""
        self._tokens = min(self.burst, self._tokens + count)

    def wait_s(self) -> float:
        """Seconds until one whole token is available (``0.0`` if one is)."""
        return max(0.0, (1.0 - self._tokens) / self.rate)
