"""The demo's figures, read from the registry the run wrote (SQLite or PostgreSQL).

Everything here is what the server stored, never what a process said it did:

- **Rounds**: ``fl_rounds`` of the run (server-side accuracy on the held-out split).
- **Privacy**: each device's ε as the privacy ledger records it (its running total after
  its last round), and the same ε *recomputed* from the ledger's per-round (σ, q, steps)
  entries alone with :mod:`edgefl.privacy` (:func:`~edgefl.privacy.merge_history` and
  :func:`~edgefl.privacy.epsilon_of`, the accounting both roles share). The recomputation
  ignores the recorded totals and histories, so a ledger whose totals understate what
  the devices ran shows up as a difference.
- **Release**: its variants as ``edgefl server releases`` lists them
  (:func:`edgefl.server.releases.list_releases`).
- **Serving**: the release's stored ``result`` records (the ingest tags each with the
  model, version and variant that answered). Accuracy is that of the served answer on
  the samples the device marks as evaluation samples (the agent's own definition,
  :mod:`edgefl.edge_agent.inference.stats`); without any, on every result carrying a
  label (samples that arrived for serving, not a held-out split). Latency is the device
  model's own time per sample (``local_ms``), the offload fraction the share of answers
  the cloud gave. With no result stored for the release, the devices' newest
  ``telemetry/inference`` reports stand in (their per-version counters).
- **Records**: rows of ``records`` per device, and duplicates (:attr:`DemoFigures.duplicate_rows`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeGuard

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edgefl.edge_agent.inference.stats import percentile_or_none
from edgefl.errors import ConfigError
from edgefl.privacy import epsilon_of, merge_history
from edgefl.proto.topics import split_topic
from edgefl.server.fl.ledger import FlStore, LedgerRow
from edgefl.server.registry.db import display_url, make_engine
from edgefl.server.registry.models import DeadLetter, Device, FlRound, Record, Rollout
from edgefl.server.releases import list_releases
from edgefl.server.rollouts.watch import look

__all__ = ["NOT_MEASURED", "DemoFigures", "read_figures", "recompute_epsilon", "stored_records"]

NOT_MEASURED = "not measured"
"""What :attr:`DemoFigures.on_device_source` says when nothing was stored to measure."""


@dataclass(frozen=True)
class DemoFigures:
    """What the registry holds of one demo run.

    Attributes:
        rounds: ``(round, server-side accuracy)`` of the run, in round order.
        epsilon_per_device: Each device's ε in the run as the privacy ledger records it
            (``epsilon_total`` of its last ledger row).
        epsilon_recomputed: The same, recomputed from the ledger's per-round (σ, q, steps)
            entries with :mod:`edgefl.privacy`, at the δ of the device's last row.
        variants: The release's variants, by name: ``name``, ``recipe``, ``size_bytes``,
            ``accuracy`` (lowest over the runtimes it was verified on; None without
            labelled data), ``float_accuracy``, ``status`` (``published``, ``failed``,
            ``accuracy_drop``, ``verified``) and ``rolled_out`` (a rollout of it exists).
        on_device_accuracy: The release's on-device accuracy (module docstring), None
            when nothing was measured.
        on_device_latency_ms: ``p50`` and ``p99`` of the device model's own time per
            sample in ms (empty when not measured).
        offload_fraction: Share of the release's answers that came from the cloud, None
            when it answered nothing stored.
        records_stored: Rows of ``records`` from the given devices (every kind).
        duplicate_rows: Rows stored more than once: ``duplicate_keys`` (rows beyond the
            first per message identity ``(device_id, incarnation, seq)``, which the
            envelope carries and the ingest deduplicates on; the registry's unique key
            on those columns makes this 0 by construction, so it is a check that the key
            held) plus ``duplicate_answers`` (``result`` rows beyond the first per
            ``(device_id, request_id)``: the same answer stored under a second message
            identity, which the key cannot catch).
        stored_by_device: Rows of ``records`` per given device (0 for a silent one).
        delta: δ of the devices' guarantee (the largest over their last ledger rows),
            None without a ledger.
        epsilon_target: The plan's per-device target ε, None without DP.
        epsilon_by_round: Each device's ledger ε after each round it trained in.
        on_device_source: Where the on-device figures come from: ``results (evaluation
            samples)``, ``results (labelled samples)``, ``telemetry`` or
            :data:`NOT_MEASURED`.
        on_device_by_device: Per device: ``answered``, ``evaluated``, ``accuracy``,
            ``offload_fraction``, ``local_p50_ms``, ``local_p99_ms`` (None: unknown).
        answered: Answers of the release counted (results, or telemetry's counters).
        evaluated: Of those, the ones its accuracy is over.
        duplicate_keys: See ``duplicate_rows``.
        duplicate_answers: See ``duplicate_rows``.
        dead_letters: Refused messages on the given devices' topics, by reason (they
            are not in ``records``).
    """

    rounds: list[tuple[int, float]]
    epsilon_per_device: dict[str, float]
    epsilon_recomputed: dict[str, float]
    variants: list[dict[str, Any]]
    on_device_accuracy: float | None
    on_device_latency_ms: dict[str, float]
    offload_fraction: float | None
    records_stored: int
    duplicate_rows: int
    stored_by_device: dict[str, int]
    delta: float | None = None
    epsilon_target: float | None = None
    epsilon_by_round: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    on_device_source: str = NOT_MEASURED
    on_device_by_device: dict[str, dict[str, Any]] = field(default_factory=dict)
    answered: int = 0
    evaluated: int = 0
    duplicate_keys: int = 0
    duplicate_answers: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)

    @property
    def epsilon_max(self) -> float | None:
        """The largest ledger ε of any device (None without a ledger)."""
        return max(self.epsilon_per_device.values(), default=None)

    @property
    def final_accuracy(self) -> float | None:
        """The last round's server-side accuracy (None before the first round)."""
        return self.rounds[-1][1] if self.rounds else None


