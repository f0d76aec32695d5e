"""The lifetime privacy budget, attacked from both sides.

- **The server (or whoever submits runs) against a device's lifetime cap.** It controls
  every instruction a device receives: the run id, the plan (target ε, the per-run cap,
  the planned rounds) and how many rounds it sends. None of it takes a device past its
  own lifetime cap: a run whose target alone passes it is refused when planned; a run
  that declares one round and a per-run cap of 1,000 and then keeps sending rounds is
  refused by the per-round check; a new run id per round composes like anything else;
  a short or empty ledger floor never makes the device forget what it spent. Driven by
  direct ClientApp calls (what a SuperNode runs) with a real state dir.
- **A device's certificate against the server's view.** Its reply's lifetime report is a
  claim: non-numbers, NaN, negative values, δ outside (0, 1) and booleans are dropped
  (the reply is still screened as usual), a node cannot report for another device, and
  the lifetime ε the server shows is recomputed from the ledger at a δ no larger than
  the device's runs', so a device reporting ε 0 or δ 0.9 does not make it look smaller.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from edgefl.edge_agent.fl import clientapp
from edgefl.edge_agent.fl.privacy import FilePrivacyStore, epsilon_of, lifetime_history
from edgefl.federation import ClientInstructions, RoundReport, load_plan
from edgefl.server.fl.ledger import Checkpoint, FlStore, LedgerRow
from edgefl.server.fl.strategy import screen_train_replies
from edgefl.zoo import build_model

DELTA = 1e-5


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower needs a task identity to build messages outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _message(run_id: str, server_round: int, *, ledger: str = "{}", **plan: Any) -> Message:
    fed = load_plan(
        {
            "dataset": "digits",
            "model": "digits-mlp",
            "num_devices": 1,
            "min_available_nodes": 1,
            "min_train_nodes": 1,
            "batch_size": 64,
            **plan,
        }
    )
    inst = dataclasses.replace(
        ClientInstructions.from_plan(fed, run_id), server_round=server_round, ledger=ledger
    )
    model = build_model("digits-mlp", seed=0)
    arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in model.state_dict().items()})
    return Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(dict(inst.to_config()))}),
        dst_node_id=1,
        message_type="train",
    )


def _train(node: Mapping[str, str | float | int], msg: Message) -> tuple[str, dict[str, Any]]:
    context = Context(
        run_id=1, node_id=1, node_config=dict(node), state=RecordDict(), run_config={}
    )
    reply = clientapp.train(msg, context)
    info = dict(reply.content.config_records["edgefl"])
    assert ("arrays" in reply.content.array_records) == (info["status"] == "ok")
    return str(info["status"]), info


def _lifetime_on_disk(state_dir: Path) -> float:
    runs = FilePrivacyStore(state_dir).runs()
    return epsilon_of(lifetime_history(runs, "", []), DELTA)


@pytest.mark.slow
@pytest.mark.usefixtures("task_identity")
def test_no_instruction_takes_a_device_past_its_lifetime_cap(tmp_path: Path) -> None:
    cap = 3.0
    state_dir = tmp_path / "state"
    node: dict[str, str | float | int] = {
        "partition-id": 0,
        "num-partitions": 1,
        "device-id": "victim",
        "state-dir": str(state_dir),
        "lifetime-epsilon": cap,
        "lifetime-delta": DELTA,
    }
    # 1. One declared round at ε=2 with a per-run cap of 1,000, then more rounds of it:
    #    the per-run cap never stops them, the per-round lifetime check does.
    one_round: dict[str, Any] = {
        "rounds": 1,
        "dp": {"target_epsilon": 2.0, "epsilon_cap": 1000.0},
    }
    statuses, reported = [], []
    for server_round in range(1, 7):
        status, info = _train(node, _message("r1", server_round, **one_round))
        statuses.append(status)
        reported.append(float(info["lifetime-epsilon"]))
        if status != "ok":
            assert status == "lifetime_budget_exhausted"
            assert f"past its lifetime cap {cap:g}" in str(info["reason"])
            break
    assert statuses[0] == "ok"
    assert statuses[-1] == "lifetime_budget_exhausted", statuses
    assert max(reported) <= cap
    spent = _lifetime_on_disk(state_dir)
    assert 2.0 < spent <= cap

    # 2. A new run whose target alone is past the cap: refused when planned, nothing spent.
    status, info = _train(node, _message("r2", 1, rounds=1, dp={"target_epsilon": 1000.0}))
    assert status == "lifetime_budget_exhausted"
    assert "this run's plan" in str(info["reason"])
    assert _lifetime_on_disk(state_dir) == spent

    # 3. A new run id for every round, each a small plan: they compose like the rest.
    for i in range(6):
        status, info = _train(node, _message(f"r3-{i}", 1, rounds=1, dp={"target_epsilon": 0.3}))
        assert float(info["lifetime-epsilon"]) <= cap
        if status != "ok":
            assert status == "lifetime_budget_exhausted"
            break
    assert _lifetime_on_disk(state_dir) <= cap

    # 4. A floor that says the device spent nothing in r1 is not adopted.
    before = FilePrivacyStore(state_dir).load("r1")
    assert before is not None
    status, _ = _train(node, _message("r1", 7, ledger=json.dumps({"victim": []}), **one_round))
    assert status == "lifetime_budget_exhausted"
    after = FilePrivacyStore(state_dir).load("r1")
    assert after is not None
    assert after.history == before.history
    assert _lifetime_on_disk(state_dir) <= cap


def _reply(node: int, device: str, edgefl: dict[str, Any]) -> Message:
    sent = Message(
        RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train"
    )
    metrics = MetricRecord(
        {
            "num-examples": 10.0,
            "train-loss": 0.5,
            "epsilon": 1.0,
            "delta": DELTA,
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
                {"device-id": device, "status": "ok", "history": "[[1.0, 0.2, 5]]", **edgefl}
            ),
            "arrays": ArrayRecord({"w": Array(np.ones((2, 3), np.float32))}),
        }
    )
    return Message(content, reply_to=sent)


FORGED: list[dict[str, Any]] = [
    {"lifetime-epsilon": float("nan"), "lifetime-delta": DELTA, "lifetime-cap": 16.0},
    {"lifetime-epsilon": -1.0, "lifetime-delta": DELTA, "lifetime-cap": 16.0},
    {"lifetime-epsilon": "0", "lifetime-delta": DELTA, "lifetime-cap": 16.0},
    {"lifetime-epsilon": True, "lifetime-delta": DELTA, "lifetime-cap": 16.0},
    {"lifetime-epsilon": 1.0, "lifetime-delta": 1.5, "lifetime-cap": 16.0},
    {"lifetime-epsilon": 1.0, "lifetime-delta": 0.0, "lifetime-cap": 16.0},
    {"lifetime-epsilon": 1.0, "lifetime-delta": DELTA, "lifetime-cap": float("inf")},
    {"lifetime-epsilon": 1.0, "lifetime-delta": DELTA},
]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("forged", FORGED)
def test_a_malformed_lifetime_report_is_dropped_and_the_reply_screened_as_usual(
    forged: dict[str, Any],
) -> None:
    out = screen_train_replies(
        1, [_reply(1, "liar", forged)], {"w": ((2, 3), "float32")}, {}, {}, set()
    )
    assert out.lifetime == {}
    assert [r.device_id for r in out.rows] == ["liar"]
    assert len(out.accepted) == 1


@pytest.mark.usefixtures("task_identity")
def test_a_node_cannot_report_lifetime_for_another_device() -> None:
    report = {"lifetime-epsilon": 0.0, "lifetime-delta": DELTA, "lifetime-cap": 99.0}
    out = screen_train_replies(
        1,
        [_reply(7, "victim", report)],
        {"w": ((2, 3), "float32")},
        {},
        {},
        set(),
        enrolled={7: "attacker", 8: "victim"},
        admitted_only=True,
    )
    assert out.lifetime == {}
    assert "claims 'victim'" in out.rejected["attacker"]


def test_the_servers_lifetime_is_recomputed_not_reported(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    store = FlStore(url)
    try:
        history = [[0.8, 0.05, 100]]
        eps = epsilon_of(history, DELTA)
        plan = load_plan(
            {
                "dataset": "digits",
                "num_devices": 1,
                "min_available_nodes": 1,
                "min_train_nodes": 1,
                "rounds": 1,
            }
        )
        for run_id, report in (
            ("a", {"epsilon": 0.0, "delta": 0.9, "cap": 99.0}),  # a lie: ε 0 at δ 0.9
            ("b", {"epsilon": 0.0, "delta": 0.9, "cap": 99.0}),
        ):
            store.start_run(run_id, plan, resume=False)
            store.commit_round(
                run_id,
                RoundReport(round=1, accuracy=0.5, loss=1.0),
                [LedgerRow("liar", 1, eps, eps, DELTA, 0.8, 0.05, 100, history, 10, 0.1, 1.0)],
                Checkpoint(round=1, model=b"", strategy_state=b"", accountants={}),
                lifetime={"liar": report},
            )
        life = store.lifetime()["liar"]
    finally:
        store.close()
    assert life.delta == DELTA  # never above its runs' δ
    assert life.epsilon == pytest.approx(epsilon_of(history * 2, DELTA), rel=1e-12)
    assert life.epsilon > eps
    assert life.reported_epsilon == 0.0  # shown as the device's claim, beside
    assert sorted(life.runs) == ["a", "b"]
