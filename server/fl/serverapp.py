"""The edgefl ServerApp: one federated run of a plan, with ledger, checkpoints and resume.

See :func:`make_server_app`. ``app`` is the same ServerApp for ``flwr run`` deployments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgefl.federation import FederationPlan, RoundReport

__all__ = ["app", "make_server_app"]


def make_server_app(
    plan: FederationPlan,
    *,
    registry_url: str,
    run_id: str,
    resume: bool = True,
    on_round: Callable[[RoundReport], None] | None = None,
) -> Any:
    """A Flower ``ServerApp`` that runs ``plan`` as run ``run_id``.

    Every round: wait (at most ``plan.node_wait_s``) for ``plan.min_available_nodes``;
    select devices by remaining ε budget and capability (seeded); send the train message
    (the :class:`~edgefl.federation.ClientInstructions`); collect replies for at most
    ``plan.round_timeout_s``; reject replies with wrong shapes, NaN/Inf or ε going down;
    aggregate with the plan's Flower strategy; evaluate on the held-out split (and
    federated evaluation when ``plan.fraction_evaluate`` > 0); commit the ledger rows,
    metrics and checkpoint in one transaction; call ``on_round``.

    Args:
        plan: The validated plan.
        registry_url: Registry database URL (SQLite or PostgreSQL).
        run_id: The run id; with ``resume`` an existing run continues from its last
            checkpoint (round numbering continues).
        resume: Continue an existing run (False: an existing run id is an error).
        on_round: Called after each committed round (e.g. a progress bar).

    Returns:
        The ServerApp (pass it to Flower's simulation engine or serve it).

    Raises:
        ConfigError: Raised when the app runs: the run exists with another plan, or the
            registry is unusable.
        NotEnoughNodesError: Raised when the app runs: fewer than
            ``min_available_nodes`` nodes connected within ``node_wait_s``.
    """
    raise NotImplementedError


app: Any = None
