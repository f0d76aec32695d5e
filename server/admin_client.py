"""The admin API's client: run an operation on a remote ``edgefl server``.

:func:`invoke_remote` sends ``POST /api/v1/ops/{name}`` with the arguments as a JSON
object, over HTTPS that verifies the server against the CA file given (the fleet CA's
``ca.pem``, which ``edgefl server admin-cert`` copies next to the admin certificate), and
authenticates with an admin client certificate (``cert_file``/``key_file``) or an API
token (``Authorization: Bearer efl_...``). It returns the operation's ``result``, or
raises the :class:`~edgefl.server.ops.OpError` subclass matching the server's status
with the server's message and hint, so a remote command fails exactly like a local one.

Where the settings come from is :class:`edgefl.server.cli_ops.RemoteOptions`' job
(flags, ``EDGEFL_SERVER``/``EDGEFL_ADMIN_TOKEN``, a client config file).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from edgefl.errors import ConfigError, ExitCode, ServiceUnavailableError
from edgefl.server.ops import (
    ConflictError,
    ForbiddenError,
    InvalidError,
    NotFoundError,
    OpError,
    UnavailableError,
)

if TYPE_CHECKING:
    from edgefl.server.cli_ops import RemoteOptions

__all__ = ["API_PREFIX", "UnauthenticatedError", "error_for_status", "invoke_remote"]

API_PREFIX: Final = "/api/v1"
"""Path prefix of every admin API route."""

DEFAULT_TIMEOUT_S: Final = 60.0


class UnauthenticatedError(OpError):
    """No valid admin credential: missing, expired, revoked or unknown (HTTP 401)."""

    status = 401
    exit_code = ExitCode.USAGE


_BY_STATUS: Final[dict[int, type[OpError]]] = {
    400: InvalidError,
    401: UnauthenticatedError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    503: UnavailableError,
}


def error_for_status(status: int, message: str, hint: str = "") -> OpError:
    """The :class:`OpError` subclass instance for an HTTP status (500 for the others)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        err = OpError(message, hint=hint)
        err.status = status
        return err
    return cls(message, hint=hint)


def _ssl_context(remote: RemoteOptions) -> ssl.SSLContext:
    ca = remote.ca
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot read the server CA file {ca}: {exc}",
            hint="pass --admin-ca (the ca.pem `edgefl server admin-cert` wrote)",
        ) from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if remote.cert is not None:
        if remote.key is None:
            raise ConfigError(
                "an admin certificate needs its key", hint="pass --admin-key with --admin-cert"
            )
        try:
            ctx.load_cert_chain(str(remote.cert), str(remote.key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the admin certificate {remote.cert} / {remote.key}: {exc}",
                hint="check the files `edgefl server admin-cert` wrote",
            ) from exc
    return ctx


def invoke_remote(
    name: str,
    arguments: Mapping[str, Any],
    remote: RemoteOptions,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Any:
    """Run operation ``name`` on the admin API ``remote.server``; return its result.

    Raises:
        OpError: The server refused or failed (the subclass for its HTTP status: 400
            :class:`InvalidError`, 401 :class:`UnauthenticatedError`, 403
            :class:`ForbiddenError`, 404, 409, 503), with its message and hint.
        ServiceUnavailableError: The server could not be reached, or the TLS handshake
            failed (e.g. a certificate the server does not accept).
        ConfigError: No server, unreadable CA or certificate files.
    """
    import httpx

    if not remote.server:
        raise ConfigError(
            "no admin API to send the command to",
            hint="pass --server https://HOST:PORT, set EDGEFL_SERVER, or use a client config",
        )
    url = remote.server.rstrip("/") + f"{API_PREFIX}/ops/{name}"
    headers = {"Accept": "application/json"}
    if remote.token and remote.cert is None:
        headers["Authorization"] = f"Bearer {remote.token}"
    try:
        with httpx.Client(verify=_ssl_context(remote), timeout=timeout) as client:
            response = client.post(url, json=dict(arguments), headers=headers)
    except httpx.ConnectError as exc:
        text = str(exc)
        hint = (
            "the TLS handshake failed: check --admin-ca (the server's CA) and that the "
            "certificate is an admin certificate of this server"
            if "SSL" in text or "certificate" in text.lower() or "handshake" in text.lower()
            else "is `edgefl server start` running there, with the admin API enabled?"
        )
        raise ServiceUnavailableError(f"cannot reach {remote.server}: {text}", hint=hint) from exc
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(
            f"admin API {remote.server}: {type(exc).__name__}: {exc}",
            hint="check the address and the network, then retry",
        ) from exc
    try:
        body = response.json()
    except (json.JSONDecodeError, ValueError):
        body = None
    if response.status_code == 200 and isinstance(body, dict) and "result" in body:
        return body["result"]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        raise error_for_status(
            int(error.get("status", response.status_code)),
            str(error.get("message", "")),
            str(error.get("hint", "") or ""),
        )
    raise error_for_status(
        response.status_code if response.status_code >= 400 else 502,
        f"admin API {remote.server} answered HTTP {response.status_code} without a result: "
        f"{response.text[:200]!r}",
        "is the address an edgefl admin API?",
    )
