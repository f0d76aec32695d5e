"""The reconnect/restart backoff curve both roles use (exponential, "equal jitter")."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["backoff_delay"]


def backoff_delay(
    attempt: int, min_s: float, max_s: float, rng: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with "equal jitter" for reconnect attempt ``attempt`` (0-based).

    Half the capped exponential delay is fixed and half random, so a fleet that lost its
    broker at the same instant does not reconnect in lock-step, yet no device retries in a
    tight loop.

    Args:
        attempt: How many attempts failed in a row, starting at 0.
        min_s: Delay of the first attempt before jitter.
        max_s: Cap on the delay before jitter.
        rng: Source of uniform numbers in ``[0, 1)``; tests inject their own.
    """
    base = min(max_s, min_s * (2.0 ** min(attempt, 32)))
    return base / 2 + rng() * base / 2
