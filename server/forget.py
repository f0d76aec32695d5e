"""``edgefl server forget DEVICE``: erase what the registry stores about one device.

Erased (one transaction):

- ``records``: every record it sent (telemetry, data, results, command responses);
- ``dead_letters`` that arrived on its topics (``edgefl/{fleet}/{device}/...``);
- ``device_states``: the model it last reported;
- ``rollout_devices``: its state in past rollouts (the rollouts' own rows, with their
  counts and evidence, stay);
- ``enrollments``: its certificate and Flower node key (it must be revoked first, so the
  CRL keeps refusing its certificate; the CA's ``state.json`` keeps the serial and the
  key fingerprint, which refuse a reused key: they name no data);
- ``devices``: its row (presence, versions).

Kept, and why:

- ``privacy_ledger`` rows (ε per run and round, the DP-SGD parameters and the accountant
  history, the example count): they prove each run's privacy cap held for the models
  already trained and released with the device's updates, and the server composes a
  device's lifetime ε from them (:meth:`edgefl.server.fl.ledger.FlStore.lifetime`), so a
  device that rejoins under the same id cannot start a fresh budget. They hold no data
  the device measured.
- ``fl_rounds`` and ``fl_checkpoints`` (aggregates: the device's update cannot be taken
  out of a trained model) and ``audit_log`` (append-only; the forget itself is added).

A device that is admitted, or part of a running rollout, is refused (409): revoke it
first, or wait for the rollout. The broker's retained ``status`` and ``state/reported``
messages of the device are not the registry's: they stay in the broker's persistence.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, delete, func, select

from edgefl.server.registry.models import (
    DeadLetter,
    Device,
    DeviceState,
    Enrollment,
    PrivacyLedgerEntry,
    Record,
    Rollout,
    RolloutDevice,
)

__all__ = ["forget_device"]

_BATCH = 5000


def _dead_letter_ids(conn: Any, device_id: str) -> list[int]:
    """Dead letters on ``edgefl/*/{device_id}/...`` (exact segment, not a LIKE wildcard)."""
    escaped = device_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    rows = conn.execute(
        select(DeadLetter.id, DeadLetter.topic).where(
            DeadLetter.topic.like(f"edgefl/%/{escaped}/%", escape="\\")
        )
    )
    out = []
    for row_id, topic in rows:
        parts = str(topic).split("/")
        if len(parts) > 3 and parts[2] == device_id:
            out.append(int(row_id))
    return out


def forget_device(engine: Engine, device_id: str, *, dry_run: bool = False) -> dict[str, Any]:
    """Erase (or, ``dry_run``, count) what the registry stores about ``device_id``.

    Returns:
        Per table, the rows erased (or that would be), and what is kept.

    Raises:
        NotFoundError: The registry has never heard of the device.
        ConflictError: It is admitted, or in a running rollout.
    """
    from edgefl.server.ops import ConflictError, NotFoundError

    with engine.connect() as conn:
        known = conn.execute(select(Device.device_id).where(Device.device_id == device_id)).first()
        enrollment = conn.execute(
            select(Enrollment.status).where(Enrollment.device_id == device_id)
        ).first()
        if known is None and enrollment is None:
            raise NotFoundError(
                f"no device {device_id!r} in the registry",
                hint="`edgefl server devices` lists the known devices",
            )
        if enrollment is not None and enrollment.status == "admitted":
            raise ConflictError(
                f"device {device_id!r} is admitted: it would keep sending data",
                hint=f"revoke it first (edgefl server revoke {device_id}), then forget it",
            )
        running = conn.execute(
            select(Rollout.id)
            .join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
            .where(RolloutDevice.device_id == device_id, Rollout.state == "running")
        ).first()
        if running is not None:
            raise ConflictError(
                f"device {device_id!r} is part of the running rollout {running.id}",
                hint="wait until it ends (edgefl server rollout-status), then forget it",
            )

        def count(model: Any, *where: Any) -> int:
            return int(
                conn.execute(select(func.count()).select_from(model).where(*where)).scalar_one()
            )

        dead_ids = _dead_letter_ids(conn, device_id)
        counts = {
            "records": count(Record, Record.device_id == device_id),
            "dead_letters": len(dead_ids),
            "device_states": count(DeviceState, DeviceState.device_id == device_id),
            "rollout_devices": count(RolloutDevice, RolloutDevice.device_id == device_id),
            "enrollments": count(Enrollment, Enrollment.device_id == device_id),
            "devices": count(Device, Device.device_id == device_id),
        }
        kept = {
            "privacy_ledger": count(PrivacyLedgerEntry, PrivacyLedgerEntry.device_id == device_id)
        }
    result: dict[str, Any] = {
        "device_id": device_id,
        "dry_run": dry_run,
        "erased": counts,
        "kept": kept,
        "kept_why": (
            "privacy_ledger rows prove each run's privacy cap held and make up the device's "
            "lifetime ε if it rejoins; they hold no measured data"
        ),
    }
    if dry_run:
        return result
    # Records may be many: delete them in batches, then the rest in one transaction.
    while True:
        with engine.begin() as conn:
            ids = list(
                conn.execute(
                    select(Record.id).where(Record.device_id == device_id).limit(_BATCH)
                ).scalars()
            )
            if not ids:
                break
            conn.execute(delete(Record).where(Record.id.in_(ids)))
    with engine.begin() as conn:
        for start in range(0, len(dead_ids), _BATCH):
            chunk = dead_ids[start : start + _BATCH]
            conn.execute(delete(DeadLetter).where(DeadLetter.id.in_(chunk)))
        conn.execute(delete(DeviceState).where(DeviceState.device_id == device_id))
        conn.execute(delete(RolloutDevice).where(RolloutDevice.device_id == device_id))
        conn.execute(delete(Enrollment).where(Enrollment.device_id == device_id))
        conn.execute(delete(Record).where(Record.device_id == device_id))  # a late arrival
        conn.execute(delete(Device).where(Device.device_id == device_id))
    return result
