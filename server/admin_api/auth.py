"""Who an admin API request comes from: a certificate, a bearer token or a session.

Checked in this order (the first credential present decides; a bad one is never
skipped in favour of the next):

1. **A TLS client certificate.** The TLS layer asks for one but does not require it
   (``CERT_OPTIONAL``, so token clients and browsers without one connect) and checks its
   signature against the admin CA and the fleet CA, without checking dates. Then
   :func:`edgefl.server.admin_ca.verify_admin_cert` accepts it only if the **admin CA**
   signed it, now is within its validity, and the registry lists it unrevoked with the
   same role: a device's fleet-CA certificate gets 403, an expired or revoked admin
   certificate 401, each with a message saying so. (The fleet CA is trusted by the TLS
   layer only so that a device certificate reaches this clear refusal; a certificate of
   any other CA fails the handshake.)
2. **``Authorization: Bearer efl_<id>_<secret>``**: :func:`edgefl.server.admin_tokens.authenticate`.
3. **The session cookie** of a token login (:mod:`.sessions`); an unsafe method must
   carry the session's CSRF token.

No credential: 401.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from starlette.concurrency import run_in_threadpool

from edgefl.server.admin_api.sessions import SESSION_COOKIE, check_csrf
from edgefl.server.admin_client import UnauthenticatedError
from edgefl.server.audit import Principal
from edgefl.server.ops import ForbiddenError

if TYPE_CHECKING:
    from starlette.requests import Request

    from edgefl.server.admin_api.state import AdminState

__all__ = ["PEER_CERT_KEY", "authenticate", "peer_cert_der"]

PEER_CERT_KEY: Final = "edgefl_peer_cert_der"
"""Key of the connection's client certificate (DER) in the ASGI scope's ``state``."""

_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_CACHE_KEY: Final = "edgefl.principal"


def peer_cert_der(request: Request) -> bytes | None:
    """The DER client certificate of the request's TLS connection, or None."""
    state = request.scope.get("state") or {}
    der = state.get(PEER_CERT_KEY)
    return der if isinstance(der, bytes) and der else None


async def authenticate(request: Request, state: AdminState) -> Principal:
    """The principal of ``request`` (cached on the request; see the module docstring).

    Raises:
        UnauthenticatedError: No credential, or an expired, revoked or unknown one (401).
        ForbiddenError: A certificate that is no admin certificate, or a session request
            without its CSRF token (403).
    """
    cached = request.scope.get(_CACHE_KEY)
    if isinstance(cached, Principal):
        return cached
    principal = await _authenticate(request, state)
    request.scope[_CACHE_KEY] = principal
    return principal


async def _authenticate(request: Request, state: AdminState) -> Principal:
    from cryptography import x509

    from edgefl.server import admin_tokens
    from edgefl.server.admin_ca import AdminCertRefusedError, verify_admin_cert

    der = peer_cert_der(request)
    if der is not None:
        try:
            cert = x509.load_der_x509_certificate(der)
            return await run_in_threadpool(
                verify_admin_cert, cert, state.admin_ca_cert, state.engine
            )
        except AdminCertRefusedError as exc:
            if exc.status == 401:
                raise UnauthenticatedError(
                    exc.reason, hint="ask an admin for a new one: `edgefl server admin-cert`"
                ) from exc
            raise ForbiddenError(
                exc.reason, hint="use an admin certificate (`edgefl server admin-cert`)"
            ) from exc
        except ValueError as exc:
            raise ForbiddenError("unreadable client certificate") from exc
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError(
                "the Authorization header must be `Bearer efl_<id>_<secret>`",
                hint="make a token with `edgefl server admin-token NAME --role ROLE`",
            )
        try:
            return await run_in_threadpool(admin_tokens.authenticate, state.engine, token)
        except admin_tokens.TokenRefusedError as exc:
            raise UnauthenticatedError(
                f"token refused: {exc.reason}",
                hint="ask an admin for a new token: `edgefl server admin-token`",
            ) from exc
    session = state.sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is not None:
        why = await run_in_threadpool(admin_tokens.token_state, state.engine, session.token_id)
        if why is not None:
            state.sessions.end_token(session.token_id)
            raise UnauthenticatedError(
                f"the session ended: its token is {why}", hint="log in again with a valid token"
            )
        if request.method not in _SAFE_METHODS and not await check_csrf(request, session):
            raise ForbiddenError(
                "missing or wrong CSRF token",
                hint="reload the page and submit the form again",
            )
        return session.principal
    raise UnauthenticatedError(
        "no credentials: present an admin client certificate, an API token or a session",
        hint="pass --admin-cert/--admin-key or --token (or a client config file)",
    )
