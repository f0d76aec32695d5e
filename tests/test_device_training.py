"""End to end on one machine, every part a real process, driven through the CLI.

``edgefl server start`` (mosquitto with the shipped mutual-TLS config, a TLS SuperLink
with node authentication and an on-disk database, the MQTT ingest, a SQLite registry),
three devices enrolled with ``edgefl agent enroll`` / ``edgefl server admit`` /
``edgefl agent enroll --install``, three ``edgefl agent run`` daemons that collect
samples from their dataset-replay source into their local data store and supervise
their own ``flower-supernode``, and ``edgefl server train --wait`` running three DP
rounds of edgefl's ServerApp. Checked afterwards:

- the global model improves;
- each device's ε in the server's privacy ledger equals the device's own accountant
  (``<state_dir>/fl_privacy.json``);
- the outbox delivered each training-telemetry document exactly once (one registry
  record per device and round it trained in).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from edgefl.edge_agent.fl.privacy import FilePrivacyStore, epsilon_of
from edgefl.enrollment import IdentityPaths
from edgefl.process import ManagedProcess
from edgefl.server.fl.ledger import FlStore
from edgefl.server.registry import Device, Record, make_engine, session_factory
from edgefl.testing import free_port, wait_for

pytestmark = pytest.mark.slow

DEVICES = 3
ROUNDS = 3
RUN = "device-run"
EDGEFL = [str(Path(sys.executable).parent / "edgefl")]


def _cli(*args: str, timeout: float = 180) -> dict[str, Any]:
    """Run one ``edgefl ... --json`` command; its JSON answer."""
    proc = subprocess.run(
        [*EDGEFL, *args, "--json"], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"edgefl {' '.join(args)}: {proc.stderr[-3000:]}"
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


class _Proc(ManagedProcess):
    """A long-running ``edgefl`` command in its own process group, its output in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        super().__init__([*EDGEFL, *args], log, name=f"edgefl {args[0]}")
        self.start()

    def json_line(self, timeout: float) -> dict[str, Any]:
        """The JSON document it prints on one line (``--json``) once ready."""
        doc: dict[str, Any] = json.loads(self.wait_for_log(r'(?m)^\{".*\}$', timeout).group(0))
        return doc

    def stop(self, grace: float = 60.0) -> int | None:
        return super().stop(grace)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    config = tmp_path / "server.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path / "server"),
                "superlink": {"port": free_port()},
                "broker": {"port": free_port()},
            }
        )
    )
    proc = _Proc(["server", "start", "--config", str(config), "--json"], tmp_path / "server.log")
    try:
        info = proc.json_line(timeout=120)
        yield config, info
    finally:
        proc.stop()


def _agent_config(tmp_path: Path, i: int, info: dict[str, Any]) -> Path:
    state = tmp_path / f"agent{i}"
    ident = IdentityPaths(state)
    path = tmp_path / f"agent{i}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "device_id": f"dev-{i}",
                "fleet": "lab",
                "state_dir": str(state),
                "mqtt": {
                    "host": "127.0.0.1",
                    "port": int(info["broker"]["port"]),
                    "tls": {
                        "ca_file": str(ident.ca),
                        "cert_file": str(ident.cert),
                        "key_file": str(ident.tls_key),
                    },
                },
                "sources": [
                    {
                        "type": "dataset-replay",
                        "dataset": "digits",
                        "rate_hz": 200,
                        "partition": i,
                        "num_partitions": DEVICES,
                        "limit": 400,
                    }
                ],
                "training": {"superlink": str(info["superlink"]), "min_samples": 200},
            }
        )
    )
    return path


def _plan(tmp_path: Path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "dataset": "digits",
                "model": "digits-mlp",
                "num_devices": DEVICES,
                "rounds": ROUNDS,
                "lr": 0.3,
                "min_train_nodes": DEVICES,
                "min_available_nodes": DEVICES,
                "node_wait_s": 120,
                "round_timeout_s": 240,
                "dp": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5},
            }
        )
    )
    return path


def _status(config: Path) -> dict[str, Any]:
    return _cli("agent", "status", "--config", str(config))


def _telemetry(db_url: str) -> list[tuple[str, int, dict[str, Any]]]:
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            rows = session.scalars(
                sa.select(Record).where(Record.topic.like("edgefl/lab/%/telemetry/training"))
            ).all()
            out = []
            for row in rows:
                out.append((row.device_id, row.seq, json.loads(row.body)))
            return out
    finally:
        engine.dispose()


