"""Training on the agent's own data: the ClientApp on a device, the daemon's training wiring."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from edgefl.datasets import load_dataset
from edgefl.edge_agent.datastore import LocalDataStore, Sample
from edgefl.edge_agent.fl import clientapp
from edgefl.edge_agent.fl.privacy import FilePrivacyStore, epsilon_of
from edgefl.errors import BadInputError, EdgeflError
from edgefl.federation import ClientInstructions, FederationPlan
from edgefl.zoo import build_model


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower needs a task identity to build messages outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _fill_store(path: Path, n: int = 120) -> None:
    data = load_dataset("digits", seed=0)
    x = data.x_train.reshape(len(data.x_train), -1)[:n]
    with LocalDataStore(path) as store:
        store.add_many(
            Sample(x=row, y=int(label), stream="samples")
            for row, label in zip(x, data.y_train[:n], strict=True)
        )


def _message(kind: str, server_round: int) -> Message:
    plan = FederationPlan(dataset="digits", model="digits-mlp", num_devices=3, rounds=3)
    inst = dataclasses.replace(
        ClientInstructions.from_plan(plan, "run-7"), server_round=server_round
    )
    model = build_model("digits-mlp", seed=0)
    arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in model.state_dict().items()})
    return Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(dict(inst.to_config()))}),
        dst_node_id=1,
        message_type=kind,
    )


def _context(node_config: Mapping[str, bool | float | int | str]) -> Context:
    return Context(
        run_id=1, node_id=1, node_config=dict(node_config), state=RecordDict(), run_config={}
    )


@pytest.mark.usefixtures("task_identity")
def test_clientapp_trains_on_the_data_store_and_spools_telemetry(tmp_path: Path) -> None:
    store_path, state, spool = tmp_path / "samples.db", tmp_path / "state", tmp_path / "spool"
    _fill_store(store_path)
    node = {
        "device-id": "pi-01",
        "state-dir": str(state),
        "data-store": str(store_path),
        "telemetry-dir": str(spool),
    }
    epsilons = []
    for server_round in (1, 2):
        reply = clientapp.train(_message("train", server_round), _context(node))
        metrics: dict[str, Any] = dict(reply.content.metric_records["metrics"])
        info = reply.content.config_records["edgefl"]
        assert info["device-id"] == "pi-01"
        assert info["status"] == "ok"
        assert "arrays" in reply.content.array_records
        with LocalDataStore(store_path, input_shape=(64,)) as store:
            assert metrics["num-examples"] == len(store.train_arrays()[0])
        doc = json.loads((spool / f"train-run-7-r{server_round}.json").read_text())
        saved = FilePrivacyStore(state).load("run-7")
        assert saved is not None
        assert doc["epsilon"] == pytest.approx(epsilon_of(saved.history, doc["delta"]))
        assert doc["epsilon"] == pytest.approx(float(metrics["epsilon"]))
        assert doc["device_id"] == "pi-01"
        assert doc["run_id"] == "run-7"
        assert doc["round"] == server_round
        assert doc["status"] == "ok"
        assert doc["steps"] > 0
        assert doc["num_examples"] == int(metrics["num-examples"])
        assert doc["sigma"] > 0
        assert set(doc) >= {"train_loss", "train_time_s", "sample_rate"}
        epsilons.append(doc["epsilon"])
    assert 0 < epsilons[0] < epsilons[1]
    evaluated = clientapp.evaluate(_message("evaluate", 2), _context(node))
    eval_metrics: dict[str, Any] = dict(evaluated.content.metric_records["metrics"])
    assert eval_metrics["num-examples"] > 0
    assert not list(spool.glob(".*"))  # no temporary files left behind


@pytest.mark.usefixtures("task_identity")
def test_clientapp_on_a_device_needs_a_device_id_and_data(tmp_path: Path) -> None:
    with pytest.raises(EdgeflError, match="no device-id"):
        clientapp.train(_message("train", 1), _context({"data-store": str(tmp_path / "s.db")}))
    with pytest.raises(BadInputError, match="no local data store"):
        clientapp.train(
            _message("train", 1),
            _context({"device-id": "pi-01", "data-store": str(tmp_path / "missing.db")}),
        )


def test_telemetry_file_names_are_safe() -> None:
    assert clientapp.telemetry_file_name("run/../x y", 3) == "train-run_.._x_y-r3.json"
