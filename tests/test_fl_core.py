"""Federated core without Flower's engine: plan, accounting helpers, selection, screening,
bounded wait and the registry ledger (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from opacus.accountants import RDPAccountant

from edgefl.edge_agent.fl.privacy import (
    FilePrivacyStore,
    PrivacyState,
    choose_sigma,
    epsilon_of,
    merge_history,
    steps_per_round,
)
from edgefl.errors import ConfigError
from edgefl.federation import (
    ClientInstructions,
    DeviceProfile,
    FederationPlan,
    RoundReport,
    load_plan,
    profile_for,
)
from edgefl.server.fl.ledger import Checkpoint, DeviceRecord, FlStore, LedgerRow
from edgefl.server.fl.serverapp import NotEnoughNodesError, wait_for_nodes
from edgefl.server.fl.strategy import (
    build_strategy,
    load_strategy_state,
    screen_train_replies,
    select_nodes,
    strategy_state,
)

# ---------------------------------------------------------------------------- the plan


def test_plan_rejects_bad_input_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_plan({"strategy": {"name": "fedbest"}, "dp": {"delta": 2.0}, "num_devicez": 3})
    text = str(err.value)
    assert "strategy.name" in text
    assert "dp.delta" in text
    assert "num_devicez: unknown key" in text
    with pytest.raises(ConfigError, match="fractions must sum to 1"):
        load_plan({"profiles": [{"fraction": 0.5}, {"fraction": 0.2}]})
    with pytest.raises(ConfigError, match="min_available_nodes"):
        load_plan({"num_devices": 3, "min_available_nodes": 4})
    with pytest.raises(ConfigError, match="model"):
        load_plan({"dataset": "digits", "model": "mnist-cnn"})
    with pytest.raises(ConfigError, match="proximal_mu"):
        load_plan({"strategy": {"name": "fedprox"}})


def test_plan_flat_round_trip_and_instructions() -> None:
    plan = load_plan(
        {
            "num_devices": 6,
            "strategy": {"name": "fedprox", "proximal_mu": 0.05},
            "profiles": [
                {"fraction": 0.5},
                {"fraction": 0.5, "compute_speed": 0.25, "dropout": 0.2},
            ],
            "dp": {"target_epsilon": 3.0, "epsilon_cap": 2.5},
        }
    )
    flat = plan.to_flat()
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert FederationPlan.from_flat(flat) == plan
    with pytest.raises(ConfigError, match=r"dp\.target_epsilon"):
        FederationPlan.from_flat({**flat, "dp.target_epsilon": -1.0})
    inst = ClientInstructions.from_plan(plan, "run-x")
    config = {**inst.to_config(), "clipping_norm": 0.7, "server-round": 3}
    back = ClientInstructions.from_config(config)
    assert back.clipping_norm == 0.7
    assert back.server_round == 3
    assert back.epsilon_cap == 2.5
    assert back.proximal_mu == 0.05
    assert [p.compute_speed for p in back.device_profiles()] == [1.0, 0.25]
    with pytest.raises(ConfigError, match="batch-size"):
        ClientInstructions.from_config({**inst.to_config(), "batch-size": "16"})


def test_one_table_of_strategies_models_and_datasets() -> None:
    """Strategy names, models per dataset and device profiles are each defined once."""
    import inspect

    from edgefl import datasets, zoo
    from edgefl.federation import STRATEGIES, STRATEGY_PARAMS

    # Every name builds the Flower strategy of that name, with the parameters it takes.
    params = {"fedprox": {"proximal_mu": 0.1}}
    for name in STRATEGIES:
        built = build_strategy(load_plan({"strategy": {"name": name, **params.get(name, {})}}))
        assert type(built).__name__.lower() == name
        takes = set(inspect.signature(type(built)).parameters) | {"trim_beta"}  # Flower: beta
        assert STRATEGY_PARAMS[name] <= takes
    # The zoo builds exactly the models the torch-free table names.
    assert set(zoo.MODELS) == set(datasets.MODEL_DATASET)
    for dataset in datasets.DATASETS:
        model = load_plan({"dataset": dataset}).model_name
        assert model == datasets.MODELS_BY_DATASET[dataset][0]
        assert zoo.get_spec(model).dataset == dataset
    # One DeviceProfile: the scenario module has none of its own.
    import edgefl.simulations.scenario as scenario

    assert not hasattr(scenario, "DeviceProfile")
    assert not hasattr(scenario, "STRATEGIES")


def test_plan_key_is_unchanged_for_plans_older_than_the_new_keys() -> None:
    """Devices keep σ per plan key: name, description and unused profile keys do not
    change it (the values were computed by the previous release)."""
    assert load_plan({}).plan_key() == "3509e8f141aeaadf"
    plan = {
        "num_devices": 6,
        "strategy": {"name": "fedprox", "proximal_mu": 0.05},
        "profiles": [{"fraction": 0.5}, {"fraction": 0.5, "compute_speed": 0.25, "dropout": 0.2}],
        "dp": {"target_epsilon": 3.0, "epsilon_cap": 2.5},
    }
    assert load_plan(plan).plan_key() == "4aac79e50a0a466e"
    assert load_plan({**plan, "name": "x", "description": "y"}).plan_key() == "4aac79e50a0a466e"
    slow = {**plan, "profiles": [{"fraction": 1.0, "straggler_fraction": 0.5}]}
    assert load_plan(slow).plan_key() != load_plan({**plan, "profiles": [{}]}).plan_key()


def test_strategy_parameters_must_fit_the_strategy() -> None:
    with pytest.raises(ConfigError, match=r"\['eta'\] do not apply to 'fedavg'"):
        load_plan({"strategy": {"name": "fedavg", "eta": 0.5}})
    # A default value is no choice: a plan read back from a run_config carries them all.
    plan = load_plan({"strategy": {"name": "fedavg", "eta": 0.01}})
    assert FederationPlan.from_flat(plan.to_flat()) == plan
    assert load_plan({"strategy": {"name": "FedAdam", "eta": 0.5}}).strategy.name == "fedadam"


def test_profiles_cover_partitions_by_fraction() -> None:
    profiles = [DeviceProfile(fraction=0.7), DeviceProfile(fraction=0.3, compute_speed=0.5)]
    speeds = [profile_for(profiles, i, 10).compute_speed for i in range(10)]
    assert speeds == [1.0] * 7 + [0.5] * 3
    assert len([p for p in range(7) if profile_for(profiles, p, 7).compute_speed == 0.5]) == 2


# ---------------------------------------------------------------------- accounting


def test_history_helpers_match_opacus() -> None:
    q, steps = steps_per_round(70, 16, 2)
    assert (q, steps) == (1 / 5, 10)
    sigma = choose_sigma(4.0, 1e-5, q, steps * 5)
    history: list[list[float]] = []
    acct = RDPAccountant()
    for _ in range(5):
        history = merge_history(history, sigma, q, steps)
        for _ in range(steps):
            acct.step(noise_multiplier=sigma, sample_rate=q)
    assert history == [[sigma, q, 50]]
    assert epsilon_of(history, 1e-5) == pytest.approx(acct.get_epsilon(1e-5), rel=1e-9)
    assert 3.98 <= epsilon_of(history, 1e-5) <= 4.0


def test_file_privacy_store_keeps_runs_apart(tmp_path: Path) -> None:
    store = FilePrivacyStore(tmp_path / "agent")
    assert store.load("a") is None
    store.save(PrivacyState("a", "k", 1.1, 0.2, 5, [[1.1, 0.2, 5]]))
    store.save(PrivacyState("b", "k", 0.9, 0.1, 10, []))
    again = FilePrivacyStore(tmp_path / "agent")
    a = again.load("a")
    assert a is not None
    assert a.history == [[1.1, 0.2, 5]]
    assert again.load("b") is not None


# ------------------------------------------------------------------------ selection


def _record(device: str, history: list[list[float]], *, time_s: float = 1.0) -> DeviceRecord:
    return DeviceRecord(
        device_id=device,
        epsilon_total=epsilon_of(history, 1e-5),
        sigma=history[-1][0],
        sample_rate=history[-1][1],
        steps_per_round=5,
        history=history,
        compute_speed=1.0,
        train_time_s=time_s,
        rounds=1,
    )


def test_selection_never_picks_devices_over_budget() -> None:
    plan = load_plan({"num_devices": 6, "fraction_train": 1.0, "dp": {"target_epsilon": 8.0}})
    nodes = [101, 102, 103, 104, 105, 106]
    node_device = {n: f"sim-{n - 101:03d}" for n in nodes[:5]}  # node 106 never replied yet
    spent = [[1.0, 0.2, 200]]  # far past ε=8 after one more round
    fresh = [[1.0, 0.2, 5]]
    devices = {
        "sim-000": _record("sim-000", spent),
        "sim-001": _record("sim-001", fresh),
        "sim-002": _record("sim-002", fresh),
    }
    assert epsilon_of(merge_history(spent, 1.0, 0.2, 5), 1e-5) > 8.0
    assert epsilon_of(merge_history(fresh, 1.0, 0.2, 5), 1e-5) < 8.0
    for rnd in range(1, 20):
        chosen, excluded = select_nodes(plan, rnd, nodes, node_device, devices, {"sim-004"})
        assert 101 not in chosen
        assert 105 not in chosen
        assert set(excluded) == {"sim-000", "sim-004"}
        assert set(chosen) == {102, 103, 104, 106}
    # Without budget selection every connected node is eligible.
    loose = plan.model_copy(update={"select_by_budget": False})
    assert len(select_nodes(loose, 1, nodes, node_device, devices, {"sim-004"})[0]) == 6


def test_selection_is_seeded_and_prefers_fast_devices() -> None:
    plan = load_plan({"num_devices": 10, "fraction_train": 0.3, "min_train_nodes": 1})
    nodes = list(range(1, 11))
    node_device = {n: f"sim-{n:03d}" for n in nodes}
    devices = {
        f"sim-{n:03d}": _record(f"sim-{n:03d}", [[1.0, 0.2, 5]], time_s=10.0 if n <= 5 else 1.0)
        for n in nodes
    }
    picks = [select_nodes(plan, r, nodes, node_device, devices, set())[0] for r in range(1, 41)]
    assert picks == [
        select_nodes(plan, r, nodes, node_device, devices, set())[0] for r in range(1, 41)
    ]
    assert all(len(p) == 3 for p in picks)
    slow = sum(1 for p in picks for n in p if n <= 5)
    assert slow < 0.25 * 3 * 40  # 10x slower devices are picked far less often


# ------------------------------------------------------------------------ screening

EXPECTED = {"w": ((2, 3), "float32"), "b": ((3,), "float32")}


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower needs a task identity to build messages outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _reply(node: int, device: str, arrays: dict[str, np.ndarray] | None, eps: float) -> Message:
    ins = Message(
        RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train"
    )
    metrics = MetricRecord(
        {
            "num-examples": 10.0,
            "train-loss": 0.5,
            "epsilon": eps,
            "delta": 1e-5,
            "sigma": 1.0,
            "sample-rate": 0.2,
            "steps": 5.0,
            "train-time-s": 0.1,
            "compute-speed": 1.0,
            "unit-weight": 1.0,
            "refused": 0.0,
        }
    )
    content = RecordDict(
        {
            "metrics": metrics,
            "edgefl": ConfigRecord(
                {"device-id": device, "status": "ok", "history": "[[1.0, 0.2, 5]]"}
            ),
        }
    )
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(content, reply_to=ins)


@pytest.mark.usefixtures("task_identity")
def test_screening_rejects_bad_updates_and_flags_falling_epsilon() -> None:
    good = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    nan = {"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}
    shape = {"w": np.ones((3, 2), np.float32), "b": np.zeros(3, np.float32)}
    keys = {"w": np.ones((2, 3), np.float32)}
    devices = {"sim-004": _record("sim-004", [[1.0, 0.2, 50]])}
    replies = [
        _reply(1, "sim-000", good, 1.0),
        _reply(2, "sim-001", nan, 1.0),
        _reply(3, "sim-002", shape, 1.0),
        _reply(4, "sim-003", keys, 1.0),
        _reply(5, "sim-004", good, 0.5),  # below its ledger total
    ]
    node_device: dict[int, str] = {}
    result = screen_train_replies(2, replies, EXPECTED, devices, node_device, set())
    assert [m.metadata.src_node_id for m in result.accepted] == [1]
    assert set(result.rejected) == {"sim-001", "sim-002", "sim-003", "sim-004"}
    assert "NaN" in result.rejected["sim-001"]
    assert "shape (3, 2)" in result.rejected["sim-002"]
    assert "missing ['b']" in result.rejected["sim-003"]
    assert "below its ledger total" in result.rejected["sim-004"]
    assert result.flagged == ["sim-004"]
    # Every device that trained has its spend in the ledger, the flagged one marked.
    rows = {r.device_id: r for r in result.rows}
    assert set(rows) == {"sim-000", "sim-001", "sim-002", "sim-003", "sim-004"}
    assert rows["sim-004"].flagged
    assert rows["sim-004"].epsilon_total == devices["sim-004"].epsilon_total
    assert node_device == {1: "sim-000", 2: "sim-001", 3: "sim-002", 4: "sim-003", 5: "sim-004"}


# ------------------------------------------------------------------- bounded wait


class _SlowFleet(Grid):
    """Fault injection: a grid where only ``n`` nodes ever connect."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.polls = 0

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        self.polls += 1
        return list(range(self.n))

    def create_message(self, *a: object, **k: object) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError


