"""``edgefl server start``: the supervised broker, SuperLink and ingest, for real.

Children are real processes (mosquitto with the shipped config, flower-superlink with TLS
and node authentication), killed by PID only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from edgefl.cli import app as cli_app
from edgefl.errors import ExitCode
from edgefl.server.registry import make_engine
from edgefl.server.serve import RUNTIME_FILE, Server, ServerConfig, read_runtime
from edgefl.testing import wait_for

TIMEOUT = 90.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


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
    assert _alive(pids["broker"])
    assert pids["superlink"]
    assert _alive(pids["superlink"])
    assert info["broker"]["port"] == server.broker_port
    assert info["superlink"] == server.superlink_address
    assert read_runtime(server.state_dir) == json.loads(json.dumps(info))
    # The CA was created with the broker/SuperLink server and the ingest's service cert.
    assert server.ca.cert_path == server.ca_dir / "ca.pem"
    assert (server.ca_dir / "server" / "cert.pem").exists()
    assert (server.ca_dir / "services" / "edgefl-server" / "key.pem").exists()
    # The ingest is subscribed through mutual TLS on the shipped broker config.
    assert server.ingest is not None
    assert server.ingest.wait_ready(TIMEOUT)
    assert server.ingest.config.cert_file == server.ca_dir / "services/edgefl-server/cert.pem"
    # The registry is migrated.
    engine = make_engine(server.db_url)
    try:
        assert "enrollments" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    # The SuperLink answers over TLS.
    assert server.admin().list_nodes() == []


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
    assert _alive(int(server.pids()["broker"] or 0))
    wait_for(lambda: server.ingest is not None and server.ingest.wait_ready(0.1), TIMEOUT, "ingest")

    os.kill(int(old["superlink"] or 0), signal.SIGKILL)
    wait_for(lambda: server.restarts()["superlink"] == 1, TIMEOUT, "the SuperLink restart")
    assert server.pids()["superlink"] != old["superlink"]
    # --database on disk: the registered node is still known after the crash.
    assert {n.node_id: n.status for n in admin.list_nodes()} == {node_id: "registered"}
    assert read_runtime(server.state_dir)["pids"] == server.pids()  # type: ignore[index]


@pytest.mark.slow
def test_sigterm_on_the_cli_stops_every_child(tmp_path: Path) -> None:
    config = tmp_path / "server.json"
    config.write_text(
        json.dumps(
            {"state_dir": str(tmp_path / "srv"), "superlink": {"port": 0}, "broker": {"port": 0}}
        ),
        encoding="utf-8",
    )
    stderr = tmp_path / "start.err"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "edgefl"),
                "server",
                "start",
                "--config",
                str(config),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, stderr.read_text()
        info = json.loads(line)
        assert "[4/5] flower-superlink" in stderr.read_text()  # progress on stderr
        children = [int(info["pids"]["broker"]), int(info["pids"]["superlink"])]
        assert info["pids"]["server"] == proc.pid
        assert all(_alive(pid) for pid in children)
        assert (tmp_path / "srv" / RUNTIME_FILE).exists()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0, stderr.read_text()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children)
        assert not (tmp_path / "srv" / RUNTIME_FILE).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
