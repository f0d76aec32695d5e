"""Run one federation on Flower's simulation engine (the same ServerApp and ClientApp)."""

from __future__ import annotations

import logging
import os
import warnings
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
    num_nodes: int | None = None,
    client_app: Any = None,
    verbose: bool = False,
) -> FederationResult:
    """Run ``plan`` on Flower's simulation engine with ``plan.num_devices`` virtual nodes.

    Uses :func:`~edgefl.server.fl.serverapp.make_server_app` and
    ``edgefl.edge_agent.fl.clientapp:app``; each node gets node config
    ``partition-id``/``num-partitions`` from Flower and trains on its Dirichlet partition
    (device id ``sim-NNN``). Client resources default to 1 CPU per virtual client.

    Args:
        plan: The plan.
        registry_url: Registry database URL.
        run_id: Run id (an existing one is resumed when ``resume``).
        resume: See ``make_server_app``.
        on_round: Called after each round.
        backend_config: Flower backend config (default ``{"client_resources":
            {"num_cpus": 1, "num_gpus": 0.0}}``).
        num_nodes: Start this many virtual nodes instead of ``plan.num_devices`` (fault
            scenarios: fewer devices than planned connect).
        client_app: Another ClientApp (fault injection in tests); default ours.
        verbose: Flower debug logging.

    Returns:
        The run's result, read back from the registry.

    Raises:
        NotEnoughNodesError: Fewer nodes than ``plan.min_available_nodes`` within
            ``plan.node_wait_s``.
        ConfigError: The registry or the run id cannot be used.
    """
    from flwr.simulation import run_simulation as flwr_run_simulation

    from edgefl.edge_agent.fl.clientapp import app as default_client_app
    from edgefl.server.fl.ledger import load_result
    from edgefl.server.fl.serverapp import make_server_app

    # Virtual nodes are never enrolled: the admitted-nodes-only check is for deployments.
    server_app = make_server_app(
        plan,
        registry_url=registry_url,
        run_id=run_id,
        resume=resume,
        on_round=on_round,
        admitted_only=False,
    )
    config = backend_config or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    # Ray workers inherit this: one torch thread per virtual client on a small machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Flower's Ray backend exports this interpreter's sys.path as PYTHONPATH and leaves it
    # set; restore it afterwards so later subprocesses (e.g. another venv) are unaffected.
    saved_pythonpath = os.environ.get("PYTHONPATH")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            flwr_run_simulation(
                server_app=server_app,
                client_app=client_app or default_client_app,
                num_supernodes=num_nodes or plan.num_devices,
                backend_config=config,
                verbose_logging=verbose,
            )
        except RuntimeError as exc:
            # Flower wraps the ServerApp's exception; surface ours.
            cause = exc.__cause__
            from edgefl.errors import EdgeflError

            if isinstance(cause, EdgeflError):
                raise cause from exc
            raise
        finally:
            if saved_pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved_pythonpath
    logging.getLogger(__name__).debug("simulation of %s finished", run_id)
    return load_result(registry_url, run_id)
