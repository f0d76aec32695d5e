"""What each dashboard page shows, read through the admin operations.

Every page asks :func:`edgefl.server.ops.invoke` for its data (``devices``,
``device-show``, ``runs``, ``run-show``, ``releases``, ``rollouts``, ``rollout-status``,
``audit``), as the principal who looks, so a page shows exactly what the same command
prints with ``--json`` and the same role rules apply. The functions here only reshape
those JSON values for the templates (labels, chart series); they never read the registry
themselves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from edgefl.server.dashboard.charts import line_chart
from edgefl.server.ops import OpContext, invoke

__all__ = [
    "audit_page",
    "device_page",
    "fleet_page",
    "release_page",
    "rollout_page",
    "run_page",
    "runs_page",
]

_BODY_CAP = 400


def _model_label(row: Mapping[str, Any]) -> str:
    model = row.get("model")
    if not model:
        return "—"
    label = f"{model} v{row.get('version')}" if row.get("version") is not None else str(model)
    return f"{label} ({row['variant']})" if row.get("variant") else label


def _backlog(row: Mapping[str, Any]) -> int | None:
    outbox = row.get("outbox")
    if isinstance(outbox, Mapping) and outbox.get("depth") is not None:
        return int(outbox["depth"])
    value = row.get("backlog")
    return int(value) if isinstance(value, int | float) else None


def _device_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **row,
        "model_label": _model_label(row),
        "backlog": _backlog(row),
        "epsilon": row.get("epsilon"),
    }


def _stream(topic: Any) -> str:
    """``telemetry/inference`` of ``edgefl/FLEET/DEVICE/telemetry/inference``."""
    parts = str(topic or "").split("/")
    return "/".join(parts[3:]) if len(parts) > 3 else str(topic or "")


def _body_text(body: Any) -> str:
    text = body if isinstance(body, str) else json.dumps(body, sort_keys=True, default=str)
    return text if len(text) <= _BODY_CAP else text[: _BODY_CAP - 1] + "…"


def running_runs(ctx: OpContext) -> list[str]:
    """The ids of the runs still going on (the pages that show them refresh themselves)."""
    runs = invoke("runs", {"status": "running"}, ctx).get("runs", [])
    return [str(r["run_id"]) for r in runs]


def fleet_page(ctx: OpContext) -> dict[str, Any]:
    """The fleet table: every device with presence, last seen, backlog, model, ε."""
    devices = [_device_row(d) for d in invoke("devices", {}, ctx).get("devices", [])]
    running = running_runs(ctx)
    return {
        "devices": devices,
        "online": sum(1 for d in devices if d.get("online")),
        "running_runs": running,
        "live": bool(running),
    }


def device_page(ctx: OpContext, device_id: str) -> dict[str, Any]:
    """One device: status, its newest telemetry and results, the commands it was sent."""
    shown = invoke("device-show", {"device": device_id, "limit": 10}, ctx)
    row = shown.get("device") or {"device_id": device_id, "online": False}
    enrollment = shown.get("enrollment") or {}
    device = _device_row(row)
    extra = []
    if enrollment:
        extra.append(("Enrollment", str(enrollment.get("status", "—"))))
    if row.get("records") is not None:
        extra.append(("Records stored", str(row["records"])))
    if row.get("rollbacks"):
        extra.append(("Rollbacks", str(row["rollbacks"])))
    device["extra"] = extra
    commands = [
        {
            **c,
            "detail": _body_text(c["response"]) if c.get("response") is not None else "",
        }
        for c in shown.get("commands", [])
    ]
    return {
        "device": device,
        "telemetry": [
            {**t, "body": _body_text(t.get("body")), "stream": _stream(t.get("topic"))}
            for t in shown.get("telemetry", [])
        ],
        "results": [
            {**r, "body": _body_text(r.get("body")), "model_label": _model_label(r)}
            for r in shown.get("results", [])
        ],
        "commands": commands,
        "live": False,
    }


def runs_page(ctx: OpContext) -> dict[str, Any]:
    """Every run, newest first."""
    runs = [
        {**r, "rounds": r.get("rounds_planned")} for r in invoke("runs", {}, ctx).get("runs", [])
    ]
    return {"runs": runs, "live": any(r.get("status") == "running" for r in runs)}


def run_page(ctx: OpContext, run_id: str) -> dict[str, Any]:
    """One run: its rounds, the accuracy curve and each device's ε curve (inline SVG)."""
    shown = invoke("run-show", {"run": run_id}, ctx)
    rounds = list(shown.get("rounds", []))
    accuracy: dict[str, list[tuple[float, float]]] = {
        "server accuracy": [
            (float(r["round"]), float(r["accuracy"]))
            for r in rounds
            if r.get("accuracy") is not None
        ]
    }
    federated = [
        (float(r["round"]), float(r["federated_accuracy"]))
        for r in rounds
        if r.get("federated_accuracy") is not None
    ]
    if federated:
        accuracy["federated accuracy"] = federated
    curves = shown.get("epsilon_curves") or {}
    epsilon = {
        str(device): [(float(rnd), float(eps)) for rnd, eps in points]
        for device, points in sorted(curves.items())
    }
    per_device = shown.get("epsilon_per_device") or {}
    devices = [
        {
            "device_id": device,
            "rounds": len(curves.get(device, [])),
            "epsilon": per_device.get(device, points[-1][1] if points else None),
        }
        for device, points in sorted(epsilon.items())
    ]
    status = str(shown.get("status", "unknown"))
    run = {
        "run_id": shown.get("run_id", run_id),
        "status": status,
        "stop_reason": shown.get("stop_reason", ""),
        "final_accuracy": shown.get("final_accuracy"),
        "rounds_done": shown.get("rounds_trained", len(rounds)),
        "rounds": shown.get("planned_rounds") or None,
        "created_at": shown.get("created_at"),
        "updated_at": shown.get("updated_at"),
    }
    return {
        "run": run,
        "rounds": rounds,
        "devices": devices,
        "accuracy_chart": line_chart(
            accuracy, title="Accuracy per round", x_label="round", y_label="accuracy"
        ),
        "epsilon_chart": line_chart(
            epsilon, title="ε per device", x_label="round", y_label="ε (running total)", y_min=0
        ),
        "live": status == "running",
    }


