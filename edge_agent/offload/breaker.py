"""A circuit breaker for the cloud path, fed by health checks and request outcomes.

States (the classic three):

* ``closed``: requests go to the cloud. ``failure_threshold`` failures in a row open it.
* ``open``: nothing goes to the cloud for ``open_s`` seconds (doubled after each failed
  probe, up to ``max_open_s``), so a dead or sick service costs the device nothing.
* ``half_open``: after the wait, exactly one caller gets :meth:`CircuitBreaker.allow` =
  ``True`` (the probe). Its success closes the breaker; its failure opens it again.

Health checks report through the same :meth:`record_success` / :meth:`record_failure`,
so a failed health check counts like a failed request and a passing one can close a
half-open breaker. :attr:`CircuitBreaker.recoveries` counts the times a success closed an
open or half-open breaker (an outage ended), so the policy can probe the path at once.
The clock is injectable for tests. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed → open after consecutive failures → half-open probe → closed or open.

    Args:
        failure_threshold: Consecutive failures that open a closed breaker; at least 1.
        open_s: First wait in the open state, seconds; > 0.
        max_open_s: Longest wait after repeated failed probes.
        clock: Monotonic time source, seconds.

    Raises:
        ValueError: A parameter is out of range.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        open_s: float = 2.0,
        max_open_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        if open_s <= 0 or max_open_s < open_s:
            raise ValueError(f"need 0 < open_s <= max_open_s, got {open_s} and {max_open_s}")
        self._threshold = failure_threshold
        self._base_open_s = open_s
        self._max_open_s = max_open_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0
        self._open_s = open_s
        self._opened_at = 0.0
        self._probe_out = False
        self.opened_count = 0
        #: Times a success closed the breaker after it had opened.
        self.recoveries = 0

    @property
    def state(self) -> BreakerState:
        """The current state (an expired open wait shows as ``half_open``)."""
        with self._lock:
            self._expire_open()
            return self._state

    def allow(self) -> bool:
        """Whether a request may go to the cloud now.

        In ``half_open`` only the first caller is allowed (it is the probe) until its
        outcome is recorded.
        """
        with self._lock:
            self._expire_open()
            if self._state == "closed":
                return True
            if self._state == "half_open" and not self._probe_out:
                self._probe_out = True
                return True
            return False

    def record_success(self) -> None:
        """A request or health check succeeded: close the breaker, reset the backoff."""
        with self._lock:
            if self._state != "closed":
                self.recoveries += 1
            self._state = "closed"
            self._failures = 0
            self._open_s = self._base_open_s
            self._probe_out = False

    def record_failure(self) -> None:
        """A request or health check failed: count it; open the breaker when due."""
        with self._lock:
            self._expire_open()
            if self._state == "half_open":
                # The probe failed: wait longer this time.
                self._open_s = min(self._open_s * 2.0, self._max_open_s)
                self._open()
                return
            if self._state == "open":
                return
            self._failures += 1
            if self._failures >= self._threshold:
                self._open()

    def _open(self) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self._probe_out = False
        self._failures = 0
        self.opened_count += 1

    def _expire_open(self) -> None:
        if self._state == "open" and self._clock() - self._opened_at >= self._open_s:
            self._state = "half_open"
            self._probe_out = False
