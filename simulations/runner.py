"""Run a scenario on Flower's simulation engine and write its report and plots.

The federation itself is the core's: :func:`edgefl.server.fl.run_simulation` runs the
scenario's :class:`~edgefl.federation.FederationPlan` with the same ServerApp and
ClientApp a deployment uses, writing the privacy ledger, round metrics and checkpoints
to the registry (an SQLite file in the output folder by default). This module adds what
a laptop experiment needs around it: progress per round, wall time and the process
tree's peak memory per round, the optional no-DP comparison run, the independent ε
check from the ledger, and the reports (``report.json``, ``report.md``, PNG plots).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefl.simulations.plots import write_plots
from edgefl.simulations.report import RoundRow, RunResult, build_report, write_reports
from edgefl.simulations.resources import RSS_METHOD, TreeRssSampler

if TYPE_CHECKING:
    from edgefl.federation import RoundReport
    from edgefl.server.fl.ledger import LedgerRow
    from edgefl.simulations.scenario import Scenario

__all__ = ["REGISTRY_FILENAME", "RoundProgress", "run_scenario"]

REGISTRY_FILENAME = "registry.db"


@dataclass(frozen=True)
class RoundProgress:
    """Sent to the progress callback after every round of every run."""

    label: str
    round: int
    done: int
    total: int
    accuracy: float
    epsilon_max: float


def _running_totals(ledger: list[LedgerRow], rounds: list[int]) -> dict[int, dict[str, float]]:
    """Each device's running ε after each round (carried forward over rounds it skipped)."""
    by_round: dict[int, list[LedgerRow]] = {}
    for row in ledger:
        by_round.setdefault(row.round, []).append(row)
    current: dict[str, float] = {}
    out: dict[int, dict[str, float]] = {}
    for r in sorted(set(rounds) | set(by_round)):
        for row in by_round.get(r, []):
            current[row.device_id] = row.epsilon_total
        out[r] = dict(current)
    return out


def _backend_config(scenario: Scenario, verbose: bool) -> dict[str, Any]:
    sim = scenario.simulation
    return {
        "client_resources": {"num_cpus": sim.num_cpus, "num_gpus": sim.num_gpus},
        # Worker output would otherwise be copied to this process's stdout, which a
        # --json caller reserves for the report.
        "init_args": {"log_to_driver": verbose},
    }


