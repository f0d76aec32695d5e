"""The agent's inference loop driven through a network trace, and what its answers show.

Not a benchmark by itself: ``offload_bench.py`` (its ``trace`` condition) and
``tests/test_offload_trace.py`` run it. :func:`run_through_trace` plays the daemon's part
around the real :class:`~edgefl.edge_agent.inference.loop.InferenceLoop`: it polls a
source every 10 ms and offers its records to the loop, which answers each with the model
through the offload ``Predictor`` (policy, estimates, breaker) and commits a result
record; every result is kept with the time it was committed. :func:`analyse` turns them
into the offload benchmark's per-mode figures, a per-segment and a sliding-window time
series, and the recovery after each outage.

**Recovery.** For an outage ``[a, b)`` the pre-outage level is the offload fraction over
the whole segment before it; the recovery time is the first ``t >= b`` at which the
fraction over the sliding window ``[t - window_s, t]`` is back above half that level,
minus ``b``. The window reaches back into the outage at first (answered locally), so the
figure includes up to one window of lag. Two fractions are followed:

* ``offload_fraction``: cloud answers over all answers;
* ``wanted_offload_fraction``: cloud answers over the answers the policy *wanted* from
  the cloud (the local model was unsure; :func:`analyse`'s ``wanted``). The unsure
  samples are a property of the data, not of the network: in a replay they come in
  clusters, so the first fraction moves with the sample order as much as with the
  network. The recovery figure (``recovery_s``) uses the second when ``wanted`` is known;
  the first is reported beside it (``recovery_all_samples_s``).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from netshape import NetworkTrace  # benchmarks/ is on sys.path (script or MYPYPATH)

from edgefl.edge_agent.inference.config import InferenceConfig
from edgefl.edge_agent.inference.loop import InferenceLoop
from edgefl.edge_agent.sources import DataSource, SourceRecord

__all__ = ["Answer", "FixedModel", "TraceRun", "analyse", "recovery", "run_through_trace"]

_POLL_S = 0.01  # the daemon's main loop waits this long between two polls


class FixedModel:
    """The model manager's part for one model that never changes (no swaps here).

    Satisfies :class:`~edgefl.edge_agent.inference.loop.ServingModels`.
    """

    def __init__(self, path: Path, *, model: str, version: int = 1, variant: str = "") -> None:
        from edgefl.manifest import sha256_file

        self._current = SimpleNamespace(
            path=path,
            installed=SimpleNamespace(
                model=model, version=version, variant=variant, sha256=sha256_file(path)
            ),
        )
        self.errors: list[str] = []

    @property
    def generation(self) -> int:
        return 0

    def current(self) -> Any:
        return self._current

    def add_listener(self, callback: Callable[[], None]) -> None:
        pass  # it never changes

    def record_inference(self, *, error: str | None = None) -> None:
        if error is not None:
            self.errors.append(error)


class _StartsWithTheTrace(DataSource):
    """The source, made when the trace starts (its clock starts when it is built).

    The loop is handed this stand-in at construction, as the daemon hands it its
    sources, and tells it the model's input spec; the real source gets the spec too.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.inner: DataSource | None = None

    def begin(self, source: DataSource) -> None:
        source.expect(self.expected)
        self.inner = source

    def expect(self, spec: Any) -> None:
        super().expect(spec)
        if self.inner is not None:
            self.inner.expect(spec)

    def due(self, now: float) -> list[SourceRecord]:
        return [] if self.inner is None else self.inner.due(now)


@dataclass(frozen=True)
class Answer:
    """One result the loop committed.

    Attributes:
        t_s: When it was committed, seconds from the trace's start.
        index: The sample's index in its source.
        where: ``local``, ``cloud`` or ``local_fallback``.
        latency_ms: The predictor's time for it (what the budget bounds).
        deadline_met: ``latency_ms <= budget``.
        correct: Its answer matches the label (``None`` without one).
        due_s: When the source was due to produce it (its rate from the moment it was
            ready), seconds from the trace's start.
        reason: Why it was (not) offloaded, as the result records it.
    """

    t_s: float
    index: int
    where: str
    latency_ms: float
    deadline_met: bool
    correct: bool | None
    due_s: float
    reason: str = ""