def test_three_devices_train_three_dp_rounds_end_to_end(
    tmp_path: Path, server: tuple[Path, dict[str, Any]]
) -> None:
    server_config, info = server
    agents: list[_Proc] = []
    configs = [_agent_config(tmp_path, i, info) for i in range(DEVICES)]
    try:
        for i, config in enumerate(configs):
            request = _cli("agent", "enroll", "--config", str(config))["request"]
            bundle = tmp_path / f"bundle{i}.json"
            admitted = _cli(
                "server", "admit", request, "--out", str(bundle), "--config", str(server_config)
            )
            assert admitted["device_id"] == f"dev-{i}"
            _cli("agent", "enroll", "--config", str(config), "--install", str(bundle))
            agents.append(
                _Proc(["agent", "run", "--config", str(config)], tmp_path / f"agent{i}.log")
            )

        def ready() -> bool:
            states = [_status(c) for c in configs]
            return all(
                s["state"] == "running"
                and s["connected"]
                and s["training"]["supernode"]["state"] == "running"
                and s["training"]["supernode"].get("node_id")
                for s in states
            )

        wait_for(ready, 180, "three agents connected, with data and a running SuperNode")

        def online() -> bool:
            engine = make_engine(str(info["db_url"]))
            try:
                with session_factory(engine)() as session:
                    seen = session.scalars(
                        sa.select(Device.device_id).where(Device.online.is_(True))
                    ).all()
            finally:
                engine.dispose()
            return {f"dev-{i}" for i in range(DEVICES)} <= set(seen)

        wait_for(online, 60, "the registry shows the three devices online")

        result = _cli(
            "server",
            "train",
            "--plan",
            str(_plan(tmp_path)),
            "--config",
            str(server_config),
            "--run-id",
            RUN,
            "--wait",
            "--poll-s",
            "2",
            timeout=900,
        )
        assert result["flower_status"] == "finished:completed"
        # `server train` told each online device that a run was starting, and each agent
        # started its ClientApp's warm zygote then (prewarm-training), before any message.
        assert result["prewarmed"] == [f"dev-{i}" for i in range(DEVICES)]

        def prewarm_answers() -> dict[str, Any]:
            engine = make_engine(str(result["db_url"]))
            try:
                with session_factory(engine)() as session:
                    rows = session.scalars(
                        sa.select(Record).where(
                            Record.topic.like("edgefl/lab/%/cmd-resp/prewarm-training-%")
                        )
                    ).all()
                    return {row.device_id: json.loads(row.body) for row in rows}
            finally:
                engine.dispose()

        wait_for(lambda: len(prewarm_answers()) == DEVICES, 60, "every agent's prewarm answer")
        for device, answer in prewarm_answers().items():
            assert answer["command"] == "prewarm-training", device
            assert answer["ok"] is True, answer
            assert answer["result"] == {"prewarmed": True}, answer
        db_url = str(result["db_url"])
        rounds = result["result"]["rounds"]
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
        for r in rounds:
            assert r["num_replies"] == DEVICES, r
        # The global model improves (chance is 0.1 on ten classes).
        assert rounds[-1]["accuracy"] > rounds[0]["accuracy"], rounds
        assert rounds[-1]["accuracy"] > 0.3, rounds

        # Every device's ε in the server ledger equals its own accountant.
        store = FlStore(db_url)
        try:
            ledger = store.ledger(RUN)
            delta = store.plan(RUN).dp.delta
        finally:
            store.close()
        trained = {(r.device_id, r.round) for r in ledger}
        assert trained == {(f"dev-{i}", n) for i in range(DEVICES) for n in range(1, ROUNDS + 1)}
        for i in range(DEVICES):
            state = FilePrivacyStore(tmp_path / f"agent{i}").load(RUN)
            assert state is not None
            own = epsilon_of(state.history, delta)
            last = max((r for r in ledger if r.device_id == f"dev-{i}"), key=lambda r: r.round)
            assert last.epsilon_total == pytest.approx(own, rel=1e-12)
            assert result["result"]["epsilon_per_device"][f"dev-{i}"] == pytest.approx(own)

        # The training telemetry went through the outbox exactly once per device and round.
        def delivered() -> bool:
            return len(_telemetry(db_url)) >= len(trained)

        wait_for(delivered, 60, "training telemetry in the registry")
        time.sleep(2.0)  # anything duplicated would arrive now
        telemetry = _telemetry(db_url)
        keys = [(device, body["run_id"], body["round"]) for device, _, body in telemetry]
        assert len(keys) == len(set(keys)), "a telemetry document was stored twice"
        assert {(d, n) for d, run, n in keys if run == RUN} == trained
        for device, _, body in telemetry:
            row = next(r for r in ledger if (r.device_id, r.round) == (device, body["round"]))
            assert body["epsilon"] == pytest.approx(row.epsilon_total)
    finally:
        for agent in agents:
            agent.stop()
