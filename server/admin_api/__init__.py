"""The admin API: HTTPS, FastAPI on uvicorn, inside ``edgefl server start``.

- :mod:`.app`: the application factory (:func:`create_app`) and its routes:
  ``POST /api/v1/ops/{name}`` runs any admin operation (:mod:`edgefl.server.ops`),
  ``GET /api/v1/health``, ``/api/v1/devices``, ``/api/v1/children``, ``/api/v1/whoami``,
  ``/api/v1/ops``, token login (``POST /api/v1/session``), ``/metrics`` and the dashboard;
- :mod:`.auth`: who a request comes from (admin client certificate, bearer token or a
  browser session);
- :mod:`.deps`: the FastAPI dependencies routes use (``principal``, ``op_context``);
- :mod:`.sessions`: browser sessions, their cookie and CSRF tokens;
- :mod:`.server`: uvicorn in a thread, TLS set up, the client certificate passed on.

Only :mod:`.server` and :mod:`.app` import uvicorn and FastAPI; importing this package
does not.
"""