def test_bounded_wait_fails_clearly_instead_of_hanging() -> None:
    grid = _SlowFleet(2)
    started = time.monotonic()
    with pytest.raises(NotEnoughNodesError, match=r"only 2 of the 5 required nodes"):
        wait_for_nodes(grid, 5, 0.6)
    assert time.monotonic() - started < 30  # it returned at all (no endless wait)
    assert grid.polls >= 2
    assert wait_for_nodes(_SlowFleet(5), 5, 0.0) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------- strategy state


def test_fedadam_state_survives_a_checkpoint() -> None:
    plan = load_plan({"strategy": {"name": "fedadam"}})
    strategy = build_strategy(plan)
    m_t = {"w": np.arange(6.0).reshape(2, 3), "b": np.array([-1.5, 2.5])}
    v_t = {"w": np.arange(6.0).reshape(2, 3) ** 2 + 0.25, "b": np.array([0.5, 3.0])}
    strategy.m_t = m_t  # type: ignore[attr-defined]
    strategy.v_t = v_t  # type: ignore[attr-defined]
    blob, meta = strategy_state(strategy)
    fresh = build_strategy(plan)
    # Adam's two moments are both state: a resume that restores m_t alone scales every
    # step by a fresh v_t, so each one is checked, key by key.
    load_strategy_state(fresh, blob, json.loads(json.dumps(meta)))
    for name, expected in (("m_t", m_t), ("v_t", v_t)):
        restored = getattr(fresh, name)
        assert isinstance(restored, dict), f"{name} was not restored: {restored!r}"
        assert set(restored) == set(expected), name
        for key, value in expected.items():
            np.testing.assert_array_equal(restored[key], value, err_msg=f"{name}[{key}]")