@dataclass
class TraceRun:
    """What one run through a trace produced."""

    answers: list[Answer]
    status: dict[str, Any]
    duration_s: float
    rate_hz: float
    origin: float
    model_errors: list[str] = field(default_factory=list)


def run_through_trace(
    config: InferenceConfig,
    *,
    model: FixedModel,
    runtime_key: str,
    make_source: Callable[[], DataSource],
    source_name: str,
    start_trace: Callable[[], float],
    duration_s: float,
    rate_hz: float,
    progress: Callable[[float], None] | None = None,
) -> TraceRun:
    """Run the inference loop on ``make_source()``'s samples for ``duration_s`` of a trace.

    The loop starts first (its predictor connects and seeds its estimates on the
    conditions before the trace), then ``start_trace()`` starts the relay's trace and
    returns its origin (``time.monotonic()``), and the source is made at that moment, so
    sample ``i`` is due ``i / rate_hz`` seconds after it. One source is made and thrown
    away before, so that loading its data (a replay's first dataset load imports
    scikit-learn: seconds) does not eat into the trace.

    Args:
        config: The ``inference:`` section (mode, budget, cloud ...).
        model: The model the loop serves.
        runtime_key: The device runtime.
        make_source: Builds the source (its clock starts when it is built).
        source_name: Its name.
        start_trace: Starts the trace; returns its origin.
        duration_s: How long to feed samples.
        rate_hz: The source's rate (for each sample's due time).
        progress: Called about every 10 s with the seconds played.
    """
    answers: list[Answer] = []
    lock = threading.Lock()
    origin_box: list[float] = []
    first_due = [0.0]  # when the source was ready, seconds from the trace's start

    def commit(records: Sequence[SourceRecord]) -> None:
        now = time.monotonic()
        origin = origin_box[0]
        with lock:
            for record in records:
                if record.kind != "result":
                    continue
                body = json.loads(record.body)
                label = body.get("label")
                answers.append(
                    Answer(
                        t_s=now - origin,
                        index=int(body["index"]),
                        where=str(body["where"]),
                        latency_ms=float(body["latency_ms"]),
                        deadline_met=bool(body["deadline_met"]),
                        correct=None if label is None else body["prediction"] == label,
                        due_s=first_due[0] + int(body["index"]) / rate_hz,
                        reason=str(body.get("reason", "")),
                    )
                )

    make_source().close()  # warm: imports and caches
    source = _StartsWithTheTrace(source_name)
    loop = InferenceLoop(
        config,
        models=model,
        runtime_key=runtime_key,
        commit=commit,
        sources=[source],
        device_id="trace-bench",
        fleet="bench",
    )
    loop.start()
    try:
        origin = start_trace()
        origin_box.append(origin)
        source.begin(make_source())  # a replay loads its dataset first
        first_due[0] = time.monotonic() - origin
        end = origin + duration_s
        next_progress = origin + 10.0
        while (now := time.monotonic()) < end:
            records = source.due(now)
            if records:
                loop.offer(source.name, records)
            if progress is not None and now >= next_progress:
                progress(now - origin)
                next_progress += 10.0
            time.sleep(_POLL_S)
    finally:
        loop.stop()
    return TraceRun(
        answers=sorted(answers, key=lambda a: a.t_s),
        status=loop.status(),
        duration_s=duration_s,
        rate_hz=rate_hz,
        origin=origin_box[0] if origin_box else 0.0,
        model_errors=list(model.errors),
    )


# --- analysis ---------------------------------------------------------------------------


