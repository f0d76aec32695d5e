"""The endpoint source: a local HTTP endpoint (loopback TCP and/or a Unix socket) for samples.

A sensor process POSTs to ``/samples`` one sample or many, as JSON (``{"x": [...], "y":
label?}`` or ``{"samples": [...]}``) or as an ``.npy`` (``application/x-npy``). Each
request is checked whole and queued whole, or refused whole with a status and a JSON
``{"error": reason, "detail": what to do}``:

====  =====================================================================
202   queued: ``{"accepted": n, "first_index": i, "queued": q}``
400   a bad sample (shape, dtype, NaN, label ...), or not JSON / not ``.npy``
401   the bearer token is missing or wrong (when ``http.token_file`` is set)
403   a peer that is not on this machine
411   no ``Content-Length`` (chunked bodies are not taken)
413   the body is over ``max_body_bytes`` (refused before it is read), or
      more samples than the queue holds
415   a content type other than JSON or ``.npy``
429   the queue is full: retry later (``Retry-After``)
503   ``max_connections`` connections are open already
====  =====================================================================

``GET /`` describes the source (what it expects, how full its queue is). Each refusal is
counted under its reason in :attr:`~edgefl.edge_agent.sources.DataSource.rejected`.

The server is the standard library's (``http.server`` over ``socketserver``), one
thread per connection up to ``max_connections``; the source's queue is the only place
samples wait, so memory stays bounded by ``queue_size`` samples plus ``max_connections``
bodies in flight.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import os
import socket
import socketserver
import stat
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, field_validator, model_validator

from edgefl.config import Address, StrictModel
from edgefl.edge_agent.sources._base import PushSource
from edgefl.edge_agent.sources._samples import SampleError, read_json, read_npy, split_batch
from edgefl.errors import ConfigError
from edgefl.proto.ids import ID_REGEX

__all__ = ["EndpointConfig", "EndpointHttp", "EndpointSource", "EndpointUnixSocket"]

logger = logging.getLogger("edgefl.edge_agent.sources")

SAMPLES_PATH = "/samples"
JSON_TYPES = frozenset({"application/json"})
NPY_TYPES = frozenset({"application/x-npy", "application/npy"})

_STATUS_OF = {
    "too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "too_many": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "queue_full": HTTPStatus.TOO_MANY_REQUESTS,
    "unsupported_type": HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    "unauthorized": HTTPStatus.UNAUTHORIZED,
    "forbidden": HTTPStatus.FORBIDDEN,
    "no_length": HTTPStatus.LENGTH_REQUIRED,
    "not_found": HTTPStatus.NOT_FOUND,
    "busy": HTTPStatus.SERVICE_UNAVAILABLE,
}
"""HTTP status of each refusal; any other reason is a 400."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EndpointHttp(Address):
    """The endpoint's TCP side: loopback only unless said otherwise."""

    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address to listen on: an IP literal or localhost; loopback unless "
        "allow_non_loopback.",
    )
    port: int = Field(8181, ge=0, le=65535, description="TCP port (0: any free port).")
    token_file: Path | None = Field(
        None,
        description="File holding a bearer token every request must present "
        "(Authorization: Bearer ...); mode 0600.",
    )
    allow_non_loopback: bool = Field(
        False,
        description="Listen beyond this machine (needs token_file; the endpoint has no TLS).",
    )

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> EndpointHttp:
        host = self.host
        if host != "localhost":
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(
                    f"host {host!r} is not an IP address: give one (127.0.0.1, ::1) or localhost"
                ) from None
        if not _is_loopback(host) and not self.allow_non_loopback:
            raise ValueError(
                f"host {host} is not a loopback address: the endpoint takes samples without "
                "TLS, so it listens on 127.0.0.1 (or ::1); to listen beyond this machine set "
                "allow_non_loopback: true and a token_file"
            )
        if self.allow_non_loopback and self.token_file is None:
            raise ValueError("allow_non_loopback needs a token_file (a bearer token)")
        return self


