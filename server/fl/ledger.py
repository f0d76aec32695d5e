"""The federated-training side of the registry: runs, privacy ledger, round metrics, checkpoints.

Everything one round produces (its ledger rows, its metrics row and its checkpoint) is
committed in **one transaction** at the end of the round. A server killed mid-round
therefore leaves the registry exactly at the previous round: a resume redoes that round,
and the ledger never holds a row without its checkpoint (nor a duplicate: one row per
``(run, device, round)`` is enforced by a unique key).

**Lifetime privacy** (:meth:`FlStore.lifetime`). The ledger is per run; a device's privacy
over its whole life is the composition of every run it trained in. The server recomputes
it from the ledger alone: for each run, the device's accountant history from its ledger
row with the most steps (the running history, whose last row is the run's total), all
runs' histories composed (RDP, :func:`edgefl.privacy.compose`) and converted at the δ the
device last reported for its lifetime, never above the largest δ of its runs (without a
report, that largest δ). What
the device reports of itself (its lifetime ε, δ and cap, in every train reply, refusals
included) is kept in the round's ``detail_json`` under ``lifetime``, beside the ledger: no
new table or column was needed.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import SQLAlchemyError

from edgefl.errors import ConfigError, EdgeflError
from edgefl.federation import FederationPlan, FederationResult, RoundReport, load_plan
from edgefl.server.registry.db import make_engine, session_factory, upgrade
from edgefl.server.registry.models import FlCheckpoint, FlRound, FlRun, PrivacyLedgerEntry

__all__ = [
    "Checkpoint",
    "DeviceRecord",
    "FlStore",
    "LedgerRow",
    "LifetimeRecord",
    "load_result",
    "new_run_id",
]


def new_run_id() -> str:
    """A fresh run id: ``run-`` + UTC time + random suffix."""
    return f"run-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class LedgerRow:
    """One device's privacy spend in one round (see ``PrivacyLedgerEntry``)."""

    device_id: str
    round: int
    epsilon_spent: float
    epsilon_total: float
    delta: float
    sigma: float
    sample_rate: float
    steps: int
    history: list[list[float]]
    num_examples: int
    train_time_s: float
    compute_speed: float
    flagged: bool = False


@dataclass(frozen=True)
class DeviceRecord:
    """What the ledger says about a device: its latest row in this run."""

    device_id: str
    epsilon_total: float
    sigma: float
    sample_rate: float
    steps_per_round: int
    history: list[list[float]]
    compute_speed: float
    train_time_s: float
    rounds: int


