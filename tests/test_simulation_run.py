"""A real simulation through the CLI: Flower's engine (Ray), our ServerApp and ClientApp.

One Ray run of the README's main command (quick.toml as shipped) for the whole file: about a
minute here, more on a loaded machine, most of it Ray's and the workers' start-up.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgefl.simulations.plots import ACCURACY_PNG, EPSILON_PNG
from edgefl.simulations.scenario import load_scenario, shipped_scenarios

QUICK = next(p for p in shipped_scenarios() if p.stem == "quick")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("quick")
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("edgefl")),
            "simulate",
            "--scenario",
            str(QUICK),
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # --json: stdout is exactly one JSON document, whatever Ray and Flower print.
    return out, json.loads(proc.stdout), proc.stderr


@pytest.mark.slow
def test_report_follows_the_output_contract(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    out, report, _ = quick_run
    scenario = load_scenario(QUICK)
    assert report == json.loads((out / "report.json").read_text())
    assert report["scenario"] == "quick"
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, scenario.rounds + 1))
    for row in rounds:
        for key, kind in (
            ("round", int),
            ("accuracy", float),
            ("loss", float),
            ("epsilon_max", float),
            ("wall_s", float),
            ("peak_rss_mb", float),
        ):
            assert isinstance(row[key], kind), (key, row[key])
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["wall_s"] > 0
        # Ray workers are child processes: the tree is far above one Python process.
        assert row["peak_rss_mb"] > 300
    assert report["final_accuracy"] == rounds[-1]["accuracy"]
    eps = report["epsilon_per_device"]
    assert sorted(eps) == [f"sim-{i:03d}" for i in range(scenario.num_devices)]
    cap = scenario.dp.cap
    assert all(0 < e <= cap * (1 + 1e-6) for e in eps.values())
    assert rounds[-1]["epsilon_max"] == pytest.approx(max(eps.values()))
    # ε only grows, round after round.
    assert rounds[0]["epsilon_max"] <= rounds[-1]["epsilon_max"]


MAIN_MIN_ACCURACY = 0.75
"""The main command must visibly learn: chance on digits is 10%; over seeds 0-4 it ends at
89-93% (benchmarks/utility_bench.py --only main), so a regression towards chance fails."""


@pytest.mark.slow
def test_the_main_command_learns_under_dp(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    _, report, _ = quick_run
    scenario = load_scenario(QUICK)
    assert scenario.dp.enabled
    assert scenario.dp.target_epsilon == 8.0
    assert report["complete"], report["shortfall"]
    accuracies = [r["accuracy"] for r in report["rounds"]]
    assert report["final_accuracy"] >= MAIN_MIN_ACCURACY, accuracies
    # A learning curve, not a lucky last round: it starts far below where it ends.
    assert accuracies[0] < report["final_accuracy"] - 0.2, accuracies
    # Every device spent its budget (DP was on all the way), none past it.
    eps = report["epsilon_per_device"].values()
    assert all(0.9 * scenario.dp.cap < e <= scenario.dp.cap * (1 + 1e-6) for e in eps)


@pytest.mark.slow
def test_plots_markdown_and_ledger(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    from edgefl.server.fl.ledger import FlStore

    out, report, _ = quick_run
    for png in (ACCURACY_PNG, EPSILON_PNG):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| round |" in md
    assert f"{report['final_accuracy']:.2%}" in md

    store = FlStore(report["registry_url"])
    try:
        ledger = store.ledger(report["run_id"])
    finally:
        store.close()
    assert report["registry_url"].endswith(str(out / "registry.db"))
    trained = sum(r["devices_trained"] for r in report["rounds"])
    assert trained > 0
    assert len(ledger) == trained
    latest: dict[str, float] = {}
    for row in ledger:
        assert row.epsilon_total >= latest.get(row.device_id, 0.0)
        latest[row.device_id] = row.epsilon_total
    assert latest == pytest.approx(report["epsilon_per_device"])
    # The runner recomputed every device's ε from the ledger's (σ, q, steps).
    check = report["epsilon_check"]
    assert check["devices"] == len(latest)
    assert check["max_relative_error"] < 0.01
    assert not math.isnan(report["peak_rss_mb"])