def read_figures(
    db_url: str,
    *,
    run_id: str,
    model: str,
    release_version: int | None,
    devices: Sequence[str],
) -> DemoFigures:
    """Read one demo run's figures from the registry at ``db_url``.

    Args:
        db_url: The registry's SQLAlchemy URL (already migrated: the server did it).
        run_id: The federated run.
        model: The released model's name.
        release_version: The release served (None: no release yet; no variant and no
            on-device figure is read).
        devices: The demo's device ids (records, results and telemetry are theirs only).

    Raises:
        ConfigError: The registry cannot be opened or read.
    """
    wanted = sorted(set(devices))
    engine = make_engine(db_url)
    try:
        training = _training(engine, run_id)
        variants = _variants(db_url, engine, model, release_version)
        serving = _serving(engine, model, release_version, wanted)
        stored, keys, answers, dead = _records(engine, wanted)
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot read the registry {display_url(db_url)}: {exc}") from exc
    finally:
        engine.dispose()
    return DemoFigures(
        rounds=training.rounds,
        epsilon_per_device=training.epsilon,
        epsilon_recomputed=training.recomputed,
        variants=variants,
        on_device_accuracy=serving.accuracy,
        on_device_latency_ms=serving.latency_ms,
        offload_fraction=serving.offload_fraction,
        records_stored=sum(stored.values()),
        duplicate_rows=keys + answers,
        stored_by_device=stored,
        delta=training.delta,
        epsilon_target=training.target,
        epsilon_by_round=training.by_round,
        on_device_source=serving.source,
        on_device_by_device=serving.by_device,
        answered=serving.answered,
        evaluated=serving.evaluated,
        duplicate_keys=keys,
        duplicate_answers=answers,
        dead_letters=dead,
    )


def stored_records(db_url: str, devices: Sequence[str]) -> dict[str, int]:
    """Rows of ``records`` per device (0 for one with none): a cheap poll.

    :func:`read_figures` also recomputes every device's ε (Opacus, imported on the first
    call: seconds), which a loop waiting for the outboxes to drain does not need.

    Raises:
        ConfigError: The registry cannot be opened or read.
    """
    engine = make_engine(db_url)
    try:
        with Session(engine) as session:
            return _stored(session, sorted(set(devices)))
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot read the registry {display_url(db_url)}: {exc}") from exc
    finally:
        engine.dispose()