@dataclass(frozen=True)
class LifetimeRecord:
    """A device's privacy over every run in the registry (see the module docstring).

    Attributes:
        device_id: The device.
        epsilon: RDP composition of its ledger histories of every run, at ``delta``.
        delta: δ of ``epsilon``: the lifetime δ the device reported, at most the largest
            δ of its runs (which it is without a report).
        runs: Run id -> the device's ε in that run (its ledger total).
        reported_epsilon: The lifetime ε the device last reported (None: never).
        cap: The lifetime cap the device last reported (None: none or unknown).
    """

    device_id: str
    epsilon: float
    delta: float
    runs: dict[str, float]
    reported_epsilon: float | None = None
    cap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "runs": dict(self.runs),
            "reported_epsilon": self.reported_epsilon,
            "cap": self.cap,
        }


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint."""

    round: int
    model: bytes
    strategy_state: bytes
    accountants: dict[str, Any]


class FlStore:
    """Registry access for federated runs (SQLite or PostgreSQL, migrated on open).

    Args:
        url: Registry database URL.

    Raises:
        ConfigError: The database cannot be opened or migrated.
    """

    def __init__(self, url: str) -> None:
        upgrade(url)
        self.url = url
        self.engine: Engine = make_engine(url)
        self._sessions = session_factory(self.engine)

    @classmethod
    def on_engine(cls, engine: Engine) -> FlStore:
        """A store on an engine already open and migrated (:meth:`close` disposes of it)."""
        store = cls.__new__(cls)
        store.url = engine.url.render_as_string(hide_password=False)
        store.engine = engine
        store._sessions = session_factory(engine)
        return store

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()

    def start_run(self, run_id: str, plan: FederationPlan, *, resume: bool) -> Checkpoint | None:
        """Register a run, or find where an existing one stopped.

        Returns:
            The last checkpoint of an existing run (None for a new run or one without
            any finished round).

        Raises:
            ConfigError: The run exists and ``resume`` is False, or it was started with
                another plan.
        """
        now = datetime.now(UTC)
        with self._sessions.begin() as session:
            run = session.get(FlRun, run_id)
            if run is None:
                session.add(
                    FlRun(
                        run_id=run_id,
                        plan_json=plan.model_dump_json(),
                        plan_key=plan.plan_key(),
                        status="running",
                        stop_reason="",
                        rounds_done=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
                return None
            if not resume:
                raise ConfigError(
                    f"run {run_id!r} already exists in the registry",
                    hint="resume it (resume=True) or choose another run id",
                )
            if run.plan_key != plan.plan_key():
                raise ConfigError(
                    f"run {run_id!r} was started with another plan; a resume needs the same plan",
                    hint="use the original scenario or a new run id",
                )
            run.status = "running"
            run.updated_at = now
            # Rows past the last checkpoint cannot exist (one transaction per round), but a
            # registry edited by hand must not make a resumed round collide with them.
            for table in (PrivacyLedgerEntry, FlRound):
                session.execute(
                    delete(table).where(table.run_id == run_id, table.round > run.rounds_done)
                )
            ck = session.get(FlCheckpoint, (run_id, run.rounds_done))
            if ck is None:
                return None
            return Checkpoint(
                round=ck.round,
                model=ck.model,
                strategy_state=ck.strategy_state,
                accountants=json.loads(ck.accountants_json),
            )

    def devices(self, run_id: str) -> dict[str, DeviceRecord]:
        """The latest ledger row of every device of the run."""
        with self._sessions() as session:
            latest = (
                select(
                    PrivacyLedgerEntry.device_id,
                    func.max(PrivacyLedgerEntry.round).label("round"),
                    func.count().label("n"),
                )
                .where(PrivacyLedgerEntry.run_id == run_id)
                .group_by(PrivacyLedgerEntry.device_id)
                .subquery()
            )
            rows = session.execute(
                select(PrivacyLedgerEntry, latest.c.n)
                .join(
                    latest,
                    (PrivacyLedgerEntry.device_id == latest.c.device_id)
                    & (PrivacyLedgerEntry.round == latest.c.round),
                )
                .where(PrivacyLedgerEntry.run_id == run_id)
            ).all()
        out: dict[str, DeviceRecord] = {}
        for entry, count in rows:
            out[entry.device_id] = DeviceRecord(
                device_id=entry.device_id,
                epsilon_total=entry.epsilon_total,
                sigma=entry.sigma,
                sample_rate=entry.sample_rate,
                steps_per_round=entry.steps,
                history=json.loads(entry.history_json),
                compute_speed=entry.compute_speed,
                train_time_s=entry.train_time_s,
                rounds=int(count),
            )
        return out

    def commit_round(
        self,
        run_id: str,
        report: RoundReport,
        rows: list[LedgerRow],
        checkpoint: Checkpoint,
        *,
        central_epsilon: float | None = None,
        lifetime: dict[str, dict[str, float]] | None = None,
    ) -> None:
        """Commit a round's ledger rows, metrics and checkpoint in one transaction.

        ``lifetime`` is what the round's replies reported of each device's lifetime
        privacy (``{device: {"epsilon", "delta", "cap"}}``), kept with the round.

        Raises:
            EdgeflError: The registry refused the write (e.g. a duplicate ledger row).
        """
        now = datetime.now(UTC)
        try:
            with self._sessions.begin() as session:
                for row in rows:
                    session.add(
                        PrivacyLedgerEntry(
                            run_id=run_id,
                            device_id=row.device_id,
                            round=row.round,
                            epsilon_spent=row.epsilon_spent,
                            epsilon_total=row.epsilon_total,
                            delta=row.delta,
                            sigma=row.sigma,
                            sample_rate=row.sample_rate,
                            steps=row.steps,
                            history_json=json.dumps(row.history),
                            num_examples=row.num_examples,
                            train_time_s=row.train_time_s,
                            compute_speed=row.compute_speed,
                            flagged=row.flagged,
                            at=now,
                        )
                    )
                session.add(
                    FlRound(
                        run_id=run_id,
                        round=report.round,
                        accuracy=report.accuracy,
                        loss=report.loss,
                        federated_accuracy=report.federated_accuracy,
                        federated_loss=report.federated_loss,
                        train_loss=report.train_loss,
                        num_selected=report.num_selected,
                        num_replies=report.num_replies,
                        num_failures=report.num_failures,
                        num_rejected=report.num_rejected,
                        num_refused=report.num_refused,
                        num_flagged=report.num_flagged,
                        epsilon_max=report.epsilon_max,
                        central_epsilon=central_epsilon,
                        wall_s=report.wall_s,
                        detail_json=json.dumps(
                            {
                                "aggregated": report.aggregated,
                                "rejections": report.rejections,
                                "refusals": report.refusals,
                                "failure_reasons": report.failure_reasons,
                                "lifetime": lifetime or {},
                            }
                        ),
                        at=now,
                    )
                )
                session.add(
                    FlCheckpoint(
                        run_id=run_id,
                        round=checkpoint.round,
                        model=checkpoint.model,
                        strategy_state=checkpoint.strategy_state,
                        accountants_json=json.dumps(checkpoint.accountants),
                        at=now,
                    )
                )
                run = session.get(FlRun, run_id)
                if run is None:
                    raise EdgeflError(f"run {run_id!r} vanished from the registry")
                run.rounds_done = report.round
                run.updated_at = now
        except SQLAlchemyError as exc:
            raise EdgeflError(f"cannot record round {report.round} of {run_id!r}: {exc}") from exc

    def finish(self, run_id: str, status: str, reason: str = "") -> None:
        """Mark the run ``completed`` or ``stopped`` (with the reason)."""
        with self._sessions.begin() as session:
            run = session.get(FlRun, run_id)
            if run is not None:
                run.status = status
                run.stop_reason = reason
                run.updated_at = datetime.now(UTC)

    def result(self, run_id: str) -> FederationResult:
        """The run's result as recorded so far.

        Raises:
            ConfigError: No run of that id is in the registry.
        """
        with self._sessions() as session:
            run = session.get(FlRun, run_id)
            if run is None:
                raise ConfigError(f"no federated run {run_id!r} in the registry")
            rounds = session.scalars(
                select(FlRound).where(FlRound.run_id == run_id).order_by(FlRound.round)
            ).all()
        reports: list[RoundReport] = []
        central: float | None = None
        for r in rounds:
            detail = json.loads(r.detail_json)
            reports.append(
                RoundReport(
                    round=r.round,
                    accuracy=r.accuracy,
                    loss=r.loss,
                    federated_accuracy=r.federated_accuracy,
                    federated_loss=r.federated_loss,
                    train_loss=r.train_loss,
                    num_selected=r.num_selected,
                    num_replies=r.num_replies,
                    num_failures=r.num_failures,
                    num_rejected=r.num_rejected,
                    num_refused=r.num_refused,
                    num_flagged=r.num_flagged,
                    epsilon_max=r.epsilon_max,
                    wall_s=r.wall_s,
                    aggregated=bool(detail.get("aggregated", True)),
                    rejections=dict(detail.get("rejections", {})),
                    refusals=dict(detail.get("refusals", {})),
                    failure_reasons=dict(detail.get("failure_reasons", {})),
                )
            )
            central = r.central_epsilon
        eps = {d: rec.epsilon_total for d, rec in sorted(self.devices(run_id).items())}
        # The run's devices: those in its ledger, and those that only refused (a device
        # past its lifetime cap never trains in the run).
        members = set(eps)
        for r in rounds:
            detail = json.loads(r.detail_json)
            members.update(detail.get("lifetime", {}))
            members.update(detail.get("refusals", {}))
        lifetime = self.lifetime(members) if members else {}
        return FederationResult(
            run_id=run_id,
            status=run.status,
            stop_reason=run.stop_reason,
            rounds=reports,
            epsilon_per_device=eps,
            central_epsilon=central,
            planned_rounds=int(json.loads(run.plan_json).get("rounds", 0)),
            lifetime={d: rec.to_dict() for d, rec in sorted(lifetime.items())},
        )

    def lifetime(self, device_ids: Iterable[str] | None = None) -> dict[str, LifetimeRecord]:
        """Each device's privacy over every run in the registry (module docstring).

        Args:
            device_ids: Only these devices (None: every device in the ledger). A device
                with no ledger row but a lifetime report (it refused every run) is listed
                with ε 0 from the ledger and its report.
        """
        from edgefl.privacy import compose, epsilon_of, history_steps

        wanted = set(device_ids) if device_ids is not None else None
        best: dict[tuple[str, str], tuple[int, int, list[list[float]], float, float]] = {}
        with self._sessions() as session:
            query = select(
                PrivacyLedgerEntry.run_id,
                PrivacyLedgerEntry.device_id,
                PrivacyLedgerEntry.round,
                PrivacyLedgerEntry.history_json,
                PrivacyLedgerEntry.epsilon_total,
                PrivacyLedgerEntry.delta,
            )
            if wanted is not None:
                query = query.where(PrivacyLedgerEntry.device_id.in_(sorted(wanted)))
            for run_id, device, rnd, history_json, total, delta in session.execute(query):
                history = json.loads(history_json)
                key = (device, run_id)
                rank = (history_steps(history), rnd)
                if key not in best or rank > best[key][:2]:
                    best[key] = (*rank, history, total, delta)
            reports: dict[str, dict[str, float]] = {}
            for (detail_json,) in session.execute(
                select(FlRound.detail_json).order_by(FlRound.at, FlRound.round)
            ):
                for device, report in json.loads(detail_json).get("lifetime", {}).items():
                    if wanted is None or device in wanted:
                        reports[device] = report
        devices = {device for device, _ in best} | set(reports)
        out: dict[str, LifetimeRecord] = {}
        for device in sorted(devices):
            runs = {run: v for (d, run), v in best.items() if d == device}
            report = reports.get(device)
            # Never above the largest δ of its runs: a device cannot make its lifetime ε
            # look smaller by reporting a large δ.
            runs_delta = max((v[4] for v in runs.values()), default=1e-5)
            delta = min(float(report["delta"]), runs_delta) if report is not None else runs_delta
            histories = [v[2] for _, v in sorted(runs.items())]
            cap = float(report["cap"]) if report is not None else 0.0
            out[device] = LifetimeRecord(
                device_id=device,
                epsilon=epsilon_of(compose(histories), delta),
                delta=delta,
                runs={run: v[3] for run, v in sorted(runs.items())},
                reported_epsilon=float(report["epsilon"]) if report is not None else None,
                cap=cap if cap > 0 else None,
            )
        return out

    def plan(self, run_id: str) -> FederationPlan:
        """The plan a run was started with."""
        with self._sessions() as session:
            run = session.get(FlRun, run_id)
            if run is None:
                raise ConfigError(f"no federated run {run_id!r} in the registry")
            return load_plan(json.loads(run.plan_json), source=f"run {run_id}")

    def ledger(self, run_id: str) -> list[LedgerRow]:
        """Every ledger row of the run, by round then device."""
        with self._sessions() as session:
            entries = session.scalars(
                select(PrivacyLedgerEntry)
                .where(PrivacyLedgerEntry.run_id == run_id)
                .order_by(PrivacyLedgerEntry.round, PrivacyLedgerEntry.device_id)
            ).all()
        return [
            LedgerRow(
                device_id=e.device_id,
                round=e.round,
                epsilon_spent=e.epsilon_spent,
                epsilon_total=e.epsilon_total,
                delta=e.delta,
                sigma=e.sigma,
                sample_rate=e.sample_rate,
                steps=e.steps,
                history=json.loads(e.history_json),
                num_examples=e.num_examples,
                train_time_s=e.train_time_s,
                compute_speed=e.compute_speed,
                flagged=e.flagged,
            )
            for e in entries
        ]


def load_result(registry_url: str, run_id: str) -> FederationResult:
    """Read a run's :class:`~edgefl.federation.FederationResult` from the registry.

    Raises:
        ConfigError: The registry cannot be opened or holds no such run.
    """
    store = FlStore(registry_url)
    try:
        return store.result(run_id)
    finally:
        store.close()
