"""Browser sessions of the admin API: a token login, a cookie, CSRF on every form.

A person without an admin certificate in their browser logs in with an API token (a
login form posts it once). The server then keeps a **server-side session** (in this
process's memory: a server restart logs everybody out) and sets a cookie holding only
the session's random id: ``Secure; HttpOnly; SameSite=Strict; Path=/``. Every session has
its own CSRF token; every POST authenticated by the cookie must carry it, as the form
field ``csrf_token`` or the header ``X-CSRF-Token`` (:func:`check_csrf`, which the
``principal`` dependency of :mod:`edgefl.server.admin_api.deps` applies).

A session ends at logout, after :data:`SESSION_TTL` of inactivity, or as soon as the
token it was opened with expires or is revoked (checked on every request).

Forms are read by :func:`read_form` (``application/x-www-form-urlencoded`` only, size
capped), which needs no multipart parser.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl

from edgefl.server.audit import Principal

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "SESSION_TTL",
    "FormTooLargeError",
    "Session",
    "SessionStore",
    "check_csrf",
    "clear_cookie",
    "read_capped",
    "read_form",
    "set_cookie",
]

SESSION_COOKIE: Final = "edgefl_session"
CSRF_FIELD: Final = "csrf_token"
CSRF_HEADER: Final = "X-CSRF-Token"
SESSION_TTL: Final = 8 * 3600.0
"""Seconds of inactivity after which a session ends."""
MAX_FORM_BYTES: Final = 64 * 1024


class FormTooLargeError(ValueError):
    """A form body over :data:`MAX_FORM_BYTES`."""


@dataclass
class Session:
    """One browser's login.

    Attributes:
        id: The cookie's value (random, 32 bytes).
        principal: Who logged in (``token:NAME`` and the token's role).
        token_id: The token it was opened with (re-checked on every request).
        csrf: This session's CSRF token.
        last_used: Monotonic time of its last request.
    """

    id: str
    principal: Principal
    token_id: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    last_used: float = field(default_factory=time.monotonic)


class SessionStore:
    """The server's sessions, in memory (thread-safe)."""

    def __init__(self, ttl: float = SESSION_TTL) -> None:
        self.ttl = ttl
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def start(self, principal: Principal, token_id: str) -> Session:
        """Open a session for a principal who just presented token ``token_id``."""
        session = Session(secrets.token_urlsafe(32), principal, token_id)
        with self._lock:
            self._drop_idle()
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id (its idle timer restarted), else None."""
        if not session_id:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if now - session.last_used > self.ttl:
                del self._sessions[session_id]
                return None
            session.last_used = now
            return session

    def end(self, session_id: str | None) -> None:
        """End a session (logout); unknown ids are ignored."""
        if session_id:
            with self._lock:
                self._sessions.pop(session_id, None)

    def end_token(self, token_id: str) -> None:
        """End every session opened with ``token_id`` (revoked or expired)."""
        with self._lock:
            for sid in [s.id for s in self._sessions.values() if s.token_id == token_id]:
                del self._sessions[sid]

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _drop_idle(self) -> None:
        now = time.monotonic()
        for sid in [s.id for s in self._sessions.values() if now - s.last_used > self.ttl]:
            del self._sessions[sid]


def set_cookie(response: Response, session: Session) -> None:
    """Set the session cookie (Secure, HttpOnly, SameSite=Strict, Path=/)."""
    response.set_cookie(
        SESSION_COOKIE,
        session.id,
        secure=True,
        httponly=True,
        samesite="strict",
        path="/",
    )


def clear_cookie(response: Response) -> None:
    """Remove the session cookie from the browser."""
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")


async def read_capped(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is over ``limit`` bytes (not read past it).

    The body is kept on the request, so routes and dependencies may each call this.
    """
    cached = request.scope.get("edgefl.body")
    if isinstance(cached, bytes):
        return cached if len(cached) <= limit else None
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    body = b"".join(chunks)
    request.scope["edgefl.body"] = body
    return body


async def read_form(request: Request) -> dict[str, str]:
    """The request's urlencoded form fields (the last value of a repeated field).

    Raises:
        FormTooLargeError: A body over :data:`MAX_FORM_BYTES`.
    """
    cached = request.scope.get("edgefl.form")
    if isinstance(cached, dict):
        return cached
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    form: dict[str, str] = {}
    if content_type == "application/x-www-form-urlencoded":
        body = await read_capped(request, MAX_FORM_BYTES)
        if body is None:
            raise FormTooLargeError(f"form over {MAX_FORM_BYTES} bytes")
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    request.scope["edgefl.form"] = form
    return form


async def check_csrf(request: Request, session: Session) -> bool:
    """Whether an unsafe request carries ``session``'s CSRF token (header or form field)."""
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        sent = (await read_form(request)).get(CSRF_FIELD)
    return sent is not None and hmac.compare_digest(sent.encode(), session.csrf.encode())
