"""The admin API served by uvicorn in a thread of the server process, over HTTPS.

TLS: the server certificate is the fleet CA's server certificate (``<ca_dir>/server/``,
for the server's configured host names and IPs; clients check it against the fleet CA's
``ca.pem``, which ``edgefl server admin-cert`` copies next to the admin certificate). The
TLS layer requests a client certificate without requiring one (``CERT_OPTIONAL``): token
clients connect without. A presented certificate must chain to the admin CA or the fleet
CA (anything else fails the handshake); dates are not checked there, so that the API can
answer an expired admin certificate with a 401 that says so, and a fleet (device)
certificate with a 403 (:mod:`edgefl.server.admin_api.auth`). TLS 1.2 at least.

uvicorn puts no TLS details in the ASGI scope, so :class:`_TlsH11Protocol` (its h11
protocol) copies each connection's client certificate into the scope's ``state``, where
:func:`edgefl.server.admin_api.auth.peer_cert_der` finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from edgefl.errors import ConfigError, ServiceUnavailableError
from edgefl.server.admin_api.auth import PEER_CERT_KEY

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy import Engine

    from edgefl.server.config import ServerConfig

__all__ = ["AdminServer", "TlsSettings", "admin_server_for", "server_ssl_context"]

log = logging.getLogger(__name__)

_X509_V_FLAG_NO_CHECK_TIME: Final = 0x200000
"""OpenSSL's flag: verify signatures, not dates (the API checks dates with a message)."""


class TlsSettings:
    """The files the admin API's TLS uses.

    Args:
        cert_file: The server certificate (PEM).
        key_file: Its key.
        client_ca_files: CA certificates a client certificate may chain to (the admin CA
            and the fleet CA; the API itself accepts only the admin CA's).
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_files: list[Path]) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_files = client_ca_files


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The admin API's TLS context (see the module docstring).

    Raises:
        ConfigError: A file is missing or unusable.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        for ca in tls.client_ca_files:
            ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"admin API TLS: {exc}", hint="check the admin: section's files") from exc
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags = ssl.VerifyFlags(int(ctx.verify_flags) | _X509_V_FLAG_NO_CHECK_TIME)
    return ctx


def _protocol_class() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _TlsH11Protocol(H11Protocol):
        """uvicorn's h11 protocol, with the client certificate in each request's scope."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            # A per-connection copy: the scope's state starts from it on every request.
            self.app_state = {**self.app_state, PEER_CERT_KEY: der}

    return _TlsH11Protocol


class AdminServer:
    """uvicorn serving ``app`` over HTTPS on ``host:port`` in a daemon thread.

    Args:
        app: The application (:func:`edgefl.server.admin_api.app.create_app`).
        host: Address to listen on.
        port: Port; 0 picks a free one (:attr:`port` says which after :meth:`start`).
        tls: Certificate files (:class:`TlsSettings`).
    """

    def __init__(self, app: FastAPI, host: str, port: int, tls: TlsSettings) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.tls = tls
        self.port = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        """``https://HOST:PORT`` (a wildcard host shown as 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"https://[{host}]:{self.port}" if ":" in host else f"https://{host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Bind, start serving, and return once uvicorn accepts connections.

        Raises:
            ConfigError: Unusable TLS files.
            ServiceUnavailableError: The port cannot be bound, or uvicorn did not start.
        """
        import uvicorn

        context = server_ssl_context(self.tls)  # fail here, with a clear message
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise ServiceUnavailableError(
                f"admin API: cannot listen on {self.host}:{self.requested_port}: {exc.strerror}",
                hint="choose another admin.port (0 picks a free one)",
            ) from exc
        sock.listen(128)
        sock.set_inheritable(True)
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        self.requested_port = self.port  # a restart (renewed certificate) keeps the port
        config = uvicorn.Config(
            self.app,
            http=_protocol_class(),
            lifespan="off",
            log_level="warning",
            access_log=False,
            ssl_certfile=str(self.tls.cert_file),  # uvicorn needs it to mean "TLS on"
            ssl_context_factory=lambda _config, _default: context,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        server = self._server
        self._thread = threading.Thread(
            target=lambda: server.run(sockets=[sock]), name="edgefl-admin-api", daemon=True
        )
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if server.started:
                log.info("admin API on %s", self.url)
                return
            if not self._thread.is_alive():
                break
            deadline.wait(0.02)
        self.stop()
        raise ServiceUnavailableError(
            "admin API: uvicorn did not start", hint="see the server's log"
        )

    @property
    def pid(self) -> int | None:
        """None: the API is a thread of the server process, no process of its own.

        (server.json's ``pids`` name processes a successor may end after a crash; the
        server's own PID must not be among the children.)
        """
        return None

    def running(self) -> bool:
        """Whether the serving thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None
        self._server = None


def admin_server_for(
    config: ServerConfig,
    *,
    config_path: Path | None,
    engine: Engine,
    children: Callable[[], list[dict[str, Any]]] | None = None,
) -> AdminServer:
    """The admin API of ``edgefl server start`` (its ``admin:`` section), not started yet.

    The admin CA is created in ``<ca_dir>/admin`` when missing.

    Raises:
        ConfigError: The fleet CA's server certificate is missing (the server makes it at
            start-up), or the admin CA cannot be created.
    """
    from edgefl.server.admin_api.app import create_app
    from edgefl.server.admin_api.sessions import SessionStore
    from edgefl.server.admin_api.state import AdminState
    from edgefl.server.admin_ca import open_admin_ca

    section = config.admin
    ca_dir = config.resolved_ca_dir
    try:
        admin_ca = open_admin_ca(ca_dir)
    except OSError as exc:
        raise ConfigError(f"admin CA in {ca_dir}: {exc}") from exc
    cert_file = section.tls.cert_file or ca_dir / "server" / "cert.pem"
    key_file = section.tls.key_file or ca_dir / "server" / "key.pem"
    state = AdminState(
        config=config,
        config_path=config_path,
        engine=engine,
        admin_ca_cert=admin_ca.cert,
        sessions=SessionStore(section.session_ttl_s),
        children=children,
        metrics_auth=section.metrics_auth,
    )
    tls = TlsSettings(cert_file, key_file, [admin_ca.cert_path, ca_dir / "ca.pem"])
    return AdminServer(create_app(state), section.host, section.port, tls)
