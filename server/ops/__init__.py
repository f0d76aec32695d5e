"""Admin operations: each ``edgefl server`` admin command defined once, run anywhere.

An :class:`Operation` is one admin command's contract: its name, the least role that
may run it, its parameters (a pydantic model), whether it changes the deployment (then
every call, allowed or not, is written to the audit log), and a handler that takes an
:class:`OpContext` and the validated parameters and returns a JSON-ready value.

The same definition serves three callers:

- the CLI on the server host (``edgefl server devices``): :func:`invoke` with a local
  :class:`~edgefl.server.audit.Principal` and a context opened from ``server.yaml``;
- the admin API (``POST /api/v1/ops/{name}``): :func:`invoke` with the principal its
  authentication found (an admin certificate or an API token) and the server's context;
- the CLI on a laptop (``edgefl server devices --server URL``): the admin client sends the
  same name and arguments to the API, and renders the same JSON.

So a command's checks (role, validation, not-found, audit) live in one place and cannot
differ between local and remote use. Handlers raise :class:`OpError` subclasses, which
carry the HTTP status the API answers with and the exit code the CLI ends with.

Operations register with :func:`operation` in the modules listed in
:data:`OPERATION_MODULES`; :func:`operations` imports them on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from edgefl.errors import BadInputError, ConfigError, EdgeflError, ExitCode
from edgefl.server.audit import Principal

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from edgefl.server.admin import AdminContext
    from edgefl.server.config import ServerConfig

__all__ = [
    "OPERATION_MODULES",
    "ROLE_RANK",
    "ConflictError",
    "ForbiddenError",
    "InvalidError",
    "NoParams",
    "NotFoundError",
    "OpContext",
    "OpError",
    "Operation",
    "Params",
    "UnavailableError",
    "invoke",
    "operation",
    "operations",
    "role_allows",
    "status_of",
]

ROLE_RANK: Final = {"viewer": 0, "operator": 1, "admin": 2}
"""Roles by rank: a principal may run an operation whose role ranks at or below its own."""

OPERATION_MODULES: Final[tuple[str, ...]] = (
    "fleet",
    "runs",
    "audit_ops",
    "releases",
    "enroll",
    "access",
    "maintenance",
    "background",
)
"""Modules whose import registers operations (``edgefl.server.ops.<name>``)."""


def role_allows(have: str, need: str) -> bool:
    """Whether role ``have`` may run an operation that needs role ``need``."""
    return ROLE_RANK.get(have, -1) >= ROLE_RANK[need]


class OpError(EdgeflError):
    """An operation refused or failed; ``status`` is the admin API's HTTP status."""

    status: int = 500
    exit_code = ExitCode.INTERNAL


class InvalidError(OpError):
    """Malformed or invalid arguments (HTTP 400)."""

    status = 400
    exit_code = ExitCode.BAD_INPUT


class ForbiddenError(OpError):
    """The principal's role does not allow the operation (HTTP 403)."""

    status = 403
    exit_code = ExitCode.USAGE


class NotFoundError(OpError):
    """An unknown device, run, release or operation (HTTP 404)."""

    status = 404
    exit_code = ExitCode.BAD_INPUT


class ConflictError(OpError):
    """The deployment's state does not allow it now (HTTP 409)."""

    status = 409
    exit_code = ExitCode.BAD_INPUT


class UnavailableError(OpError):
    """A service the operation needs is not running (HTTP 503)."""

    status = 503
    exit_code = ExitCode.SERVICE_UNAVAILABLE


def status_of(exc: EdgeflError) -> int:
    """The HTTP status for an error an operation raised (edgefl errors map by kind)."""
    if isinstance(exc, OpError):
        return exc.status
    if isinstance(exc, BadInputError):
        return 400
    if isinstance(exc, ConfigError):
        return 409
    if exc.exit_code is ExitCode.SERVICE_UNAVAILABLE:
        return 503
    return 500


