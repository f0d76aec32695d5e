"""Federated-run operations: ``runs``, ``run-show``, ``privacy``, ``train`` and ``stop``.

``train`` submits a run and returns at once with its id (the work goes on in the
SuperLink); follow it with ``run-show RUN`` (its rounds as they commit), which is what
``edgefl server train --wait`` does when it talks to a remote server.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final

from pydantic import Field

from edgefl.errors import ConfigError, EdgeflError
from edgefl.server.ops import (
    ConflictError,
    InvalidError,
    NotFoundError,
    OpContext,
    Params,
    operation,
)
from edgefl.server.ops.fleet import iso

__all__: list[str] = []

_RUN_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_PREWARM_TTL_S: Final = 60.0
"""A prewarm command older than this is stale: the run it announced has started."""
_PREWARM_SESSION_WAIT_S: Final = 5.0
"""How long the hint waits for another command publisher's session before it gives up."""

log = logging.getLogger(__name__)


class RunsParams(Params):
    limit: int = Field(50, ge=1, le=10_000, description="Newest this many.")
    status: str | None = Field(None, description="Only runs in this state (running ...).")


@operation("runs", role="viewer", params=RunsParams, summary="List federated runs, newest first.")
def runs(ctx: OpContext, params: RunsParams) -> dict[str, Any]:
    """The runs, newest first.

    Returns ``{"runs": [{run_id, status, stop_reason, rounds_done, rounds_planned,
    accuracy (last round's), epsilon_max (largest over its rounds), created_at,
    updated_at}]}``.
    """
    from sqlalchemy import func, select

    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import FlRound, FlRun

    with session_factory(ctx.engine)() as session:
        query = select(FlRun).order_by(FlRun.created_at.desc()).limit(params.limit)
        if params.status is not None:
            query = query.where(FlRun.status == params.status)
        rows = list(session.scalars(query))
        ids = [r.run_id for r in rows]
        last_round = dict(
            session.execute(
                select(FlRound.run_id, func.max(FlRound.round))
                .where(FlRound.run_id.in_(ids))
                .group_by(FlRound.run_id)
            ).all()
        )
        eps = dict(
            session.execute(
                select(FlRound.run_id, func.max(FlRound.epsilon_max))
                .where(FlRound.run_id.in_(ids))
                .group_by(FlRound.run_id)
            ).all()
        )
        accuracy: dict[str, float] = {}
        for run_id, rnd in last_round.items():
            row = session.get(FlRound, (run_id, rnd))
            if row is not None:
                accuracy[str(run_id)] = row.accuracy
        return {
            "runs": [
                {
                    "run_id": r.run_id,
                    "status": r.status,
                    "stop_reason": r.stop_reason,
                    "rounds_done": int(last_round.get(r.run_id, 0) or 0),
                    "rounds_planned": int(json.loads(r.plan_json).get("rounds", 0)),
                    "accuracy": accuracy.get(r.run_id),
                    "epsilon_max": eps.get(r.run_id),
                    "created_at": iso(r.created_at),
                    "updated_at": iso(r.updated_at),
                }
                for r in rows
            ]
        }


class RunParams(Params):
    run: str = Field(pattern=_RUN_ID, description="The run id.")


def _result(ctx: OpContext, run_id: str) -> Any:
    from edgefl.server.fl.ledger import FlStore

    store = FlStore.on_engine(ctx.engine)
    try:
        return store, store.result(run_id)
    except ConfigError as exc:
        raise NotFoundError(
            f"no federated run {run_id!r} in the registry",
            hint="`edgefl server runs` lists the runs",
        ) from exc


@operation(
    "run-show",
    role="viewer",
    params=RunParams,
    summary="Show one run: rounds with accuracy, and each device's ε per round (ledger).",
)
def run_show(ctx: OpContext, params: RunParams) -> dict[str, Any]:
    """One run's rounds and each device's ε per round.

    Returns the run's result (``status``, ``stop_reason``, ``rounds`` with accuracy, loss,
    replies and ε max, ``epsilon_per_device``, ``lifetime``, ``central_epsilon``), plus
    ``ledger``: one entry per round and device from the privacy ledger (``epsilon_total``
    after the round, ``epsilon_spent`` in it, ``num_examples``, ``flagged``), and
    ``epsilon_curves``: device -> ``[[round, epsilon_total], ...]``.
    """
    store, result = _result(ctx, params.run)
    ledger = store.ledger(params.run)
    curves: dict[str, list[list[float]]] = {}
    for row in ledger:
        curves.setdefault(row.device_id, []).append([row.round, row.epsilon_total])
    doc: dict[str, Any] = result.to_dict()
    doc["ledger"] = [
        {
            "round": row.round,
            "device_id": row.device_id,
            "epsilon_spent": row.epsilon_spent,
            "epsilon_total": row.epsilon_total,
            "delta": row.delta,
            "num_examples": row.num_examples,
            "train_time_s": row.train_time_s,
            "flagged": row.flagged,
        }
        for row in ledger
    ]
    doc["epsilon_curves"] = curves
    return doc


class PrivacyParams(Params):
    run: str | None = Field(None, pattern=_RUN_ID, description="Show this run's ledger ε beside.")
    devices: list[str] | None = Field(None, description="Only these devices.")


