"""The registry's record of rollouts (tables ``rollouts`` and ``rollout_devices``)."""

from __future__ import annotations

import getpass
import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edgefl.errors import BadInputError, ConfigError
from edgefl.server.device_states import read_model_states
from edgefl.server.registry.models import Record, Rollout, RolloutDevice
from edgefl.server.rollouts.options import STALE_AFTER_S, RolloutOptions
from edgefl.server.rollouts.plan import _Plan
from edgefl.server.rollouts.watch import presence

__all__ = [
    "list_rollouts",
    "read_rollout",
    "record_end",
    "record_start",
    "results_by_version",
    "touch",
    "write_rows",
]


log = logging.getLogger("edgefl.server.staged_rollout")


def _created_by(by: str | None) -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no passwd entry and no $USER (containers)
        user = f"uid {os.getuid()}"
    return f"{by} (os user {user})" if by else user


# --- reading rollouts back -------------------------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; they mean UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    value = _utc(value)
    return value.isoformat() if value is not None else None


def _evidence(row: Rollout) -> dict[str, Any]:
    try:
        doc = json.loads(row.evidence_json or "{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _rollout_doc(row: Rollout) -> dict[str, Any]:
    evidence = _evidence(row)
    return {
        "shadow": bool(evidence.get("shadow")),
        "min_agreement": evidence.get("min_agreement"),
        "id": row.id,
        "model": row.model,
        "version": row.version,
        "variant": row.variant,
        "sha256": row.sha256,
        "fleet": row.fleet,
        "state": row.state,
        "phase": row.phase,
        "reason": row.reason,
        "canary_fraction": row.canary_fraction,
        "canaries": row.canaries,
        "soak_s": row.soak_s,
        "max_failures": row.max_failures,
        "min_accuracy": row.min_accuracy,
        "max_accuracy_drop": row.max_accuracy_drop,
        "min_evaluated": row.min_evaluated,
        "install_timeout_s": row.install_timeout_s,
        "created_by": row.created_by,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "finished_at": _iso(row.finished_at),
        "stale": row.state == "running"
        and (_utc(row.updated_at) or datetime.now(UTC))
        < datetime.now(UTC) - timedelta(seconds=STALE_AFTER_S),
    }


def list_rollouts(engine: Engine, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest rollouts first, each with its device counts per state.

    Raises:
        ConfigError: The registry cannot be read.
    """
    try:
        with Session(engine) as session:
            rows = list(
                session.scalars(select(Rollout).order_by(Rollout.created_at.desc()).limit(limit))
            )
            counts: dict[str, dict[str, int]] = {}
            if rows:
                for rid, state, n in session.execute(
                    select(RolloutDevice.rollout_id, RolloutDevice.state, func.count())
                    .where(RolloutDevice.rollout_id.in_([r.id for r in rows]))
                    .group_by(RolloutDevice.rollout_id, RolloutDevice.state)
                ):
                    counts.setdefault(str(rid), {})[str(state)] = int(n)
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot read the rollouts in the registry: {exc}",
            hint="`edgefl server start` (or `edgefl server rollout`) migrates the registry",
        ) from exc
    return [
        {
            **_rollout_doc(r),
            "devices": sum(counts.get(r.id, {}).values()),
            "device_states": counts.get(r.id, {}),
        }
        for r in rows
    ]


def read_rollout(engine: Engine, rollout_id: str) -> dict[str, Any]:
    """One rollout with each device's state, reason, what it runs now and its results.

    ``now`` is the device's current reported model; ``results`` counts the stored result
    records the rollout's release computed on it (``records.model_version``), so a device
    that ever answered with the release shows it.

    Raises:
        BadInputError: No such rollout.
        ConfigError: The registry cannot be read.
    """
    try:
        with Session(engine) as session:
            row = session.get(Rollout, rollout_id)
            if row is None:
                raise BadInputError(
                    f"no rollout {rollout_id!r} in the registry",
                    hint="list them with `edgefl server rollouts`",
                )
            devices = list(
                session.scalars(
                    select(RolloutDevice)
                    .where(RolloutDevice.rollout_id == rollout_id)
                    .order_by(RolloutDevice.cohort, RolloutDevice.device_id)
                )
            )
            ids = [d.device_id for d in devices]
            now = read_model_states(session, ids)
            online = presence(session, ids)
            results = {
                str(d): int(n)
                for d, n in session.execute(
                    select(Record.device_id, func.count())
                    .where(
                        Record.model == row.model,
                        Record.model_version == row.version,
                        Record.device_id.in_(ids),
                    )
                    .group_by(Record.device_id)
                )
            }
            doc = _rollout_doc(row)
            doc["evidence"] = _evidence(row)
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot read rollout {rollout_id} from the registry: {exc}",
            hint="`edgefl server start` (or `edgefl server rollout`) migrates the registry",
        ) from exc
    doc["devices"] = [
        {
            "device_id": d.device_id,
            "fleet": d.fleet,
            "cohort": d.cohort,
            "state": d.state,
            "reason": d.reason,
            "online": online.get(d.device_id, False),
            "online_at_start": d.online_at_start,
            "previous": None
            if d.previous_model is None
            else {
                "model": d.previous_model,
                "version": d.previous_version,
                "variant": d.previous_variant,
                "sha256": d.previous_sha256,
            },
            "now": None
            if d.device_id not in now
            else {
                "model": now[d.device_id].model,
                "version": now[d.device_id].version,
                "variant": now[d.device_id].variant,
                "state": now[d.device_id].state,
            },
            "published_at": _iso(d.published_at),
            "evaluated": d.evaluated,
            "accuracy": d.accuracy,
            "previous_evaluated": d.previous_evaluated,
            "previous_accuracy": d.previous_accuracy,
            "results": results.get(d.device_id, 0),
            "shadow": (doc["evidence"].get("shadow_canaries") or {}).get(d.device_id),
            "updated_at": _iso(d.updated_at),
        }
        for d in devices
    ]
    return doc


def results_by_version(
    engine: Engine,
    *,
    model: str | None = None,
    version: int | None = None,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Stored ``result`` records per device and the model version that computed them.

    Rows are ``{device_id, model, version, variant, results, first_received,
    last_received}``; results whose body named no model have ``model`` ``None``.

    Raises:
        ConfigError: The registry cannot be read.
    """
    query = select(
        Record.device_id,
        Record.model,
        Record.model_version,
        Record.model_variant,
        func.count(),
        func.min(Record.received_at),
        func.max(Record.received_at),
    ).where(Record.kind == "result")
    if model is not None:
        query = query.where(Record.model == model)
    if version is not None:
        query = query.where(Record.model_version == version)
    if device is not None:
        query = query.where(Record.device_id == device)
    query = query.group_by(
        Record.device_id, Record.model, Record.model_version, Record.model_variant
    ).order_by(Record.device_id, Record.model, Record.model_version, Record.model_variant)
    try:
        with Session(engine) as session:
            rows = list(session.execute(query))
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot read the results in the registry: {exc}") from exc
    return [
        {
            "device_id": str(d),
            "model": m,
            "version": None if v is None else int(v),
            "variant": var,
            "results": int(n),
            "first_received": _iso(first),
            "last_received": _iso(last),
        }
        for d, m, v, var, n, first, last in rows
    ]


def record_start(engine: Engine, plan: _Plan, options: RolloutOptions) -> None:
    """Insert the rollout's row (``running``) and one row per target device."""
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        session.add(
            Rollout(
                id=plan.rollout_id,
                model=plan.release.model,
                version=plan.release.version,
                variant=plan.release.variant,
                sha256=plan.release.sha256,
                fleet=options.fleet,
                canary_fraction=options.canary,
                canaries=len(plan.canaries),
                soak_s=options.soak_s,
                max_failures=options.max_failures,
                min_accuracy=options.min_accuracy,
                max_accuracy_drop=options.max_accuracy_drop,
                min_evaluated=options.min_evaluated,
                install_timeout_s=options.install_timeout_s,
                state="running",
                phase="canary",
                reason="",
                evidence_json=json.dumps(
                    {
                        "notes": plan.notes,
                        "shadow": options.shadow,
                        "min_agreement": options.min_agreement,
                    }
                ),
                created_by=_created_by(options.by),
                created_at=now,
                updated_at=now,
                finished_at=None,
            )
        )
        session.flush()
        for target in plan.targets.values():
            previous = target.previous
            session.add(
                RolloutDevice(
                    rollout_id=plan.rollout_id,
                    device_id=target.device,
                    fleet=target.fleet,
                    cohort=target.cohort,
                    state=target.state,
                    reason=target.reason,
                    online_at_start=target.online_at_start,
                    previous_model=previous.model if previous else None,
                    previous_version=previous.version if previous else None,
                    previous_variant=previous.variant if previous else None,
                    previous_sha256=previous.sha256 if previous else None,
                    published_at=None,
                    updated_at=now,
                )
            )
            target.dirty = False


def write_rows(engine: Engine, plan: _Plan, phase: str) -> None:
    """Store the devices whose row changed, and the rollout's phase and heartbeat."""
    dirty = [t for t in plan.targets.values() if t.dirty]
    if not dirty:
        return
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        for target in dirty:
            row = session.get(RolloutDevice, (plan.rollout_id, target.device))
            if row is None:
                continue
            row.state = target.state
            row.reason = target.reason
            row.published_at = target.published_at
            if target.new is not None:
                row.evaluated, row.accuracy = target.new.evaluated, target.new.accuracy
            if target.old is not None:
                row.previous_evaluated = target.old.evaluated
                row.previous_accuracy = target.old.accuracy
            row.updated_at = now
            target.dirty = False
        rollout = session.get(Rollout, plan.rollout_id)
        if rollout is not None:
            rollout.phase = phase
            rollout.updated_at = now


def touch(engine: Engine, rollout_id: str, phase: str) -> None:
    """The rollout's phase and heartbeat; a registry error is logged, not raised."""
    try:
        with Session(engine) as session, session.begin():
            rollout = session.get(Rollout, rollout_id)
            if rollout is not None:
                rollout.phase = phase
                rollout.updated_at = datetime.now(UTC)
    except SQLAlchemyError as exc:
        log.warning("cannot record the rollout's heartbeat: %s", exc)


def record_end(
    engine: Engine,
    rollout_id: str,
    *,
    state: str,
    phase: str,
    reason: str,
    evidence: Mapping[str, Any],
    at: datetime,
) -> None:
    """The rollout's end: its state, reason and evidence.

    Raises:
        SQLAlchemyError: The registry refused the write.
    """
    with Session(engine) as session, session.begin():
        rollout = session.get(Rollout, rollout_id)
        if rollout is not None:
            rollout.state = state
            rollout.phase = phase
            rollout.reason = reason
            rollout.evidence_json = json.dumps(evidence, sort_keys=True)
            rollout.updated_at = at
            rollout.finished_at = at