def _fraction(hits: int, total: int) -> float | None:
    return hits / total if total else None


def summary(answers: Sequence[Answer], budget_ms: float) -> dict[str, Any]:
    """The offload benchmark's per-mode keys, over ``answers``."""
    if not answers:
        raise ValueError("no answers to summarise")
    latency = np.array([a.latency_ms for a in answers])
    where = [a.where for a in answers]
    scored = [a.correct for a in answers if a.correct is not None]
    return {
        "p50_ms": float(np.percentile(latency, 50)),
        "p99_ms": float(np.percentile(latency, 99)),
        "deadline_miss_rate": float(np.mean(latency > budget_ms)),
        "accuracy": float(np.mean(scored)) if scored else math.nan,
        "offload_fraction": where.count("cloud") / len(answers),
        "fallback_fraction": where.count("local_fallback") / len(answers),
        "max_ms": float(latency.max()),
        "samples": len(answers),
    }


def _window_fraction(
    answers: Sequence[Answer],
    times: np.ndarray,
    lo: float,
    hi: float,
    wanted: Callable[[int], bool] | None,
) -> tuple[float | None, int]:
    """Cloud share of the answers committed in ``[lo, hi)`` (of the wanted ones, if given)."""
    first, last = int(np.searchsorted(times, lo)), int(np.searchsorted(times, hi))
    chosen = [a for a in answers[first:last] if wanted is None or wanted(a.index)]
    return _fraction(sum(a.where == "cloud" for a in chosen), len(chosen)), len(chosen)


def recovery(
    answers: Sequence[Answer],
    trace: NetworkTrace,
    *,
    window_s: float,
    wanted: Callable[[int], bool] | None = None,
    step_s: float = 0.1,
) -> list[dict[str, Any]]:
    """For each outage: the pre-outage level, its fall during the outage, the recovery.

    Returns one entry per outage: ``start_s``, ``end_s``, ``reset``, ``pre_level`` (the
    fraction over the segment before it), ``during`` (over the outage), ``recovery_s``
    (``None`` when the level never came back before the trace's end or the next outage;
    ``0`` when there was nothing to recover) and ``recovered``.
    """
    times = np.array([a.t_s for a in answers])
    starts = trace.starts()
    outages = trace.outages()
    out: list[dict[str, Any]] = []
    for n, (start, end, reset) in enumerate(outages):
        before = trace.index_at(start) - 1
        pre_lo = starts[before] if before >= 0 else 0.0
        pre, pre_n = _window_fraction(answers, times, pre_lo, start, wanted)
        during, _ = _window_fraction(answers, times, start, end, wanted)
        limit = outages[n + 1][0] if n + 1 < len(outages) else trace.duration_s
        limit = min(limit, times[-1] if len(times) else end)
        entry: dict[str, Any] = {
            "start_s": start,
            "end_s": end,
            "reset": reset,
            "pre_level": pre,
            "pre_samples": pre_n,
            "during": during,
            "recovery_s": None,
            "recovered": False,
        }
        if not pre:
            entry.update(recovery_s=0.0, recovered=True)  # nothing was offloaded before
        else:
            t = end
            while t <= limit:
                level, _ = _window_fraction(answers, times, t - window_s, t, wanted)
                if level is not None and level > pre / 2.0:
                    entry.update(recovery_s=round(t - end, 3), recovered=True)
                    break
                t += step_s
            if not entry["recovered"]:
                entry["not_back_after_s"] = round(limit - end, 3)
        out.append(entry)
    return out


