"""The federated levers of the DP target: FedAvgM (server momentum), a learning-rate
schedule across rounds (``lr_final``), and how both reach devices in a deployment."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvgM

from edgefl.errors import ConfigError
from edgefl.federation import ClientInstructions, FederationPlan, load_plan
from edgefl.server.fl.serverapp import plan_from_run_config, round_config
from edgefl.server.fl.strategy import build_strategy, load_strategy_state, strategy_state


def test_fedavgm_is_flowers_with_the_plans_server_step() -> None:
    plan = load_plan(
        {"strategy": {"name": "fedavgm", "server_learning_rate": 0.5, "server_momentum": 0.8}}
    )
    strategy = build_strategy(plan)
    assert type(strategy) is FedAvgM
    assert (strategy.server_learning_rate, strategy.server_momentum) == (0.5, 0.8)
    with pytest.raises(ConfigError, match=r"\['server_momentum'\] do not apply to 'fedavg'"):
        load_plan({"strategy": {"name": "fedavg", "server_momentum": 0.9}})
    with pytest.raises(ConfigError, match="server_momentum"):
        load_plan({"strategy": {"name": "fedavgm", "server_momentum": 1.0}})


def test_fedavgm_momentum_survives_a_checkpoint() -> None:
    plan = load_plan({"strategy": {"name": "fedavgm", "server_momentum": 0.9}})
    strategy = build_strategy(plan)
    momentum = [np.arange(6.0).reshape(2, 3)] + [np.full(3, -0.5)] * 11
    strategy.momentum_vector = momentum  # type: ignore[attr-defined]
    blob, meta = strategy_state(strategy)
    fresh = build_strategy(plan)
    load_strategy_state(fresh, blob, json.loads(json.dumps(meta)))
    restored = fresh.momentum_vector  # type: ignore[attr-defined]
    assert len(restored) == len(momentum)  # in the model's key order, past 10 entries
    for got, want in zip(restored, momentum, strict=True):
        np.testing.assert_array_equal(got, want)


def test_lr_final_is_a_half_cosine_over_the_planned_rounds() -> None:
    plan = load_plan({"rounds": 5, "lr": 0.2, "lr_final": 0.02})
    lrs = [plan.round_lr(r) for r in range(1, 7)]
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[4] == pytest.approx(0.02)
    assert lrs[2] == pytest.approx((0.2 + 0.02) / 2)
    assert lrs[5] == pytest.approx(0.02)  # past the plan
    assert all(a > b for a, b in itertools.pairwise(lrs[:5]))
    assert lrs[1] == pytest.approx(0.02 + 0.18 * 0.5 * (1 + math.cos(math.pi / 4)))
    constant = load_plan({"rounds": 5, "lr": 0.2})
    assert {constant.round_lr(r) for r in range(1, 6)} == {0.2}
    with pytest.raises(ConfigError, match="lr_final"):
        load_plan({"lr_final": 0})


def test_each_round_sends_its_learning_rate_to_devices() -> None:
    plan = load_plan({"rounds": 3, "lr": 0.3, "lr_final": 0.03})
    base = ClientInstructions.from_plan(plan, "run-1").to_config()
    sent = [
        ClientInstructions.from_config(dict(round_config(base, plan, rnd, "{}")))
        for rnd in (1, 2, 3)
    ]
    assert [inst.server_round for inst in sent] == [1, 2, 3]
    assert [inst.lr for inst in sent] == pytest.approx([0.3, 0.165, 0.03])
    # The privacy plan does not move with the learning rate.
    assert len({inst.plan_key for inst in sent}) == 1


def test_new_keys_reach_a_deployed_run_and_leave_older_plans_keys_alone() -> None:
    plan = load_plan(
        {
            "model": "digits-mlp",
            "lr_final": 0.01,
            "strategy": {"name": "fedavgm", "server_momentum": 0.7},
        }
    )
    run_config = {**plan.to_flat(), "registry-url": "sqlite:///x.db", "run-id": "dep-1"}
    assert plan_from_run_config(run_config) == (plan, "sqlite:///x.db", "dep-1")
    assert FederationPlan.from_flat(plan.to_flat()) == plan
    # A plan that sets none of them keeps the key devices hold σ under.
    assert load_plan({}).plan_key() == "3509e8f141aeaadf"
    assert load_plan({"lr_final": 0.01}).plan_key() != load_plan({}).plan_key()
    fedavgm = load_plan({"strategy": {"name": "fedavgm"}}).plan_key()
    assert (
        fedavgm != load_plan({"strategy": {"name": "fedavgm", "server_momentum": 0.5}}).plan_key()
    )


@pytest.mark.slow  # Opacus' first import
def test_digits_mlp_wide_trains_under_dp_sgd_beside_an_unchanged_digits_mlp() -> None:
    from edgefl.datasets import MODELS_BY_DATASET, load_dataset
    from edgefl.edge_agent.fl.trainer import build_trainable_model, train_local
    from edgefl.zoo import build_model, get_spec

    def size(name: str) -> int:
        return sum(p.numel() for p in build_model(name).parameters())

    assert size("digits-mlp") == 64 * 16 + 16 + 16 * 10 + 10  # other scenarios rely on it
    assert size("digits-mlp-wide") == 64 * 32 + 32 + 32 * 10 + 10
    assert get_spec("digits-mlp-wide").dataset == "digits"
    assert MODELS_BY_DATASET["digits"][0] == "digits-cnn"  # the default is unchanged
    data = load_dataset("digits", seed=0)
    state = {
        k: v.detach().numpy().copy()
        for k, v in build_trainable_model("digits-mlp-wide").state_dict().items()
    }
    result = train_local(
        "digits-mlp-wide", state, data.x_train[:64], data.y_train[:64], epochs=1,
        batch_size=16, lr=0.3, momentum=0.9, optimizer="sgd", seed=0, dp=True, sigma=1.0,
        max_grad_norm=1.0, history=[],
    )  # fmt: skip
    assert result.history == [[1.0, 0.25, 4]]
    assert {k: v.shape for k, v in result.state.items()} == {k: v.shape for k, v in state.items()}
    assert any(not np.array_equal(result.state[k], state[k]) for k in state)


def test_every_screened_lever_is_a_valid_override_of_the_target_scenario() -> None:
    """benchmarks/utility_bench.py --only levers runs each entry: each must load, keep
    the shipped seed line replaceable, and change what its name says."""
    import sys
    import tomllib
    from pathlib import Path

    from edgefl.simulations.scenario import parse_scenario

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import utility_bench as bench

    text = bench.DP_TARGET_SCENARIO.read_text(encoding="utf-8")
    shipped = parse_scenario(tomllib.loads(text))
    names = [name for name, _ in bench.LEVERS]
    assert len(set(names)) == len(names)
    assert all("," not in name for name in names)  # --levers is comma-separated
    assert bench.parse_levers(",".join(names)) == names
    for name, override in bench.LEVERS:
        copy = bench.with_override(text, 3, bench.merge(override, bench.LEVER_BASE), Path("x"))
        scenario = parse_scenario(tomllib.loads(copy))
        assert scenario.seed == 3, name
        assert not scenario.simulation.compare_no_dp, name
        keys = ["model", "lr", "lr_final", "batch_size", "local_epochs"]
        keys += ["centre_inputs", "augment_multiplicity"]
        changed = {key for key in keys if getattr(scenario, key) != getattr(shipped, key)}
        changed |= {"strategy"} if scenario.strategy != shipped.strategy else set()
        changed |= {"dp"} if scenario.dp != shipped.dp else set()
        # Every key the override changes is one it names, and it changes something (an
        # entry merged onto the previous configuration may name a key at today's value).
        assert changed <= set(override), name
        assert bool(changed) == bool(override), name
    assert bench.with_override(text, 4, {}, Path("x")) == text.replace("seed = 0", "seed = 4")
