"""The dashboard's routes: pages, the token login, and the forms that act.

Who looks is found like the admin API finds it: the admin certificate the browser
presented (``principal_of``), else the session cookie a token login created. Without
either, a page redirects to the login form.

Every form carries a CSRF token that the POST must send back: the session's own token,
or for a certificate (which the browser sends by itself, so a foreign page could make it
post) a keyed hash of the certificate's name and role. A POST whose token is missing or
wrong, or whose ``Origin`` is another site, is refused with 403 before anything runs. The
forms that act (send a command, stop a run) call the same operations as the CLI, which
check the role (a viewer gets 403) and write the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from edgefl.errors import EdgeflError
from edgefl.server.admin_api.sessions import (
    CSRF_FIELD,
    SESSION_COOKIE,
    FormTooLargeError,
    Session,
    clear_cookie,
    read_form,
    set_cookie,
)
from edgefl.server.audit import Principal
from edgefl.server.dashboard import views
from edgefl.server.ops import InvalidError, OpContext, invoke, role_allows, status_of

if TYPE_CHECKING:
    from edgefl.server.admin_api.state import AdminState

__all__ = ["LOGIN_COOKIE", "PrincipalOf", "router"]

PrincipalOf = Callable[[Request], Awaitable[Principal]]
"""Who a request comes from, by the admin API's rules (certificate, token or session with
its CSRF token on a POST); raises ``UnauthenticatedError`` (401) without a credential and
``ForbiddenError`` (403) for a refused one."""

LOGIN_COOKIE: Final = "edgefl_login"
"""The login form's CSRF cookie (double submit: the form sends the same value back)."""

_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class _Viewer:
    principal: Principal
    session: Session | None  # a certificate has none
    csrf: str


def _when(value: Any) -> str:
    if not value:
        return "—"
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    age = (datetime.now(UTC) - moment).total_seconds()
    if 0 <= age < 90:
        ago = f"{age:.0f} s ago"
    elif 0 <= age < 5400:
        ago = f"{age / 60:.0f} min ago"
    elif 0 <= age < 172_800:
        ago = f"{age / 3600:.0f} h ago"
    else:
        ago = ""
    text = moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{text} ({ago})" if ago else text


def _dash(value: Any) -> Any:
    return "—" if value is None or value == "" else value


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(_HERE / "templates")),
        autoescape=select_autoescape(["html"]),
        auto_reload=False,
    )
    env.filters["when"] = _when
    env.filters["dash"] = _dash
    env.filters["num"] = _num
    return env


