"""``edgefl server start``: the supervised broker, SuperLink and ingest, for real.

Children are real processes (mosquitto with the shipped config, flower-superlink with TLS
and node authentication), killed by PID only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from edgefl.cli import app as cli_app
from edgefl.errors import ExitCode
from edgefl.process import ManagedProcess
from edgefl.procs import pid_alive
from edgefl.server.fleet_ca import FleetCA
from edgefl.server.registry import make_engine
from edgefl.server.serve import RUNTIME_FILE, Server, ServerConfig, read_runtime
from edgefl.testing import EdgeflProcesses, first_line, wait_for

TIMEOUT = 90.0


def _config(tmp_path: Path, **extra: object) -> ServerConfig:
    return ServerConfig.model_validate(
        {
            "state_dir": str(tmp_path / "server"),
            "superlink": {"port": 0},
            "broker": {"port": 0},
            "restart_min_s": 0.5,
            "restart_max_s": 2.0,
            **extra,
        }
    )


def _node_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(_config(tmp_path))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_config_is_strict_and_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "server.yaml"
    bad.write_text("state_dir: x\nbroker: {prot: 1883}\n", encoding="utf-8")
    res = CliRunner().invoke(cli_app, ["server", "start", "--config", str(bad)])
    assert res.exit_code == ExitCode.CONFIG
    assert "broker.prot: unknown key" in res.output


@pytest.mark.slow
def test_server_starts_broker_superlink_and_ingest(server: Server) -> None:
    info = server.info()
    pids = info["pids"]
    assert pids["broker"]
    assert pid_alive(pids["broker"])
    assert pids["superlink"]
    assert pid_alive(pids["superlink"])
    assert info["broker"]["port"] == server.broker_port
    assert info["superlink"] == server.superlink_address
    assert read_runtime(server.state_dir) == json.loads(json.dumps(info))
    # The CA was created with the broker/SuperLink server and the ingest's service cert.
    assert server.ca.cert_path == server.ca_dir / "ca.pem"
    assert (server.ca_dir / "server" / "cert.pem").exists()
    assert (server.ca_dir / "services" / "edgefl-ingest" / "key.pem").exists()
    # The ingest is subscribed through mutual TLS on the shipped broker config.
    assert server.ingest is not None
    assert server.ingest.wait_ready(TIMEOUT)
    assert server.ingest.config.tls.cert_file == server.ca_dir / "services/edgefl-ingest/cert.pem"
    # The registry is migrated.
    engine = make_engine(server.db_url)
    try:
        assert "enrollments" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    # The SuperLink answers over TLS.
    assert server.admin().list_nodes() == []


@pytest.mark.slow
def test_start_json_names_the_operator_identity_and_the_admin_flower_home(
    server: Server,
) -> None:
    info = server.info()
    operator = info["operator"]
    assert operator["cn"] == "edgefl-op-NAME"
    assert operator["make"].startswith("edgefl server operator-cert NAME")
    assert operator["identities"] == []  # none made yet: the example names the folder
    assert f"-p {server.broker_port} " in operator["mosquitto_sub"]
    assert f"--cafile {server.ca_dir / 'ca.pem'} " in operator["mosquitto_sub"]
    home = Path(info["admin_flwr_home"]["path"])
    assert home == server.state_dir / "admin-flwr-home"
    assert f'address = "{server.superlink_admin_address}"' in (home / "config.toml").read_text()
    assert info["admin_flwr_home"]["flwr"] == f"FLWR_HOME={home} flwr ls edgefl"

    # An operator certificate made while the server runs shows up in server.json, with a
    # mosquitto_sub line that connects, subscribes and waits (exit 27: timed out, no error).
    FleetCA.load(server.ca_dir).issue_operator_cert("alice")

    def listed() -> list[dict[str, str]]:
        runtime = read_runtime(server.state_dir) or {}
        identities: list[dict[str, str]] = runtime.get("operator", {}).get("identities", [])
        return identities

    wait_for(lambda: bool(listed()), TIMEOUT, "the operator in server.json")
    (identity,) = listed()
    assert identity["cn"] == "edgefl-op-alice"
    assert Path(identity["cert_file"]).is_file()
    assert Path(identity["key_file"]).is_file()
    line = (read_runtime(server.state_dir) or {})["operator"]["mosquitto_sub"]
    assert f"--cert {identity['cert_file']} --key {identity['key_file']}" in line
    if shutil.which("mosquitto_sub"):
        done = subprocess.run(
            [*shlex.split(line), "-W", "2"], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 27, done.stderr


@pytest.mark.slow
def test_server_down_past_the_crl_end_starts_with_a_fresh_one(
    tmp_path: Path, sign_expired_crl: Callable[[FleetCA], dt.datetime]
) -> None:
    # OpenSSL refuses every client once the CRL's nextUpdate has passed; a server that was
    # down that long re-signs it before it starts the broker, so its ingest gets in.
    config = _config(tmp_path)
    sign_expired_crl(FleetCA.create(config.resolved_ca_dir))
    srv = Server(config)
    srv.start()
    try:
        next_update = srv.ca.crl_next_update()
        assert next_update is not None
        assert next_update - dt.datetime.now(dt.UTC) > dt.timedelta(days=29)
        assert srv.ingest is not None
        assert srv.ingest.wait_ready(TIMEOUT)
        assert srv.broker_restarts_for_crl == 0  # the broker started with the fresh CRL
    finally:
        srv.stop()


@pytest.mark.slow
def test_running_server_re_signs_a_crl_that_is_due(server: Server) -> None:
    # An admin signed a CRL with 3 days left (as if 27 had passed): the server re-signs
    # it, restarts its broker once for it, and the ingest is back.
    assert server.ingest is not None
    assert server.ingest.wait_ready(TIMEOUT)
    FleetCA.load(server.ca_dir).crl_pem(days=3)

    def fresh() -> bool:
        next_update = server.ca.crl_next_update()
        return next_update is not None and next_update - dt.datetime.now(dt.UTC) > dt.timedelta(
            days=29
        )

    wait_for(fresh, TIMEOUT, "the CRL to be re-signed")
    wait_for(lambda: server.broker_restarts_for_crl >= 1, TIMEOUT, "a broker restart")
    assert server.ingest.wait_ready(TIMEOUT)
    time.sleep(2.5)  # a few CRL polls: nothing more is due, so no more restarts
    assert server.broker_restarts_for_crl == 1


@pytest.mark.slow
def test_children_killed_with_sigkill_are_restarted_and_state_survives(
    tmp_path: Path, server: Server
) -> None:
    admin = server.admin()
    node_id = admin.register_node(_node_key(tmp_path / "n.pub"), name="survivor")
    assert server.ingest is not None

    old = server.pids()
    os.kill(int(old["broker"] or 0), signal.SIGKILL)
    wait_for(lambda: server.restarts()["broker"] == 1, TIMEOUT, "the broker restart")
    assert server.pids()["broker"] != old["broker"]
    assert pid_alive(int(server.pids()["broker"] or 0))
    wait_for(lambda: server.ingest is not None and server.ingest.wait_ready(0.1), TIMEOUT, "ingest")

    os.kill(int(old["superlink"] or 0), signal.SIGKILL)
    wait_for(lambda: server.restarts()["superlink"] == 1, TIMEOUT, "the SuperLink restart")
    assert server.pids()["superlink"] != old["superlink"]
    # --database on disk: the registered node is still known after the crash.
    assert {n.node_id: n.status for n in admin.list_nodes()} == {node_id: "registered"}
    assert read_runtime(server.state_dir)["pids"] == server.pids()  # type: ignore[index]


def _cli_config(tmp_path: Path) -> Path:
    config = tmp_path / "server.json"
    config.write_text(
        json.dumps(
            {"state_dir": str(tmp_path / "srv"), "superlink": {"port": 0}, "broker": {"port": 0}}
        ),
        encoding="utf-8",
    )
    return config


def _start_cli(procs: EdgeflProcesses, config: Path, name: str) -> ManagedProcess:
    """``edgefl server start --config CONFIG --json``: stderr to NAME.err, stdout to NAME.out."""
    return procs.start(
        *("server", "start", "--config", str(config), "--json"),
        log=f"{name}.err",
        stdout=procs.folder / f"{name}.out",
    )


def _ready(proc: ManagedProcess, procs: EdgeflProcesses, name: str) -> dict[str, Any]:
    """The JSON line the server prints on stdout when ready."""
    info: dict[str, Any] = json.loads(first_line(proc, procs.folder / f"{name}.out", 2 * TIMEOUT))
    return info


def _children(info: dict[str, Any]) -> list[int]:
    return [int(info["pids"]["broker"]), int(info["pids"]["superlink"])]


def _gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(pid_alive(pid) for pid in pids)


@pytest.mark.slow
def test_sigterm_on_the_cli_stops_every_child(
    tmp_path: Path, edgefl_procs: EdgeflProcesses
) -> None:
    stderr = tmp_path / "start.err"
    proc = _start_cli(edgefl_procs, _cli_config(tmp_path), "start")
    info = _ready(proc, edgefl_procs, "start")
    assert "[4/5] flower-superlink" in stderr.read_text()  # progress on stderr
    children = _children(info)
    assert info["pids"]["server"] == proc.pid
    assert all(pid_alive(pid) for pid in children)
    assert (tmp_path / "srv" / RUNTIME_FILE).exists()

    proc.send_signal(signal.SIGTERM)  # the server alone: it stops its children itself
    assert proc.wait(TIMEOUT) == 0, stderr.read_text()
    assert _gone(children)
    assert not (tmp_path / "srv" / RUNTIME_FILE).exists()


@pytest.mark.slow
def test_a_server_killed_with_sigkill_leaves_nothing_its_successor_trips_on(
    tmp_path: Path, edgefl_procs: EdgeflProcesses
) -> None:
    # kill -9 leaves the broker and SuperLink running (orphans holding the ports and
    # files); the next start on the same state_dir ends them first. A second server
    # while the first still runs is refused and touches nothing.
    config = _cli_config(tmp_path)
    first = _start_cli(edgefl_procs, config, "first")
    old: list[int] = []
    try:
        old = _children(_ready(first, edgefl_procs, "first"))
        second = _start_cli(edgefl_procs, config, "second")
        assert second.wait(TIMEOUT) == ExitCode.CONFIG
        assert "already runs" in (tmp_path / "second.err").read_text()
        assert all(pid_alive(pid) for pid in old)

        first.send_signal(signal.SIGKILL)  # the server alone: its children live on
        first.wait(TIMEOUT)
        time.sleep(0.5)
        assert all(pid_alive(pid) for pid in old)  # orphans

        third = _start_cli(edgefl_procs, config, "third")
        info = _ready(third, edgefl_procs, "third")
        assert _gone(old)
        assert "left running by a server" in (tmp_path / "third.err").read_text()
        new = _children(info)
        assert all(pid_alive(pid) for pid in new)
        third.send_signal(signal.SIGTERM)
        assert third.wait(TIMEOUT) == 0, (tmp_path / "third.err").read_text()
        assert _gone(new)
    finally:
        edgefl_procs.stop_all()
        for pid in old:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_train_runs_a_plan_on_admitted_devices_and_reports_rounds_and_epsilon(
    tmp_path: Path, server: Server
) -> None:
    """`edgefl server train --plan --wait`: two admitted devices' SuperNodes train 2 DP
    rounds with edgefl's ServerApp/ClientApp; the registry's rounds and ledger come back."""
    from edgefl.edge_agent.identity import prepare_enrollment
    from edgefl.server.enrollment import admit
    from edgefl.server.fl.superlink import flower_env
    from edgefl.testing import free_port

    config = tmp_path / "server.json"
    config.write_text(json.dumps({"state_dir": str(server.state_dir)}), encoding="utf-8")
    engine = make_engine(server.db_url)
    nodes: list[ManagedProcess] = []
    try:
        for i, device in enumerate(("trainer-0", "trainer-1")):
            enrolled = prepare_enrollment(device, "lab", tmp_path / device)
            admit(enrolled.request, ca=server.ca, admin=server.admin(), engine=engine)
            node_config = (
                f'partition-id={i} num-partitions=2 device-id="{device}" '
                f'state-dir="{tmp_path / device / "fl"}"'
            )
            node = ManagedProcess(
                [
                    str(Path(sys.executable).parent / "flower-supernode"),
                    "--superlink",
                    server.superlink_address,
                    "--root-certificates",
                    str(server.ca.cert_path),
                    "--auth-supernode-private-key",
                    str(enrolled.paths.node_key),
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node_config,
                ],
                tmp_path / f"{device}.log",
                env=flower_env(tmp_path / device / "flwr-home"),
            )
            nodes.append(node)
            node.start()
        plan = tmp_path / "plan.json"
        plan.write_text(
            json.dumps(
                {
                    "dataset": "digits",
                    "model": "digits-mlp",
                    "num_devices": 2,
                    "rounds": 2,
                    "min_train_nodes": 2,
                    "min_available_nodes": 2,
                    "node_wait_s": 120,
                    "round_timeout_s": 300,
                }
            ),
            encoding="utf-8",
        )
        res = CliRunner().invoke(
            cli_app,
            [
                "server",
                "train",
                "--plan",
                str(plan),
                "--config",
                str(config),
                "--run-id",
                "deploy-run-1",
                "--wait",
                "--poll-s",
                "5",
                "--json",
            ],
        )
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        assert out["run_id"] == "deploy-run-1"
        assert out["flower_status"] == "finished:completed"
        assert (server.state_dir / "runs" / "deploy-run-1" / "app" / "pyproject.toml").exists()
        result = out["result"]
        assert [r["round"] for r in result["rounds"]] == [1, 2]
        assert set(result["epsilon_per_device"]) == {"trainer-0", "trainer-1"}
        assert all(eps > 0 for eps in result["epsilon_per_device"].values())
    finally:
        engine.dispose()
        for node in nodes:
            node.signal_group(signal.SIGTERM)
        for node in nodes:
            node.stop(grace=15)