class Params(BaseModel):
    """Base of operation parameters: unknown keys are refused, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    """An operation without parameters."""


P = TypeVar("P", bound=Params)


@dataclass(frozen=True)
class Operation:
    """One admin command's contract (see the module docstring).

    Attributes:
        name: Its name (``devices``, ``run-show``, ``admit`` ...), the API path's last part.
        summary: One line for help texts and the API's description.
        role: The least role that may run it (``viewer``, ``operator``, ``admin``).
        params: Its parameters' model.
        handler: ``handler(ctx, params)`` returns a JSON-ready value.
        mutating: It changes the deployment: every call is audited.
        target: What a call acts on, for the audit log (``params -> str``).
        secrets: Parameter names to redact in the audit log.
    """

    name: str
    summary: str
    role: str
    params: type[Params]
    handler: Callable[[OpContext, Any], Any]
    mutating: bool = False
    target: Callable[[Any], str] | None = None
    secrets: frozenset[str] = field(default_factory=frozenset)


_REGISTRY: dict[str, Operation] = {}


def operation(
    name: str,
    *,
    role: str,
    params: type[P],
    summary: str,
    mutating: bool = False,
    target: Callable[[P], str] | None = None,
    secrets: tuple[str, ...] = (),
) -> Callable[[Callable[[OpContext, P], Any]], Callable[[OpContext, P], Any]]:
    """Register the decorated function as the handler of operation ``name``."""
    if role not in ROLE_RANK:
        raise ValueError(f"role must be one of {tuple(ROLE_RANK)}, not {role!r}")

    def register(handler: Callable[[OpContext, P], Any]) -> Callable[[OpContext, P], Any]:
        if name in _REGISTRY and _REGISTRY[name].handler is not handler:
            raise ValueError(f"operation {name!r} is defined twice")
        _REGISTRY[name] = Operation(
            name, summary, role, params, handler, mutating, target, frozenset(secrets)
        )
        return handler

    return register


def operations() -> dict[str, Operation]:
    """Every registered operation by name (importing :data:`OPERATION_MODULES` first)."""
    for module in OPERATION_MODULES:
        importlib.import_module(f"edgefl.server.ops.{module}")
    return dict(_REGISTRY)


class OpContext:
    """What an operation runs against: the server's config and registry, and who asks.

    The registry engine and the SuperLink connection are opened on first use (and closed
    by :meth:`close` when this context opened them): most operations need only the
    registry, and listing devices must not wait for a SuperLink.

    Args:
        principal: Who runs the operation.
        config_path: ``server.yaml`` (``None``: the built-in defaults).
        config: The config already read (the server passes its own).
        engine: An engine to use instead of opening one (the server's; not disposed here).
    """

    def __init__(
        self,
        principal: Principal,
        *,
        config_path: Path | None = None,
        config: ServerConfig | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.principal = principal
        self.config_path = config_path
        self._config = config
        self._engine = engine
        self._owns_engine = engine is None
        self._admin: AdminContext | None = None

    @property
    def config(self) -> ServerConfig:
        """The server config (read on first use)."""
        if self._config is None:
            from edgefl.server.config import read_server_config

            self._config = read_server_config(self.config_path)
        return self._config

    @property
    def engine(self) -> Engine:
        """The registry, migrated to head (opened on first use)."""
        if self._engine is None:
            from edgefl.server.registry import make_engine, upgrade

            upgrade(self.config.resolved_db_url)
            self._engine = make_engine(self.config.resolved_db_url)
        return self._engine

    def admin(self, *, need_superlink: bool = True) -> AdminContext:
        """The CA, registry and SuperLink wrapper (:func:`edgefl.server.admin.connect`)."""
        if self._admin is None:
            from edgefl.server.admin import connect

            self._admin = connect(self.config_path, need_superlink=need_superlink)
        return self._admin

    def close(self) -> None:
        """Dispose of what this context opened."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._engine is not None and self._owns_engine:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> OpContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def invoke(name: str, arguments: Mapping[str, Any], ctx: OpContext) -> Any:
    """Run operation ``name`` for ``ctx.principal``: check, validate, run, audit.

    Raises:
        NotFoundError: No such operation (or the handler's own not-found).
        ForbiddenError: The principal's role is too low (audited when the operation mutates).
        InvalidError: The arguments do not validate (nothing runs).
        EdgeflError: What the handler raised (audited as ``error``).
    """
    from edgefl.server import audit

    op = operations().get(name)
    if op is None:
        raise NotFoundError(
            f"unknown operation {name!r}", hint="`edgefl server --help` lists the commands"
        )

    def record(outcome: str, detail: str, target: str = "") -> None:
        if op.mutating:
            audit.append(
                ctx.engine,
                ctx.principal,
                op.name,
                target=target,
                arguments=dict(arguments),
                secrets=op.secrets,
                outcome=outcome,
                detail=detail,
            )

    if not role_allows(ctx.principal.role, op.role):
        message = (
            f"{ctx.principal.name} (role {ctx.principal.role}) may not run {name!r}: "
            f"it needs the {op.role} role"
        )
        record("denied", message)
        raise ForbiddenError(message, hint="ask an admin for a certificate or token with that role")
    try:
        params = op.params.model_validate(dict(arguments))
    except ValidationError as exc:
        raise InvalidError(
            f"{name}: invalid arguments: {_validation_message(exc)}",
            hint=f"`edgefl server {name} --help` lists them",
        ) from exc
    target = op.target(params) if op.target is not None else ""
    try:
        result = op.handler(ctx, params)
    except EdgeflError as exc:
        record("error", str(exc), target)
        raise
    except Exception as exc:
        record("error", f"{type(exc).__name__}: {exc}", target)
        raise
    record("ok", "", target)
    return result
