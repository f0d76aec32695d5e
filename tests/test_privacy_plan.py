"""A device's privacy plan while its data grows, and its lifetime budget across runs.

- The plan: a device whose data store grows between rounds (a replay source keeps
  collecting during the run) trains every planned round, with the steps and sample rate
  it fixed when it chose σ, and ends at ε <= target exactly as the server's ledger
  recomputes it. Driven by direct ClientApp calls (the code a SuperNode runs) on a real
  SQLite data store and a real state dir, with a fresh context per message (a restarted
  agent), and the replies screened into ledger rows by the server's own code.
- The lifetime budget: one device (a real Flower simulation, the device's state dir and
  cap in its node config, as the agent passes them) joins three runs in a row with a
  lifetime cap that allows two; the third is refused with ``lifetime_budget_exhausted``
  and the server shows the device's lifetime ε beside the run's ledger.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from edgefl.datasets import load_dataset
from edgefl.edge_agent.datastore import LocalDataStore, Sample
from edgefl.edge_agent.fl import clientapp
from edgefl.edge_agent.fl.privacy import (
    FilePrivacyStore,
    LifetimeBudget,
    choose_sigma,
    epsilon_of,
    steps_per_round,
)
from edgefl.federation import ClientInstructions, FederationPlan, load_plan
from edgefl.privacy import compose
from edgefl.server.fl.ledger import DeviceRecord
from edgefl.server.fl.strategy import next_round_epsilon, screen_train_replies
from edgefl.zoo import build_model

DELTA, TARGET = 1e-5, 8.0


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower needs a task identity to build messages outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class _Digits:
    """The digits training split, handed out in order (a replay source's stream)."""

    def __init__(self) -> None:
        data = load_dataset("digits", seed=0)
        self.x = data.x_train.reshape(len(data.x_train), -1)
        self.y = data.y_train
        self.next = 0

    def add(self, path: Path, n: int) -> None:
        rows = range(self.next, self.next + n)
        self.next += n
        with LocalDataStore(path, input_shape=(64,)) as store:
            store.add_many(Sample(x=self.x[i], y=int(self.y[i])) for i in rows)


def _message(plan: FederationPlan, run_id: str, server_round: int, ledger: str = "{}") -> Message:
    inst = dataclasses.replace(
        ClientInstructions.from_plan(plan, run_id), server_round=server_round, ledger=ledger
    )
    model = build_model(plan.model_name, seed=0)
    arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in model.state_dict().items()})
    return Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(dict(inst.to_config()))}),
        dst_node_id=1,
        message_type="train",
    )


def _context(node_config: Mapping[str, bool | float | int | str]) -> Context:
    return Context(
        run_id=1, node_id=1, node_config=dict(node_config), state=RecordDict(), run_config={}
    )


def _train_arrays_size(path: Path) -> int:
    with LocalDataStore(path, input_shape=(64,)) as store:
        return len(store.train_arrays()[0])


