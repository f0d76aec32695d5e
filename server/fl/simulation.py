"""Run one federation on Flower's simulation engine (the same ServerApp and ClientApp)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgefl.federation import FederationPlan, FederationResult, RoundReport

__all__ = ["run_simulation"]


def run_simulation(
    plan: FederationPlan,
    *,
    registry_url: str,
    run_id: str,
    resume: bool = True,
    on_round: Callable[[RoundReport], None] | None = None,
    backend_config: dict[str, Any] | None = None,
    verbose: bool = False,
) -> FederationResult:
    """Run ``plan`` on Flower's simulation engine with ``plan.num_devices`` virtual nodes.

    Uses ``make_server_app`` and ``edgefl.edge_agent.fl.clientapp:app``; each node gets
    node config ``partition-id``/``num-partitions`` from Flower and trains on its
    Dirichlet partition (device id ``sim-NNN``). Client resources default to 1 CPU.

    Args:
        plan: The plan.
        registry_url: Registry database URL.
        run_id: Run id (an existing one is resumed when ``resume``).
        resume: See ``make_server_app``.
        on_round: Called after each round.
        backend_config: Flower backend config (default ``{"client_resources":
            {"num_cpus": 1, "num_gpus": 0.0}}``).
        verbose: Flower debug logging.

    Returns:
        The run's result, read back from the registry.
    """
    raise NotImplementedError
