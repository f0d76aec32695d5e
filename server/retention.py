"""Retention: how long the registry keeps device records, dead letters and checkpoints.

The ``retention:`` section of server.yaml (:class:`RetentionConfig`) states the policy;
``edgefl server start`` applies it every ``interval_s`` in a thread
(:class:`RetentionLoop`), and ``edgefl server retention --dry-run/--apply`` on demand
(:func:`apply_retention`). The default policy:

- ``records`` (telemetry, data, results, command responses): 365 days, at most 10 million
  rows (the oldest go first);
- ``dead_letters``: 90 days, at most 100 000 rows;
- ``fl_checkpoints``: the newest 3 of each run, and any a release was made from; a run's
  newest is never deleted (a resume starts from it).

Nothing else is ever deleted by retention: devices, reported states, runs, rounds, the
privacy ledger (the accounting needs every row for the life of a device), releases,
rollouts and the audit log stay. Deletes go in batches of ``batch_rows`` rows, one short
transaction each with a pause between them, so the ingest's writes are never held up for
long (on SQLite, a single writer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import Field
from sqlalchemy import Engine, and_, delete, func, select, tuple_

from edgefl.config import StrictModel
from edgefl.server.registry.models import DeadLetter, FlCheckpoint, Record, Release

__all__ = [
    "AgeAndRows",
    "CheckpointRetention",
    "RetentionConfig",
    "RetentionLoop",
    "RetentionReport",
    "apply_retention",
]

log = logging.getLogger(__name__)


class AgeAndRows(StrictModel):
    """A table's limits: rows older than ``max_age_days`` go, then the oldest past ``max_rows``."""

    max_age_days: float | None = Field(None, gt=0, description="None: no age limit.")
    max_rows: int | None = Field(None, ge=0, description="None: no row limit.")


class CheckpointRetention(StrictModel):
    """``fl_checkpoints``: the newest ``keep_last`` per run (never its newest or a released one)."""

    keep_last: int | None = Field(
        3, ge=1, description="Checkpoints kept per run (its newest rounds); None: all."
    )
    max_age_days: float | None = Field(
        None,
        gt=0,
        description="Also delete older checkpoints than this (still never a run's newest "
        "nor one a release was made from); None: no age limit.",
    )


class RetentionConfig(StrictModel):
    """The ``retention:`` section of server.yaml (see the module docstring)."""

    enabled: bool = Field(True, description="Apply the policy in `edgefl server start`.")
    interval_s: float = Field(3600.0, gt=0, description="How often the server applies it.")
    first_after_s: float = Field(
        60.0, ge=0, description="Delay after start-up before the first pass."
    )
    batch_rows: int = Field(5000, ge=1, le=1_000_000, description="Rows deleted per transaction.")
    pause_s: float = Field(
        0.05, ge=0, description="Pause between batches (other writers get the database)."
    )
    records: AgeAndRows = Field(
        default_factory=lambda: AgeAndRows(max_age_days=365, max_rows=10_000_000)
    )
    dead_letters: AgeAndRows = Field(
        default_factory=lambda: AgeAndRows(max_age_days=90, max_rows=100_000)
    )
    checkpoints: CheckpointRetention = Field(default_factory=lambda: CheckpointRetention())


@dataclass
class RetentionReport:
    """What one pass deleted (or, dry, would delete), per table and rule."""

    dry_run: bool
    deleted: dict[str, dict[str, int]] = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        totals = {table: sum(rules.values()) for table, rules in self.deleted.items()}
        return {
            "dry_run": self.dry_run,
            "deleted": self.deleted,
            "totals": totals,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
        }


def _delete_ids(
    engine: Engine,
    table: Any,
    ids: list[int],
    report: RetentionReport,
    pause_s: float,
) -> None:
    with engine.begin() as conn:
        conn.execute(delete(table).where(table.c.id.in_(ids)))
    report.batches += 1
    if pause_s:
        time.sleep(pause_s)


