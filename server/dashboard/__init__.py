"""The web dashboard, served by the admin API: fleet, devices, runs, releases, audit.

Server-rendered pages (Jinja2 templates in ``templates/``; one small vendored script,
``static/refresh.js``, that reloads a page while a run or rollout goes on unless a form is
being filled in). Every page reads through the admin operations
(:mod:`edgefl.server.ops`), as the principal who looks, so it shows what the CLI prints
and obeys the same roles. :func:`router` returns the FastAPI router the admin API mounts;
see :mod:`edgefl.server.dashboard.routes` for authentication and CSRF.
"""

from edgefl.server.dashboard.routes import LOGIN_COOKIE, PrincipalOf, router

__all__ = ["LOGIN_COOKIE", "PrincipalOf", "router"]