# --- training and privacy ----------------------------------------------------------------


def recompute_epsilon(rows: Iterable[LedgerRow]) -> dict[str, float]:
    """Each device's ε from its ledger rows' (σ, q, steps) alone, at its last row's δ.

    The rows' recorded totals and accountant histories are not read: the history is
    rebuilt round by round as the device's accountant would have kept it.
    """
    history: dict[str, list[list[float]]] = defaultdict(list)
    delta: dict[str, float] = {}
    for row in sorted(rows, key=lambda r: (r.device_id, r.round)):
        delta[row.device_id] = row.delta
        if row.steps > 0:  # a round without a DP step spends nothing
            history[row.device_id] = merge_history(
                history[row.device_id], row.sigma, row.sample_rate, row.steps
            )
    return {device: epsilon_of(history[device], d) for device, d in sorted(delta.items())}


@dataclass(frozen=True)
class _Training:
    rounds: list[tuple[int, float]]
    epsilon: dict[str, float]
    recomputed: dict[str, float]
    by_round: dict[str, list[tuple[int, float]]]
    delta: float | None
    target: float | None


def _training(engine: Engine, run_id: str) -> _Training:
    store = FlStore.on_engine(engine)  # not closed: the engine is the caller's
    with Session(engine) as session:
        rounds = [
            (int(r), float(a))
            for r, a in session.execute(
                select(FlRound.round, FlRound.accuracy)
                .where(FlRound.run_id == run_id)
                .order_by(FlRound.round)
            )
        ]
    ledger = store.ledger(run_id)
    by_round: dict[str, list[tuple[int, float]]] = defaultdict(list)
    last: dict[str, LedgerRow] = {}
    for row in sorted(ledger, key=lambda r: (r.device_id, r.round)):
        by_round[row.device_id].append((row.round, row.epsilon_total))
        last[row.device_id] = row
    target: float | None = None
    if rounds or ledger:
        try:
            plan = store.plan(run_id)
        except ConfigError:  # a plan this version cannot read: the target is unknown
            plan = None
        if plan is not None and plan.dp.enabled:
            target = plan.dp.target_epsilon
    return _Training(
        rounds=rounds,
        # The ledger's own reading of each device (its latest row), as the server shows it.
        epsilon={d: rec.epsilon_total for d, rec in sorted(store.devices(run_id).items())},
        recomputed=recompute_epsilon(ledger),
        by_round=dict(by_round),
        delta=max((r.delta for r in last.values()), default=None),
        target=target,
    )


# --- the release ------------------------------------------------------------------------


def _variants(db_url: str, engine: Engine, model: str, version: int | None) -> list[dict[str, Any]]:
    if version is None:
        return []
    release = next((r for r in list_releases(db_url, model=model) if r.version == version), None)
    if release is None:
        return []
    with Session(engine) as session:
        rolled = set(
            session.scalars(
                select(Rollout.variant).where(Rollout.model == model, Rollout.version == version)
            )
        )
    return [
        {
            "name": name,
            "recipe": v["recipe"],
            "size_bytes": int(v["size_bytes"]),
            "accuracy": v["accuracy"],
            "float_accuracy": v["float_accuracy"],
            "status": v["status"],
            "rolled_out": name in rolled,
        }
        for name, v in sorted(release.variants.items())
    ]


# --- serving ------------------------------------------------------------------------------


@dataclass
class _Tally:
    """One device's answers with the release."""

    answered: int = 0
    cloud: int = 0
    evaluated: int = 0
    evaluated_correct: int = 0
    labelled: int = 0
    labelled_correct: int = 0
    local_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Serving:
    source: str = NOT_MEASURED
    accuracy: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    offload_fraction: float | None = None
    by_device: dict[str, dict[str, Any]] = field(default_factory=dict)
    answered: int = 0
    evaluated: int = 0


def _serving(engine: Engine, model: str, version: int | None, devices: list[str]) -> _Serving:
    if version is None or not devices:
        return _Serving()
    tallies = _result_tallies(engine, model, version, devices)
    if tallies:
        return _from_results(tallies)
    return _from_telemetry(engine, model, version, devices)


