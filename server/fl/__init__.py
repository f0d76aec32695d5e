"""The federated-training server: Flower ServerApp, strategies, privacy ledger, resume.

Entry points (signatures are stable; see each docstring):

- :func:`make_server_app` (``edgefl.server.fl.serverapp``): a Flower ``ServerApp`` for
  one run of a :class:`~edgefl.federation.FederationPlan`, writing the privacy ledger,
  per-round metrics and a checkpoint per round to the registry at ``registry_url``, and
  calling ``on_round(RoundReport)`` after each round. With ``resume=True`` (default) a
  run id that already has checkpoints continues from the last one.
- ``edgefl.server.fl.serverapp:app``: the same ServerApp for ``flwr run`` deployments; it
  reads the plan from the ``run_config`` (``FederationPlan.to_flat()`` keys plus
  ``registry-url``, ``run-id`` and ``admitted-nodes-only``) and uses only nodes that are
  admitted enrollments in the registry (see ``edgefl.server.fl.serverapp``).
- :func:`run_simulation` (``edgefl.server.fl.simulation``): one run on Flower's
  simulation engine with the same ServerApp and ``edgefl.edge_agent.fl.clientapp:app``
  (one virtual node per device, 1 CPU each); returns a
  :class:`~edgefl.federation.FederationResult`.
- :func:`load_result`: read a run's :class:`~edgefl.federation.FederationResult` from the
  registry (works for finished, stopped and killed runs).
- :func:`new_run_id`: a fresh run id.

Heavy imports (flwr, torch) happen when these are called, not when this package is
imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgefl.server.fl.ledger import load_result, new_run_id

if TYPE_CHECKING:
    from edgefl.server.fl.serverapp import make_server_app
    from edgefl.server.fl.simulation import run_simulation

__all__ = ["load_result", "make_server_app", "new_run_id", "run_simulation"]


def __getattr__(name: str) -> Any:
    if name == "make_server_app":
        from edgefl.server.fl.serverapp import make_server_app

        return make_server_app
    if name == "run_simulation":
        from edgefl.server.fl.simulation import run_simulation

        return run_simulation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
