"""The audit log: who did what to the deployment, when, with which outcome.

Every mutating admin action (admit, revoke, train, stop, release, rollout, command,
forget, token and certificate changes) appends one row to the registry's ``audit_log``
table, through :func:`append`, whether it ran through the admin API or on the server host.
Rows are only ever inserted; nothing in edgefl updates or deletes them.

Arguments are stored as JSON with secrets redacted (:func:`redact`): any key named in the
operation's secrets, and any key whose name says it holds one (``token``, ``password``,
``secret``, ``key_pem`` ...), becomes ``"***"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = ["REDACTED", "Principal", "append", "read", "redact"]

REDACTED: Final = "***"
"""What a redacted value is stored as."""

_SECRET_KEY = re.compile(r"(token|password|passwd|secret|private|key_pem|passphrase)", re.I)
_DETAIL_CAP: Final = 2000


@dataclass(frozen=True)
class Principal:
    """Who acts: an admin certificate, an API token, or a user on the server host.

    Attributes:
        name: The certificate's CN, ``token:NAME``, or ``local:USER``.
        role: ``viewer``, ``operator`` or ``admin`` (a local user is ``admin``: whoever
            can read the server's files already holds its keys).
        via: ``api`` (through the admin API) or ``cli`` (on the server host).
    """

    name: str
    role: str
    via: str

    @classmethod
    def local(cls) -> Principal:
        """The user running a command on the server host."""
        import getpass

        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        return cls(f"local:{user}", "admin", "cli")


def redact(arguments: Mapping[str, Any], secrets: Iterable[str] = ()) -> dict[str, Any]:
    """A copy of ``arguments`` with secret values replaced by :data:`REDACTED` (nested too)."""
    named = set(secrets)

    def walk(value: Any, key: str | None) -> Any:
        if key is not None and (key in named or _SECRET_KEY.search(key)) and value is not None:
            return REDACTED
        if isinstance(value, Mapping):
            return {str(k): walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v, None) for v in value]
        return value

    return {str(k): walk(v, str(k)) for k, v in arguments.items()}


def append(
    engine: Engine,
    principal: Principal,
    action: str,
    *,
    target: str = "",
    arguments: Mapping[str, Any] | None = None,
    secrets: Iterable[str] = (),
    outcome: str = "ok",
    detail: str = "",
) -> int:
    """Append one entry; returns its id.

    Args:
        engine: The registry.
        principal: Who acted.
        action: What (``admit``, ``train`` ...).
        target: What it acted on, or ``""``.
        arguments: The arguments (redacted here, see :func:`redact`).
        secrets: Argument names to redact besides the ones that look secret.
        outcome: ``ok``, ``denied`` or ``error``.
        detail: The refusal or error message, or a short result.
    """
    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import AUDIT_OUTCOMES, AuditEntry

    if outcome not in AUDIT_OUTCOMES:
        raise ValueError(f"outcome must be one of {AUDIT_OUTCOMES}, not {outcome!r}")
    entry = AuditEntry(
        at=datetime.now(UTC),
        actor=principal.name[:255],
        role=principal.role[:16],
        via=principal.via[:16],
        action=action[:64],
        target=target[:255],
        arguments_json=json.dumps(redact(arguments or {}, secrets), sort_keys=True, default=str),
        outcome=outcome,
        detail=detail[:_DETAIL_CAP],
    )
    with session_factory(engine)() as session, session.begin():
        session.add(entry)
        session.flush()
        return int(entry.id)


def read(
    engine: Engine,
    *,
    limit: int = 100,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    """The newest entries first, as JSON-ready dicts (``at`` in ISO 8601 UTC)."""
    from sqlalchemy import select

    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import AuditEntry

    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(max(1, min(limit, 10_000)))
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    with session_factory(engine)() as session:
        return [
            {
                "id": e.id,
                "at": (e.at if e.at.tzinfo else e.at.replace(tzinfo=UTC)).isoformat(),
                "actor": e.actor,
                "role": e.role,
                "via": e.via,
                "action": e.action,
                "target": e.target,
                "arguments": json.loads(e.arguments_json),
                "outcome": e.outcome,
                "detail": e.detail,
            }
            for e in session.scalars(query)
        ]