def _run_one(
    scenario: Scenario,
    label: str,
    registry_url: str,
    *,
    done_before: int,
    total: int,
    progress: Callable[[RoundProgress], None] | None,
    verbose: bool,
) -> tuple[RunResult, dict[str, Any]]:
    from edgefl.server.fl import new_run_id, run_simulation
    from edgefl.server.fl.ledger import FlStore
    from edgefl.server.registry.db import display_url
    from edgefl.simulations.accounting import check_reported_epsilon

    if not verbose:
        # Flower sets its logger to DEBUG when imported; its records also reach the root
        # handler. The progress bar and the report carry the same information.
        import flwr.common.logger  # noqa: F401

        logging.getLogger("flwr").setLevel(logging.WARNING)
    plan = scenario.plan
    run_id = f"{scenario.name}-{label}-{new_run_id()}"
    timings: dict[int, tuple[float, float]] = {}
    with TreeRssSampler() as rss:
        started = time.perf_counter()
        last = [started]

        def on_round(report: RoundReport) -> None:
            now = time.perf_counter()
            timings[report.round] = (now - last[0], rss.take_window_peak())
            last[0] = now
            if progress is not None:
                progress(
                    RoundProgress(
                        label=label,
                        round=report.round,
                        done=done_before + len(timings),
                        total=total,
                        accuracy=report.accuracy,
                        epsilon_max=report.epsilon_max,
                    )
                )

        result = run_simulation(
            plan,
            registry_url=registry_url,
            run_id=run_id,
            resume=False,
            on_round=on_round,
            backend_config=_backend_config(scenario, verbose),
            verbose=verbose,
        )
        wall = time.perf_counter() - started
        peak = rss.peak_mb

    store = FlStore(registry_url)
    try:
        ledger = store.ledger(run_id)
    finally:
        store.close()
    totals = _running_totals(ledger, [r.round for r in result.rounds])
    rows: list[RoundRow] = []
    failures: dict[str, int] = {}
    rejections: dict[str, int] = {}
    for rep in result.rounds:
        # The server times each round itself; the time between callbacks is the fallback.
        seen_wall, window_peak = timings.get(rep.round, (rep.wall_s, 0.0))
        rows.append(
            RoundRow(
                round=rep.round,
                accuracy=rep.accuracy,
                loss=rep.loss,
                wall_s=rep.wall_s if rep.wall_s > 0 else seen_wall,
                peak_rss_mb=window_peak,
                epsilon_per_device=totals.get(rep.round, {}),
                trained=rep.num_replies,
                failures=rep.num_failures,
                rejected=rep.num_rejected,
                refused_budget=rep.num_refused,
                aggregated=rep.aggregated,
                trained_nobody_because="" if rep.aggregated else rep.why_nothing_trained(),
                refusals=dict(rep.refusals),
            )
        )
        if rep.num_failures:
            key = "failed or timed-out train messages (emulated dropouts and stragglers too)"
            failures[key] = failures.get(key, 0) + rep.num_failures
        for reason in rep.rejections.values():
            rejections[reason] = rejections.get(reason, 0) + 1
    rounds_wall = sum(r.wall_s for r in rows)
    run = RunResult(
        label=label,
        rows=rows,
        epsilon_per_device=dict(result.epsilon_per_device),
        startup_s=max(0.0, wall - rounds_wall),
        wall_s=wall,
        peak_rss_mb=peak,
        failure_reasons=failures,
        rejection_reasons=rejections,
        stopped_early=result.stop_reason,
        registry_url=display_url(registry_url),  # the report never holds a password
        shortfall=result.shortfall(),
    )
    histories: dict[str, list[tuple[float, float, int]]] = {}
    for entry in ledger:
        histories.setdefault(entry.device_id, []).append(
            (entry.sigma, entry.sample_rate, entry.steps)
        )
    check = check_reported_epsilon(
        result.epsilon_per_device,
        histories if plan.dp.enabled else {},
        plan.dp.delta,
    )
    extra = {
        "run_id": run_id,
        "status": result.status,
        "central_epsilon": result.central_epsilon,
        "epsilon_check": {
            "method": "ledger (sigma, q, steps) per round fed to a fresh Opacus RDPAccountant",
            **check.to_dict(),
        },
    }
    return run, extra


def run_scenario(
    scenario: Scenario,
    out_dir: Path,
    *,
    registry_url: str | None = None,
    progress: Callable[[RoundProgress], None] | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run a scenario (and its no-DP twin when asked) and write the reports.

    Args:
        scenario: The validated scenario.
        out_dir: Where ``report.json``, ``report.md``, the PNGs and (by default) the
            registry go; created if missing.
        registry_url: Registry database (default: ``sqlite:///OUT/registry.db``).
        progress: Called after every round of every run.
        verbose: Flower's debug logging and Ray worker output.

    Returns:
        The report object written to ``report.json``.
    """
    # Validate the plan before the engine starts: a central-DP budget that fits no round
    # is a ConfigError (exit 3) here, and one that fits fewer rounds than planned is said.
    budget = scenario.central_budget
    if budget is not None and budget.rounds_fit < scenario.rounds:
        logging.getLogger(__name__).warning("%s", budget.describe())
    out_dir.mkdir(parents=True, exist_ok=True)
    url = registry_url or f"sqlite:///{(out_dir / REGISTRY_FILENAME).resolve()}"
    compare = scenario.simulation.compare_no_dp and scenario.dp.enabled
    total = scenario.rounds * (2 if compare else 1)
    dp_run, extra = _run_one(
        scenario,
        "dp" if scenario.dp.enabled else "no-dp",
        url,
        done_before=0,
        total=total,
        progress=progress,
        verbose=verbose,
    )
    no_dp_run = None
    if compare:
        no_dp_run, no_dp_extra = _run_one(
            scenario.without_dp(),
            "no-dp",
            url,
            done_before=len(dp_run.rows),
            total=total,
            progress=progress,
            verbose=verbose,
        )
        extra["no_dp_run_id"] = no_dp_extra["run_id"]
    report = build_report(
        scenario=scenario.name,
        description=scenario.description,
        config=scenario.model_dump(mode="json"),
        dp=dp_run,
        no_dp=no_dp_run,
        rss_method=RSS_METHOD,
        extra=extra,
    )
    if budget is not None:
        report["central_dp_budget"] = budget.describe()
    report["plots"] = write_plots(report, out_dir)
    write_reports(report, out_dir)
    return report
