"""FastAPI dependencies for admin API routes (the API's own and the dashboard's).

- :func:`admin_state`: the :class:`~edgefl.server.admin_api.state.AdminState`;
- :func:`principal`: who asks (:func:`edgefl.server.admin_api.auth.authenticate`:
  certificate, token or session with CSRF on unsafe methods), or a 401/403 error;
- :func:`op_context`: an :class:`~edgefl.server.ops.OpContext` for that principal on the
  server's config and registry, closed after the response.

A route runs an operation with :func:`run_operation`, which does what the CLI does
(``invoke``: role check, validation, audit) in a worker thread::

    @router.get("/fleet")
    async def fleet(ctx: Annotated[OpContext, Depends(op_context)]) -> HTMLResponse:
        devices = await run_operation("devices", {}, ctx)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from edgefl.server.admin_api.auth import authenticate
from edgefl.server.admin_api.state import AdminState
from edgefl.server.audit import Principal
from edgefl.server.ops import OpContext, invoke

__all__ = ["admin_state", "op_context", "principal", "run_operation"]


def admin_state(request: Request) -> AdminState:
    """The server's :class:`AdminState`."""
    state = request.app.state.edgefl
    assert isinstance(state, AdminState)
    return state


async def principal(request: Request) -> Principal:
    """Who the request comes from (raises the 401/403 :class:`OpError` otherwise)."""
    return await authenticate(request, admin_state(request))


async def op_context(request: Request) -> AsyncIterator[OpContext]:
    """An operation context for the request's principal (closed after the response)."""
    who = await principal(request)
    ctx = admin_state(request).op_context(who)
    try:
        yield ctx
    finally:
        await run_in_threadpool(ctx.close)


async def run_operation(name: str, arguments: Mapping[str, Any], ctx: OpContext) -> Any:
    """``invoke(name, arguments, ctx)`` in a worker thread (it reads the registry)."""
    return await run_in_threadpool(invoke, name, arguments, ctx)