class EndpointUnixSocket(StrictModel):
    """The endpoint's Unix-socket side (HTTP over the socket: ``curl --unix-socket``)."""

    path: Path = Field(description="Socket path; its folder must exist.")
    mode: int = Field(
        0o600,
        ge=0,
        le=0o777,
        description='Permission bits of the socket file ("0660" to let a group write).',
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _octal_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ValueError(f"mode {value!r} is not octal, e.g. '0600'") from None
        return value


class EndpointConfig(StrictModel):
    """A local endpoint a sensor process posts samples to (JSON or ``.npy``)."""

    type: Literal["endpoint"] = "endpoint"
    name: str = Field("endpoint", description="Name of this source in logs and status.")
    http: EndpointHttp | None = Field(
        None, description="Listen on TCP (loopback by default): {host, port, token_file}."
    )
    unix_socket: EndpointUnixSocket | None = Field(
        None, description="Listen on a Unix socket: {path, mode}."
    )
    shape: list[int] | None = Field(
        None, min_length=1, description="Shape of one sample, checked besides the model's."
    )
    dtype: Literal["float32", "float16", "float64", "int8", "uint8", "int16", "int32"] | None = (
        Field(None, description="Values must fit this dtype, besides the model's.")
    )
    stream: str = Field("samples", pattern=ID_REGEX)
    kind: Literal["data", "telemetry"] = "data"
    evaluation: bool = Field(
        False, description="Labelled held-out samples: scored, never stored for training."
    )
    queue_size: int = Field(
        1000, ge=1, le=1_000_000, description="Samples waiting at most; beyond, 429."
    )
    max_body_bytes: int = Field(
        1 << 20, ge=64, le=1 << 30, description="Largest request body; beyond, 413."
    )
    max_connections: int = Field(
        16, ge=1, le=1024, description="Connections served at once; beyond, 503."
    )
    request_timeout_s: float = Field(
        10.0, gt=0, le=600, description="A connection idle (or sending) this long is closed."
    )

    @field_validator("shape")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(d < 1 for d in value):
            raise ValueError(f"every dimension is at least 1, got {value}")
        return value

    @model_validator(mode="after")
    def _somewhere_to_listen(self) -> EndpointConfig:
        if self.http is None and self.unix_socket is None:
            raise ValueError(
                "an endpoint listens somewhere: give http: {port: 8181} and/or unix_socket: "
                "{path: /run/edgefl/samples.sock}"
            )
        return self


class EndpointSource(PushSource):
    """Serves the endpoint in background threads; :meth:`due` hands out what was posted.

    The sockets are bound when the source is built (a port or path in use is a
    :class:`~edgefl.errors.ConfigError`); :meth:`close` stops the servers and removes the
    socket file.
    """

    def __init__(self, config: EndpointConfig) -> None:
        super().__init__(
            config.name,
            stream=config.stream,
            kind=config.kind,
            queue_size=config.queue_size,
            shape=config.shape,
            dtype=config.dtype,
            evaluation=config.evaluation,
        )
        self.config = config
        self._token: bytes | None = None
        self._servers: list[_LimitedServer] = []
        self._threads: list[threading.Thread] = []
        self._socket_path: Path | None = None
        self._socket_ino: int | None = None
        self._closed = False
        try:
            if config.http is not None:
                if config.http.token_file is not None:
                    self._token = _read_token(config.http.token_file)
                self._servers.append(self._tcp_server(config.http))
            if config.unix_socket is not None:
                self._servers.append(self._unix_server(config.unix_socket))
        except BaseException:
            self.close()
            raise
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.2},
                name=f"source-{config.name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        for where in self.addresses:
            logger.info("source %s takes samples at %s", self.name, where)

    @property
    def http_address(self) -> tuple[str, int] | None:
        """``(host, port)`` the TCP side listens on (the real port when 0 was asked)."""
        for server in self._servers:
            if isinstance(server, _TcpServer):
                host, port = server.server_address[:2]
                return str(host), int(port)
        return None

    @property
    def socket_path(self) -> Path | None:
        """The Unix socket's path, when there is one."""
        return self._socket_path

    @property
    def addresses(self) -> list[str]:
        """Where samples are taken, as URLs (``unix:`` for the socket)."""
        out = []
        address = self.http_address
        if address is not None:
            host, port = address
            out.append(f"http://{f'[{host}]' if ':' in host else host}:{port}{SAMPLES_PATH}")
        if self._socket_path is not None:
            out.append(f"unix:{self._socket_path} {SAMPLES_PATH}")
        return out

    def status(self) -> dict[str, Any]:
        """Adds where the endpoint listens."""
        return {**super().status(), "addresses": self.addresses}

    def close(self) -> None:
        """Stop serving and remove the socket file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for server, _ in zip(self._servers, self._threads, strict=False):
            server.shutdown()  # its thread started: serve_forever returns promptly
        for server in self._servers:
            server.server_close()
        for thread in self._threads:
            thread.join(5.0)
        if self._socket_path is not None and self._socket_ino is not None:
            with contextlib.suppress(OSError):
                if os.lstat(self._socket_path).st_ino == self._socket_ino:
                    os.unlink(self._socket_path)

    # ---- the servers -------------------------------------------------------------------

    def _tcp_server(self, http: EndpointHttp) -> _LimitedServer:
        host = "127.0.0.1" if http.host == "localhost" else http.host
        cls = _Tcp6Server if ":" in host else _TcpServer
        try:
            return cls((host, http.port), self)
        except OSError as exc:
            raise ConfigError(
                f"source {self.name}: cannot listen on {host}:{http.port}: {exc.strerror}",
                hint="pick another port (0: any free one) or stop what holds it",
            ) from exc

    def _unix_server(self, unix: EndpointUnixSocket) -> _LimitedServer:
        path = unix.path.absolute()
        _clear_stale_socket(path, self.name)
        server = _UnixServer(self)
        try:
            _bind_private(server.socket, path, unix.mode)
            server.server_address = str(path)
            server.server_activate()
        except BaseException:
            server.server_close()
            raise
        self._socket_path = path
        self._socket_ino = os.lstat(path).st_ino
        return server

    # ---- requests ----------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (always, without one)."""
        if self._token is None:
            return True
        scheme, _, value = (header or "").partition(" ")
        given = value.strip().encode() if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(given, self._token)

    def take(self, content_type: str, body: bytes) -> dict[str, Any]:
        """Parse, check and queue one request's samples; the 202 answer.

        Raises:
            SampleError: Refused (counted under its reason).
        """
        try:
            if content_type in JSON_TYPES:
                samples = read_json(body, max_samples=self.queue_size)
            else:
                shapes, _ = self.constraints()
                samples = split_batch(read_npy(body), shapes, max_samples=self.queue_size)
        except SampleError as exc:
            self.reject(exc.reason)
            raise
        first = self.offer(samples)
        return {"accepted": len(samples), "first_index": first, "queued": self.queued}

    def describe(self) -> dict[str, Any]:
        """The ``GET /`` document."""
        shapes, dtypes = self.constraints()
        return {
            "source": self.name,
            "post": SAMPLES_PATH,
            "content_types": sorted(JSON_TYPES | NPY_TYPES),
            "expects": {
                "shape": list(shapes[-1]) if shapes else None,
                "dtypes": dtypes,
            },
            "queued": self.queued,
            "queue_size": self.queue_size,
            "max_body_bytes": self.config.max_body_bytes,
        }


