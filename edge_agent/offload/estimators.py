"""Running estimates the offload policy decides on: RTT, uplink, cloud compute, local latency.

Each quantity is a :class:`RollingEstimate`: an exponentially weighted moving average
(reacts smoothly) beside the 90th percentile of a sliding window of recent samples
(conservative: it sees the tail that breaks budgets). The policy reads one or the other
(:attr:`OffloadEstimates.statistic`).

Where the samples come from (see :class:`OffloadEstimates`):

* **RTT** from health checks, whose messages are a few bytes, so their round trip is
  (almost) pure network latency; a request that ran into its deadline adds the time it
  waited as a (censored) sample, so a path that starts timing out pushes the tail up.
* **Uplink** as *milliseconds per KiB sent*, from Predict calls: the response carries the
  server's compute and queue time, so ``round trip - server time - RTT`` is what the bytes
  took to travel. A cost per KiB (higher is worse) keeps "p90 is conservative" true for
  every estimate; :meth:`OffloadEstimates.uplink_mbit_s` shows it as a bandwidth.
* **Cloud** compute plus queueing time, as the server reports it.
* **Local** latency of the device runtime.

The windows remember the last ``window`` samples however old they are: with health
checks every 0.5 s, a p90 over 32 of them still holds a congestion or an outage from 16 s
ago. :meth:`OffloadEstimates.restart_network` forgets it when a request sent *against*
the estimate (an exploration) came back in time: the network is better than the window
says, and the next samples describe it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Literal

__all__ = ["OffloadEstimates", "RollingEstimate", "Statistic", "percentile"]

Statistic = Literal["p90", "ewma"]
"""Which summary of a :class:`RollingEstimate` the policy uses."""

_KIB = 1024.0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of a non-empty sequence.

    Args:
        values: The samples, any order.
        q: Percentile in [0, 100].

    Raises:
        ValueError: No values, or ``q`` outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class RollingEstimate:
    """EWMA and p90 of one non-negative quantity.

    Args:
        alpha: EWMA weight of a new sample, in (0, 1]; the first sample seeds the average.
        window: How many recent samples the percentile looks at.
        prior: Value reported before the first sample, or ``None`` (then :meth:`value`
            is ``None`` until a sample arrives).

    Raises:
        ValueError: ``alpha`` or ``window`` is out of range.
    """

    def __init__(self, *, alpha: float = 0.2, window: int = 32, prior: float | None = None) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._alpha = alpha
        self._window: deque[float] = deque(maxlen=window)
        self._ewma: float | None = None
        self._prior = prior
        self.count = 0

    def add(self, value: float) -> None:
        """Record one sample; negative or non-finite values are refused.

        Raises:
            ValueError: ``value`` is negative, NaN or infinite.
        """
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(f"samples must be finite and >= 0, got {value}")
        self._window.append(value)
        self._ewma = (
            value if self._ewma is None else self._ewma + self._alpha * (value - self._ewma)
        )
        self.count += 1

    def extend(self, values: Iterable[float]) -> None:
        """Record several samples in order."""
        for value in values:
            self.add(value)

    @property
    def last(self) -> float | None:
        """The most recent sample, ``None`` before any."""
        return self._window[-1] if self._window else None

    @property
    def ewma(self) -> float | None:
        """The moving average, the prior before any sample."""
        return self._prior if self._ewma is None else self._ewma

    @property
    def p90(self) -> float | None:
        """90th percentile of the window, the prior before any sample."""
        return self._prior if not self._window else percentile(self._window, 90.0)

    def value(self, statistic: Statistic) -> float | None:
        """The chosen summary (``"p90"`` or ``"ewma"``)."""
        return self.p90 if statistic == "p90" else self.ewma


class OffloadEstimates:
    """The four estimates behind an offload decision, fed from observations.

    Not thread-safe by itself; :class:`~edgefl.edge_agent.offload.engine.Predictor` feeds
    it under its own lock.

    Args:
        statistic: ``"p90"`` (default, conservative) or ``"ewma"``.
        alpha: EWMA weight of a new sample.
        window: Samples the percentile looks at.
        uplink_mbit_prior: Uplink assumed before the first measurement, Mbit/s.
    """

    def __init__(
        self,
        *,
        statistic: Statistic = "p90",
        alpha: float = 0.2,
        window: int = 32,
        uplink_mbit_prior: float = 5.0,
    ) -> None:
        if uplink_mbit_prior <= 0:
            raise ValueError(f"uplink_mbit_prior must be > 0, got {uplink_mbit_prior}")
        self.statistic: Statistic = statistic
        self._alpha = alpha
        self._window_size = window
        self._upload_prior = _ms_per_kib(uplink_mbit_prior)
        self.rtt = RollingEstimate(alpha=alpha, window=window)
        self.upload = RollingEstimate(
            alpha=alpha, window=window, prior=_ms_per_kib(uplink_mbit_prior)
        )
        self.cloud = RollingEstimate(alpha=alpha, window=window)
        self.local = RollingEstimate(alpha=alpha, window=window)

    # -- observations ---------------------------------------------------------------------

    def observe_rtt(self, rtt_ms: float) -> None:
        """A health check (a few bytes each way) took ``rtt_ms`` end to end."""
        self.rtt.add(rtt_ms)

    def observe_local(self, latency_ms: float) -> None:
        """The local runtime answered one sample in ``latency_ms``."""
        self.local.add(latency_ms)

    def observe_predict(self, *, total_ms: float, server_ms: float, request_bytes: int) -> None:
        """A Predict call succeeded.

        Args:
            total_ms: Client-side round trip of the call.
            server_ms: Compute plus queue time the server reported.
            request_bytes: Serialized request size.
        """
        server_ms = max(0.0, min(server_ms, total_ms))
        self.cloud.add(server_ms)
        network_ms = total_ms - server_ms
        rtt = self.rtt.ewma
        if rtt is None:
            # No health check yet: the whole network time is the best RTT guess there is.
            self.rtt.add(network_ms)
            return
        if request_bytes > 0:
            self.upload.add(max(0.0, network_ms - rtt) / (request_bytes / _KIB))

    def restart_network(self, rtt_ms: float) -> None:
        """Start the network estimates again from one round trip that fitted.

        Called when an exploration (a request the estimates said would not fit) answered
        within its deadline: the RTT window restarts from its network time and the uplink
        from its prior. The cloud and local estimates describe the machines, not the
        network, and stay.
        """
        self.rtt = RollingEstimate(alpha=self._alpha, window=self._window_size)
        self.rtt.add(rtt_ms)
        self.upload = RollingEstimate(
            alpha=self._alpha, window=self._window_size, prior=self._upload_prior
        )

    def observe_timeout(self, waited_ms: float) -> None:
        """A call gave up after ``waited_ms`` without an answer (deadline exceeded).

        The true round trip is at least that long, so it is recorded as an RTT sample: a
        path that keeps timing out drives the estimate above the budget.
        """
        self.rtt.add(waited_ms)

    # -- reading --------------------------------------------------------------------------

    def upload_ms(self, request_bytes: int) -> float | None:
        """Estimated time to send ``request_bytes`` over the uplink."""
        per_kib = self.upload.value(self.statistic)
        return None if per_kib is None else per_kib * request_bytes / _KIB

    def uplink_mbit_s(self) -> float | None:
        """The uplink estimate as a bandwidth (``inf`` when sending costs nothing)."""
        per_kib = self.upload.value(self.statistic)
        if per_kib is None:
            return None
        return math.inf if per_kib == 0.0 else _KIB * 8.0 / (per_kib * 1000.0)

    def cloud_path_ms(self, request_bytes: int) -> float | None:
        """Estimated upload + RTT + cloud time, or ``None`` while RTT or cloud is unknown.

        An unknown cloud time counts as 0 once the RTT is known: the first offload then
        measures it, and the deadline protects the budget if it is large.
        """
        rtt = self.rtt.value(self.statistic)
        upload = self.upload_ms(request_bytes)
        if rtt is None or upload is None:
            return None
        cloud = self.cloud.value(self.statistic) or 0.0
        return upload + rtt + cloud

    def latest_path_ms(self, request_bytes: int) -> float | None:
        """Like :meth:`cloud_path_ms`, with the latest RTT sample instead of its summary.

        What the network looks like right now: the policy probes sooner when this fits
        and the summary (which remembers the last ``window`` samples) does not.
        """
        rtt = self.rtt.last
        upload = self.upload_ms(request_bytes)
        if rtt is None or upload is None:
            return None
        return upload + rtt + (self.cloud.value(self.statistic) or 0.0)

    def snapshot(self) -> dict[str, float | None]:
        """Current values (the configured statistic) for logs and results."""
        uplink = self.uplink_mbit_s()
        return {
            "rtt_ms": self.rtt.value(self.statistic),
            # JSON has no infinity: a free uplink is reported as unknown-but-fast (None).
            "uplink_mbit_s": None if uplink is None or math.isinf(uplink) else uplink,
            "cloud_ms": self.cloud.value(self.statistic),
            "local_ms": self.local.value(self.statistic),
        }


def _ms_per_kib(mbit_s: float) -> float:
    """Milliseconds one KiB takes at ``mbit_s`` megabits per second."""
    return _KIB * 8.0 / (mbit_s * 1e6) * 1000.0
