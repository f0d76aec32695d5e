"""Run one federation on Flower's simulation engine (the same ServerApp and ClientApp)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from edgefl.federation import FederationPlan, FederationResult, RoundReport

__all__ = ["run_simulation"]

_log = logging.getLogger(__name__)

#: Ray's own start-up waits are fixed: the head node waits 30 s for its GCS server to write
#: its port file, then 30 s for its raylet to register with the GCS. A machine loaded by
#: other work (a test suite on two cores) can miss either.
_RAY_START_ATTEMPTS = 3


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
            _start_ray(dict(config.get("init_args") or {}))
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
    _log.debug("simulation of %s finished", run_id)
    return load_result(registry_url, run_id)


def _start_ray(init_args: dict[str, Any]) -> None:
    """Start Ray as Flower's Ray backend would, retrying a start-up that timed out.

    Flower's backend starts Ray only when it is not running yet and shuts it down at the
    end of the run, so a Ray started here is the one the run uses. Ray gives its GCS
    server and then its raylet a fixed 30 s each to come up; on a loaded machine either
    can fail the whole run before its first round. Here such an attempt's processes are
    ended and the start is tried again; any other failure is raised at once.
    """
    import ray

    if ray.is_initialized():
        return
    # The same arguments and environment as flwr's RayBackend.init_ray, with the defaults
    # flwr.simulation.run_simulation sets.
    args: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
    args.update(init_args)
    args.setdefault("include_dashboard", False)
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    from edgefl.procs import descendants

    for attempt in range(1, _RAY_START_ATTEMPTS + 1):
        before = set(descendants(os.getpid()))
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **args)
            return
        except Exception as exc:  # Ray raises a bare Exception for the raylet's wait
            if not _ray_start_timed_out(exc) or attempt == _RAY_START_ATTEMPTS:
                raise
            _log.warning(
                "Ray did not start in time (attempt %d of %d: %s); trying again",
                attempt,
                _RAY_START_ATTEMPTS,
                exc,
            )
            with contextlib.suppress(Exception):
                ray.shutdown()
            _end_ray_processes(before)


def _ray_start_timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is one of Ray's fixed start-up waits running out.

    ``RuntimeError("Timed out waiting for file .../gcs_server_port_...")`` (the GCS
    server) and ``Exception("The current node timed out during startup. ...")`` (the
    raylet registering with the GCS), as Ray 2.55 words them.
    """
    text = str(exc)
    return (isinstance(exc, RuntimeError) and text.startswith("Timed out waiting for file")) or (
        "timed out during startup" in text
    )


def _end_ray_processes(before: set[int]) -> None:
    """End the Ray processes a failed start left.

    They are this process's descendants that were not there before it (``before``) and
    run Ray's code or binaries.
    """
    from edgefl.procs import cmdline, descendants, pid_alive

    left = [
        pid
        for pid in descendants(os.getpid())
        if pid not in before and any("ray" in part for part in cmdline(pid))
    ]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while any(pid_alive(pid) for pid in left) and time.monotonic() < deadline:
        time.sleep(0.05)