def _read_token(path: Path) -> bytes:
    try:
        info = os.stat(path)
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the endpoint token file {path}: {exc.strerror}") from exc
    if info.st_mode & 0o077:
        raise ConfigError(
            f"the endpoint token file {path} is readable by others "
            f"(mode {stat.S_IMODE(info.st_mode):04o})",
            hint=f"chmod 600 {path}",
        )
    if len(token) < 16:
        raise ConfigError(
            f"the endpoint token in {path} is {len(token)} bytes; use at least 16",
            hint="e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE",
        )
    return token


def _clear_stale_socket(path: Path, name: str) -> None:
    """Remove a socket file nobody listens on; refuse a live one or any other file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(
            f"source {name}: {path} exists and is not a socket; it is left alone",
            hint="choose another unix_socket.path or remove that file",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"source {name}: cannot check {path}: {exc.strerror}") from exc
        os.unlink(path)  # left behind by a process that ended
        return
    finally:
        probe.close()
    raise ConfigError(
        f"source {name}: another process listens on {path}",
        hint="stop it, or choose another unix_socket.path",
    )


def _bind_private(sock: socket.socket, path: Path, mode: int) -> None:
    """Bind ``sock`` at ``path`` with ``mode`` and no moment where it is more open.

    The socket is bound inside a fresh 0700 folder next to ``path``, given its mode, then
    renamed into place (the umask is process-wide, so it is not touched).
    """
    private = Path(tempfile.mkdtemp(prefix=".s", dir=path.parent))
    staged = private / "s"
    try:
        if len(os.fsencode(staged)) > 107:
            raise ConfigError(
                f"socket path {path} is too long to bind (Unix sockets allow about 100 bytes)",
                hint="choose a shorter unix_socket.path",
            )
        sock.bind(str(staged))
        os.chmod(staged, mode)
        os.rename(staged, path)
    except OSError as exc:
        raise ConfigError(f"cannot create the socket {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()
        with contextlib.suppress(OSError):
            private.rmdir()


class _LimitedServer(socketserver.ThreadingMixIn, socketserver.BaseServer):
    """One thread per connection, at most ``max_connections`` at once (503 beyond)."""

    daemon_threads = True
    block_on_close = False
    source: EndpointSource

    def init_limits(self, source: EndpointSource) -> None:
        self.source = source
        self._slots = threading.BoundedSemaphore(source.config.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.source.reject("busy")
            body = b'{"error":"busy","detail":"too many connections; retry shortly"}'
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
            with contextlib.suppress(OSError):
                request.close()
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A connection that failed mid-way is the sender's problem: logged, never printed.
        logger.warning("source %s: a request failed", self.source.name, exc_info=True)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        # Answer first, then drain a little of what the client still sends (a refused
        # body), so closing does not reset the connection before it reads the answer.
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
            request.settimeout(0.5)
            drained = 0
            while drained < 256 * 1024:
                chunk = request.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        request.close()


class _TcpServer(_LimitedServer, socketserver.TCPServer):
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], source: EndpointSource) -> None:
        self.init_limits(source)
        socketserver.TCPServer.__init__(self, address, _Handler)


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(_LimitedServer, socketserver.UnixStreamServer):
    def __init__(self, source: EndpointSource) -> None:
        self.init_limits(source)
        # Bound by _bind_private, not by the path the base class would bind.
        socketserver.UnixStreamServer.__init__(self, "", _Handler, bind_and_activate=False)


class _RefusedError(Exception):
    def __init__(self, reason: str, detail: str, *, unread: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.unread = unread


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgefl-endpoint"
    sys_version = ""

    @property
    def source(self) -> EndpointSource:
        return cast(_LimitedServer, self.server).source

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.source.config.request_timeout_s)

    def address_string(self) -> str:
        address = self.client_address
        return str(address[0]) if isinstance(address, tuple) and address else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("source %s: %s %s", self.source.name, self.address_string(), format % args)

    # ---- checks before the body --------------------------------------------------------

    def _check_peer(self) -> None:
        source = self.source
        http = source.config.http
        address = self.client_address
        if not isinstance(address, tuple) or not address:
            return  # the Unix socket: its file mode decides who connects
        if http is not None and http.allow_non_loopback:
            return
        if not _is_loopback(str(address[0])):
            raise _RefusedError("forbidden", "this endpoint takes samples from this machine only")

    def _check_headers(self) -> tuple[str, int]:
        """The content type and length of a POST that may be read, or :class:`_RefusedError`."""
        self._check_peer()
        source = self.source
        if self.path.split("?", 1)[0] != SAMPLES_PATH:
            raise _RefusedError("not_found", f"POST samples to {SAMPLES_PATH}", unread=True)
        if not source.authorized(self.headers.get("Authorization")):
            raise _RefusedError(
                "unauthorized", "send Authorization: Bearer <the token>", unread=True
            )
        if self.headers.get("Transfer-Encoding"):
            raise _RefusedError(
                "no_length", "send a Content-Length; chunked bodies are not taken", unread=True
            )
        text = self.headers.get("Content-Length")
        if text is None:
            raise _RefusedError("no_length", "send a Content-Length", unread=True)
        try:
            length = int(text)
        except ValueError:
            length = -1
        if length < 0:
            raise _RefusedError("bad_request", f"bad Content-Length {text!r}", unread=True)
        limit = source.config.max_body_bytes
        if length > limit:
            raise _RefusedError(
                "too_large",
                f"a body of {length} bytes is over this endpoint's {limit}; send fewer "
                "samples per request",
                unread=True,
            )
        content_type = (self.headers.get_content_type() or "").lower()
        if content_type not in JSON_TYPES | NPY_TYPES:
            raise _RefusedError(
                "unsupported_type",
                f"Content-Type {content_type} is not taken; send application/json or "
                "application/x-npy",
                unread=True,
            )
        return content_type, length

    def handle_expect_100(self) -> bool:
        try:
            self._check_headers()
        except _RefusedError as refusal:
            self._refuse(refusal)
            return False
        return super().handle_expect_100()

    # ---- methods -----------------------------------------------------------------------

    def do_POST(self) -> None:
        try:
            content_type, length = self._check_headers()
        except _RefusedError as refusal:
            self._refuse(refusal)
            return
        try:
            body = self.rfile.read(length)
        except OSError:  # the sender stalled past request_timeout_s, or went away
            body = b""
        if len(body) != length:
            self.source.reject("incomplete")
            self.close_connection = True
            return
        try:
            answer = self.source.take(content_type, body)
        except SampleError as exc:
            self._answer(_status(exc.reason), {"error": exc.reason, "detail": exc.message})
            return
        self._answer(HTTPStatus.ACCEPTED, answer)

    def do_GET(self) -> None:
        try:
            self._check_peer()
            if not self.source.authorized(self.headers.get("Authorization")):
                raise _RefusedError("unauthorized", "send Authorization: Bearer <the token>")
        except _RefusedError as refusal:
            self._refuse(refusal)
            return
        if self.path.split("?", 1)[0] != "/":
            self._answer(HTTPStatus.NOT_FOUND, {"error": "not_found", "detail": "GET /"})
            return
        self._answer(HTTPStatus.OK, self.source.describe())

    def _refuse(self, refusal: _RefusedError) -> None:
        self.source.reject(refusal.reason)
        if refusal.unread:
            self.close_connection = True
        headers = {"WWW-Authenticate": "Bearer"} if refusal.reason == "unauthorized" else {}
        self._answer(
            _status(refusal.reason),
            {"error": refusal.reason, "detail": refusal.detail},
            headers=headers,
            close=refusal.unread,
        )

    def _answer(
        self,
        status: HTTPStatus,
        doc: dict[str, Any],
        *,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        data = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.TOO_MANY_REQUESTS:
            self.send_header("Retry-After", "1")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)


def _status(reason: str) -> HTTPStatus:
    return _STATUS_OF.get(reason, HTTPStatus.BAD_REQUEST)