def _result_tallies(
    engine: Engine, model: str, version: int, devices: list[str]
) -> dict[str, _Tally]:
    tallies: dict[str, _Tally] = {}
    with Session(engine) as session:
        rows = session.execute(
            select(Record.device_id, Record.body).where(
                Record.kind == "result",
                Record.model == model,
                Record.model_version == version,
                Record.device_id.in_(devices),
            )
        )
        for device, body in rows:
            doc = _json(body)
            if doc is None:
                continue
            tally = tallies.setdefault(str(device), _Tally())
            tally.answered += 1
            tally.cloud += doc.get("where") == "cloud"
            local_ms = doc.get("local_ms")
            if _is_number(local_ms):
                tally.local_ms.append(float(local_ms))
            label, prediction = doc.get("label"), doc.get("prediction")
            if type(label) is int and type(prediction) is int:
                hit = label == prediction
                tally.labelled += 1
                tally.labelled_correct += hit
                if doc.get("evaluation") is True:
                    tally.evaluated += 1
                    tally.evaluated_correct += hit
    return tallies


def _from_results(tallies: Mapping[str, _Tally]) -> _Serving:
    evaluated = sum(t.evaluated for t in tallies.values())
    on_evaluation = evaluated > 0

    def counted(t: _Tally) -> tuple[int, int]:
        return (
            (t.evaluated, t.evaluated_correct)
            if on_evaluation
            else (t.labelled, t.labelled_correct)
        )

    total = sum(counted(t)[0] for t in tallies.values())
    correct = sum(counted(t)[1] for t in tallies.values())
    answered = sum(t.answered for t in tallies.values())
    local = [ms for t in tallies.values() for ms in t.local_ms]
    by_device = {
        device: {
            "answered": t.answered,
            "evaluated": counted(t)[0],
            "accuracy": counted(t)[1] / counted(t)[0] if counted(t)[0] else None,
            "offload_fraction": t.cloud / t.answered if t.answered else None,
            "local_p50_ms": percentile_or_none(t.local_ms, 50),
            "local_p99_ms": percentile_or_none(t.local_ms, 99),
        }
        for device, t in sorted(tallies.items())
    }
    return _Serving(
        source="results (evaluation samples)" if on_evaluation else "results (labelled samples)",
        accuracy=correct / total if total else None,
        latency_ms=_latency(percentile_or_none(local, 50), percentile_or_none(local, 99)),
        offload_fraction=sum(t.cloud for t in tallies.values()) / answered if answered else None,
        by_device=by_device,
        answered=answered,
        evaluated=total,
    )


def _from_telemetry(engine: Engine, model: str, version: int, devices: list[str]) -> _Serving:
    """The devices' newest inference reports: their counters for the release's versions."""
    with Session(engine) as session:
        fleets = {
            str(d): str(f)
            for d, f in session.execute(
                select(Device.device_id, Device.fleet).where(Device.device_id.in_(devices))
            )
        }
    seen = look(engine, fleets, datetime(1970, 1, 1, tzinfo=UTC)) if fleets else None
    if seen is None:
        return _Serving()
    by_device: dict[str, dict[str, Any]] = {}
    for device, report in sorted(seen.reports.items()):
        versions = report.get("versions")
        entries = [
            e
            for e in (versions if isinstance(versions, list) else [])
            if isinstance(e, dict) and e.get("model") == model and e.get("version") == version
        ]
        figures = _telemetry_figures(entries)
        if figures is not None:
            by_device[device] = figures
    answered = sum(f["answered"] for f in by_device.values())
    if not answered:
        return _Serving()
    evaluated = sum(f["evaluated"] for f in by_device.values())
    correct = sum(f["correct"] for f in by_device.values())
    cloud = sum(f["cloud"] for f in by_device.values())
    p50s = [f["local_p50_ms"] for f in by_device.values() if f["local_p50_ms"] is not None]
    p99s = [f["local_p99_ms"] for f in by_device.values() if f["local_p99_ms"] is not None]
    return _Serving(
        source="telemetry",
        accuracy=correct / evaluated if evaluated else None,
        # Percentiles do not combine: the median of the devices' p50 and the worst p99.
        latency_ms=_latency(statistics.median(p50s) if p50s else None, max(p99s) if p99s else None),
        offload_fraction=cloud / answered,
        by_device={
            d: {k: v for k, v in f.items() if k not in ("correct", "cloud")}
            for d, f in by_device.items()
        },
        answered=answered,
        evaluated=evaluated,
    )