def test_central_dp_accountant_survives_a_checkpoint() -> None:
    from flwr.serverapp import GaussianPrivacyEvent

    plan = load_plan(
        {
            "num_devices": 4,
            "central_dp": {"enabled": True, "noise_multiplier": 1.0, "max_epsilon": 50.0},
        }
    )
    strategy = build_strategy(plan)
    strategy.accountant.compose(GaussianPrivacyEvent(1.0, 4, 4))  # type: ignore[attr-defined]
    blob, meta = strategy_state(strategy)
    fresh = build_strategy(plan)
    load_strategy_state(fresh, blob, json.loads(json.dumps(meta)))
    eps = fresh.accountant.get_privacy_spent().epsilon  # type: ignore[attr-defined]
    assert eps == pytest.approx(strategy.accountant.get_privacy_spent().epsilon)  # type: ignore[attr-defined]
    assert math.isfinite(eps)
    assert eps > 0


def _central_plan(noise: float, max_epsilon: float, rounds: int = 10) -> dict[str, object]:
    return {
        "num_devices": 10,
        "rounds": rounds,
        "central_dp": {"enabled": True, "noise_multiplier": noise, "max_epsilon": max_epsilon},
    }


def _rounds_the_server_allows(plan: FederationPlan) -> tuple[int, float]:
    """Round by round, as the server's wrapped strategy decides before each release."""
    from flwr.serverapp import GaussianPrivacyEvent

    accountant = build_strategy(plan).accountant  # type: ignore[attr-defined]
    event = GaussianPrivacyEvent(plan.central_dp.noise_multiplier, 10, 10)
    done = 0
    while done < plan.rounds and not accountant.would_exceed(event):
        accountant.compose(event)
        done += 1
    return done, accountant.get_privacy_spent().epsilon if done else 0.0


