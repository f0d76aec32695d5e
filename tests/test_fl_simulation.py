"""One real Flower simulation (4 devices, 3 rounds, digits, DP-SGD) shared by the tests.

Faults are injected with a Flower mod around the real ClientApp: device sim-002 sends
arrays of the wrong shape in round 1 and sim-003 sends NaN in round 2. The ε cap sits
between what devices spend after round 2 and after round 3, and budget selection is off,
so every device must refuse round 3 itself.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from edgefl.edge_agent.fl import clientapp as ours
from edgefl.edge_agent.fl.data import PartitionData
from edgefl.edge_agent.fl.privacy import choose_sigma, epsilon_of, steps_per_round
from edgefl.federation import FederationPlan, FederationResult, load_plan
from edgefl.server.fl import run_simulation
from edgefl.server.fl.ledger import FlStore, LedgerRow

pytestmark = pytest.mark.slow

NUM_DEVICES, ROUNDS, TARGET_EPS, DELTA = 4, 3, 4.0, 1e-5


def corrupt_mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
    reply = call_next(msg, context)
    if msg.metadata.message_type != "train" or reply.has_error():
        return reply
    partition = int(context.node_config["partition-id"])
    rnd = int(cast(int, msg.content.config_records["config"]["server-round"]))
    arrays = reply.content.array_records.get("arrays")
    if arrays is None:
        return reply
    values = {k: v.numpy() for k, v in arrays.items()}
    first = next(iter(values))
    if partition == 2 and rnd == 1:
        values[first] = np.zeros((3, 3), np.float32)
    elif partition == 3 and rnd == 2:
        values[first] = np.full_like(values[first], np.nan)
    else:
        return reply
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in values.items()})
    return reply


faulty_app = ClientApp(mods=[corrupt_mod])
faulty_app.train()(ours.train)
faulty_app.evaluate()(ours.evaluate)


def _expected_epsilons(plan: FederationPlan) -> list[tuple[float, float]]:
    """ε after 2 and after 3 rounds for each device, computed independently."""
    out = []
    for pid in range(plan.num_devices):
        x, _ = PartitionData(
            "digits", pid, plan.num_devices, plan.dirichlet_alpha, plan.seed
        ).train_arrays()
        q, steps = steps_per_round(len(x), plan.batch_size, plan.local_epochs)
        sigma = choose_sigma(TARGET_EPS, DELTA, q, steps * ROUNDS)
        out.append(
            (epsilon_of([[sigma, q, 2 * steps]], DELTA), epsilon_of([[sigma, q, 3 * steps]], DELTA))
        )
    return out


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[FederationPlan, FederationResult, list[LedgerRow], float]:
    import ray.cloudpickle

    # Ray workers cannot import this test module by name: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]
    base: dict[str, Any] = {
        "dataset": "digits",
        "num_devices": NUM_DEVICES,
        "dirichlet_alpha": 1.0,
        "rounds": ROUNDS,
        "batch_size": 32,
        "lr": 0.05,
        "min_available_nodes": NUM_DEVICES,
        "min_train_nodes": NUM_DEVICES,
        "fraction_evaluate": 0.5,
        "node_wait_s": 60,
        "select_by_budget": False,
        "dp": {"target_epsilon": TARGET_EPS, "delta": DELTA},
    }
    plan = load_plan(base)
    expected = _expected_epsilons(plan)
    after2 = max(e2 for e2, _ in expected)
    after3 = min(e3 for _, e3 in expected)
    assert after2 < after3
    cap = (after2 + after3) / 2
    plan = load_plan({**base, "dp": {**base["dp"], "epsilon_cap": cap}})
    url = f"sqlite:///{tmp_path_factory.mktemp('fl') / 'registry.db'}"
    reports: list[int] = []
    result = run_simulation(
        plan,
        registry_url=url,
        run_id="sim-test",
        resume=False,
        on_round=lambda r: reports.append(r.round),
        client_app=faulty_app,
    )
    assert reports == [1, 2, 3]
    store = FlStore(url)
    try:
        ledger = store.ledger("sim-test")
    finally:
        store.close()
    return plan, result, ledger, cap


def test_ledger_matches_an_independent_opacus_recomputation(run: Any) -> None:
    from opacus.accountants import RDPAccountant

    _, result, ledger, _ = run
    by_device: dict[str, list[LedgerRow]] = defaultdict(list)
    for row in ledger:
        by_device[row.device_id].append(row)
    assert sorted(by_device) == ["sim-000", "sim-001", "sim-002", "sim-003"]
    for device, rows in by_device.items():
        assert [r.round for r in rows] == [1, 2]  # one row per round; none for the refusal
        accountant = RDPAccountant()
        spent = 0.0
        for row in rows:
            for _ in range(row.steps):
                accountant.step(noise_multiplier=row.sigma, sample_rate=row.sample_rate)
            truth = accountant.get_epsilon(DELTA)
            assert row.epsilon_total == pytest.approx(truth, rel=0.01), device
            spent += row.epsilon_spent
            assert row.epsilon_total == pytest.approx(spent)
        assert result.epsilon_per_device[device] == rows[-1].epsilon_total
        assert rows[0].sigma == rows[1].sigma  # σ chosen once per device


def test_devices_refuse_to_pass_their_cap(run: Any) -> None:
    plan, result, _, cap = run
    last = result.rounds[-1]
    assert last.round == 3
    assert last.num_refused == NUM_DEVICES
    assert last.num_replies == 0
    assert not last.aggregated
    assert all(eps <= cap for eps in result.epsilon_per_device.values())
    assert result.status == "completed"
    assert max(result.epsilon_per_device.values()) < plan.dp.target_epsilon


def test_bad_updates_are_rejected_and_the_round_continues(run: Any) -> None:
    _, result, _, _ = run
    r1, r2 = result.rounds[0], result.rounds[1]
    assert r1.num_rejected == 1
    assert "sim-002" in r1.rejections
    assert "shape" in r1.rejections["sim-002"]
    assert r1.num_replies == 3
    assert r1.aggregated
    assert r2.num_rejected == 1
    assert "NaN" in r2.rejections["sim-003"]
    assert r2.num_replies == 3
    assert r2.aggregated
    # The model still learns from the others.
    assert r2.accuracy > 0.2
    assert r2.federated_accuracy is not None


def test_no_duplicate_ledger_rows_and_metrics_per_round(run: Any) -> None:
    _, result, ledger, _ = run
    keys = [(r.device_id, r.round) for r in ledger]
    assert len(keys) == len(set(keys))
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert all(r.num_selected == NUM_DEVICES for r in result.rounds)
    assert result.rounds[1].epsilon_max == max(r.epsilon_total for r in ledger)


def test_bounded_wait_in_a_real_simulation(tmp_path: Path) -> None:
    from edgefl.server.fl.serverapp import NotEnoughNodesError

    plan = load_plan({"num_devices": 4, "rounds": 1, "min_available_nodes": 4, "node_wait_s": 2})
    with pytest.raises(NotEnoughNodesError, match="only 2 of the 4 required nodes"):
        run_simulation(
            plan,
            registry_url=f"sqlite:///{tmp_path / 'r.db'}",
            run_id="too-few",
            num_nodes=2,
        )