def router(
    *,
    principal_of: PrincipalOf | None = None,
    prefix: str = "/dashboard",
    refresh_s: int = 5,
) -> APIRouter:
    """The dashboard's routes under ``prefix``, for the admin API's app to mount.

    The app's :class:`~edgefl.server.admin_api.state.AdminState` (``app.state.edgefl``)
    gives the registry, the config and the browser sessions.

    Args:
        principal_of: Who a request comes from (default: the admin API's own rule,
            :func:`edgefl.server.admin_api.deps.principal`).
        prefix: Where the pages are (``/dashboard``).
        refresh_s: How often a page reloads itself while a run or rollout goes on.
    """
    resolve = principal_of or _default_principal_of()
    env = _environment()
    secret = secrets.token_bytes(32)
    api = APIRouter(prefix=prefix, include_in_schema=False)
    nav = [
        (f"{prefix}/", "Fleet", "fleet"),
        (f"{prefix}/runs", "Runs", "runs"),
        (f"{prefix}/releases", "Releases", "releases"),
        (f"{prefix}/audit", "Audit", "audit"),
    ]

    def state_of(request: Request) -> AdminState:
        state: AdminState = request.app.state.edgefl
        return state

    def cert_csrf(principal: Principal) -> str:
        message = f"cert\0{principal.name}\0{principal.role}".encode()
        return hmac.new(secret, message, hashlib.sha256).hexdigest()

    async def who(request: Request) -> _Viewer | None:
        """The viewer, or None without a (valid) credential; a refused one raises 403."""
        from edgefl.server.admin_client import UnauthenticatedError

        try:
            principal = await resolve(request)
        except UnauthenticatedError:
            return None
        session = state_of(request).sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None and session.principal == principal:
            return _Viewer(principal, session, session.csrf)
        return _Viewer(principal, None, cert_csrf(principal))

    def html(
        template: str,
        viewer: _Viewer | None,
        *,
        status: int = 200,
        section: str = "",
        title: str = "",
        live: bool = False,
        flash: Mapping[str, str] | None = None,
        csrf: str = "",
        **values: Any,
    ) -> HTMLResponse:
        body = env.get_template(template).render(
            base=prefix,
            nav=nav,
            section=section,
            title=title,
            principal=viewer.principal if viewer else None,
            session_login=bool(viewer and viewer.session is not None),
            csrf_field=CSRF_FIELD,
            csrf=viewer.csrf if viewer else csrf,
            can_operate=bool(viewer and role_allows(viewer.principal.role, "operator")),
            refresh_s=refresh_s if live else 0,
            flash=flash,
            **values,
        )
        response = HTMLResponse(body, status_code=status)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["Referrer-Policy"] = "same-origin"  # "no-referrer" makes Origin null
        return response

    def error(viewer: _Viewer | None, exc: EdgeflError, section: str = "") -> HTMLResponse:
        status = status_of(exc)
        heading = _HEADINGS.get(status, "Error")
        return html(
            "error.html",
            viewer,
            status=status,
            section=section,
            title=heading,
            heading=heading,
            message=exc.message,
            hint=exc.hint,
        )

    def to_login(request: Request) -> RedirectResponse:
        target = request.url.path
        if request.url.query:
            target += "?" + request.url.query
        return RedirectResponse(f"{prefix}/login?next={quote(target, safe='')}", status_code=303)

    def show(
        viewer: _Viewer,
        request: Request,
        template: str,
        section: str,
        title: str,
        build: Callable[[OpContext], dict[str, Any]],
        *,
        status: int = 200,
        flash: Mapping[str, str] | None = None,
    ) -> Response:
        try:
            with state_of(request).op_context(viewer.principal) as ctx:
                values = build(ctx)
        except EdgeflError as exc:
            return error(viewer, exc, section)
        live = bool(values.pop("live", False)) and flash is None
        return html(
            template,
            viewer,
            status=status,
            section=section,
            title=title,
            live=live,
            flash=flash,
            **values,
        )

    async def page(
        request: Request,
        template: str,
        section: str,
        title: str,
        build: Callable[[OpContext], dict[str, Any]],
    ) -> Response:
        try:
            viewer = await who(request)
        except EdgeflError as exc:
            return error(None, exc, section)
        if viewer is None:
            return to_login(request)
        return await run_in_threadpool(show, viewer, request, template, section, title, build)

    def page_route(
        path: str, template: str, section: str, title: str, build: Callable[..., dict[str, Any]]
    ) -> None:
        """GET ``path``: ``template`` filled by ``build(ctx, **path parameters)``.

        ``title`` is formatted with the path parameters too.
        """

        async def handler(request: Request) -> Response:
            args = dict(request.path_params)
            return await page(
                request, template, section, title.format(**args), lambda ctx: build(ctx, **args)
            )

        api.add_api_route(path, handler, methods=["GET"], response_class=HTMLResponse)

    page_route("/", "fleet.html", "fleet", "Fleet", views.fleet_page)
    page_route(
        "/devices/{device_id}", "device.html", "fleet", "Device {device_id}", views.device_page
    )
    page_route("/runs", "runs.html", "runs", "Runs", views.runs_page)
    page_route("/runs/{run_id}", "run.html", "runs", "Run {run_id}", views.run_page)
    page_route("/releases", "releases.html", "releases", "Releases", views.release_page)
    page_route(
        "/rollouts/{rollout_id}",
        "rollout.html",
        "releases",
        "Rollout {rollout_id}",
        views.rollout_page,
    )
    page_route("/audit", "audit.html", "audit", "Audit log", views.audit_page)

    @api.get("/static/refresh.js")
    def refresh_js() -> Response:
        return Response(
            (_HERE / "static" / "refresh.js").read_bytes(),
            media_type="text/javascript",
            headers={"Cache-Control": "max-age=3600"},
        )

    # -- login ----------------------------------------------------------------------------

    def login_form(
        request: Request, *, status: int = 200, flash: Mapping[str, str] | None = None
    ) -> HTMLResponse:
        nonce = secrets.token_urlsafe(24)
        response = html(
            "login.html",
            None,
            status=status,
            title="Sign in",
            flash=flash,
            csrf=nonce,
            next=_next(request, prefix),
        )
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=1800,
            path=f"{prefix}/login",
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response

    @api.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request) -> Response:
        try:
            signed_in = await who(request) is not None
        except EdgeflError:
            signed_in = False
        if signed_in:
            return RedirectResponse(_next(request, prefix), status_code=303)
        return login_form(request)

    @api.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        from edgefl.server import admin_tokens

        try:
            form = await read_form(request)
        except FormTooLargeError:
            return login_form(request, status=413, flash=_error_flash("the form is too large"))
        expected = request.cookies.get(LOGIN_COOKIE, "")
        sent = form.get(CSRF_FIELD, "")
        if not (expected and sent and hmac.compare_digest(sent, expected)) or not _same_origin(
            request
        ):
            return login_form(
                request, status=403, flash=_error_flash("the form expired; sign in again")
            )
        token = form.get("token", "").strip()
        state = state_of(request)
        try:
            principal = await run_in_threadpool(admin_tokens.authenticate, state.engine, token)
        except admin_tokens.TokenRefusedError as exc:
            return login_form(request, status=401, flash=_error_flash(f"sign-in refused: {exc}"))
        session = state.sessions.start(principal, admin_tokens.token_id_of(token) or "")
        response = RedirectResponse(_next(request, prefix), status_code=303)
        set_cookie(response, session)
        response.delete_cookie(LOGIN_COOKIE, path=f"{prefix}/login")
        return response

    @api.post("/logout")
    async def logout(request: Request) -> Response:
        try:
            viewer = await who(request)
        except EdgeflError as exc:
            return error(None, exc)
        if viewer is None or viewer.session is None:
            return RedirectResponse(f"{prefix}/login", status_code=303)
        if not await csrf_ok(request, viewer):
            return csrf_refused(viewer)
        state_of(request).sessions.end(viewer.session.id)
        response = RedirectResponse(f"{prefix}/login", status_code=303)
        clear_cookie(response)
        return response

    # -- forms that act -------------------------------------------------------------------

    async def csrf_ok(request: Request, viewer: _Viewer) -> bool:
        try:
            sent = (await read_form(request)).get(CSRF_FIELD, "")
        except FormTooLargeError:
            return False
        return bool(sent) and hmac.compare_digest(sent, viewer.csrf) and _same_origin(request)

    def csrf_refused(viewer: _Viewer | None) -> HTMLResponse:
        return html(
            "error.html",
            viewer,
            status=403,
            title="Forbidden",
            heading="Forbidden",
            message="the form's CSRF token is missing or wrong, or the form came from another "
            "site: nothing was done",
            hint="reload the page and submit the form again",
        )

    async def act(
        request: Request,
        name: str,
        arguments_of: Callable[[Mapping[str, str]], dict[str, Any]],
        page_of: Callable[[_Viewer, Mapping[str, str]], Response],
        section: str,
    ) -> Response:
        try:
            viewer = await who(request)
        except EdgeflError as exc:
            # A refused certificate, or a session's POST without its CSRF token.
            return error(None, exc, section)
        if viewer is None:
            return Response("sign in first", status_code=401, media_type="text/plain")
        if not await csrf_ok(request, viewer):
            return csrf_refused(viewer)
        form = await read_form(request)
        state = state_of(request)
        try:
            arguments = arguments_of(form)
            result = await run_in_threadpool(_invoke, state, viewer.principal, name, arguments)
        except EdgeflError as exc:
            return error(viewer, exc, section)
        return await run_in_threadpool(
            page_of, viewer, {"kind": "ok", "text": f"{name}: {_summary(result)}"}
        )

    @api.post("/devices/{device_id}/command", response_class=HTMLResponse)
    async def send_command(request: Request, device_id: str) -> Response:
        def parse(form: Mapping[str, str]) -> dict[str, Any]:
            text = form.get("args", "").strip() or "{}"
            try:
                args = json.loads(text)
            except ValueError as exc:
                raise InvalidError(f"the arguments are not JSON: {exc}") from exc
            if not isinstance(args, dict):
                raise InvalidError('the arguments must be a JSON object, e.g. {} or {"n": 1}')
            return {"device": device_id, "name": form.get("name", "").strip(), "args": args}

        def again(viewer: _Viewer, flash: Mapping[str, str]) -> Response:
            return show(
                viewer,
                request,
                "device.html",
                "fleet",
                f"Device {device_id}",
                lambda ctx: views.device_page(ctx, device_id),
                flash=flash,
            )

        return await act(request, "command", parse, again, "fleet")

    @api.post("/runs/{run_id}/stop", response_class=HTMLResponse)
    async def stop_run(request: Request, run_id: str) -> Response:
        def again(viewer: _Viewer, flash: Mapping[str, str]) -> Response:
            return show(
                viewer,
                request,
                "run.html",
                "runs",
                f"Run {run_id}",
                lambda ctx: views.run_page(ctx, run_id),
                flash=flash,
            )

        return await act(request, "stop", lambda _form: {"run": run_id}, again, "runs")

    return api


_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADINGS: Final = {400: "Bad request", 403: "Forbidden", 404: "Not found", 409: "Conflict"}


def _default_principal_of() -> PrincipalOf:
    """The admin API's rule for who a request comes from."""
    from edgefl.server.admin_api.deps import principal

    return principal


def _error_flash(text: str) -> dict[str, str]:
    return {"kind": "error", "text": text}


def _invoke(
    state: AdminState, principal: Principal, name: str, arguments: Mapping[str, Any]
) -> Any:
    with state.op_context(principal) as ctx:
        return invoke(name, arguments, ctx)


def _summary(result: Any) -> str:
    if isinstance(result, Mapping):
        keys = ("status", "correlation_id", "expires_at", "state")
        parts = [f"{k} {result[k]}" for k in keys if result.get(k) not in (None, "")]
        if parts:
            return ", ".join(parts)
    return "done"


def _same_origin(request: Request) -> bool:
    """No ``Origin`` header (an older browser, a script), or one naming this very host."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _next(request: Request, prefix: str) -> str:
    """Where to go after signing in: a path under ``prefix`` only (no open redirect)."""
    target = request.query_params.get("next", "")
    if target.startswith(prefix + "/") and "//" not in target and "\\" not in target:
        return target
    return prefix + "/"