def segments(
    answers: Sequence[Answer],
    trace: NetworkTrace,
    budget_ms: float,
    wanted: Callable[[int], bool] | None = None,
) -> list[dict[str, Any]]:
    """One row per trace segment: its conditions and what the answers in it show."""
    times = np.array([a.t_s for a in answers])
    rows = []
    for start, seg in zip(trace.starts(), trace.segments, strict=True):
        end = start + seg.duration_s
        first, last = int(np.searchsorted(times, start)), int(np.searchsorted(times, end))
        inside = answers[first:last]
        chosen = [a for a in inside if wanted is None or wanted(a.index)]
        row: dict[str, Any] = {
            "label": seg.label,
            "start_s": start,
            "end_s": end,
            "outage": seg.outage,
            "rtt_ms": None if seg.outage else seg.shape.rtt_ms,
            "uplink_kbps": None
            if seg.outage or seg.shape.uplink_bps is None
            else seg.shape.uplink_bps / 1000.0,
            "loss": None if seg.outage else seg.shape.loss,
            "samples": len(inside),
            "wanted": len(chosen),
            "offload_fraction": _fraction(sum(a.where == "cloud" for a in inside), len(inside)),
            "wanted_offload_fraction": _fraction(
                sum(a.where == "cloud" for a in chosen), len(chosen)
            ),
            "fallbacks": sum(a.where == "local_fallback" for a in inside),
            "deadline_misses": sum(a.latency_ms > budget_ms for a in inside),
            "max_ms": round(max((a.latency_ms for a in inside), default=0.0), 3),
        }
        rows.append(row)
    return rows


def series(
    answers: Sequence[Answer],
    duration_s: float,
    *,
    window_s: float,
    step_s: float = 1.0,
    wanted: Callable[[int], bool] | None = None,
) -> list[dict[str, Any]]:
    """The sliding-window offload fractions every ``step_s`` seconds."""
    times = np.array([a.t_s for a in answers])
    out = []
    t = step_s
    while t <= duration_s + 1e-9:
        all_of, n = _window_fraction(answers, times, t - window_s, t, None)
        of_wanted, n_wanted = _window_fraction(answers, times, t - window_s, t, wanted)
        out.append(
            {
                "t_s": round(t, 3),
                "offload_fraction": None if all_of is None else round(all_of, 4),
                "wanted_offload_fraction": None if of_wanted is None else round(of_wanted, 4),
                "samples": n,
                "wanted": n_wanted,
            }
        )
        t += step_s
    return out


def analyse(
    run: TraceRun,
    trace: NetworkTrace,
    budget_ms: float,
    *,
    window_s: float,
    wanted: Callable[[int], bool] | None = None,
) -> dict[str, Any]:
    """Everything the benchmark reports about one mode's run through the trace."""
    answers = run.answers
    by_wanted = recovery(answers, trace, window_s=window_s, wanted=wanted)
    by_all = recovery(answers, trace, window_s=window_s)
    e2e = [(a.t_s - a.due_s) * 1000.0 for a in answers]
    expected = int(run.duration_s * run.rate_hz)
    return {
        "summary": summary(answers, budget_ms),
        "answered": len(answers),
        "expected": expected,
        "dropped": run.status.get("dropped", 0),
        "e2e_p99_ms": float(np.percentile(e2e, 99)) if e2e else None,
        "e2e_max_ms": float(max(e2e)) if e2e else None,
        "outages": [
            {**w, "recovery_all_samples_s": a["recovery_s"], "pre_level_all": a["pre_level"]}
            for w, a in zip(by_wanted, by_all, strict=True)
        ],
        "recovery_s": _slowest(by_wanted),
        "recovery_all_samples_s": _slowest(by_all),
        "segments": segments(answers, trace, budget_ms, wanted),
        "series": series(answers, run.duration_s, window_s=window_s, wanted=wanted),
        "model_errors": run.model_errors[:5],
    }


def _slowest(entries: Sequence[dict[str, Any]]) -> float | None:
    """The slowest recovery; an outage never recovered counts as its time to the end."""
    worst: float | None = None
    for entry in entries:
        value = entry["recovery_s"] if entry["recovered"] else entry.get("not_back_after_s")
        if value is not None and (worst is None or value > worst):
            worst = float(value)
    return worst
