"""The ``scenarios`` section of ``benchmarks/utility_bench.py``: every other shipped scenario.

    python benchmarks/utility_bench.py --json --only scenarios [--seeds 0,1,2]

Runs each shipped scenario (``simulations/scenarios/*.toml``) except ``quick`` (the
``main`` section) and ``digits-noniid-dp`` (the DP target's own section) with ``edgefl
simulate``, as a user runs it (a new process per run), on each of ``--seeds``: the seed
is the scenario's ``seed`` key (split, partitions, model initialisation), changed in a
temporary copy of the file and nothing else. A scenario that sets
``[simulation] compare_no_dp`` also runs without DP in the same command; its final
accuracy is the non-DP comparison. With DP, every device must end within its ε cap and
the ledger's independent recomputation must agree within 1%, or the benchmark stops with
an error naming the scenario and seed.

Output, one entry per scenario::

    {NAME: {"final_accuracy": float, "best_accuracy": float, "min": float, "max": float,
            "no_dp_accuracy": float | None, "max_drop_from_best": float,
            "seeds": {SEED: {"final_accuracy": float, "best_accuracy": float,
                             "no_dp_accuracy": float | None, "epsilon_max": float,
                             "wall_s": float}}}}

``final_accuracy``, ``best_accuracy`` and ``no_dp_accuracy`` are means over the seeds
(``best_accuracy``: each seed's best round); ``min``/``max`` span the seeds' final
accuracy; ``max_drop_from_best`` is the largest (best round - final) of any seed, the
figure the "final >= best round - 3 points" target is about.

Screening (not a section): :func:`replay` runs a scenario's federation in this process,
without Ray, to compare settings on several seeds in seconds; a real ``edgefl simulate``
run confirms the chosen ones::

    python benchmarks/utility_scenarios.py simulations/scenarios/dropouts-stragglers.toml \
        --seeds 0,1,2 --set '{"strategy": {"name": "fedavg"}, "lr": 1.0}'
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from edgefl.simulations.scenario import load_scenario, shipped_scenarios

if TYPE_CHECKING:
    from utility_bench import Options

    from edgefl.federation import FederationPlan

OWN_SECTIONS = frozenset({"quick", "digits-noniid-dp"})
"""Shipped scenarios measured by sections of their own (``main``, the DP target)."""


def scenario_files() -> list[Path]:
    """The shipped scenarios this section runs, by name."""
    return [p for p in shipped_scenarios() if p.stem not in OWN_SECTIONS]


def _bench() -> ModuleType:
    """utility_bench's helpers (simulate, check_privacy, log), as the running process has them.

    Run as ``python benchmarks/utility_bench.py`` the module is ``__main__``: importing it
    by name would load a second copy whose ``BenchError`` its ``main`` does not catch.
    Imported lazily because utility_bench imports this module for its ``SECTIONS``.
    """
    main = sys.modules.get("__main__")
    if main is not None and hasattr(main, "SECTIONS") and hasattr(main, "simulate"):
        return main
    import utility_bench

    return utility_bench


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def run_scenario_seeds(path: Path, seeds: list[int], workdir: Path) -> dict[str, Any]:
    """One scenario over ``seeds``: per-seed figures and their summary."""
    bench = _bench()
    scenario = load_scenario(path)
    rows: dict[str, dict[str, Any]] = {}
    runs = bench.sweep(f"scenarios: {scenario.name}", path, seeds, workdir / scenario.name)
    for seed, report, wall in runs:
        no_dp = report.get("no_dp")
        row = {
            "final_accuracy": float(report["final_accuracy"]),
            "best_accuracy": float(report["best_accuracy"]),
            "no_dp_accuracy": float(no_dp["final_accuracy"]) if no_dp else None,
            "epsilon_max": float(report["epsilon_max"]),
            "wall_s": round(wall, 2),
        }
        rows[str(seed)] = row
        bench.log(
            f"scenarios: {scenario.name} seed {seed}: best round {row['best_accuracy']:.2%}"
            + (f", without DP {row['no_dp_accuracy']:.2%}" if no_dp else "")
        )
    finals = [r["final_accuracy"] for r in rows.values()]
    no_dp_finals = [r["no_dp_accuracy"] for r in rows.values() if r["no_dp_accuracy"] is not None]
    return {
        "final_accuracy": statistics.fmean(finals),
        "best_accuracy": statistics.fmean(r["best_accuracy"] for r in rows.values()),
        "min": min(finals),
        "max": max(finals),
        "no_dp_accuracy": _mean(no_dp_finals),
        "max_drop_from_best": max(r["best_accuracy"] - r["final_accuracy"] for r in rows.values()),
        "seeds": rows,
    }


def scenarios_section(options: Options) -> dict[str, Any]:
    """Every shipped scenario without a section of its own, over ``options.seeds``."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="utility-bench-scenarios-") as tmp:
        workdir = (options.keep or Path(tmp)) / "scenarios"
        for path in scenario_files():
            out[load_scenario(path).name] = run_scenario_seeds(path, options.seeds, workdir)
    return out


# ---------------------------------------------------------------------------------------
# Screening: an in-process replay of a scenario's federation (no Ray, no apps).
# ---------------------------------------------------------------------------------------


