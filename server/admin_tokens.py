"""Admin API tokens: ``efl_<id>_<secret>``, hashed at rest, expiring, revocable.

A token is made of a public id (12 hex characters, the ``admin_tokens`` row's key) and a
secret of 32 random bytes (URL-safe base64). Only the SHA-256 of the secret is stored: the
secret is high-entropy, so a slow password hash would add nothing, and a stolen registry
gives no usable token. Checking compares hashes in constant time
(:func:`hmac.compare_digest`). The token string is shown once, when it is made.

A token authenticates as principal ``token:NAME`` with the role it was made with, until
it expires or is revoked (:func:`revoke`); every use moves ``last_used_at`` (at most once a
minute, so a busy client does not write to the registry on every request).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from edgefl.errors import BadInputError
from edgefl.server.audit import Principal

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "TOKEN_PREFIX",
    "IssuedToken",
    "TokenRefusedError",
    "as_utc",
    "authenticate",
    "create",
    "credential_fields",
    "iso_utc",
    "list_tokens",
    "parse_duration",
    "revoke",
]

TOKEN_PREFIX: Final = "efl"
_TOKEN_RE: Final = re.compile(r"efl_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_TOUCH_EVERY: Final = timedelta(seconds=60)


class TokenRefusedError(Exception):
    """The token is malformed, unknown, wrong, expired or revoked; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class IssuedToken:
    """A token just made: ``token`` is the only copy of its secret."""

    id: str
    name: str
    role: str
    token: str
    expires_at: datetime


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def as_utc(value: datetime) -> datetime:
    """An aware datetime (SQLite gives naive ones back; they mean UTC)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def iso_utc(value: datetime | None) -> str | None:
    """ISO 8601 in UTC, None for None."""
    return as_utc(value).isoformat() if value is not None else None


def credential_fields(row: Any, now: datetime) -> dict[str, Any]:
    """``name``, ``role`` and ``state`` (revoked, expired, active) of a token or cert row."""
    state = (
        "revoked"
        if row.revoked_at is not None
        else "expired"
        if as_utc(row.expires_at) <= now
        else "active"
    )
    return {"name": row.name, "role": row.role, "state": state}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` (a bare number is days).

    Raises:
        BadInputError: Not a positive duration.
    """
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise BadInputError(
            f"invalid duration {text!r}", hint="use a number and a unit: 45s, 90m, 12h, 30d, 2w"
        )
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def check_name(name: str) -> str:
    """A principal name: letters, digits, ``_.@-``, at most 64 characters.

    Raises:
        BadInputError: Any other name.
    """
    if _NAME_RE.fullmatch(name) is None:
        raise BadInputError(
            f"invalid name {name!r}",
            hint="use letters, digits and _.@- (at most 64, starting with a letter or digit)",
        )
    return name


def create(engine: Engine, name: str, role: str, *, expires_in: timedelta) -> IssuedToken:
    """Make a token for ``name`` with ``role``, valid for ``expires_in``.

    Raises:
        BadInputError: Invalid name, role or duration.
    """
    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import ADMIN_ROLES, AdminToken

    check_name(name)
    if role not in ADMIN_ROLES:
        raise BadInputError(f"invalid role {role!r}", hint=f"use one of {', '.join(ADMIN_ROLES)}")
    if expires_in <= timedelta(0):
        raise BadInputError("a token's lifetime must be positive")
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    row = AdminToken(
        id=token_id,
        name=name,
        role=role,
        secret_hash=_hash(secret),
        created_at=now,
        expires_at=now + expires_in,
        revoked_at=None,
        last_used_at=None,
    )
    with session_factory(engine)() as session, session.begin():
        session.add(row)
    return IssuedToken(token_id, name, role, f"{TOKEN_PREFIX}_{token_id}_{secret}", row.expires_at)


def authenticate(engine: Engine, token: str, *, now: datetime | None = None) -> Principal:
    """The principal a token string stands for.

    Raises:
        TokenRefusedError: Malformed, unknown, wrong secret, expired or revoked.
    """
    from sqlalchemy import update

    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import AdminToken

    now = now or datetime.now(UTC)
    match = _TOKEN_RE.fullmatch(token.strip())
    if match is None:
        raise TokenRefusedError("malformed token (expected efl_<id>_<secret>)")
    token_id, secret = match.groups()
    with session_factory(engine)() as session:
        row = session.get(AdminToken, token_id)
        stored = row.secret_hash if row is not None else _hash("")
        if not hmac.compare_digest(stored, _hash(secret)) or row is None:
            raise TokenRefusedError("unknown token")
        if row.revoked_at is not None:
            raise TokenRefusedError(f"token {token_id} ({row.name}) was revoked")
        if as_utc(row.expires_at) <= now:
            raise TokenRefusedError(
                f"token {token_id} ({row.name}) expired at {as_utc(row.expires_at).isoformat()}"
            )
        principal = Principal(f"token:{row.name}", row.role, "api")
        last = row.last_used_at
        due = last is None or now - as_utc(last) >= _TOUCH_EVERY
    if due:
        with session_factory(engine)() as session, session.begin():
            session.execute(
                update(AdminToken).where(AdminToken.id == token_id).values(last_used_at=now)
            )
    return principal


def token_state(engine: Engine, token_id: str, *, now: datetime | None = None) -> str | None:
    """Why a token no longer authenticates (``revoked``, ``expired``, ``unknown``), or None."""
    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import AdminToken

    now = now or datetime.now(UTC)
    with session_factory(engine)() as session:
        row = session.get(AdminToken, token_id)
        if row is None:
            return "unknown"
        if row.revoked_at is not None:
            return "revoked"
        if as_utc(row.expires_at) <= now:
            return "expired"
    return None


def token_id_of(token: str) -> str | None:
    """The id part of a well-formed token string, else None."""
    match = _TOKEN_RE.fullmatch(token.strip())
    return match.group(1) if match else None


def revoke(engine: Engine, token_id: str) -> dict[str, Any]:
    """Revoke a token by id (again: harmless); returns its listing row.

    Raises:
        BadInputError: No such token.
    """
    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import AdminToken

    with session_factory(engine)() as session, session.begin():
        row = session.get(AdminToken, token_id)
        if row is None:
            raise BadInputError(
                f"no admin token {token_id!r}", hint="`edgefl server admin-tokens` lists them"
            )
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
        return _row(row)


def _row(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        **credential_fields(row, datetime.now(UTC)),
        "created_at": iso_utc(row.created_at),
        "expires_at": iso_utc(row.expires_at),
        "revoked_at": iso_utc(row.revoked_at),
        "last_used_at": iso_utc(row.last_used_at),
    }


def list_tokens(engine: Engine) -> list[dict[str, Any]]:
    """Every token (never a secret or hash), newest first."""
    from sqlalchemy import select

    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import AdminToken

    with session_factory(engine)() as session:
        rows = session.scalars(select(AdminToken).order_by(AdminToken.created_at.desc()))
        return [_row(r) for r in rows]
