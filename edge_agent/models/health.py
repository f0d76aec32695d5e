"""The health window: a newly swapped-in model is on probation until it has proved itself.

For ``health_window_s`` after a swap (default 60 s) the manager keeps the new model's
interpreter loaded and, every ``health_check_interval_s`` (default 10 s), runs its golden
vectors on the device runtime. The model is rolled back to the previous slot on the first
of:

- ``load_failed``: the device runtime cannot load it;
- ``inference_error``: an inference raised (a golden run, or one the serving loop
  reported through :meth:`HealthWindow.record`);
- ``golden_mismatch``: its outputs left the manifest's tolerances;
- ``latency_regression``: its median latency per sample is over ``max_latency_ratio``
  (default 3.0) times the previous model's, measured the same way on the same runtime
  just before the swap, *and* over it by more than ``latency_slack_ms`` (default 1 ms).
  The slack keeps timing noise on microsecond models (a 1.2k-parameter MLP answers in
  2-11 us, and its int8 variant can cost more per sample than fp32) from undoing the
  update to a smaller variant that the release exists for.

A model that passes every check until the window ends is healthy; the window closes.
These reasons add to :data:`edgefl.releasesign.REASONS` (they are failures after the
swap, not refusals before it); they are reported the same way on ``state/reported``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgefl.errors import EdgeflError
from edgefl.manifest import Manifest
from edgefl.runtimes import Runtime, create_runtime
from edgefl.runtimes.golden import GoldenCheck, GoldenThresholds, check_golden

from .config import HealthPolicy

__all__ = [
    "HEALTH_REASONS",
    "HealthFailure",
    "HealthPolicy",
    "HealthWindow",
    "ProbeError",
    "golden_probe",
    "load_runtime",
]

HEALTH_REASONS: Final = ("load_failed", "inference_error", "golden_mismatch", "latency_regression")
"""Why a model on probation is rolled back."""


@dataclass(frozen=True)
class HealthFailure:
    """Why a model failed its probation: a reason of :data:`HEALTH_REASONS` and details."""

    reason: str
    detail: str


class ProbeError(Exception):
    """A golden probe could not run: ``reason`` ``load_failed`` or ``inference_error``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def load_runtime(runtime_key: str, artifact: Path) -> Runtime:
    """Load ``artifact`` on the device runtime.

    Raises:
        ProbeError: ``load_failed`` with the runtime's message.
    """
    try:
        return create_runtime(runtime_key, artifact)
    except EdgeflError as exc:
        raise ProbeError("load_failed", str(exc)) from exc


def golden_probe(runtime: Runtime, manifest: Manifest, repeats: int) -> GoldenCheck:
    """Run the manifest's golden vectors on a loaded model.

    Raises:
        ProbeError: ``inference_error`` when the run raised, or the manifest's tolerances
            cannot be read.
    """
    try:
        thresholds = GoldenThresholds.from_mapping(manifest.thresholds)
        return check_golden(runtime, manifest.golden, thresholds, repeats=repeats)
    except (EdgeflError, KeyError, ValueError, RuntimeError) as exc:
        raise ProbeError("inference_error", f"golden run failed: {exc}") from exc


class HealthWindow:
    """The probation of one swapped-in model.

    Args:
        artifact: The installed ``.tflite`` (in its slot).
        manifest: Its manifest (golden vectors and tolerances).
        runtime_key: The device runtime.
        baseline_p50_us: The previous model's median latency per sample, or ``None``
            when there was no previous model (no latency check then).
        policy: The window's settings.
        clock: Monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        artifact: Path,
        manifest: Manifest,
        runtime_key: str,
        baseline_p50_us: float | None,
        policy: HealthPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.artifact = artifact
        self.manifest = manifest
        self.runtime_key = runtime_key
        self.baseline_p50_us = baseline_p50_us
        self.policy = policy
        self._clock = clock
        self.started = clock()
        self._next_check = self.started
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()
        self._reported: HealthFailure | None = None
        self.checks = 0
        self.last_p50_us: float | None = None

    @property
    def ends_at(self) -> float:
        """When the window closes (monotonic clock)."""
        return self.started + self.policy.window_s

    def record(self, *, error: str | None = None) -> None:
        """Report one inference of the serving loop; any error fails the probation."""
        if error is not None:
            with self._lock:
                self._reported = self._reported or HealthFailure("inference_error", error)

    def due(self) -> bool:
        """Whether a probe is due (or the window is over and can close)."""
        now = self._clock()
        return now >= self._next_check or now >= self.ends_at or self._reported is not None

    def poll(self) -> HealthFailure | bool:
        """Run a probe if one is due.

        Returns:
            A :class:`HealthFailure` to roll back for, ``True`` when the window ended with
            the model healthy, ``False`` while probation goes on.
        """
        with self._lock:
            if self._reported is not None:
                return self._reported
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.policy.check_interval_s
            failure = self.probe()
            if failure is not None:
                return failure
        return self._clock() >= self.ends_at

    def probe(self) -> HealthFailure | None:
        """Load (once), run the golden vectors, compare the latency with the baseline."""
        self.checks += 1
        try:
            if self._runtime is None:
                self._runtime = load_runtime(self.runtime_key, self.artifact)
            result = golden_probe(self._runtime, self.manifest, self.policy.golden_repeats)
        except ProbeError as exc:
            return HealthFailure(exc.reason, exc.detail)
        self.last_p50_us = result.p50_us
        if not result.passed:
            return HealthFailure("golden_mismatch", "; ".join(result.reasons))
        base = self.baseline_p50_us
        if (
            base is not None
            and base > 0
            and result.p50_us > self.policy.max_latency_ratio * base
            and result.p50_us - base > self.policy.latency_slack_us
        ):
            return HealthFailure(
                "latency_regression",
                f"median {result.p50_us:.0f} us per sample is {result.p50_us / base:.1f}x the "
                f"previous model's {base:.0f} us (allowed {self.policy.max_latency_ratio:g}x, "
                f"or {self.policy.latency_slack_us:.0f} us more)",
            )
        return None