def release_page(ctx: OpContext) -> dict[str, Any]:
    """Releases and rollouts, with each rollout's devices counted by state."""
    releases = []
    for r in invoke("releases", {}, ctx).get("releases", []):
        variants = r.get("variants") or []
        names = [v.get("variant", "?") if isinstance(v, Mapping) else str(v) for v in variants]
        privacy = r.get("privacy") if isinstance(r.get("privacy"), Mapping) else {}
        releases.append({**r, "variants": names, "epsilon_max": privacy.get("epsilon_max")})
    rollouts = invoke("rollouts", {}, ctx).get("rollouts", [])
    return {
        "releases": releases,
        "rollouts": rollouts,
        "live": any(r.get("state") == "running" for r in rollouts),
    }


def rollout_page(ctx: OpContext, rollout_id: str) -> dict[str, Any]:
    """One rollout with each device's cohort, state, reason and what it ran before."""
    shown = invoke("rollout-status", {"rollout": rollout_id}, ctx)
    rollout = shown.get("rollout", shown)
    devices = []
    for d in shown.get("devices", rollout.get("devices", [])) or []:
        previous = d.get("previous") or {}
        if not isinstance(previous, Mapping):
            previous = {}
        model = previous.get("model", d.get("previous_model"))
        version = previous.get("version", d.get("previous_version"))
        devices.append(
            {
                **d,
                "previous": f"{model} v{version}" if model else None,
            }
        )
    return {
        "rollout": rollout,
        "devices": devices,
        "live": rollout.get("state") == "running",
    }


def audit_page(ctx: OpContext, limit: int = 200) -> dict[str, Any]:
    """The newest audit entries."""
    return {"entries": invoke("audit", {"limit": limit}, ctx).get("entries", []), "live": False}