def replay(plan: FederationPlan) -> list[float]:
    """Server-side accuracy after each round of ``plan``, replayed in this process.

    For screening settings before a real ``edgefl simulate`` run confirms them: the same
    partitions, the same trainer (``train_local``) with each device's privacy plan
    (``plan_run``: σ, batches per epoch) and accountant history, the ClientApp's
    per-round seeds and dropout draws, the server's per-round learning rate, and the
    strategy's aggregation (FedAvg weighted by sample count, FedAvgM's server momentum,
    FedMedian's coordinate-wise median). Not replayed: the round timeout (every device
    that does not drop out replies) and selection by capability (with ``fraction_train``
    below 1 the draw is uniform). ``dropouts-stragglers`` as shipped before its rework
    replayed to exactly what ``edgefl simulate`` gave (78.6% final, 82.5% best, seed 1).
    """
    import random
    import warnings

    import numpy as np
    import torch

    from edgefl.datasets import load_dataset
    from edgefl.edge_agent.fl import privacy as pv
    from edgefl.edge_agent.fl.data import PartitionData
    from edgefl.edge_agent.fl.trainer import train_local
    from edgefl.federation import profile_for
    from edgefl.training import evaluate
    from edgefl.zoo import build_trainable_model

    warnings.filterwarnings("ignore")  # Opacus' per-step notices
    n = plan.num_devices
    data = load_dataset(plan.dataset, test_fraction=plan.test_fraction, seed=plan.seed)
    model = build_trainable_model(plan.model_name)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    devices = []
    for pid in range(n):
        part = PartitionData(
            plan.dataset, pid, n, plan.dirichlet_alpha, plan.seed, plan.test_fraction
        )
        x, y = part.train_arrays()
        privacy = pv.plan_run(
            run_id="replay",
            plan_key="replay",
            num_examples=len(x),
            batch_size=plan.batch_size,
            local_epochs=plan.local_epochs,
            rounds=plan.rounds,
            target_epsilon=plan.dp.target_epsilon,
            delta=plan.dp.delta,
            dp=plan.dp.enabled,
            spent=[],
        )
        devices.append((x, y, privacy, profile_for(plan.profiles, pid, n).dropout))
    histories: list[list[list[float]]] = [[] for _ in range(n)]
    strategy = plan.strategy
    velocity: dict[str, Any] | None = None
    accuracies: list[float] = []
    k = max(int(n * plan.fraction_train), plan.min_train_nodes)
    for rnd in range(1, plan.rounds + 1):
        chosen: list[int] = list(range(n))
        if k < n:
            chosen = sorted(np.random.default_rng([plan.seed, rnd]).choice(n, k, replace=False))
        replies: list[tuple[dict[str, Any], int]] = []
        for pid in chosen:
            x, y, privacy, dropout = devices[pid]
            if random.Random(f"{plan.seed}:{pid}:{rnd}").random() < dropout:
                continue
            result = train_local(
                plan.model_name,
                state,
                x,
                y,
                epochs=plan.local_epochs,
                batch_size=plan.batch_size,
                lr=plan.round_lr(rnd),
                momentum=plan.momentum,
                optimizer=plan.optimizer,
                seed=(plan.seed * 1_000_003 + pid * 10_007 + rnd) % (2**31),
                dp=plan.dp.enabled,
                sigma=privacy.sigma,
                max_grad_norm=plan.dp.max_grad_norm,
                history=histories[pid],
                batches_per_epoch=privacy.batches,
            )
            histories[pid] = result.history
            replies.append((dict(result.state), len(x)))
        if replies:
            if strategy.name == "fedmedian":
                new = {key: np.median([s[key] for s, _ in replies], axis=0) for key in state}
            else:
                weights = np.array([m for _, m in replies], dtype=np.float64)
                weights /= weights.sum()
                new = {
                    key: sum(w * s[key] for w, (s, _) in zip(weights, replies, strict=True))
                    for key in state
                }
            if strategy.name == "fedavgm":
                step = {key: state[key] - new[key] for key in state}
                if strategy.server_momentum > 0:
                    if velocity is not None:
                        step = {
                            key: strategy.server_momentum * velocity[key] + step[key]
                            for key in state
                        }
                    velocity = step
                new = {key: state[key] - strategy.server_learning_rate * step[key] for key in state}
            state = {key: np.asarray(v, dtype=np.float32) for key, v in new.items()}
        model.load_state_dict({key: torch.from_numpy(v) for key, v in state.items()})
        accuracies.append(evaluate(model, data.x_test, data.y_test).accuracy)
    return accuracies


def _replay_main() -> int:
    """``python benchmarks/utility_scenarios.py FILE [--set JSON] [--seeds 0,1,2]``."""
    import argparse
    import json

    from edgefl.federation import load_plan

    parser = argparse.ArgumentParser(description="Replay a scenario in-process (screening).")
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--set", default="{}", help="JSON merged into the file's tables")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    import tomllib

    base = tomllib.loads(args.scenario.read_text())
    base.pop("simulation", None)
    override = json.loads(args.set)
    for seed in [int(s) for s in args.seeds.split(",")]:
        data = _merge(_merge(base, override), {"seed": seed})
        curve = replay(load_plan(data, str(args.scenario)))
        print(
            f"seed {seed}: final {curve[-1]:.2%} best {max(curve):.2%} "
            f"curve {' '.join(f'{a:.3f}' for a in curve)}",
            flush=True,
        )
    return 0


def _merge(data: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for key, value in override.items():
        old = out.get(key)
        out[key] = (
            _merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
        )
    return out


if __name__ == "__main__":
    raise SystemExit(_replay_main())
