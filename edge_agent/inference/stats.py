"""The inference loop's figures, per model version: what ``agent status`` and telemetry show.

For each model version that answered (``model``, ``version``, ``variant``):

- ``answered`` samples and ``samples_per_s`` (answered over ``served_s``, the time it
  was the loop's model);
- ``accuracy`` on *evaluation* samples only (a held-out split that is never stored for
  training), with ``evaluated`` and ``correct``; ``None`` before the first one;
- ``local_p50_ms`` / ``local_p99_ms``: the device model's own time per sample, and
  ``latency_p50_ms`` / ``latency_p99_ms`` from taking the sample off the queue to its
  answer (cloud included), over the last ``window`` samples;
- ``where``: how many answers came from ``local``, ``cloud`` and ``local_fallback``, and
  ``offload_fraction``, the share answered by the cloud;
- ``deadline_misses`` (answers later than the budget), ``dropped`` (samples that found
  the queue full while it served: the shortfall), ``rejected`` (samples that do not fit
  its input), ``errors`` (inferences that raised).

Swaps are kept with two durations (see :class:`SwapRecord`): ``blocked_ms``, the time the
loop's thread spends in the swap itself, and ``pause_ms``, how much later than usual the
first sample on the new model was answered.

A shadow release (run beside the serving model, never serving) has its own figures per
version (:class:`ShadowStats`): ``compared`` samples, ``agreed`` with the served answer
(``agreement``) and with the serving model's own local answer (``agreed_local``: they
differ when the cloud answered), on evaluation samples ``accuracy`` and, on the very same
samples, the served answers' ``served_accuracy`` (a paired comparison), ``errors``,
``rejected`` (a sample that does not fit the shadow's input), ``skipped`` (samples the
shadow did not run on: the loop had real samples waiting, or, counted in ``too_slow``
too, the shadow's median time is over ``inference.shadow_max_delay_ms``) and the shadow's
own ``latency_p50_ms`` / ``latency_p99_ms``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

__all__ = ["InferenceStats", "ModelKey", "ShadowStats", "SwapRecord", "percentile_or_none"]

WHERE: Final = ("local", "cloud", "local_fallback")
RATE_WINDOW_S: Final = 10.0
"""The top-level ``samples_per_s`` counts the answers of the last this many seconds."""
KEPT_SWAPS: Final = 100


@dataclass(frozen=True, order=True)
class ModelKey:
    """One served model version."""

    model: str
    version: int
    variant: str

    def label(self) -> str:
        """``digits-mlp v2 (fp16)``."""
        return f"{self.model} v{self.version} ({self.variant})"


@dataclass
class SwapRecord:
    """One move of the loop to another model.

    Attributes:
        at: Unix time of the swap.
        from_version: The model answered until then (``None`` for the first model).
        to_version: The model answering from then on.
        blocked_ms: Time the loop thread spent in the swap step (taking the model built
            off the loop, swapping the reference, telling the sources its input spec).
        pause_ms: How much later than usual the first sample on the new model was
            answered: from the moment the loop could start on it (its arrival, or the
            old model's last answer if it was already waiting) to its answer, minus the
            old model's median time per sample; ``None`` until that answer (or for the
            first model), never below 0.
    """

    at: float
    from_version: str | None
    to_version: str
    blocked_ms: float
    pause_ms: float | None = None


def percentile_or_none(values: Iterable[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``None`` for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class _VersionStats:
    key: ModelKey
    window: int
    answered: int = 0
    where: Counter[str] = field(default_factory=Counter)
    deadline_misses: int = 0
    evaluated: int = 0
    correct: int = 0
    errors: int = 0
    dropped: int = 0
    rejected: int = 0
    served_s: float = 0.0
    local_ms: deque[float] = field(init=False)
    latency_ms: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.local_ms = deque(maxlen=self.window)
        self.latency_ms = deque(maxlen=self.window)

    def as_dict(self, serving_for: float) -> dict[str, Any]:
        span = self.served_s + serving_for
        return {
            "model": self.key.model,
            "version": self.key.version,
            "variant": self.key.variant,
            "answered": self.answered,
            "served_s": round(span, 3),
            "samples_per_s": self.answered / span if span > 0 else None,
            "evaluated": self.evaluated,
            "correct": self.correct,
            "accuracy": self.correct / self.evaluated if self.evaluated else None,
            "local_p50_ms": _round(percentile_or_none(self.local_ms, 50)),
            "local_p99_ms": _round(percentile_or_none(self.local_ms, 99)),
            "latency_p50_ms": _round(percentile_or_none(self.latency_ms, 50)),
            "latency_p99_ms": _round(percentile_or_none(self.latency_ms, 99)),
            "where": {w: self.where[w] for w in WHERE},
            "offload_fraction": self.where["cloud"] / self.answered if self.answered else 0.0,
            "deadline_misses": self.deadline_misses,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "errors": self.errors,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class InferenceStats:
    """Thread-safe counters of the loop (answers on its thread, drops on the sources').

    Args:
        window: Latencies kept per version for the percentiles.
        clock: Monotonic seconds.
    """

    def __init__(self, *, window: int = 4096, clock: Callable[[], float] = time.monotonic):
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._versions: dict[ModelKey, _VersionStats] = {}
        self._recent: deque[float] = deque()  # answer times of the last RATE_WINDOW_S
        self._first_answer: float | None = None
        self.dropped: Counter[str] = Counter()  # by source
        self.rejected: Counter[str] = Counter()  # by reason
        self.no_model = 0
        self.errors = 0
        self.answered_by_source: Counter[str] = Counter()
        self.swaps = 0
        self._swaps: deque[SwapRecord] = deque(maxlen=KEPT_SWAPS)
        self._serving: ModelKey | None = None
        self._serving_since = 0.0
        self.on_answer: Callable[[str, float], None] | None = None
        """Called with ``(where, latency_ms)`` after each answer (the agent's metrics)."""

    def _version(self, key: ModelKey) -> _VersionStats:
        stats = self._versions.get(key)
        if stats is None:
            stats = self._versions[key] = _VersionStats(key, self._window)
        return stats

    def answered(
        self,
        key: ModelKey,
        *,
        source: str,
        where: str,
        local_ms: float,
        latency_ms: float,
        deadline_met: bool,
        correct: bool | None,
    ) -> None:
        """One answer; ``correct`` is ``None`` unless it was a labelled evaluation sample."""
        now = self._clock()
        with self._lock:
            stats = self._version(key)
            stats.answered += 1
            stats.where[where] += 1
            stats.local_ms.append(local_ms)
            stats.latency_ms.append(latency_ms)
            if not deadline_met:
                stats.deadline_misses += 1
            if correct is not None:
                stats.evaluated += 1
                stats.correct += int(correct)
            self._recent.append(now)
            while self._recent[0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            if self._first_answer is None:
                self._first_answer = now
            self.answered_by_source[source] += 1
        hook = self.on_answer
        if hook is not None:
            hook(where, latency_ms)

    def drop(self, source: str, key: ModelKey | None) -> None:
        """A sample found the queue full."""
        with self._lock:
            self.dropped[source] += 1
            if key is not None:
                self._version(key).dropped += 1

    def reject(self, reason: str, key: ModelKey | None) -> None:
        """A sample that does not fit the model (``bad_shape``, ``bad_dtype``, ...)."""
        with self._lock:
            self.rejected[reason] += 1
            if key is not None:
                self._version(key).rejected += 1

    def unanswered(self) -> None:
        """A sample arrived while no model was installed."""
        with self._lock:
            self.no_model += 1

    def error(self, key: ModelKey) -> None:
        """An inference raised."""
        with self._lock:
            self.errors += 1
            self._version(key).errors += 1

    def serving(self, key: ModelKey, swap: SwapRecord | None) -> None:
        """The loop answers with ``key`` from now on; ``swap`` unless it is the first model.

        ``swap.pause_ms`` may be filled in later (at the new model's first answer).
        """
        now = self._clock()
        with self._lock:
            if self._serving is not None:
                self._version(self._serving).served_s += now - self._serving_since
            self._version(key)
            self._serving, self._serving_since = key, now
            if swap is not None:
                self.swaps += 1
                self._swaps.append(swap)

    def snapshot(self) -> dict[str, Any]:
        """The figures as a JSON-able document (status file and telemetry)."""
        now = self._clock()
        with self._lock:
            recent = sum(1 for t in self._recent if t >= now - RATE_WINDOW_S)
            span = (
                min(RATE_WINDOW_S, now - self._first_answer)
                if self._first_answer is not None
                else 0.0
            )
            swaps = [asdict(s) for s in self._swaps]
            pauses = [s.pause_ms for s in self._swaps if s.pause_ms is not None]
            blocked = [s.blocked_ms for s in self._swaps]
            return {
                "answered": sum(v.answered for v in self._versions.values()),
                "samples_per_s": recent / span if span > 0 else None,
                "dropped": sum(self.dropped.values()),
                "dropped_by_source": dict(self.dropped),
                "rejected": dict(self.rejected),
                "no_model": self.no_model,
                "errors": self.errors,
                "answered_by_source": dict(self.answered_by_source),
                "versions": [
                    v.as_dict(now - self._serving_since if k == self._serving else 0.0)
                    for k, v in sorted(self._versions.items())
                ],
                "swaps": {
                    "count": self.swaps,
                    "pause_p50_ms": _round(percentile_or_none(pauses, 50)),
                    "pause_p99_ms": _round(percentile_or_none(pauses, 99)),
                    "blocked_p99_ms": _round(percentile_or_none(blocked, 99)),
                    "recent": swaps,
                },
            }


@dataclass
class _ShadowVersion:
    key: ModelKey
    window: int
    compared: int = 0
    agreed: int = 0
    agreed_local: int = 0
    evaluated: int = 0
    correct: int = 0
    served_correct: int = 0
    errors: int = 0
    rejected: int = 0
    skipped: int = 0
    too_slow: int = 0
    latency_ms: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.latency_ms = deque(maxlen=self.window)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.key.model,
            "version": self.key.version,
            "variant": self.key.variant,
            "compared": self.compared,
            "agreed": self.agreed,
            "agreement": self.agreed / self.compared if self.compared else None,
            "agreed_local": self.agreed_local,
            "agreement_local": self.agreed_local / self.compared if self.compared else None,
            "evaluated": self.evaluated,
            "correct": self.correct,
            "accuracy": self.correct / self.evaluated if self.evaluated else None,
            "served_correct": self.served_correct,
            "served_accuracy": self.served_correct / self.evaluated if self.evaluated else None,
            "errors": self.errors,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "too_slow": self.too_slow,
            "latency_p50_ms": _round(percentile_or_none(self.latency_ms, 50)),
            "latency_p99_ms": _round(percentile_or_none(self.latency_ms, 99)),
        }


class ShadowStats:
    """The shadow's figures per version (thread-safe: the loop writes, reports read).

    Args:
        window: Shadow latencies kept per version for the percentiles.
    """

    def __init__(self, *, window: int = 4096) -> None:
        self._window = window
        self._lock = threading.Lock()
        self._versions: dict[ModelKey, _ShadowVersion] = {}
        self.load_failures = 0

    def _version(self, key: ModelKey) -> _ShadowVersion:
        stats = self._versions.get(key)
        if stats is None:
            stats = self._versions[key] = _ShadowVersion(key, self._window)
        return stats

    def compared(
        self,
        key: ModelKey,
        *,
        agreed: bool,
        agreed_local: bool,
        correct: bool | None,
        served_correct: bool | None,
        latency_ms: float,
    ) -> None:
        """One shadow answer; ``correct`` is ``None`` unless it was an evaluation sample."""
        with self._lock:
            stats = self._version(key)
            stats.compared += 1
            stats.agreed += int(agreed)
            stats.agreed_local += int(agreed_local)
            stats.latency_ms.append(latency_ms)
            if correct is not None:
                stats.evaluated += 1
                stats.correct += int(correct)
                stats.served_correct += int(bool(served_correct))

    def error(self, key: ModelKey) -> None:
        """A shadow inference raised (the serving model is not told: it is not its fault)."""
        with self._lock:
            self._version(key).errors += 1

    def reject(self, key: ModelKey) -> None:
        """A sample the serving model took does not fit the shadow's input."""
        with self._lock:
            self._version(key).rejected += 1

    def skip(self, key: ModelKey, count: int = 1, *, too_slow: bool = False) -> None:
        """Samples the shadow did not run on: real samples were waiting, or it is too slow."""
        with self._lock:
            stats = self._version(key)
            stats.skipped += count
            if too_slow:
                stats.too_slow += count

    def load_failed(self) -> None:
        """The shadow's file could not be loaded on the device runtime."""
        with self._lock:
            self.load_failures += 1

    def snapshot(self) -> list[dict[str, Any]]:
        """Each shadow version's figures (since the agent started), sorted."""
        with self._lock:
            return [v.as_dict() for _, v in sorted(self._versions.items())]
