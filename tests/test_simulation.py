"""Scenario validation, reports, plots and the independent ε recomputation (no Ray)."""

from __future__ import annotations

import copy
import json
import logging
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.config import config_renames, load_config
from edgefl.errors import ConfigError, ExitCode
from edgefl.federation import STRATEGIES, FederationPlan, keys_table
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
    Scenario,
    SimulationSection,
    load_scenario,
    parse_scenario,
    shipped_scenarios,
)

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = {p.stem: p for p in shipped_scenarios()}
EXAMPLE_PLANS = sorted((ROOT / "deploy" / "plans").glob("*.toml"))

VALID: dict[str, Any] = {
    "name": "t",
    "description": "test",
    "dataset": "digits",
    "model": "digits-cnn",
    "num_devices": 6,
    "dirichlet_alpha": 0.5,
    "rounds": 3,
    "lr": 0.05,
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
    assert [p.name for p in EXAMPLE_PLANS] == ["digits-dp.toml"]


@pytest.mark.parametrize(
    "path",
    [*SCENARIOS.values(), *EXAMPLE_PLANS],
    ids=[*SCENARIOS, *(f"deploy-{p.stem}" for p in EXAMPLE_PLANS)],
)
def test_every_shipped_file_is_both_a_scenario_and_a_plan(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A shipped scenario or example plan loads as both, in today's keys only."""
    with caplog.at_level(logging.WARNING):
        scenario = load_scenario(path)
    assert not caplog.records, "a shipped file uses an old key: " + caplog.text
    assert scenario.name == path.stem
    with caplog.at_level(logging.WARNING):
        plan = load_config(FederationPlan, path)  # what `edgefl server train --plan` reads
    # The plan is the file without [simulation]: the same plan the simulation runs.
    assert plan == scenario.plan
    assert plan.model_dump() == scenario.model_dump(exclude={"simulation"})
    ignored = [r.getMessage() for r in caplog.records]
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    assert ignored == (
        ["[simulation] is for `edgefl simulate` only; the plan ignores it"]
        if "simulation" in raw
        else []
    )
    assert math.isclose(
        sum(p.fraction or 1 / len(plan.profiles) for p in plan.profiles), 1.0, abs_tol=1e-6
    )


def test_target_scenario_matches_the_issue() -> None:
    s = load_scenario(SCENARIOS["digits-noniid-dp"])
    assert (s.dataset, s.num_devices, s.dirichlet_alpha) == ("digits", 20, 0.5)
    assert s.dp.enabled
    assert s.dp.target_epsilon == 8.0
    assert s.rounds <= 30


def test_quick_scenario_is_the_main_commands_plan() -> None:
    """The main command's plan: the small MLP under per-device DP at ε=8 (settings chosen
    over seeds 0-4 with benchmarks/utility_bench.py; test_simulation_run checks it learns)."""
    plan = load_scenario(SCENARIOS["quick"]).plan
    assert plan.model_dump(include={"dataset", "model", "num_devices", "rounds", "lr"}) == {
        "dataset": "digits",
        "model": "digits-mlp",
        "num_devices": 4,
        "rounds": 20,
        "lr": 0.2,
    }
    assert (plan.batch_size, plan.momentum, plan.optimizer) == (32, 0.9, "sgd")
    assert (plan.dirichlet_alpha, plan.local_epochs, plan.seed) == (1.0, 1, 0)
    assert (plan.min_available_nodes, plan.min_train_nodes, plan.node_wait_s) == (4, 4, 30.0)
    assert plan.round_timeout_s == 900.0
    assert (plan.dp.enabled, plan.dp.target_epsilon, plan.strategy.name) == (True, 8.0, "fedavg")
    assert not plan.central_dp.enabled


def test_a_plan_without_simulation_is_a_scenario_with_defaults() -> None:
    s = parse_scenario(VALID)
    assert s.simulation == SimulationSection()
    assert s.plan == FederationPlan.model_validate(VALID)


def test_a_scenario_needs_a_name_which_a_file_gives(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    del data["name"]
    with pytest.raises(ConfigError, match="name"):
        parse_scenario(data)
    assert FederationPlan.model_validate(data).name is None  # a plan does not
    plan = tmp_path / "my-plan.toml"
    plan.write_text('dataset = "digits"\nrounds = 2\n', encoding="utf-8")
    assert load_scenario(plan).name == "my-plan"


def test_unknown_key_is_named_with_its_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(with_change("dp.target_epsilom", 0.1))
    assert "dp.target_epsilom" in err.value.message
    assert "unknown key" in err.value.message
    with pytest.raises(ConfigError, match=r"simulation\.node_count.*unknown key"):
        parse_scenario(with_change("simulation.node_count", 3))


def test_unknown_section_is_named() -> None:
    data = copy.deepcopy(VALID)
    data["privcy"] = {"target_epsilon": 3.0}
    with pytest.raises(ConfigError, match="privcy"):
        parse_scenario(data)


def test_bad_strategy_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(with_change("strategy.name", "fedsgd"))
    msg = err.value.message
    assert "strategy.name" in msg
    assert "fedsgd" in msg
    for name in STRATEGIES:
        assert name in msg


def test_strategy_params_must_fit_the_strategy() -> None:
    data = with_change("strategy", {"name": "fedavg", "proximal_mu": 0.1})
    with pytest.raises(ConfigError, match="proximal_mu"):
        parse_scenario(data)
    data["strategy"]["name"] = "fedprox"
    assert parse_scenario(data).plan.strategy.proximal_mu == 0.1


def test_unknown_dataset_and_mismatched_model() -> None:
    with pytest.raises(ConfigError, match=r"dataset.*unknown dataset 'cifar10'"):
        parse_scenario(with_change("dataset", "cifar10"))
    with pytest.raises(ConfigError, match="built for dataset 'mnist5k'"):
        parse_scenario(with_change("model", "mnist-cnn"))


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        ("num_devices", 0, "num_devices"),
        ("dirichlet_alpha", -1.0, "dirichlet_alpha"),
        ("rounds", "ten", "rounds"),
        ("dp.delta", 2.0, "dp.delta"),
        ("round_timeout_s", 0, "round_timeout_s"),
        ("simulation.num_cpus", 0, "simulation.num_cpus"),
        ("name", "has space", "name"),
    ],
)
def test_bad_values_name_the_key(path: str, value: Any, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(with_change(path, value))
    assert where in err.value.message
    assert repr(value) in err.value.message


def test_profiles_as_one_table_or_a_list_and_fractions_checked() -> None:
    one = with_change("profiles", {"compute_speed": 0.5, "dropout": 0.2})
    assert parse_scenario(one).profiles[0].dropout == 0.2
    bad = with_change("profiles", [{"name": "a", "fraction": 0.5}, {"name": "b", "fraction": 0.4}])
    with pytest.raises(ConfigError, match="sum to 1"):
        parse_scenario(bad)
    same = with_change("profiles", [{"name": "a"}, {"name": "a"}])
    with pytest.raises(ConfigError, match="names must be unique"):
        parse_scenario(same)


def test_stragglers_travel_as_their_own_profile() -> None:
    from edgefl.federation import ClientInstructions, profile_for

    data = with_change(
        "profiles",
        [
            {"name": "fast", "fraction": 0.5},
            {
                "name": "slow",
                "fraction": 0.5,
                "compute_speed": 0.5,
                "dropout": 0.3,
                "straggler_fraction": 0.5,
                "straggler_speed": 0.05,
            },
        ],
    )
    plan = parse_scenario(data).plan
    sent = ClientInstructions.from_plan(plan, "r").device_profiles()
    speeds = sorted((p.compute_speed, p.fraction, p.dropout) for p in sent)
    assert speeds == [(0.05, 0.25, 0.3), (0.5, 0.25, 0.3), (1.0, 0.5, 0.0)]
    # 8 devices: 4 fast, then the slow group's 2 regular and its 2 stragglers.
    assigned = [profile_for(plan.profiles, i, 8).compute_speed for i in range(8)]
    assert assigned == [1.0] * 4 + [0.5] * 2 + [0.05] * 2


def test_without_dp_switches_off_both_kinds() -> None:
    data = with_change(
        "central_dp",
        {"enabled": True, "noise_multiplier": 1.0, "clipping_norm": 1.0, "max_epsilon": 5.0},
    )
    s = parse_scenario(data)
    assert s.plan.central_dp.enabled
    off = s.without_dp()
    assert isinstance(off, Scenario)
    assert not off.dp.enabled
    assert not off.central_dp.enabled
    assert s.dp.enabled  # the original is untouched


# ---- the older scenario layout, read for one release --------------------------------

OLD_LAYOUT: dict[str, Any] = {
    "scenario": {"name": "old", "description": "the layout before plan = scenario"},
    "data": {
        "dataset": "digits",
        "model": "digits-cnn",
        "num_devices": 6,
        "dirichlet_alpha": 0.5,
        "min_samples_per_device": 8,
    },
    "training": {
        "rounds": 3,
        "lr": 0.05,
        "fraction_train": 0.5,
        "strategy": "fedprox",
        "strategy_params": {"proximal_mu": 0.01},
    },
    "privacy": {"target_epsilon": 3.0, "device_epsilon_cap": 2.5},
    "central_dp": {"noise_multiplier": 2.0, "clipping_norm": 1.0, "max_epsilon": 50.0},
    "profiles": [{"name": "a", "share": 0.5, "speed": 0.5}, {"name": "b", "share": 0.5}],
    "simulation": {"num_cpus": 0.5, "round_timeout_s": 120},
}

NEW_LAYOUT: dict[str, Any] = {
    "name": "old",
    "description": "the layout before plan = scenario",
    "dataset": "digits",
    "model": "digits-cnn",
    "num_devices": 6,
    "dirichlet_alpha": 0.5,
    "rounds": 3,
    "lr": 0.05,
    "fraction_train": 0.5,
    # What the old layout implied: wait for every device, train every sampled one,
    # a 30 s node wait, no federated evaluation.
    "min_available_nodes": 6,
    "min_train_nodes": 3,
    "min_evaluate_nodes": 0,
    "node_wait_s": 30,
    "round_timeout_s": 120,
    "strategy": {"name": "fedprox", "proximal_mu": 0.01},
    "dp": {"target_epsilon": 3.0, "epsilon_cap": 2.5},
    "central_dp": {
        "enabled": True,
        "noise_multiplier": 2.0,
        "clipping_norm": 1.0,
        "max_epsilon": 50.0,
    },
    "profiles": [
        {"name": "a", "fraction": 0.5, "compute_speed": 0.5},
        {"name": "b", "fraction": 0.5},
    ],
    "simulation": {"num_cpus": 0.5},
}


def test_old_layout_reads_as_the_new_with_a_warning_per_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = copy.deepcopy(OLD_LAYOUT)
    strategy["training"]["strategy"] = "fedavg"  # central DP needs fedavg
    del strategy["training"]["strategy_params"]
    expected = copy.deepcopy(NEW_LAYOUT)
    expected["strategy"] = {"name": "fedavg"}
    with caplog.at_level(logging.WARNING):
        old = parse_scenario(strategy)
    assert old.model_dump() == parse_scenario(expected).model_dump()
    # The plain renames are the models' renamed_keys, listed for validate-config.
    assert [(r.old, r.new) for r in config_renames(old)][:2] == [
        ("privacy", "dp"),
        ("dp.device_epsilon_cap", "dp.epsilon_cap"),
    ]
    text = caplog.text
    for old_key, new_key in [
        ("scenario.name", "name"),
        ("data.num_devices", "num_devices"),
        ("training.rounds", "rounds"),
        ("training.strategy", "strategy.name"),
        ("privacy", "dp"),
        ("dp.device_epsilon_cap", "dp.epsilon_cap"),
        ("profiles.0.share", "profiles.0.fraction"),
        ("profiles.0.speed", "profiles.0.compute_speed"),
        ("simulation.round_timeout_s", "round_timeout_s"),
    ]:
        assert f"key {old_key} is renamed {new_key}; accepted until the next release" in text
    assert "central_dp: the table alone no longer switches it on" in text
    assert "data.min_samples_per_device: no longer used" in text


def test_old_strategy_params_become_the_strategy_table() -> None:
    data = copy.deepcopy(OLD_LAYOUT)
    del data["central_dp"]
    expected = copy.deepcopy(NEW_LAYOUT)
    del expected["central_dp"]
    assert parse_scenario(data).model_dump() == parse_scenario(expected).model_dump()


def test_old_and_new_name_of_one_key_is_refused() -> None:
    data = copy.deepcopy(OLD_LAYOUT)
    data["rounds"] = 4
    with pytest.raises(
        ConfigError, match=r"both training\.rounds \(its old name\) and rounds are given"
    ):
        parse_scenario(data)


def test_server_train_reads_an_old_scenario_file(tmp_path: Path) -> None:
    old = tmp_path / "old.toml"
    old.write_text(
        """
[scenario]
name = "old"
[data]
dataset = "digits"
model = "digits-cnn"
num_devices = 4
dirichlet_alpha = 1.0
[training]
rounds = 2
lr = 0.05
[privacy]
target_epsilon = 8.0
[simulation]
num_cpus = 1
node_wait_s = 45
""",
        encoding="utf-8",
    )
    plan = load_config(FederationPlan, old)
    assert (plan.name, plan.rounds, plan.node_wait_s, plan.min_available_nodes) == (
        "old",
        2,
        45.0,
        4,
    )


def test_server_train_takes_a_scenario_file_and_says_it_ignores_simulation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The plan is read (and [simulation] set aside) before the server config is."""
    missing = tmp_path / "server.yaml"
    with caplog.at_level(logging.WARNING, logger="edgefl.federation"):
        result = CliRunner().invoke(
            app,
            ["server", "train", "--plan", str(SCENARIOS["quick"]), "--config", str(missing)],
        )
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert "[simulation] is for `edgefl simulate` only" in caplog.text
    assert str(missing) in result.output  # got past the plan, stopped at the server config


def test_help_points_to_the_plan_keys_and_the_example() -> None:
    import re

    result = CliRunner().invoke(app, ["server", "train", "--help"], env={"COLUMNS": "200"})
    text = re.sub(r"[\s│]+", " ", result.output)
    assert "README 'Federation plan keys'" in text
    assert "deploy/plans/digits-dp.toml" in text
    assert "simulation table is ignored" in text
    assert (ROOT / "deploy" / "plans" / "digits-dp.toml").is_file()


# ---- documentation ---------------------------------------------------------------------


def _readme_table(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = f"<!-- {marker}: start -->\n", f"<!-- {marker}: end -->"
    assert start in text, f"README lost its {marker} markers"
    assert end in text, f"README lost its {marker} markers"
    return text.split(start, 1)[1].split(end, 1)[0]


@pytest.mark.parametrize(
    ("marker", "model", "prefix"),
    [("plan-keys", FederationPlan, ""), ("simulation-keys", SimulationSection, "simulation.")],
)
def test_readme_key_tables_match_the_models(marker: str, model: Any, prefix: str) -> None:
    """The README's key tables are generated from the models' field descriptions."""
    assert _readme_table(marker) == keys_table(model, prefix), (
        f"regenerate the README table between the {marker} markers with: python -c "
        f"'from {model.__module__} import {model.__name__}; from edgefl.federation import "
        f'keys_table; print(keys_table({model.__name__}, "{prefix}"), end="")\''
    )


def test_every_plan_key_has_a_meaning() -> None:
    rows = keys_table(FederationPlan).splitlines()[2:]
    assert rows
    assert all(not row.endswith("|  |") for row in rows)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[scenario\nname = 'x'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ConfigError, match="cannot read scenario"):
        load_scenario(tmp_path / "missing.toml")


def test_cli_rejects_a_bad_scenario_with_exit_code_3(tmp_path: Path) -> None:
    text = SCENARIOS["quick"].read_text(encoding="utf-8")
    assert 'name = "fedavg"' in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace('name = "fedavg"', 'name = "fedbogus"'), encoding="utf-8")
    result = CliRunner().invoke(app, ["simulate", "--scenario", str(path), "--out", str(tmp_path)])
    assert result.exit_code == ExitCode.CONFIG
    assert "strategy.name" in result.output
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
    # The summary reads the scenario's keys (plan keys plus [simulation]).
    assert "- data: `digits` / `digits-cnn`, 6 devices, Dirichlet α=0.5" in md
    assert "- training: fedavg, 5/3 rounds, 1 local epoch(s), lr 0.05, batch 16" in md
    assert "- privacy: DP-SGD target ε=8.0 at δ=1e-05, clip 1.0" in md
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