def test_central_dp_plan_that_fits_no_round_is_refused_up_front() -> None:
    with pytest.raises(ConfigError) as info:
        load_plan(_central_plan(1.0, 3.0))
    message = str(info.value)
    assert "noise_multiplier 1 spends ε 4.729 in the first round, over max_epsilon 3" in message
    assert "no round can run" in message
    # What would fit, and it does fit (the suggestions are rounded up, never down).
    assert "noise_multiplier 1.5 or max_epsilon 4.73 allows 1 round" in message
    assert load_plan(_central_plan(1.5, 3.0)).central_budget.rounds_fit >= 1  # type: ignore[union-attr]
    assert load_plan(_central_plan(1.0, 4.73)).central_budget.rounds_fit == 1  # type: ignore[union-attr]
    assert info.value.exit_code == 3


def test_central_dp_budget_matches_the_servers_accountant() -> None:
    plan = load_plan(_central_plan(3.0, 3.0))
    budget = plan.central_budget
    assert budget is not None
    # The reporter's measurement: stopped after round 4 at ε = 2.985.
    assert (budget.rounds_fit, round(budget.epsilon_fit, 3)) == (4, 2.985)
    assert (budget.rounds_fit, budget.epsilon_fit) == pytest.approx(_rounds_the_server_allows(plan))
    assert "allows only 4 of the 10 planned rounds" in budget.describe()
    enough = load_plan(_central_plan(budget.noise_for_all, 3.0))
    assert enough.central_budget is not None
    assert enough.central_budget.rounds_fit == 10
    assert _rounds_the_server_allows(enough)[0] == 10
    assert load_plan({"num_devices": 10}).central_budget is None  # no central DP: no check


