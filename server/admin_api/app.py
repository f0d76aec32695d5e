"""The admin API application (:func:`create_app`); see the package docstring.

Every answer is JSON: ``{"result": ...}`` or ``{"error": {"status", "message", "hint"}}``,
the status from :func:`edgefl.server.ops.status_of` for an operation's error. Malformed
JSON is a 400 with nothing run; an unknown operation 404; a role too low 403 (audited
when the operation changes the deployment, by :func:`edgefl.server.ops.invoke`).
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Final

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefl.errors import EdgeflError
from edgefl.server.admin_api import sessions
from edgefl.server.admin_api.deps import admin_state, op_context, principal, run_operation
from edgefl.server.admin_api.state import AdminState
from edgefl.server.admin_client import API_PREFIX, UnauthenticatedError
from edgefl.server.audit import Principal
from edgefl.server.ops import (
    InvalidError,
    OpContext,
    operations,
    role_allows,
    status_of,
)

__all__ = ["MAX_BODY_BYTES", "BodyTooLargeError", "create_app"]

Ctx = Annotated[OpContext, Depends(op_context)]
Who = Annotated[Principal, Depends(principal)]

log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 1024 * 1024
"""Largest JSON body an operation call may send."""


def _error(status: int, message: str, hint: str = "") -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "message": message, "hint": hint}}, status_code=status
    )


class BodyTooLargeError(InvalidError):
    """A request body over :data:`MAX_BODY_BYTES` (HTTP 413)."""

    status = 413


async def _json_arguments(request: Request) -> dict[str, Any]:
    body = await sessions.read_capped(request, MAX_BODY_BYTES)
    if body is None:
        raise BodyTooLargeError(
            f"the request body is over {MAX_BODY_BYTES} bytes", hint="send fewer arguments"
        )
    if not body.strip():
        return {}
    try:
        arguments = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidError(
            f"malformed JSON body: {exc}", hint="send the arguments as one JSON object"
        ) from exc
    if not isinstance(arguments, dict):
        raise InvalidError(
            f"the body must be a JSON object of arguments, not {type(arguments).__name__}",
            hint='send e.g. {"device": "pi-01"}, or {} for none',
        )
    return arguments


def create_app(state: AdminState) -> FastAPI:
    """The admin API for one server (its state in ``app.state.edgefl``)."""
    app = FastAPI(
        title="edgefl admin API",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.edgefl = state

    @app.exception_handler(EdgeflError)
    async def _edgefl_error(_request: Request, exc: EdgeflError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            log.error("admin API: %s", exc)
        return _error(status, exc.message, exc.hint)

    @app.exception_handler(sessions.FormTooLargeError)
    async def _form_too_large(_request: Request, exc: sessions.FormTooLargeError) -> JSONResponse:
        return _error(413, str(exc), "send a smaller form")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("admin API: unexpected error")
        return _error(500, f"internal error ({type(exc).__name__})", "see the server's log")

    @app.get(f"{API_PREFIX}/health")
    async def health() -> dict[str, Any]:
        """Liveness, without authentication (and nothing else)."""
        return {"result": {"status": "ok"}}

    @app.get(f"{API_PREFIX}/whoami")
    async def whoami(who: Who) -> dict[str, Any]:
        """The caller's principal."""
        return {"result": {"name": who.name, "role": who.role, "via": who.via}}

    @app.get(f"{API_PREFIX}/ops")
    async def list_ops(who: Who) -> dict[str, Any]:
        """Every operation, and whether the caller's role allows it."""
        return {
            "result": [
                {
                    "name": op.name,
                    "summary": op.summary,
                    "role": op.role,
                    "mutating": op.mutating,
                    "allowed": role_allows(who.role, op.role),
                }
                for op in sorted(operations().values(), key=lambda o: o.name)
            ]
        }

    @app.post(API_PREFIX + "/ops/{name}")
    async def run_op(name: str, request: Request, ctx: Ctx) -> dict[str, Any]:
        """Run operation ``name`` with the JSON body as its arguments."""
        arguments = await _json_arguments(request)
        return {"result": await run_operation(name, arguments, ctx)}

    @app.get(f"{API_PREFIX}/devices")
    async def devices(ctx: Ctx, fleet: str | None = None) -> dict[str, Any]:
        """The ``devices`` operation (``?fleet=NAME`` for one fleet)."""
        arguments = {"fleet": fleet} if fleet is not None else {}
        return {"result": await run_operation("devices", arguments, ctx)}

    @app.get(f"{API_PREFIX}/children")
    async def children(request: Request, who: Who) -> dict[str, Any]:
        """The supervised children of ``edgefl server start``: pid, running, restarts."""
        del who  # any role may read it
        provider = admin_state(request).children
        return {"result": provider() if provider is not None else []}

    @app.post(f"{API_PREFIX}/session")
    async def login(request: Request) -> Response:
        """Token login: JSON ``{"token": ...}`` or a form field ``token``; sets the cookie."""
        from edgefl.server import admin_tokens

        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            token = (await _json_arguments(request)).get("token")
        else:
            token = (await sessions.read_form(request)).get("token")
        if not isinstance(token, str) or not token:
            raise InvalidError("no token given", hint="send the API token as `token`")
        st = admin_state(request)
        try:
            who = await run_in_threadpool(admin_tokens.authenticate, st.engine, token)
        except admin_tokens.TokenRefusedError as exc:
            raise UnauthenticatedError(f"token refused: {exc.reason}") from exc
        token_id = admin_tokens.token_id_of(token)
        assert token_id is not None  # authenticate checked the format
        session = st.sessions.start(who, token_id)
        response = JSONResponse(
            {"result": {"name": who.name, "role": who.role, "csrf_token": session.csrf}}
        )
        sessions.set_cookie(response, session)
        return response

    @app.post(f"{API_PREFIX}/logout")
    async def logout(request: Request, who: Who) -> Response:
        """End the browser session (the cookie's)."""
        del who
        admin_state(request).sessions.end(request.cookies.get(sessions.SESSION_COOKIE))
        response = JSONResponse({"result": {"logged_out": True}})
        sessions.clear_cookie(response)
        return response

    _mount_metrics(app, state)
    _mount_dashboard(app)
    return app


def _mount_metrics(app: FastAPI, state: AdminState) -> None:
    """``GET /metrics`` from :mod:`edgefl.server.metrics` when it is there."""
    try:
        from edgefl.server import metrics
    except ImportError:
        log.info("no edgefl.server.metrics: /metrics is not served")
        return
    render = getattr(metrics, "render", None)
    if render is None:
        return

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        """Prometheus exposition (a viewer principal needed unless admin.metrics_auth off)."""
        if state.metrics_auth:
            await principal(request)
        # Collecting reads the registry and scrapes supervised children: a worker thread,
        # so a slow scrape does not hold up the event loop's other requests.
        body, content_type = await run_in_threadpool(render)
        return Response(body, media_type=content_type)


def _mount_dashboard(app: FastAPI) -> None:
    """The web dashboard's router from :mod:`edgefl.server.dashboard` when it is there."""
    try:
        from edgefl.server import dashboard
    except ImportError:
        log.info("no edgefl.server.dashboard: the dashboard is not served")
        return
    factory = getattr(dashboard, "router", None)
    if factory is not None:
        app.include_router(factory())
