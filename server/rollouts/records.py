"""The registry's record of rollouts (tables ``rollouts`` and ``rollout_devices``)."""

from __future__ import annotations

import getpass
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edgefl.errors import BadInputError, ConfigError
from edgefl.server.device_states import read_model_states
from edgefl.server.registry.models import Device, Record, Rollout, RolloutDevice
from edgefl.server.rollouts.options import STALE_AFTER_S

__all__ = ["list_rollouts", "read_rollout", "results_by_version"]


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
            presence = {
                str(d): bool(o)
                for d, o in session.execute(
                    select(Device.device_id, Device.online).where(Device.device_id.in_(ids))
                )
            }
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
            "online": presence.get(d.device_id, False),
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
