"""Training on the agent's own data: the ClientApp on a device, the daemon's training wiring."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from edgefl.config import TlsFiles, load_config
from edgefl.datasets import load_dataset
from edgefl.edge_agent.daemon import Agent, AgentConfig, read_status
from edgefl.edge_agent.datastore import LocalDataStore, Sample
from edgefl.edge_agent.fl import clientapp
from edgefl.edge_agent.fl.privacy import FilePrivacyStore, epsilon_of
from edgefl.edge_agent.fl.supernode import TELEMETRY_DIR
from edgefl.edge_agent.identity import prepare_enrollment
from edgefl.edge_agent.sources import SourceRecord
from edgefl.errors import BadInputError, EdgeflError
from edgefl.federation import ClientInstructions, FederationPlan
from edgefl.proto.serde import decode_envelope
from edgefl.server.fl.superlink import SuperLink, SuperLinkConfig
from edgefl.server.fleet_ca import FleetCA
from edgefl.testing import EdgeflProcesses, free_port, wait_for
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------- the daemon


def _agent_config(tmp_path: Path, port: int, **training: Any) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": "pi-01",
            "fleet": "lab",
            "state_dir": str(tmp_path / "state"),
            "mqtt": {"port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "sources": [{"type": "dataset-replay", "rate_hz": 100}],
            "training": {"superlink": "127.0.0.1:1", "min_samples": 5, **training},
        }
    )


def _spool(agent: Agent, name: str, text: str) -> Path:
    spool = agent.config.state_dir / TELEMETRY_DIR
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / name
    path.write_text(text)
    return path


def _telemetry(agent: Agent) -> list[dict[str, Any]]:
    batch = agent.outbox.next_batch(1000)
    agent.outbox.release_many(r.seq for r in batch)
    return [
        json.loads(decode_envelope(r.payload).body)
        for r in batch
        if r.topic == "edgefl/lab/pi-01/telemetry/training"
    ]


@pytest.mark.slow
def test_agent_keeps_labelled_samples_only_with_a_training_section(tmp_path: Path) -> None:
    agent = Agent(_agent_config(tmp_path, free_port(), max_samples=50))
    try:
        records = agent.sources[0].due(time.monotonic() + 1.0)
        agent.submit(records)
        assert agent.datastore is not None
        assert agent.datastore.count() == min(len(records), 50)
        training = agent.status(running=True)["training"]
        assert training["samples"] == agent.datastore.count()
        assert training["supernode"]["state"] == "stopped"
    finally:
        agent.outbox.close()
        assert agent.datastore is not None
        agent.datastore.close()
    plain = AgentConfig.model_validate(
        {**_agent_config(tmp_path / "b", 1).model_dump(mode="json"), "training": None}
    )
    other = Agent(plain)
    try:
        other.submit(other.sources[0].due(time.monotonic() + 1.0))
        assert other.datastore is None
        assert not (plain.state_dir / "samples.db").exists()
        assert other.status(running=True)["training"] is None
    finally:
        other.outbox.close()


@pytest.mark.slow
def test_telemetry_spool_is_imported_exactly_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(_agent_config(tmp_path, free_port()))
    try:
        first = _spool(agent, "train-run-7-r1.json", json.dumps({"round": 1, "epsilon": 0.5}))
        assert agent.import_telemetry() == 1
        assert not first.exists()
        assert agent.import_telemetry() == 0
        # A crash after the commit and before the unlink: the file is back, its key is not new.
        again = _spool(agent, "train-run-7-r1.json", json.dumps({"round": 1, "epsilon": 0.5}))
        assert agent.import_telemetry() == 0
        assert not again.exists()
        _spool(agent, "train-run-7-r2.json", json.dumps({"round": 2, "epsilon": 0.7}))
        corrupt = _spool(agent, "train-run-7-r3.json", '{"round": 3, "eps')
        with caplog.at_level(logging.ERROR, logger="edgefl.edge_agent.daemon"):
            assert agent.import_telemetry() == 1
        assert not corrupt.exists()
        assert corrupt.with_name("train-run-7-r3.json.bad").is_file()
        assert any("set aside" in r.getMessage() for r in caplog.records)
        assert [d["round"] for d in _telemetry(agent)] == [1, 2]
        assert agent.status(running=True)["training"]["telemetry_bad"] == 1
    finally:
        agent.outbox.close()
        assert agent.datastore is not None
        agent.datastore.close()


@pytest.mark.slow
def test_a_put_once_committed_before_a_crash_is_not_stored_again(tmp_path: Path) -> None:
    agent = Agent(_agent_config(tmp_path, free_port()))
    try:
        path = _spool(agent, "train-r-r1.json", json.dumps({"round": 1}))
        record = SourceRecord("training", "telemetry", "application/json", b'{"round":1}')
        # What the previous agent process committed right before it was killed.
        assert agent.outbox.put_once(f"fl-telemetry:{path.name}", [agent._item(record)])
        assert agent.outbox.put_once(f"fl-telemetry:{path.name}", [agent._item(record)]) is None
        assert agent.import_telemetry() == 0
        assert not path.exists()
        assert len(_telemetry(agent)) == 1
    finally:
        agent.outbox.close()
        assert agent.datastore is not None
        agent.datastore.close()


@pytest.mark.slow
def test_agent_buffers_while_the_superlink_is_unreachable_and_joins_when_it_is_up(
    tmp_path: Path, edgefl_procs: EdgeflProcesses
) -> None:
    ca = FleetCA.create(tmp_path / "ca")
    server = ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    assert server.key_path is not None
    link_config = SuperLinkConfig(
        port=free_port(),
        tls=TlsFiles(ca_file=ca.cert_path, cert_file=server.cert_path, key_file=server.key_path),
    )
    state = tmp_path / "state"
    paths = prepare_enrollment("pi-01", "lab", state).paths
    paths.ca.write_bytes(ca.cert_pem)
    with SuperLink(link_config, tmp_path / "superlink") as link:  # register, then go away
        link.admin().register_node(paths.node_public_key)
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "device_id": "pi-01",
                "fleet": "lab",
                "state_dir": str(state),
                "mqtt": {"port": free_port()},  # no broker: everything stays in the outbox
                "sources": [{"type": "dataset-replay", "rate_hz": 20}],
                "status_interval_s": 0.5,
                "training": {
                    "superlink": f"127.0.0.1:{link_config.port}",
                    "min_samples": 5,
                    "require_connected": False,
                },
            }
        )
    )
    agent = edgefl_procs.start("agent", "run", "--config", str(config_path), log="agent.log")
    cfg = load_config(AgentConfig, config_path)

    def training() -> dict[str, Any]:
        return dict(read_status(cfg).get("training") or {})

    wait_for(
        lambda: "cannot reach" in training().get("supernode", {}).get("reason", ""),
        90,
        "the SuperNode to report an unreachable SuperLink",
    )
    pid = training()["supernode"]["pid"]
    depth = read_status(cfg)["outbox"]["depth"]
    wait_for(lambda: read_status(cfg)["outbox"]["depth"] > depth + 20, 30, "buffering")
    assert training()["samples"] > 5
    with SuperLink(link_config, tmp_path / "superlink"):  # same port and database
        wait_for(
            lambda: training().get("supernode", {}).get("node_id") is not None,
            120,
            "the SuperNode to join the SuperLink once it is up",
        )
        assert training()["supernode"]["pid"] == pid  # it retried by itself
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.slow
def test_replay_source_never_imports_scikit_learn_in_the_agent(tmp_path: Path) -> None:
    import numpy as np

    from edgefl.edge_agent.sources import DatasetReplayConfig, replay_arrays

    code = (
        "import sys; from pathlib import Path; "
        "from edgefl.edge_agent.sources import DatasetReplayConfig, replay_arrays; "
        "x, y = replay_arrays(DatasetReplayConfig(partition=1, num_partitions=3), "
        "Path(sys.argv[1])); print(len(y), 'sklearn' in sys.modules)"
    )
    for _ in range(2):  # first run prepares the cache in a child, the second reads it
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "cache")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out[1] == "False"
    assert len(list((tmp_path / "cache").glob("replay-digits-*.npz"))) == 1
    config = DatasetReplayConfig(partition=1, num_partitions=3)
    cached = replay_arrays(config, tmp_path / "cache")
    direct = replay_arrays(config)
    assert int(out[0]) == len(direct[1])
    assert np.array_equal(cached[0], direct[0])
    assert np.array_equal(cached[1], direct[1])
