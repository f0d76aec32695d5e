"""Simulation cost, overhead against stock Flower + Opacus, and ε correctness.

    python benchmarks/simulation_bench.py --json

Three runs on Flower's simulation engine (Ray, 1 CPU per virtual client), one after the
other in this process:

1. **ours**: edgefl's ServerApp and ClientApp (``edgefl.server.fl.run_simulation``) on
   digits, ``--devices`` devices (100) × ``--rounds`` rounds (10), Dirichlet α=0.5,
   DP-SGD at ε=8, every device trained every round. Per round: wall time between round
   ends and the peak RSS summed over this process and all its descendants (Ray GCS,
   raylet, workers), sampled from /proc four times a second.
2. **stock**: the same workload (same partitions, model, σ, clip, epochs, optimiser) on a
   stock ``flwr.serverapp.strategy.FedAvg`` with a ClientApp that creates a new Opacus
   ``PrivacyEngine`` every round (Flower's Opacus example), in the same process.
   ``overhead_ratio_vs_stock`` = our wall / stock wall over rounds 2..R (round 1 holds
   Ray's start-up, which is the same for both and noisy); the total ratio is given too.
3. **rss**: ours again with ``--rss-devices`` devices (10) × ``--rss-rounds`` rounds (50)
   for ``rss_mb_by_round`` (skipped with ``--rss-rounds 0``).

ε: each device's true cumulative ε is recomputed from the (σ, q, steps) of every round
it trained in (ours: the privacy ledger; stock: its reply metrics) with a fresh Opacus
``RDPAccountant``, and compared with the ε each approach reports.

Progress goes to stderr; with --json stdout holds only the JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgefl.simulations.accounting import check_reported_epsilon
from edgefl.simulations.baseline import (
    StockRound,
    StockRun,
    make_stock_client_app,
    make_stock_server_app,
)
from edgefl.simulations.cli import stdout_to_stderr
from edgefl.simulations.resources import RSS_METHOD, TreeRssSampler

DELTA = 1e-5


def log(message: str) -> None:
    print(f"[simulation_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def plan_dict(devices: int, rounds: int) -> dict[str, Any]:
    return {
        "dataset": "digits",
        "model": "digits-cnn",
        "num_devices": devices,
        "dirichlet_alpha": 0.5,
        "seed": 0,
        "rounds": rounds,
        "local_epochs": 1,
        "batch_size": 16,
        "lr": 0.05,
        "momentum": 0.9,
        "optimizer": "sgd",
        "strategy": {"name": "fedavg"},
        "fraction_train": 1.0,
        "min_train_nodes": devices,
        "min_available_nodes": devices,
        "node_wait_s": 300.0,
        "round_timeout_s": 1800.0,
        "dp": {"enabled": True, "target_epsilon": 8.0, "delta": DELTA, "max_grad_norm": 1.0},
    }


BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"log_to_driver": False},
}


def run_ours(devices: int, rounds: int, registry_url: str) -> dict[str, Any]:
    from edgefl.federation import load_plan
    from edgefl.server.fl import new_run_id, run_simulation
    from edgefl.server.fl.ledger import FlStore

    plan = load_plan(plan_dict(devices, rounds))
    run_id = f"bench-{devices}x{rounds}-{new_run_id()}"
    walls: list[float] = []
    rss_rows: list[float] = []
    accuracies: list[float] = []
    with TreeRssSampler() as rss:
        started = time.perf_counter()
        last = [started]

        def on_round(report: Any) -> None:
            now = time.perf_counter()
            walls.append(now - last[0])
            last[0] = now
            rss_rows.append(rss.take_window_peak())
            accuracies.append(report.accuracy)
            log(
                f"ours {devices}x{rounds} round {report.round}: acc {report.accuracy:.3f} "
                f"wall {walls[-1]:.1f}s rss {rss_rows[-1]:.0f}MB"
            )

        with stdout_to_stderr():
            result = run_simulation(
                plan,
                registry_url=registry_url,
                run_id=run_id,
                resume=False,
                on_round=on_round,
                backend_config=json.loads(json.dumps(BACKEND)),
            )
        total = time.perf_counter() - started
        peak = rss.peak_mb
    store = FlStore(registry_url)
    try:
        ledger = store.ledger(run_id)
    finally:
        store.close()
    histories: dict[str, list[tuple[float, float, int]]] = {}
    for row in ledger:
        histories.setdefault(row.device_id, []).append((row.sigma, row.sample_rate, row.steps))
    check = check_reported_epsilon(result.epsilon_per_device, histories, DELTA)
    return {
        "wall_s": total,
        "round_wall_s": walls,
        "rss_mb_by_round": rss_rows,
        "peak_rss_mb": peak,
        "accuracy_by_round": accuracies,
        "check": check,
        "rounds_done": len(result.rounds),
        "status": result.status,
    }


def run_stock(devices: int, rounds: int) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    cfg = {
        "dataset": "digits",
        "model": "digits-cnn",
        "seed": 0,
        "dirichlet-alpha": 0.5,
        "num-partitions": devices,
        "test-fraction": 0.2,
        "rounds": rounds,
        "local-epochs": 1,
        "batch-size": 16,
        "lr": 0.05,
        "momentum": 0.9,
        "target-epsilon": 8.0,
        "delta": DELTA,
        "max-grad-norm": 1.0,
    }
    record = StockRun()
    with TreeRssSampler() as rss:
        started = time.perf_counter()

        def on_round(row: StockRound) -> None:
            row.peak_rss_mb = rss.take_window_peak()
            log(
                f"stock {devices}x{rounds} round {row.round}: acc {row.accuracy:.3f} "
                f"wall {row.wall_s:.1f}s rss {row.peak_rss_mb:.0f}MB"
            )

        server = make_stock_server_app(
            train_config=cfg, num_devices=devices, rounds=rounds, record=record, on_round=on_round
        )
        with stdout_to_stderr():
            run_simulation(
                server_app=server,
                client_app=make_stock_client_app(),
                num_supernodes=devices,
                backend_config=json.loads(json.dumps(BACKEND)),
            )
        total = time.perf_counter() - started
        peak = rss.peak_mb
    last_reported = {d: v[-1] for d, v in record.reported_epsilon.items()}
    check = check_reported_epsilon(last_reported, record.history, DELTA)
    return {
        "wall_s": total,
        "round_wall_s": [r.wall_s for r in record.rounds],
        "rss_mb_by_round": [r.peak_rss_mb for r in record.rounds],
        "peak_rss_mb": peak,
        "accuracy_by_round": [r.accuracy for r in record.rounds],
        "check": check,
        "rounds_done": len(record.rounds),
    }


def flatness(values: list[float], start: int) -> dict[str, Any]:
    """Spread of per-round peak RSS from round ``start`` (1-based) on, relative to it."""
    tail = values[start - 1 :]
    if len(tail) < 2:
        return {"rounds_compared": len(tail)}
    ref = tail[0]
    return {
        "from_round": start,
        "to_round": len(values),
        "max_rel_change": max(abs(v - ref) / ref for v in tail),
        "last_over_first": tail[-1] / ref,
        "within_10_percent": all(abs(v - ref) / ref <= 0.10 for v in tail),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rss-devices", type=int, default=10)
    parser.add_argument("--rss-rounds", type=int, default=50, help="0 skips the long RSS run")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument(
        "--skip-main", action="store_true", help="only the long RSS run (no ratio, no ε check)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgefl-simbench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'registry.db'}"
        ours = None
        if not args.skip_main:
            log(f"ours: {args.devices} devices x {args.rounds} rounds")
            ours = run_ours(args.devices, args.rounds, url)
        stock = None
        if not args.skip_stock and not args.skip_main:
            log(f"stock: {args.devices} devices x {args.rounds} rounds")
            stock = run_stock(args.devices, args.rounds)
        long_run = None
        if args.rss_rounds > 0:
            log(f"rss: {args.rss_devices} devices x {args.rss_rounds} rounds")
            long_run = run_ours(args.rss_devices, args.rss_rounds, url)

    out: dict[str, Any] = {"rss_method": RSS_METHOD}
    if ours is not None:
        out[f"devices_{args.devices}_rounds_{args.rounds}"] = {
            "wall_s": ours["wall_s"],
            "peak_rss_mb": ours["peak_rss_mb"],
            "rounds_done": ours["rounds_done"],
            "round_wall_s": ours["round_wall_s"],
            "round_peak_rss_mb": ours["rss_mb_by_round"],
            "final_accuracy": ours["accuracy_by_round"][-1] if ours["accuracy_by_round"] else None,
        }
        out["epsilon"] = {
            "ours_max_rel_error": ours["check"].max_relative_error,
            "ours_devices_checked": len(ours["check"].true),
            "ours_reported_max": max(ours["check"].reported.values(), default=0.0),
            "true_max": max(ours["check"].true.values(), default=0.0),
        }
    if ours is not None and stock is not None:
        ours_steady = sum(ours["round_wall_s"][1:])
        stock_steady = sum(stock["round_wall_s"][1:])
        ratios = list(stock["check"].ratios.values())
        out["overhead_ratio_vs_stock"] = ours_steady / stock_steady if stock_steady else math.nan
        out["overhead"] = {
            "definition": "sum of round wall times, rounds 2..R (round 1 holds Ray start-up)",
            "ours_rounds_2_to_R_s": ours_steady,
            "stock_rounds_2_to_R_s": stock_steady,
            "total_ratio_incl_startup": ours["wall_s"] / stock["wall_s"],
            "stock_wall_s": stock["wall_s"],
            "stock_round_wall_s": stock["round_wall_s"],
            "stock_peak_rss_mb": stock["peak_rss_mb"],
            "stock_final_accuracy": stock["accuracy_by_round"][-1]
            if stock["accuracy_by_round"]
            else None,
        }
        out["epsilon"]["stock_reported_over_true"] = statistics.mean(ratios) if ratios else math.nan
        out["epsilon"]["stock_reported_over_true_range"] = (
            [min(ratios), max(ratios)] if ratios else []
        )
        out["epsilon"]["stock_max_rel_error"] = stock["check"].max_relative_error
    if long_run is not None:
        series = long_run["rss_mb_by_round"]
        out["rss_mb_by_round"] = series
        out["rss_run"] = {
            "devices": args.rss_devices,
            "rounds": args.rss_rounds,
            "rounds_done": long_run["rounds_done"],
            "wall_s": long_run["wall_s"],
            "epsilon_max_rel_error": long_run["check"].max_relative_error,
            "flat_from_round_10": flatness(series, min(10, len(series))),
        }
    elif ours is not None:
        out["rss_mb_by_round"] = ours["rss_mb_by_round"]
        out["rss_run"] = {"note": "no long run; rss_mb_by_round is the main run's"}
    if args.json:
        json.dump(out, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
