"""What the admin API's routes share: :class:`AdminState` (in ``app.state.edgefl``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefl.server.admin_api.sessions import SessionStore
from edgefl.server.audit import Principal

if TYPE_CHECKING:
    from cryptography import x509
    from sqlalchemy import Engine

    from edgefl.server.config import ServerConfig
    from edgefl.server.ops import OpContext

__all__ = ["AdminState"]


@dataclass
class AdminState:
    """The server's side of the admin API.

    Attributes:
        config: The server config.
        config_path: Its file (``None``: built-in defaults); operations that open the
            SuperLink read it.
        engine: The registry (the server's engine; never disposed by a request).
        admin_ca_cert: The admin CA's certificate: client certificates must be signed by it.
        sessions: Browser sessions (token login).
        children: The supervised children's state (``edgefl server start``), or None.
        metrics_auth: Whether ``/metrics`` needs a principal (viewer).
    """

    config: ServerConfig
    config_path: Path | None
    engine: Engine
    admin_ca_cert: x509.Certificate
    sessions: SessionStore = field(default_factory=SessionStore)
    children: Callable[[], list[dict[str, Any]]] | None = None
    metrics_auth: bool = True

    def op_context(self, principal: Principal) -> OpContext:
        """A context for running operations as ``principal`` against this server."""
        from edgefl.server.ops import OpContext

        return OpContext(
            principal, config_path=self.config_path, config=self.config, engine=self.engine
        )
