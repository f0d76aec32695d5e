"""Access operations: admin certificates and API tokens (role admin).

- ``admin-cert``: issue a client certificate of the admin CA (:mod:`edgefl.server.admin_ca`)
  for a person, with a role; the answer carries the certificate, its key (the only copy:
  the server keeps none), and the CA certificate the server's TLS certificate chains to;
- ``admin-certs``: list them (``admin_certs``);
- ``admin-token``: make an API token (:mod:`edgefl.server.admin_tokens`); the answer is
  the only place the token ever appears;
- ``admin-tokens``: list them (never a secret);
- ``admin-revoke``: revoke a person's admin certificates (by name or serial) or a token.

The changing ones are audited like every mutating operation; their arguments hold no
secret (a token or key only ever appears in an answer).
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, model_validator

from edgefl.errors import BadInputError
from edgefl.server.ops import InvalidError, NoParams, NotFoundError, OpContext, Params, operation

__all__: list[str] = []

Role = Literal["viewer", "operator", "admin"]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


class AdminCertParams(Params):
    """``admin-cert NAME --role ROLE [--days N]``."""

    name: str = Field(pattern=_NAME, description="Who the certificate is for (its CN).")
    role: Role = Field(description="viewer, operator or admin (in the certificate's OU).")
    days: float = Field(365.0, gt=0, le=3650, description="Validity in days.")


@operation(
    "admin-cert",
    role="admin",
    params=AdminCertParams,
    summary="Issue an admin client certificate (separate admin CA) with a role",
    mutating=True,
    target=lambda p: f"{p.name} ({p.role})",
)
def admin_cert(ctx: OpContext, params: AdminCertParams) -> dict[str, Any]:
    """Issue the certificate, record it, return it with its key and the server's CA."""
    from edgefl.server.admin_ca import open_admin_ca, record_issued

    ca_dir = ctx.config.resolved_ca_dir
    try:
        ca = open_admin_ca(ca_dir)
        issued = ca.issue_admin_cert(params.name, params.role, days=params.days)
    except BadInputError as exc:
        raise InvalidError(exc.message, hint=exc.hint) from exc
    record_issued(ctx.engine, issued)
    try:
        server_ca = (ca_dir / "ca.pem").read_text(encoding="ascii")
    except OSError:
        server_ca = None
    return {
        "name": issued.name,
        "role": issued.role,
        "serial": issued.serial_hex,
        "expires_at": issued.not_after.isoformat(),
        "cert_pem": issued.cert_pem.decode("ascii"),
        "key_pem": issued.key_pem.decode("ascii"),
        "server_ca_pem": server_ca,
    }


@operation(
    "admin-certs",
    role="admin",
    params=NoParams,
    summary="List the admin certificates issued (name, role, state, dates)",
)
def admin_certs(ctx: OpContext, _params: NoParams) -> dict[str, Any]:
    """Every admin certificate, newest first."""
    from edgefl.server.admin_ca import list_admin_certs

    return {"certs": list_admin_certs(ctx.engine)}


class AdminTokenParams(Params):
    """``admin-token NAME --role ROLE --expires 30d``."""

    name: str = Field(pattern=_NAME, description="Who the token is for.")
    role: Role = Field(description="viewer, operator or admin.")
    expires: str = Field("30d", description="Lifetime: 45s, 90m, 12h, 30d, 2w.")


@operation(
    "admin-token",
    role="admin",
    params=AdminTokenParams,
    summary="Make an API token with a role and an expiry (shown once)",
    mutating=True,
    target=lambda p: f"{p.name} ({p.role})",
)
def admin_token(ctx: OpContext, params: AdminTokenParams) -> dict[str, Any]:
    """Make the token; the answer is the only copy of it."""
    from edgefl.server import admin_tokens

    try:
        issued = admin_tokens.create(
            ctx.engine,
            params.name,
            params.role,
            expires_in=admin_tokens.parse_duration(params.expires),
        )
    except BadInputError as exc:
        raise InvalidError(exc.message, hint=exc.hint) from exc
    return {
        "id": issued.id,
        "name": issued.name,
        "role": issued.role,
        "expires_at": issued.expires_at.isoformat(),
        "token": issued.token,
    }


@operation(
    "admin-tokens",
    role="admin",
    params=NoParams,
    summary="List the API tokens (id, name, role, state, dates; never a secret)",
)
def admin_tokens_list(ctx: OpContext, _params: NoParams) -> dict[str, Any]:
    """Every token, newest first."""
    from edgefl.server import admin_tokens

    return {"tokens": admin_tokens.list_tokens(ctx.engine)}


class AdminRevokeParams(Params):
    """``admin-revoke [NAME] [--serial HEX] [--token ID]``: exactly one of them."""

    name: str | None = Field(None, description="Revoke every admin certificate of NAME.")
    serial: str | None = Field(None, pattern=r"^(0x)?[0-9a-fA-F]{1,64}$")
    token_id: str | None = Field(None, pattern=r"^[0-9a-f]{12}$", description="A token's id.")

    @model_validator(mode="after")
    def _one(self) -> Self:
        given = [v for v in (self.name, self.serial, self.token_id) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of name, serial or token_id")
        return self


def _revoke_target(p: AdminRevokeParams) -> str:
    if p.token_id is not None:
        return f"token {p.token_id}"
    return f"cert {p.name}" if p.name is not None else f"cert serial {p.serial}"


@operation(
    "admin-revoke",
    role="admin",
    params=AdminRevokeParams,
    summary="Revoke admin certificates (by name or serial) or an API token",
    mutating=True,
    target=_revoke_target,
)
def admin_revoke(ctx: OpContext, params: AdminRevokeParams) -> dict[str, Any]:
    """Revoke; the API refuses the credential from the next request on."""
    from edgefl.server import admin_tokens
    from edgefl.server.admin_ca import open_admin_ca, revoke_admin_certs

    try:
        if params.token_id is not None:
            return {"tokens": [admin_tokens.revoke(ctx.engine, params.token_id)], "certs": []}
        ca = open_admin_ca(ctx.config.resolved_ca_dir)
        certs = revoke_admin_certs(ctx.engine, ca, name=params.name, serial=params.serial)
    except BadInputError as exc:
        raise NotFoundError(exc.message, hint=exc.hint) from exc
    return {"certs": certs, "tokens": []}