def _by_id(
    engine: Engine,
    model: Any,
    limits: AgeAndRows,
    now: datetime,
    report: RetentionReport,
    cfg: RetentionConfig,
    stop: Callable[[], bool],
) -> None:
    table = model.__table__
    name = table.name
    counts = report.deleted.setdefault(name, {"age": 0, "rows": 0})
    if limits.max_age_days is not None:
        cutoff = now - timedelta(days=limits.max_age_days)
        old = table.c.received_at < cutoff
        if report.dry_run:
            with engine.connect() as conn:
                counts["age"] = int(
                    conn.execute(select(func.count()).select_from(table).where(old)).scalar_one()
                )
        else:
            while not stop():
                with engine.connect() as conn:
                    ids = list(
                        conn.execute(
                            select(table.c.id).where(old).order_by(table.c.id).limit(cfg.batch_rows)
                        ).scalars()
                    )
                if not ids:
                    break
                _delete_ids(engine, table, ids, report, cfg.pause_s)
                counts["age"] += len(ids)
    if limits.max_rows is not None:
        with engine.connect() as conn:
            total = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
        if report.dry_run:
            total -= counts["age"]
        excess = max(0, total - limits.max_rows)
        if report.dry_run:
            counts["rows"] = excess
            return
        while excess > 0 and not stop():
            with engine.connect() as conn:
                ids = list(
                    conn.execute(
                        select(table.c.id).order_by(table.c.id).limit(min(excess, cfg.batch_rows))
                    ).scalars()
                )
            if not ids:
                break
            _delete_ids(engine, table, ids, report, cfg.pause_s)
            counts["rows"] += len(ids)
            excess -= len(ids)


def _checkpoints(
    engine: Engine, cfg: RetentionConfig, now: datetime, report: RetentionReport
) -> None:
    rule = cfg.checkpoints
    counts = report.deleted.setdefault("fl_checkpoints", {"keep_last": 0, "age": 0})
    with engine.connect() as conn:
        rows = conn.execute(
            select(FlCheckpoint.run_id, FlCheckpoint.round, FlCheckpoint.at).order_by(
                FlCheckpoint.run_id, FlCheckpoint.round.desc()
            )
        ).all()
        released = {
            (str(r), int(n)) for r, n in conn.execute(select(Release.run_id, Release.round)).all()
        }
    cutoff = now - timedelta(days=rule.max_age_days) if rule.max_age_days is not None else None
    doomed: list[tuple[str, int, str]] = []
    position: dict[str, int] = {}
    for run_id, rnd, at in rows:
        index = position[run_id] = position.get(run_id, -1) + 1
        if index == 0 or (run_id, rnd) in released:
            continue  # a run's newest (resume) and released ones stay
        if rule.keep_last is not None and index >= rule.keep_last:
            doomed.append((run_id, rnd, "keep_last"))
            continue
        stamp = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
        if cutoff is not None and stamp < cutoff:
            doomed.append((run_id, rnd, "age"))
    for _run, _rnd, why in doomed:
        counts[why] += 1
    if report.dry_run or not doomed:
        return
    key = tuple_(FlCheckpoint.run_id, FlCheckpoint.round)
    step = max(1, min(cfg.batch_rows, 500))  # checkpoints are large rows
    for start in range(0, len(doomed), step):
        chunk = [(r, n) for r, n, _why in doomed[start : start + step]]
        with engine.begin() as conn:
            conn.execute(delete(FlCheckpoint).where(and_(key.in_(chunk))))
        report.batches += 1
        if cfg.pause_s:
            time.sleep(cfg.pause_s)


def apply_retention(
    engine: Engine,
    cfg: RetentionConfig,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> RetentionReport:
    """One pass of the policy (``dry_run``: count only, delete nothing)."""
    started = time.monotonic()
    now = now or datetime.now(UTC)
    report = RetentionReport(dry_run=dry_run)
    # SQLite stores naive UTC: compare like with like.
    cmp_now = now.replace(tzinfo=None) if engine.dialect.name == "sqlite" else now
    _by_id(engine, Record, cfg.records, cmp_now, report, cfg, stop)
    _by_id(engine, DeadLetter, cfg.dead_letters, cmp_now, report, cfg, stop)
    _checkpoints(engine, cfg, now, report)
    report.seconds = time.monotonic() - started
    return report


class RetentionLoop:
    """Applies the policy every ``interval_s`` in a daemon thread (the server's).

    Args:
        engine_factory: Opens the registry (called in the thread; disposed at the end).
        cfg: The policy.
    """

    def __init__(self, engine_factory: Callable[[], Engine], cfg: RetentionConfig) -> None:
        self._engine_factory = engine_factory
        self.cfg = cfg
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.last: RetentionReport | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._run, name="edgefl-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (between batches)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        engine = self._engine_factory()
        try:
            wait = self.cfg.first_after_s
            while not self._stop.wait(wait):
                wait = self.cfg.interval_s
                try:
                    report = apply_retention(engine, self.cfg, stop=self._stop.is_set)
                except Exception:  # the next pass tries again
                    log.exception("retention pass failed")
                    continue
                self.passes += 1
                self.last = report
                totals = report.to_dict()["totals"]
                if any(totals.values()):
                    log.info("retention deleted %s in %.1f s", totals, report.seconds)
        finally:
            engine.dispose()