def test_result_says_which_rounds_trained_nobody_and_why() -> None:
    from edgefl.federation import FederationResult

    refused = RoundReport(
        3,
        0.5,
        1.0,
        num_selected=3,
        aggregated=False,
        refusals={"dev-a": "next round would take ε to 8.4, past its cap 8.0"},
        failure_reasons={"dev-b": "no reply within 600 s"},
        rejections={"dev-c": "array 'w' has shape (2,), expected (3,)"},
    )
    done = [RoundReport(r, 0.9, 0.3, num_replies=3) for r in (1, 2)]
    result = FederationResult("r", "completed", rounds=[*done, refused], planned_rounds=3)
    shortfall = result.shortfall()
    assert shortfall is not None
    assert shortfall.startswith("trained 2 of 3 planned rounds; round 3 trained nobody (")
    for part in ("dev-a refused: next round", "dev-b failed: no reply", "dev-c rejected: array"):
        assert part in shortfall
    assert result.to_dict()["complete"] is False
    stopped = FederationResult(
        "r", "stopped", "no device has ε budget left", done, planned_rounds=3
    )
    assert stopped.shortfall() == (
        "trained 2 of 3 planned rounds; stopped: no device has ε budget left"
    )
    full = FederationResult("r", "completed", rounds=done, planned_rounds=2)
    assert full.shortfall() is None
    assert full.to_dict()["complete"] is True


# ---------------------------------------------------------------- ledger (both DBs)


def _row(device: str, rnd: int, total: float, spent: float) -> LedgerRow:
    return LedgerRow(
        device, rnd, spent, total, 1e-5, 1.0, 0.2, 5, [[1.0, 0.2, 5 * rnd]], 70, 0.1, 1.0
    )


