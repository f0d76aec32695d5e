"""Scenario validation, reports, plots and the independent ε recomputation (no Ray)."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.errors import ConfigError, ExitCode
from edgefl.simulations.accounting import check_reported_epsilon, recompute_epsilon
from edgefl.simulations.plots import ACCURACY_PNG, DP_VS_NO_DP_PNG, EPSILON_PNG, write_plots
from edgefl.simulations.report import (
    REPORT_JSON,
    REPORT_MD,
    RoundRow,
    RunResult,
    build_report,
    write_reports,
)
from edgefl.simulations.resources import TreeRssSampler, tree_rss_mb
from edgefl.simulations.scenario import (
    STRATEGIES,
    load_scenario,
    parse_scenario,
    shipped_scenarios,
)

SCENARIOS = {p.stem: p for p in shipped_scenarios()}

VALID: dict[str, Any] = {
    "scenario": {"name": "t", "description": "test"},
    "data": {
        "dataset": "digits",
        "model": "digits-cnn",
        "num_devices": 6,
        "dirichlet_alpha": 0.5,
    },
    "training": {"rounds": 3, "lr": 0.05},
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


# ---- scenario schema ------------------------------------------------------------------


def test_shipped_scenarios_are_the_five_named_ones() -> None:
    assert set(SCENARIOS) == {
        "quick",
        "digits-noniid-dp",
        "mnist5k-dp",
        "breast-cancer",
        "dropouts-stragglers",
    }


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_shipped_scenario_parses_and_becomes_a_plan(name: str) -> None:
    scenario = load_scenario(SCENARIOS[name])
    assert scenario.scenario.name == name
    plan = scenario.to_plan()
    assert plan.num_devices == scenario.data.num_devices
    assert plan.rounds == scenario.training.rounds
    assert plan.dataset == scenario.data.dataset
    assert plan.strategy.name == scenario.training.strategy
    assert plan.dp.enabled == scenario.privacy.enabled
    assert math.isclose(sum(p.fraction or 0 for p in plan.profiles), 1.0, abs_tol=1e-6)


def test_target_scenario_matches_the_issue() -> None:
    s = load_scenario(SCENARIOS["digits-noniid-dp"])
    assert (s.data.dataset, s.data.num_devices, s.data.dirichlet_alpha) == ("digits", 20, 0.5)
    assert s.privacy.enabled
    assert s.privacy.target_epsilon == 8.0
    assert s.training.rounds <= 30


def test_unknown_key_is_named_with_its_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(with_change("training.learning_rate", 0.1))
    assert "training.learning_rate" in err.value.message
    assert "unknown key" in err.value.message


def test_unknown_section_is_named() -> None:
    data = copy.deepcopy(VALID)
    data["privcy"] = {"target_epsilon": 3.0}
    with pytest.raises(ConfigError, match="privcy"):
        parse_scenario(data)


def test_bad_strategy_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(with_change("training.strategy", "fedsgd"))
    msg = err.value.message
    assert "training.strategy" in msg
    assert "fedsgd" in msg
    for name in STRATEGIES:
        assert name in msg


def test_strategy_params_must_fit_the_strategy() -> None:
    data = with_change("training.strategy", "fedavg")
    data["training"]["strategy_params"] = {"proximal_mu": 0.1}
    with pytest.raises(ConfigError, match="proximal_mu"):
        parse_scenario(data)
    data["training"]["strategy"] = "fedprox"
    assert parse_scenario(data).to_plan().strategy.proximal_mu == 0.1


def test_unknown_dataset_and_mismatched_model() -> None:
    with pytest.raises(ConfigError, match=r"data\.dataset.*unknown dataset 'cifar10'"):
        parse_scenario(with_change("data.dataset", "cifar10"))
    with pytest.raises(ConfigError, match="built for dataset 'mnist5k'"):
        parse_scenario(with_change("data.model", "mnist-cnn"))


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        ("data.num_devices", 0, "data.num_devices"),
        ("data.dirichlet_alpha", -1.0, "data.dirichlet_alpha"),
        ("training.rounds", "ten", "training.rounds"),
        ("privacy.delta", 2.0, "privacy.delta"),
        ("simulation.round_timeout_s", 0, "simulation.round_timeout_s"),
        ("scenario.name", "has space", "scenario.name"),
    ],
)
def test_bad_values_name_the_key(path: str, value: Any, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(with_change(path, value))
    assert where in err.value.message
    assert repr(value) in err.value.message


def test_profiles_as_one_table_or_a_list_and_shares_checked() -> None:
    one = with_change("profiles", {"speed": 0.5, "dropout": 0.2})
    assert parse_scenario(one).profiles[0].dropout == 0.2
    bad = with_change("profiles", [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}])
    with pytest.raises(ConfigError, match="add up to 1"):
        parse_scenario(bad)


def test_stragglers_become_their_own_plan_profile() -> None:
    data = with_change(
        "profiles",
        [
            {"name": "fast", "share": 0.5},
            {
                "name": "slow",
                "share": 0.5,
                "speed": 0.5,
                "dropout": 0.3,
                "straggler_fraction": 0.5,
                "straggler_speed": 0.05,
            },
        ],
    )
    plan = parse_scenario(data).to_plan()
    speeds = sorted((p.compute_speed, p.fraction, p.dropout) for p in plan.profiles)
    assert speeds == [(0.05, 0.25, 0.3), (0.5, 0.25, 0.3), (1.0, 0.5, 0.0)]


def test_without_dp_switches_off_both_kinds() -> None:
    data = with_change(
        "central_dp", {"noise_multiplier": 1.0, "clipping_norm": 1.0, "max_epsilon": 5.0}
    )
    s = parse_scenario(data)
    assert s.to_plan().central_dp.enabled
    off = s.without_dp()
    assert not off.privacy.enabled
    assert off.central_dp is None
    assert s.privacy.enabled  # the original is untouched


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[scenario\nname = 'x'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ConfigError, match="cannot read scenario"):
        load_scenario(tmp_path / "missing.toml")


def test_cli_rejects_a_bad_scenario_with_exit_code_3(tmp_path: Path) -> None:
    text = tomllib.loads(SCENARIOS["quick"].read_text())
    text["training"]["strategy"] = "fedbogus"
    path = tmp_path / "bad.toml"
    lines = []
    for section, values in text.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["simulate", "--scenario", str(path), "--out", str(tmp_path)])
    assert result.exit_code == ExitCode.CONFIG
    assert "training.strategy" in result.output
    assert "fedbogus" in result.output
    assert not (tmp_path / REPORT_JSON).exists()


# ---- ε recomputation ------------------------------------------------------------------


def test_recompute_matches_an_accountant_stepped_by_hand() -> None:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    history = [(1.1, 1 / 7, 7), (1.1, 1 / 7, 7), (0.9, 1 / 5, 10)]
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert recompute_epsilon(history, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert recompute_epsilon([], 1e-5) == 0.0
    with pytest.raises(ValueError, match="sigma"):
        recompute_epsilon([(0.0, 0.1, 3)], 1e-5)


def test_fresh_engine_per_round_under_reports() -> None:
    per_round = [(1.0, 0.1, 10)] * 10
    one_round = recompute_epsilon(per_round[:1], 1e-5)
    check = check_reported_epsilon({"a": one_round}, {"a": per_round}, 1e-5)
    assert check.ratios["a"] < 0.6
    assert check.max_relative_error > 0.4
    honest = check_reported_epsilon(
        {"a": recompute_epsilon(per_round, 1e-5)}, {"a": per_round}, 1e-5
    )
    assert honest.max_relative_error < 1e-9


# ---- reports and plots ----------------------------------------------------------------


def synthetic_run(label: str, rounds: int, dp: bool) -> RunResult:
    rows = []
    for r in range(1, rounds + 1):
        eps = {f"sim-{d:03d}": (0.8 * r + 0.1 * d if dp else 0.0) for d in range(4)} if dp else {}
        rows.append(
            RoundRow(
                round=r,
                accuracy=min(0.95, 0.3 + 0.1 * r),
                loss=2.0 / r,
                wall_s=1.5,
                peak_rss_mb=1200.0 + r,
                epsilon_per_device=eps,
                trained=4 - (r % 2),
                failures=r % 2,
            )
        )
    return RunResult(
        label=label,
        rows=rows,
        epsilon_per_device=rows[-1].epsilon_per_device,
        startup_s=20.0,
        wall_s=20.0 + 1.5 * rounds,
        peak_rss_mb=1200.0 + rounds,
        failure_reasons={"dropout": sum(r.failures for r in rows)},
    )


def test_report_contract_markdown_and_plots(tmp_path: Path) -> None:
    scenario = parse_scenario(VALID)
    dp = synthetic_run("dp", 5, dp=True)
    report = build_report(
        scenario="t",
        description="test",
        config=scenario.model_dump(mode="json"),
        dp=dp,
        no_dp=synthetic_run("no-dp", 5, dp=False),
    )
    report["plots"] = write_plots(report, tmp_path)
    write_reports(report, tmp_path)

    loaded = json.loads((tmp_path / REPORT_JSON).read_text())
    assert loaded["scenario"] == "t"
    assert loaded["final_accuracy"] == dp.rows[-1].accuracy
    assert loaded["epsilon_per_device"] == dp.epsilon_per_device
    assert [r["round"] for r in loaded["rounds"]] == [1, 2, 3, 4, 5]
    for row, src in zip(loaded["rounds"], dp.rows, strict=True):
        assert set(row) >= {"round", "accuracy", "loss", "epsilon_max", "wall_s", "peak_rss_mb"}
        assert row["epsilon_max"] == max(src.epsilon_per_device.values())
        assert row["epsilon_min"] == min(src.epsilon_per_device.values())
    assert loaded["failures"] == sum(r.failures for r in dp.rows)
    assert loaded["no_dp"]["final_accuracy"] == pytest.approx(0.8)
    assert loaded["versions"]["flwr"] == "1.41.0"

    md = (tmp_path / REPORT_MD).read_text()
    assert "# Simulation `t`" in md
    assert md.count("\n| ") == 1 + 5  # header + one line per round
    for png in (ACCURACY_PNG, EPSILON_PNG, DP_VS_NO_DP_PNG):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md


def test_no_comparison_plot_without_a_no_dp_run(tmp_path: Path) -> None:
    report = build_report(
        scenario="t", description="", config={}, dp=synthetic_run("dp", 2, dp=True)
    )
    assert write_plots(report, tmp_path) == [ACCURACY_PNG, EPSILON_PNG]
    assert not (tmp_path / DP_VS_NO_DP_PNG).exists()


# ---- resources ------------------------------------------------------------------------


def test_tree_rss_counts_a_child_process() -> None:
    import subprocess
    import sys

    alone = tree_rss_mb()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; b = bytearray(200 * 2**20); sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        with TreeRssSampler(interval_s=0.05) as sampler:
            for _ in range(100):
                if tree_rss_mb() - alone > 150:
                    break
                import time

                time.sleep(0.05)
            peak = sampler.take_window_peak()
        assert peak - alone > 150
        assert sampler.peak_mb >= peak
    finally:
        child.communicate(b"")


def test_running_totals_carry_devices_forward() -> None:
    from edgefl.server.fl.ledger import LedgerRow
    from edgefl.simulations.runner import _running_totals

    def row(device: str, rnd: int, total: float) -> LedgerRow:
        return LedgerRow(device, rnd, 0.1, total, 1e-5, 1.0, 0.2, 5, [], 10, 0.1, 1.0)

    ledger = [row("a", 1, 1.0), row("b", 1, 2.0), row("a", 3, 1.5)]
    totals = _running_totals(ledger, [1, 2, 3])
    assert totals == {1: {"a": 1.0, "b": 2.0}, 2: {"a": 1.0, "b": 2.0}, 3: {"a": 1.5, "b": 2.0}}