@operation(
    "privacy",
    role="viewer",
    params=PrivacyParams,
    summary="Each device's lifetime ε over every run, beside a run's ledger ε.",
)
def privacy(ctx: OpContext, params: PrivacyParams) -> dict[str, Any]:
    """``{"run_id", "run_epsilon": {device: ε} | None, "lifetime": {device: {...}}}``."""
    from edgefl.server.fl.ledger import FlStore

    run_epsilon: dict[str, float] | None = None
    if params.run is not None:
        _, result = _result(ctx, params.run)
        run_epsilon = dict(result.epsilon_per_device)
        lifetime = dict(result.lifetime)
    else:
        store = FlStore.on_engine(ctx.engine)
        lifetime = {d: r.to_dict() for d, r in store.lifetime(params.devices or None).items()}
    if params.devices:
        wanted = set(params.devices)
        lifetime = {d: v for d, v in lifetime.items() if d in wanted}
        if run_epsilon is not None:
            run_epsilon = {d: v for d, v in run_epsilon.items() if d in wanted}
    return {"run_id": params.run, "run_epsilon": run_epsilon, "lifetime": lifetime}


class TrainParams(Params):
    plan: dict[str, Any] = Field(description="The federation plan (its keys, as in the file).")
    run_id: str | None = Field(None, pattern=_RUN_ID, description="Our run id (existing: resume).")


@operation(
    "train",
    role="operator",
    params=TrainParams,
    summary="Start a federated run of a plan; returns its id (follow it with run-show).",
    mutating=True,
    target=lambda p: p.run_id or "",
)
def train(ctx: OpContext, params: TrainParams) -> dict[str, Any]:
    """Submit the run to the server's SuperLink and return at once.

    Returns ``run_id``, ``flower_run_id``, ``app_dir``, ``db_url`` (without its
    password) and ``rounds``.

    Raises:
        InvalidError: The plan does not validate (nothing is submitted).
        ConfigError: No SuperLink to submit to (the server is not running).
    """
    from edgefl.federation import load_plan
    from edgefl.server.fl.ledger import new_run_id
    from edgefl.server.runs import submit_run

    try:
        plan = load_plan(params.plan, source="plan")
    except ConfigError as exc:
        raise InvalidError(str(exc), hint=exc.hint) from exc
    rid = params.run_id or new_run_id()
    prewarmed = prewarm_devices(ctx)
    submitted = submit_run(ctx.admin(), plan, rid)
    return {**submitted, "rounds": plan.rounds, "prewarmed": prewarmed}


def prewarm_devices(ctx: OpContext) -> list[str]:
    """Tell the admitted, online devices that a run is about to start.

    Each agent then starts its ClientApp's warm zygote (``prewarm-training``), so the
    zygote's imports (several seconds of CPU) overlap the run's start on the server rather
    than delaying every device's first message. Best effort: a broker that cannot be
    reached costs the run nothing but that head start.

    Returns:
        The devices whose command the broker acknowledged.
    """
    from edgefl.proto.commands import PREWARM_TRAINING_COMMAND
    from edgefl.server.enrollment import admitted_fleets
    from edgefl.server.ops.fleet import _commands_identity, publish_commands
    from edgefl.server.registry import session_factory
    from edgefl.server.rollout import broker_address
    from edgefl.server.rollouts.watch import presence

    try:
        fleets = admitted_fleets(ctx.engine)
        with session_factory(ctx.engine)() as session:
            online = presence(session, fleets)
        targets = {d: f for d, f in fleets.items() if online.get(d)}
        if not targets:
            return []
        host, port = broker_address(ctx.config)
        return publish_commands(
            host=host,
            port=port,
            tls=_commands_identity(ctx.config.resolved_ca_dir),
            targets=targets,
            name=PREWARM_TRAINING_COMMAND,
            args={},
            ttl_s=_PREWARM_TTL_S,
            # A head start is worth little once it has waited for another command.
            session_wait_s=_PREWARM_SESSION_WAIT_S,
        )
    except (EdgeflError, OSError, ValueError) as exc:
        log.warning("could not tell the devices a run is starting (%s); submitting anyway", exc)
        return []


class StopParams(Params):
    run: str = Field(pattern=_RUN_ID, description="The run id.")
    reason: str = Field("", max_length=500, description="Why (kept as the run's stop reason).")


@operation(
    "stop",
    role="operator",
    params=StopParams,
    summary="Stop a running federated run (on the SuperLink) and mark it stopped.",
    mutating=True,
    target=lambda p: p.run,
)
def stop(ctx: OpContext, params: StopParams) -> dict[str, Any]:
    """Stop the run on the SuperLink, then mark it stopped in the registry.

    The stop reason is ``stopped by NAME`` unless given. Returns ``run_id``,
    ``flower_run_id``, ``status`` and ``stop_reason``.

    Raises:
        NotFoundError: No such run in the registry.
        ConflictError: The run is not running (completed or already stopped).
    """
    from edgefl.server.fl.ledger import FlStore
    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import FlRun

    with session_factory(ctx.engine)() as session:
        run = session.get(FlRun, params.run)
        status = run.status if run is not None else None
    if status is None:
        raise NotFoundError(
            f"no federated run {params.run!r} in the registry",
            hint="`edgefl server runs` lists the runs",
        )
    if status != "running":
        raise ConflictError(f"run {params.run} is {status}, not running: nothing to stop")
    id_file = ctx.config.resolved_state_dir / "runs" / params.run / "flower-run-id"
    try:
        flower_run_id = int(id_file.read_text(encoding="utf-8").strip())
    except (OSError, ValueError) as exc:
        raise ConflictError(
            f"run {params.run} was not submitted by this server ({id_file} is missing)",
            hint="stop it where it was started (`flwr stop`)",
        ) from exc
    ctx.admin().admin.stop_run(flower_run_id)
    reason = params.reason or f"stopped by {ctx.principal.name}"
    FlStore.on_engine(ctx.engine).finish(params.run, "stopped", reason)
    return {
        "run_id": params.run,
        "flower_run_id": flower_run_id,
        "status": "stopped",
        "stop_reason": reason,
    }