def test_ledger_rounds_and_resume_point(db_url: str) -> None:
    plan = load_plan({"num_devices": 2, "rounds": 3})
    store = FlStore(db_url)
    try:
        assert store.start_run("r1", plan, resume=False) is None
        with pytest.raises(ConfigError, match="already exists"):
            store.start_run("r1", plan, resume=False)
        with pytest.raises(ConfigError, match="another plan"):
            store.start_run("r1", plan.model_copy(update={"rounds": 4}), resume=True)
        for rnd, totals in ((1, (1.0, 1.1)), (2, (1.5, 1.6))):
            rows = [_row(f"sim-00{i}", rnd, t, 0.5) for i, t in enumerate(totals)]
            ck = Checkpoint(rnd, f"model{rnd}".encode(), b"", {"devices": {}})
            store.commit_round("r1", RoundReport(rnd, 0.5, 1.0, num_replies=2), rows, ck)
        # A duplicate (run, device, round) row is refused, and nothing of that round lands.
        dup = [_row("sim-000", 3, 2.0, 0.5), _row("sim-000", 2, 2.0, 0.5)]
        with pytest.raises(Exception, match="round 3"):
            store.commit_round("r1", RoundReport(3, 0.5, 1.0), dup, Checkpoint(3, b"m3", b"", {}))
        resumed = store.start_run("r1", plan, resume=True)
        assert resumed is not None
        ck = resumed
        assert (ck.round, ck.model) == (2, b"model2")
        devices = store.devices("r1")
        assert {d: r.epsilon_total for d, r in devices.items()} == {"sim-000": 1.5, "sim-001": 1.6}
        assert devices["sim-000"].rounds == 2
        result = store.result("r1")
        assert [r.round for r in result.rounds] == [1, 2]
        assert result.planned_rounds == 3
        assert result.shortfall() == "trained 2 of 3 planned rounds; only 2 rounds ran"
        assert result.epsilon_per_device == {"sim-000": 1.5, "sim-001": 1.6}
        assert len(store.ledger("r1")) == 4
        store.finish("r1", "completed")
        assert store.result("r1").status == "completed"
        # A round that trained nobody keeps each device's reason in the registry.
        idle = RoundReport(
            3,
            0.5,
            1.0,
            num_selected=2,
            num_refused=2,
            aggregated=False,
            refusals={"sim-000": "past its cap", "sim-001": "past its cap too"},
            failure_reasons={"node-7": "no reply within 600 s"},
        )
        store.commit_round("r1", idle, [], Checkpoint(3, b"m3", b"", {}))
        back = store.result("r1").rounds[-1]
        assert (back.aggregated, back.refusals, back.failure_reasons) == (
            False,
            idle.refusals,
            idle.failure_reasons,
        )
        assert "round 3 trained nobody (sim-000 refused: past its cap" in str(
            store.result("r1").shortfall()
        )
    finally:
        store.close()


def test_deployed_app_reads_the_plan_from_run_config() -> None:
    from edgefl.server.fl.serverapp import app, plan_from_run_config

    plan = load_plan({"num_devices": 5, "strategy": {"name": "fedtrimmedavg", "trim_beta": 0.1}})
    run_config = {**plan.to_flat(), "registry-url": "sqlite:///x.db", "run-id": "dep-1"}
    assert plan_from_run_config(run_config) == (plan, "sqlite:///x.db", "dep-1")
    with pytest.raises(ConfigError, match=r"strategy\.name"):
        plan_from_run_config({**run_config, "strategy.name": "nope"})
    assert app is not None


def test_run_app_keeps_the_registry_password_out_of_the_app(tmp_path: Path) -> None:
    import tomllib

    from sqlalchemy import make_url

    from edgefl.server.fl.serverapp import plan_from_run_config
    from edgefl.server.fl.superlink import write_run_app
    from edgefl.server.registry.db import display_url

    url = "postgresql+psycopg2://edgefl:s3cr%40t@db.example:5432/fleet?sslmode=require"
    assert (
        display_url(url) == "postgresql+psycopg2://edgefl:***@db.example:5432/fleet?sslmode=require"
    )
    plan = load_plan({"num_devices": 2, "rounds": 1})
    app = write_run_app(tmp_path / "run" / "app", plan, registry_url=url, run_id="r1")
    # Flower ships the app folder (and its run_config) to the SuperLink and every device.
    for path in app.rglob("*"):
        if path.is_file():
            assert b"s3cr" not in path.read_bytes(), path
    secret = tmp_path / "run" / "registry-password"
    assert secret.stat().st_mode & 0o777 == 0o600
    doc = tomllib.loads((app / "pyproject.toml").read_text())
    config = doc["tool"]["flwr"]["app"]["config"]
    assert (
        config["registry-url"]
        == "postgresql+psycopg2://edgefl@db.example:5432/fleet?sslmode=require"
    )
    got_plan, got_url, run_id = plan_from_run_config(config)
    assert (got_plan, run_id) == (plan, "r1")
    assert make_url(got_url) == make_url(url)  # the ServerApp gets the real URL back
    # Without a password nothing changes: no secret file, the URL as given.
    plain = write_run_app(tmp_path / "p" / "app", plan, registry_url="sqlite:///x.db", run_id="p")
    assert not (tmp_path / "p" / "registry-password").exists()
    plain_config = tomllib.loads((plain / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert plan_from_run_config(plain_config["config"])[1] == "sqlite:///x.db"