def _telemetry_figures(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One device's counters over its report's entries of the release (any variant).

    The report is the device's own data: an entry whose counters are not whole numbers
    of 0 or more (or claims more correct than evaluated) is left out.
    """
    answered = evaluated = correct = cloud = 0
    p50: list[float] = []
    p99: list[float] = []
    for e in entries:
        raw = e.get("where")
        where: dict[str, Any] = raw if isinstance(raw, dict) else {}
        counts = [e.get("answered"), e.get("evaluated"), e.get("correct"), where.get("cloud", 0)]
        if not all(type(c) is int and c >= 0 for c in counts) or counts[2] > counts[1]:
            continue
        answered += counts[0]
        evaluated += counts[1]
        correct += counts[2]
        cloud += min(counts[3], counts[0])
        if _is_number(e.get("local_p50_ms")):
            p50.append(float(e["local_p50_ms"]))
        if _is_number(e.get("local_p99_ms")):
            p99.append(float(e["local_p99_ms"]))
    if not answered:
        return None
    return {
        "answered": answered,
        "evaluated": evaluated,
        "correct": correct,
        "cloud": cloud,
        "accuracy": correct / evaluated if evaluated else None,
        "offload_fraction": cloud / answered,
        "local_p50_ms": max(p50) if p50 else None,
        "local_p99_ms": max(p99) if p99 else None,
    }


# --- records --------------------------------------------------------------------------------


def _records(engine: Engine, devices: list[str]) -> tuple[dict[str, int], int, int, dict[str, int]]:
    """Rows per device, duplicate keys, duplicate answers, dead letters by reason."""
    if not devices:
        return {}, 0, 0, {}
    with Session(engine) as session:
        stored = _stored(session, devices)
        per_key = (
            select(func.count().label("n"))
            .where(Record.device_id.in_(devices))
            .group_by(Record.device_id, Record.incarnation, Record.seq)
            .having(func.count() > 1)
            .subquery()
        )
        keys = int(session.scalar(select(func.coalesce(func.sum(per_key.c.n - 1), 0))) or 0)
        answers: Counter[tuple[str, str]] = Counter()
        for device, body in session.execute(
            select(Record.device_id, Record.body).where(
                Record.kind == "result", Record.device_id.in_(devices)
            )
        ):
            doc = _json(body)
            request_id = doc.get("request_id") if doc is not None else None
            if isinstance(request_id, str) and request_id:
                answers[(str(device), request_id)] += 1
        dead: Counter[str] = Counter()
        wanted = set(devices)
        for topic, reason in session.execute(select(DeadLetter.topic, DeadLetter.reason)):
            parts = split_topic(str(topic))
            if parts is not None and parts.device_id in wanted:
                dead[str(reason)] += 1
    return stored, keys, sum(n - 1 for n in answers.values()), dict(sorted(dead.items()))


def _stored(session: Session, devices: list[str]) -> dict[str, int]:
    stored = dict.fromkeys(devices, 0)
    if not devices:
        return stored
    for device, count in session.execute(
        select(Record.device_id, func.count())
        .where(Record.device_id.in_(devices))
        .group_by(Record.device_id)
    ):
        stored[str(device)] = int(count)
    return stored


# --- helpers -------------------------------------------------------------------------------


def _json(body: bytes | memoryview | None) -> dict[str, Any] | None:
    if body is None:
        return None
    try:
        doc = json.loads(bytes(body))
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _is_number(value: object) -> TypeGuard[float]:
    """A finite int or float (a device's report may hold anything)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _latency(p50: float | None, p99: float | None) -> dict[str, float]:
    out: dict[str, float] = {}
    if p50 is not None:
        out["p50"] = p50
    if p99 is not None:
        out["p99"] = p99
    return out
