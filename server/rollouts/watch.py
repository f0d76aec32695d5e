"""What the controller reads of the fleet: reported model states, presence, inference reports."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefl.proto.topics import record_topic
from edgefl.server.registry.models import Record
from edgefl.server.rollouts.options import INFERENCE_STREAM

__all__ = []


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
