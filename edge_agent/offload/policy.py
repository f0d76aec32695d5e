"""The offload decision: does this sample go to the cloud, and with which deadline?

A sample is offloaded only when all of these hold (``adaptive`` mode):

1. the policy *wants* the cloud answer: the local top-1 probability is below
   ``confidence_threshold``, or ``prefer_cloud`` is set;
2. it *fits*: ``upload + RTT + cloud + margin <= budget - elapsed - local fallback time``,
   with the estimates from :class:`~edgefl.edge_agent.offload.estimators.OffloadEstimates`;
3. the service is *healthy*: the circuit breaker allows a request.

The local fallback time is what it takes to hand over the local answer once the cloud
gave up: the local runtime's latency estimate if the local answer is not computed yet,
plus ``fallback_reserve_ms``. The gRPC deadline is ``budget - elapsed - fallback``, so
whatever the cloud does, the local answer is ready in time.

``cloud`` mode skips 1-3 and always asks the cloud (the deadline still bounds the wait);
``local`` mode never does. When the estimates say the cloud does not fit, ``adaptive`` still
sends one sample every ``explore_interval_s`` so that a recovered network is noticed; the
deadline keeps that probe inside the budget too. Probes go sooner when there is evidence
that the network is back: at once after the breaker closed again (an outage ended: what
the estimates remember was measured before and during it), and after
:data:`FAST_EXPLORE_S` when the latest health check alone says the cloud fits (the p90
still remembers a congestion that is over). A probe answered in time restarts the network
estimates from its round trip (see
:meth:`~edgefl.edge_agent.offload.estimators.OffloadEstimates.restart_network`), so the
offload comes back within a few seconds of the network, not when the window forgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .breaker import CircuitBreaker
from .config import PolicyConfig
from .estimators import OffloadEstimates

__all__ = ["FAST_EXPLORE_S", "Decision", "OffloadPolicy"]

FAST_EXPLORE_S: Final = 1.0
"""Shortest time between two probes, when the latest health check says the cloud fits."""


@dataclass(frozen=True)
class Decision:
    """The outcome of :meth:`OffloadPolicy.decide`.

    Attributes:
        offload: Whether to ask the cloud.
        reason: Why, in a few words (recorded with the result).
        deadline_ms: The gRPC deadline from now when offloading, else ``None``.
        estimate_ms: Estimated cloud path (upload + RTT + cloud + margin), if known.
        available_ms: Time the cloud may take: budget - elapsed - fallback.
        explore: The request goes against the estimate (a probe of a path they say
            does not fit).
    """

    offload: bool
    reason: str
    deadline_ms: float | None = None
    estimate_ms: float | None = None
    available_ms: float | None = None
    explore: bool = False


class OffloadPolicy:
    """Decides per sample; see the module docstring for the rules.

    Args:
        config: Mode, thresholds and margins.
        estimates: The running estimates (read under the caller's lock).
        breaker: The cloud's circuit breaker.
        cloud_available: Whether a cloud endpoint is configured at all.
        clock: Monotonic seconds, for the exploration interval.
    """

    def __init__(
        self,
        config: PolicyConfig,
        estimates: OffloadEstimates,
        breaker: CircuitBreaker,
        *,
        cloud_available: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.estimates = estimates
        self.breaker = breaker
        self.cloud_available = cloud_available
        #: Reason recorded when the cloud is not available (set by the predictor when the
        #: served model cannot take the device's input, for example).
        self.unavailable_reason = "no cloud configured"
        self._clock = clock
        self._last_attempt: float | None = None
        self._recoveries_seen = breaker.recoveries

    def fallback_ms(self, *, local_done: bool) -> float:
        """Local fallback time: reserve plus the local latency still to come."""
        pending = 0.0 if local_done else (self.estimates.local.value(self.config.statistic) or 0.0)
        return self.config.fallback_reserve_ms + pending

    def decide(
        self,
        *,
        budget_ms: float,
        elapsed_ms: float,
        request_bytes: int,
        local_confidence: float | None,
        local_done: bool = True,
    ) -> Decision:
        """Decide for one sample.

        Args:
            budget_ms: The sample's end-to-end budget.
            elapsed_ms: Time already spent on it (the local inference, if done).
            request_bytes: Size of the Predict request that would be sent.
            local_confidence: Local top-1 probability, ``None`` if not computed.
            local_done: Whether the local answer is already in hand.
        """
        cfg = self.config
        if cfg.mode == "local":
            return Decision(False, "mode local")
        if not self.cloud_available:
            return Decision(False, self.unavailable_reason)
        available = budget_ms - elapsed_ms - self.fallback_ms(local_done=local_done)
        if available <= 0:
            return Decision(
                False,
                f"budget too small: {budget_ms:.1f} ms leaves nothing after the local fallback",
                available_ms=available,
            )
        if cfg.mode == "cloud":
            return self._offload("mode cloud", available, None)
        if not cfg.prefer_cloud:
            if local_confidence is None:
                return Decision(False, "no local confidence to judge by", available_ms=available)
            if local_confidence >= cfg.confidence_threshold:
                return Decision(
                    False,
                    f"local confidence {local_confidence:.3f} >= {cfg.confidence_threshold:g}",
                    available_ms=available,
                )
        path = self.estimates.cloud_path_ms(request_bytes)
        estimate = None if path is None else path + cfg.margin_ms
        if estimate is not None and estimate > available:
            if self._explore_due(request_bytes, available):
                if not self.breaker.allow():
                    return Decision(False, "circuit breaker open", None, estimate, available)
                return self._offload(
                    f"explore: estimate {estimate:.1f} ms > {available:.1f} ms available",
                    available,
                    estimate,
                    explore=True,
                )
            return Decision(
                False,
                f"cloud does not fit: estimate {estimate:.1f} ms > {available:.1f} ms available",
                None,
                estimate,
                available,
            )
        if not self.breaker.allow():
            return Decision(False, "circuit breaker open", None, estimate, available)
        if estimate is None:
            return self._offload("no estimate yet (deadline bounds the try)", available, None)
        return self._offload(
            f"fits: estimate {estimate:.1f} ms <= {available:.1f} ms available",
            available,
            estimate,
        )

    def _offload(
        self, reason: str, available: float, estimate: float | None, *, explore: bool = False
    ) -> Decision:
        self._last_attempt = self._clock()
        self._recoveries_seen = self.breaker.recoveries  # any request probes the path
        return Decision(True, reason, available, estimate, available, explore)

    def _explore_due(self, request_bytes: int, available: float) -> bool:
        interval = self.config.explore_interval_s
        if interval <= 0:
            return False
        if self.breaker.recoveries != self._recoveries_seen:
            return True  # the breaker closed again since the last probe: an outage ended
        if self._last_attempt is None:
            return True
        since = self._clock() - self._last_attempt
        if since >= interval:
            return True
        latest = self.estimates.latest_path_ms(request_bytes)
        return (
            since >= min(FAST_EXPLORE_S, interval)
            and latest is not None
            and latest + self.config.margin_ms <= available
        )