@pytest.mark.slow
@pytest.mark.usefixtures("task_identity")
def test_every_planned_round_trains_while_the_data_store_grows(tmp_path: Path) -> None:
    rounds = 5
    plan = load_plan(
        {
            "dataset": "digits",
            "model": "digits-mlp",
            "num_devices": 3,
            "rounds": rounds,
            "batch_size": 16,
            "dp": {"target_epsilon": TARGET, "delta": DELTA},
        }
    )
    store_path, state_dir = tmp_path / "samples.db", tmp_path / "state"
    digits = _Digits()
    digits.add(store_path, 300)
    node = {"device-id": "pi-01", "state-dir": str(state_dir), "data-store": str(store_path)}
    n0 = _train_arrays_size(store_path)
    q0, steps0 = steps_per_round(n0, plan.batch_size, plan.local_epochs)
    sigma = choose_sigma(TARGET, DELTA, q0, steps0 * rounds)

    devices: dict[str, DeviceRecord] = {}
    sizes, predicted = [], None
    # The replay source keeps collecting during the run: a few samples between most rounds,
    # a backlog of 150 before the last.
    growth = [10, 10, 10, 150, 0]
    for server_round in range(1, rounds + 1):
        sizes.append(_train_arrays_size(store_path))
        # A fresh context per message, as a restarted agent's ClientApp process has: the
        # plan comes back from the state dir.
        reply = clientapp.train(_message(plan, "grow", server_round), _context(node))
        info = reply.content.config_records["edgefl"]
        assert info["status"] == "ok", info["reason"]
        metrics: dict[str, Any] = dict(reply.content.metric_records["metrics"])
        assert metrics["num-examples"] == sizes[-1]
        assert metrics["steps"] == steps0
        assert metrics["sample-rate"] == q0
        assert metrics["sigma"] == sigma
        # The server's own screening turns the reply into this round's ledger row.
        screen = screen_train_replies(
            server_round,
            [reply],  # from node 1, in answer to the message
            _expected_arrays(plan),
            devices,
            {},
            set(),
        )
        assert [r.device_id for r in screen.rows] == ["pi-01"], screen.rejected
        row = screen.rows[0]
        # The ledger recomputes the device's ε from the history it reports (within 1%),
        # and budget-aware selection predicted this round exactly from the last row.
        assert epsilon_of(row.history, DELTA) == pytest.approx(row.epsilon_total, rel=0.01)
        if predicted is not None:
            assert row.epsilon_total == pytest.approx(predicted, rel=1e-12)
        devices["pi-01"] = DeviceRecord(
            "pi-01",
            row.epsilon_total,
            row.sigma,
            row.sample_rate,
            row.steps,
            row.history,
            row.compute_speed,
            row.train_time_s,
            server_round,
        )
        predicted = next_round_epsilon(devices["pi-01"], DELTA)
        digits.add(store_path, growth[server_round - 1])

    assert sizes[-1] > sizes[0] * 1.4, sizes  # it did grow
    state = FilePrivacyStore(state_dir).load("grow")
    assert state is not None
    assert state.history == [[sigma, q0, rounds * steps0]]
    assert (state.plan_examples, state.batches_per_epoch) == (n0, steps0)
    final = epsilon_of(state.history, DELTA)
    assert final <= TARGET
    assert final == pytest.approx(TARGET, abs=0.01)
    assert float(metrics["epsilon"]) == final
    # What the plan prevents: devices used to recompute q and the steps from the store each
    # round, and checked the next round as its steps at the first round's q; on this data
    # that check refused the last round (ε past the target).
    before = [[sigma, *steps_per_round(n, plan.batch_size, plan.local_epochs)] for n in sizes]
    last_steps = before[-1][2]
    old_check = epsilon_of([*before[:-1], [sigma, q0, last_steps]], DELTA)
    assert old_check > TARGET


def _expected_arrays(plan: FederationPlan) -> dict[str, tuple[tuple[int, ...], str]]:
    model = build_model(plan.model_name, seed=0)
    return {
        k: (tuple(v.detach().numpy().shape), str(v.detach().numpy().dtype))
        for k, v in model.state_dict().items()
    }


# ---------------------------------------------------------------- the lifetime budget

LIFE_DEVICE = "dev-life"


