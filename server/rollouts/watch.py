"""What the controller reads of the fleet: reported model states, presence, inference reports."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edgefl.proto.topics import record_topic
from edgefl.server.device_states import ReportedModelState, read_model_states
from edgefl.server.registry.models import Device, Record
from edgefl.server.rollouts.options import INFERENCE_STREAM

__all__ = ["Look", "look", "presence"]

log = logging.getLogger("edgefl.server.staged_rollout")


@dataclass(frozen=True)
class Look:
    """One read of the registry about some devices.

    Attributes:
        reported: Each device's reported model state (devices that have one).
        online: Each device's presence (``False`` for a device the registry lacks).
        reports: Each device's newest inference report since the look's ``since``.
    """

    reported: dict[str, ReportedModelState]
    online: dict[str, bool]
    reports: dict[str, dict[str, Any]]


def presence(session: Session, devices: Iterable[str]) -> dict[str, bool]:
    """Device -> online, for the registry's devices among ``devices``."""
    return {
        str(d): bool(o)
        for d, o in session.execute(
            select(Device.device_id, Device.online).where(Device.device_id.in_(sorted(devices)))
        )
    }


def look(engine: Engine, fleets: Mapping[str, str], since: datetime | None) -> Look | None:
    """Read the devices of ``fleets`` (device -> fleet); ``None`` when the registry fails.

    Inference reports are read only with ``since`` (those stored at or after it). A
    registry that cannot be read is logged and looked at again by the caller.
    """
    try:
        with Session(engine) as session:
            reported = read_model_states(session, list(fleets))
            online = presence(session, fleets)
            reports = _inference_reports(session, fleets, since) if since is not None else {}
    except SQLAlchemyError as exc:
        log.warning("cannot read the registry (will look again): %s", exc)
        return None
    return Look(reported, online, reports)


def _inference_reports(
    session: Session, fleets: Mapping[str, str], since: datetime
) -> dict[str, dict[str, Any]]:
    """Each device's newest ``telemetry/inference`` report stored at or after ``since``."""
    topics = [record_topic(f, d, "telemetry", INFERENCE_STREAM) for d, f in fleets.items()]
    newest = (
        select(func.max(Record.id))
        .where(
            Record.device_id.in_(sorted(fleets)),
            Record.kind == "telemetry",
            Record.topic.in_(topics),
            Record.received_at >= since,
        )
        .group_by(Record.device_id)
    )
    docs: dict[str, dict[str, Any]] = {}
    for device, body in session.execute(
        select(Record.device_id, Record.body).where(Record.id.in_(newest))
    ):
        try:
            doc = json.loads(bytes(body))
        except (ValueError, RecursionError):
            continue
        if isinstance(doc, dict):
            docs[str(device)] = doc
    return docs
