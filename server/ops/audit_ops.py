"""The ``audit`` operation: the audit log, newest first (role viewer)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from edgefl.server import audit as audit_log
from edgefl.server.ops import OpContext, Params, operation

__all__: list[str] = []


class AuditParams(Params):
    limit: int = Field(100, ge=1, le=10_000, description="Newest this many.")
    action: str | None = Field(None, description="Only this action (admit, command ...).")
    actor: str | None = Field(None, description="Only this actor (certificate CN, token:NAME ...).")


@operation(
    "audit",
    role="viewer",
    params=AuditParams,
    summary="Show the audit log: who did what, when, with which arguments and outcome.",
)
def audit(ctx: OpContext, params: AuditParams) -> dict[str, Any]:
    """The newest entries first, their arguments' secrets redacted.

    Returns ``{"entries": [{id, at, actor, role, via, action, target, arguments, outcome,
    detail}]}``.
    """
    return {
        "entries": audit_log.read(
            ctx.engine, limit=params.limit, action=params.action, actor=params.actor
        )
    }