def _device_app(state_dir: str, cap: float) -> ClientApp:
    """Our ClientApp with the node config an agent passes: its state dir and lifetime cap."""

    def agent_node_config(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        context.node_config["device-id"] = LIFE_DEVICE
        context.node_config["state-dir"] = state_dir
        context.node_config["lifetime-epsilon"] = cap
        context.node_config["lifetime-delta"] = DELTA
        return call_next(msg, context)

    app = ClientApp(mods=[agent_node_config])
    app.train()(clientapp.train)
    app.evaluate()(clientapp.evaluate)
    return app


@pytest.mark.slow
def test_a_device_refuses_the_run_that_would_pass_its_lifetime_cap(tmp_path: Path) -> None:
    import ray.cloudpickle
    from typer.testing import CliRunner

    from edgefl.cli import app as cli
    from edgefl.edge_agent.fl.data import PartitionData
    from edgefl.server.fl import run_simulation

    # Ray workers cannot import this test module by name: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]
    target = 4.0
    plan = load_plan(
        {
            "dataset": "digits",
            "model": "digits-mlp",
            "num_devices": 1,
            "rounds": 2,
            "batch_size": 64,
            "lr": 0.3,
            "min_available_nodes": 1,
            "min_train_nodes": 1,
            "fraction_evaluate": 0.0,
            "node_wait_s": 60,
            "dp": {"target_epsilon": target, "delta": DELTA},
        }
    )
    # What one run spends, and the lifetime after two and after three such runs (RDP
    # composition): the cap sits between, so two runs fit and the third does not.
    x, _ = PartitionData("digits", 0, 1, plan.dirichlet_alpha, plan.seed).train_arrays()
    q, steps = steps_per_round(len(x), plan.batch_size, plan.local_epochs)
    one_run = [[choose_sigma(target, DELTA, q, steps * plan.rounds), q, steps * plan.rounds]]
    after = {k: epsilon_of(compose([one_run] * k), DELTA) for k in (1, 2, 3)}
    assert after[1] <= target < after[2] < after[3] < 2 * target  # tighter than a sum
    cap = (after[2] + after[3]) / 2
    state_dir = tmp_path / "device-state"
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    device_app = _device_app(str(state_dir), cap)
    results = [
        run_simulation(
            plan, registry_url=url, run_id=f"run-{i}", resume=False, client_app=device_app
        )
        for i in (1, 2, 3)
    ]

    for i, result in enumerate(results[:2], start=1):
        assert result.status == "completed"
        assert result.shortfall() is None, result.shortfall()
        assert result.epsilon_per_device[LIFE_DEVICE] == pytest.approx(after[1], rel=1e-9)
        life = result.lifetime[LIFE_DEVICE]
        assert life["epsilon"] == pytest.approx(after[i], rel=1e-9)
        assert life["reported_epsilon"] == pytest.approx(after[i], rel=1e-9)
        assert life["cap"] == pytest.approx(cap)
        assert sorted(life["runs"]) == [f"run-{k}" for k in range(1, i + 1)]

    third = results[2]
    assert third.status == "stopped"
    assert third.rounds[0].num_refused == 1
    assert not third.rounds[0].aggregated
    reason = third.rounds[0].refusals[LIFE_DEVICE]
    assert reason.startswith("lifetime budget exhausted: ")
    assert f"{after[2]:.4f} to {after[3]:.4f}, past its lifetime cap {cap:g}" in reason
    assert "lifetime budget exhausted" in (third.shortfall() or "")
    assert LIFE_DEVICE not in third.epsilon_per_device  # it spent nothing in run 3
    life = third.lifetime[LIFE_DEVICE]
    assert life["epsilon"] == pytest.approx(after[2], rel=1e-9)
    assert life["reported_epsilon"] == pytest.approx(after[2], rel=1e-9)
    assert sorted(life["runs"]) == ["run-1", "run-2"]
    # The device's own lifetime accountant: three runs, the third empty and refused.
    runs = FilePrivacyStore(state_dir).runs()
    assert sorted(runs) == ["run-1", "run-2", "run-3"]
    assert runs["run-3"].history == []
    assert runs["run-3"].lifetime_refused_cap == cap
    assert runs["run-1"].history == runs["run-2"].history == one_run

    # The server shows the lifetime ε beside the run's ledger.
    shown = CliRunner().invoke(
        cli, ["server", "privacy", "--db-url", url, "--run-id", "run-3", "--json"]
    )
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    assert doc["run_epsilon"] == {}
    assert doc["lifetime"][LIFE_DEVICE]["epsilon"] == pytest.approx(after[2], rel=1e-9)
    table = CliRunner().invoke(cli, ["server", "privacy", "--db-url", url, "--run-id", "run-2"])
    assert table.exit_code == 0, table.output
    assert "lifetime ε" in table.output
    line = next(row for row in table.output.splitlines() if row.startswith(LIFE_DEVICE))
    assert line.split()[1:4] == [f"{after[1]:.4f}", f"{after[2]:.4f}", f"{DELTA:g}"]


def test_readme_training_example_sets_the_lifetime_budget(tmp_path: Path) -> None:
    import yaml

    from edgefl.config import validate_config
    from edgefl.edge_agent.daemon import AgentConfig
    from edgefl.edge_agent.fl.supernode import SuperNodeSupervisor

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Training on the device", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    data = {"device_id": "d", "state_dir": str(tmp_path), "mqtt": {"port": 1883}}
    config = validate_config(AgentConfig, {**data, **yaml.safe_load(example)}, source="README")
    assert config.training is not None
    assert config.training.privacy.lifetime_epsilon == 16.0
    # The supervisor hands the budget to the ClientApp, past any extra node_config entry.
    training = config.training.model_copy(update={"node_config": {"lifetime-epsilon": 1e9}})
    node = SuperNodeSupervisor(
        training, device_id="d", state_dir=tmp_path, data_store=tmp_path / "samples.db"
    ).node_config()
    assert (node["lifetime-epsilon"], node["lifetime-delta"]) == (16.0, 1e-5)
    # lifetime_epsilon: null turns the cap off (0.0 on the node: no cap).
    off = validate_config(
        AgentConfig,
        {
            **data,
            "training": {
                **yaml.safe_load(example)["training"],
                "privacy": {"lifetime_epsilon": None},
            },
        },
        source="test",
    )
    assert off.training is not None
    node = SuperNodeSupervisor(
        off.training, device_id="d", state_dir=tmp_path, data_store=tmp_path / "samples.db"
    ).node_config()
    assert LifetimeBudget.from_node_config(node).epsilon is None
