"""The agent daemon as a real process against a real mosquitto: nothing committed is lost."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.config import RenamedKeyWarning, load_config
from edgefl.edge_agent.daemon import AgentConfig
from edgefl.edge_agent.outbox import Outbox
from edgefl.errors import ExitCode
from edgefl.process import ManagedProcess
from edgefl.proto.serde import decode_envelope
from edgefl.testing import EdgeflProcesses, Mosquitto, wait_for


class Collector:
    """A plain paho subscriber that records every envelope seq it receives."""

    def __init__(self, port: int, topic: str) -> None:
        self.seqs: list[int] = []
        self.status: list[bytes] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"collector-{port}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if msg.topic.endswith("/status"):
                self.status.append(bytes(msg.payload))
            else:
                self.seqs.append(decode_envelope(bytes(msg.payload)).seq)

    def distinct(self) -> set[int]:
        with self._lock:
            return set(self.seqs)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _write_config(tmp_path: Path, port: int, *, rate_hz: float, limit: int) -> Path:
    config = {
        "device_id": "dev-a",
        "fleet": f"t{os.getpid()}",
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "sources": [{"type": "dataset-replay", "rate_hz": rate_hz, "limit": limit}],
        "status_interval_s": 0.2,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start_agent(procs: EdgeflProcesses, config: Path) -> ManagedProcess:
    return procs.start("agent", "run", "--config", str(config), log="agent.log")


def _committed(config: Path) -> int:
    cfg = load_config(AgentConfig, config)
    with Outbox(cfg.state_dir / "outbox.db", cfg.device_id, cfg.outbox) as box:
        return box.stats().next_seq - 1


def test_client_id_defaults_to_device_id(tmp_path: Path) -> None:
    cfg = load_config(AgentConfig, _write_config(tmp_path, 1883, rate_hz=1, limit=1))
    assert cfg.mqtt.client_id == "dev-a"


def test_validate_config_names_the_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "device_id: dev-a\nstate_dir: /tmp/x\nmqtt: {port: 99999}\n"
        "sources: [{type: dataset-replay, rate_hz: -1}]\nbogus: 1\n"
    )
    result = CliRunner().invoke(app, ["agent", "validate-config", "--config", str(path)])
    assert result.exit_code == ExitCode.CONFIG
    for fragment in ("mqtt.port", "sources.0.dataset-replay.rate_hz", "bogus", "unknown key"):
        assert fragment in result.output


OLD_AGENT_YAML = """device_id: dev-a
state_dir: /tmp/x
mqtt:
  host: mqtt.local
  port: 8883
  keepalive: 20
  ca_file: /etc/edgefl/ca.pem
  cert_file: /etc/edgefl/device.pem
  key_file: /etc/edgefl/device.key
"""


def test_an_agent_yaml_with_old_key_names_still_loads_and_validate_config_says_so(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(OLD_AGENT_YAML)
    with pytest.warns(RenamedKeyWarning, match="mqtt.keepalive is renamed mqtt.keepalive_s"):
        cfg = load_config(AgentConfig, path)
    assert cfg.mqtt.keepalive_s == 20
    assert cfg.mqtt.tls.cert_file == Path("/etc/edgefl/device.pem")
    result = CliRunner().invoke(app, ["agent", "validate-config", "--config", str(path)])
    assert result.exit_code == 0, result.output
    for old, new in [
        ("mqtt.keepalive", "mqtt.keepalive_s"),
        ("mqtt.ca_file", "mqtt.tls.ca_file"),
        ("mqtt.cert_file", "mqtt.tls.cert_file"),
        ("mqtt.key_file", "mqtt.tls.key_file"),
    ]:
        assert f"key {old} is renamed {new}; accepted until the next release" in result.stdout
    result = CliRunner().invoke(app, ["agent", "validate-config", "-c", str(path), "--json"])
    renamed = json.loads(result.stdout)["renamed_keys"]
    assert {"old": "mqtt.keepalive", "new": "mqtt.keepalive_s"} in renamed
    assert len(renamed) == 4


@pytest.mark.slow
def test_agent_delivers_everything_and_reports_status(
    tmp_path: Path, broker: Mosquitto, edgefl_procs: EdgeflProcesses
) -> None:
    config = _write_config(tmp_path, broker.port, rate_hz=400, limit=300)
    cfg = load_config(AgentConfig, config)
    collector = Collector(broker.port, f"edgefl/{cfg.fleet}/dev-a/#")
    agent = _start_agent(edgefl_procs, config)
    try:
        wait_for(lambda: collector.distinct() == set(range(1, 301)), 60, "300 records")
        runner = CliRunner()
        wait_for(
            lambda: (
                json.loads(
                    runner.invoke(app, ["agent", "status", "-c", str(config), "--json"]).stdout
                )["state"]
                == "running"
            ),
            10,
            "running status",
        )
        report = json.loads(
            runner.invoke(app, ["agent", "status", "-c", str(config), "--json"]).stdout
        )
        assert report["connected"] is True
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
        collector.close()
    report = json.loads(
        CliRunner().invoke(app, ["agent", "status", "-c", str(config), "--json"]).stdout
    )
    assert report["state"] == "stopped"
    assert report["outbox"]["depth"] == 0
    assert report["sender"]["acked"] == 300
    assert b"online" in collector.status


@pytest.mark.slow
def test_agent_killed_mid_stream_loses_nothing_it_committed(
    tmp_path: Path, broker: Mosquitto, edgefl_procs: EdgeflProcesses
) -> None:
    config = _write_config(tmp_path, broker.port, rate_hz=300, limit=400)
    cfg = load_config(AgentConfig, config)
    collector = Collector(broker.port, f"edgefl/{cfg.fleet}/dev-a/+/+")
    agent = _start_agent(edgefl_procs, config)
    try:
        wait_for(lambda: len(collector.distinct()) >= 100, 60, "first 100 records")
        agent.kill()  # SIGKILL, reaped
        first_run = _committed(config)
        assert first_run >= 100
        agent = _start_agent(edgefl_procs, config)
        expected = set(range(1, first_run + 400 + 1))
        wait_for(lambda: collector.distinct() == expected, 60, "every committed record")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        collector.close()
    # At-least-once: a record in flight when the agent died may arrive twice; the ingest
    # deduplicates on (device_id, seq).
    assert _committed(config) == first_run + 400


@pytest.mark.slow
def test_agent_boots_without_a_broker_and_delivers_later(
    tmp_path: Path, edgefl_procs: EdgeflProcesses
) -> None:
    broker = Mosquitto(tmp_path)
    config = _write_config(tmp_path, broker.port, rate_hz=100, limit=50)
    cfg = load_config(AgentConfig, config)
    agent = _start_agent(edgefl_procs, config)
    try:
        wait_for(
            lambda: _committed(config) == 50 if cfg.state_dir.exists() else False, 30, "50 buffered"
        )
        broker.start()
        # Every record was PUBACKed by the broker once the outbox is empty.
        wait_for(
            lambda: (
                json.loads(
                    CliRunner().invoke(app, ["agent", "status", "-c", str(config), "--json"]).stdout
                )["outbox"]["depth"]
                == 0
            ),
            60,
            "outbox drained after the broker came up",
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        broker.kill()
    assert _committed(config) == 50


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _status(config: Path) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["agent", "status", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_status_reports_a_corrupt_outbox_and_leaves_it_where_it_is(tmp_path: Path) -> None:
    config = _write_config(tmp_path, 1883, rate_hz=1, limit=1)
    state = load_config(AgentConfig, config).state_dir
    state.mkdir()
    (state / "outbox.db").write_bytes(b"not an sqlite file at all" * 100)
    before = _files(state)
    report = _status(config)
    assert "not a usable outbox" in report["outbox"]["error"]
    assert _files(state) == before  # not quarantined, nothing created beside it
    text = CliRunner().invoke(app, ["agent", "status", "-c", str(config)])
    assert "outbox: UNREADABLE, left as it is" in text.output


def test_status_of_a_stopped_agent_writes_nothing(tmp_path: Path) -> None:
    config = _write_config(tmp_path, 1883, rate_hz=1, limit=1)
    cfg = load_config(AgentConfig, config)
    now = [1000.0]
    with Outbox(
        cfg.state_dir / "outbox.db", cfg.device_id, cfg.outbox, clock=lambda: now[0]
    ) as box:
        box.put("edgefl/f/dev-a/data/x", b"keep", ttl_s=10**11)
        box.put("edgefl/f/dev-a/data/x", b"stale", ttl_s=1.0)
    before = _files(cfg.state_dir)
    assert set(before) == {"outbox.db"}  # closed cleanly: no -wal/-shm
    report = _status(config)
    # The stale record counts as expired (the agent deletes it later), but stays stored.
    assert (report["outbox"]["depth"], report["outbox"]["expired"]) == (1, 1)
    assert report["outbox"]["next_seq"] == 3
    assert _files(cfg.state_dir) == before


def test_status_beside_a_running_writer_reads_its_commits_read_only(tmp_path: Path) -> None:
    config = _write_config(tmp_path, 1883, rate_hz=1, limit=1)
    cfg = load_config(AgentConfig, config)
    with Outbox(cfg.state_dir / "outbox.db", cfg.device_id, cfg.outbox) as box:
        box.put_many([("edgefl/f/dev-a/data/x", b"r%d" % i) for i in range(5)])
        assert (cfg.state_dir / "outbox.db-wal").exists()  # the writer holds it open
        mtimes = {p.name: p.stat().st_mtime_ns for p in cfg.state_dir.iterdir()}
        report = _status(config)
        assert report["outbox"]["depth"] == 5
        assert {p.name for p in cfg.state_dir.iterdir()} == set(mtimes)
        assert (cfg.state_dir / "outbox.db").stat().st_mtime_ns == mtimes["outbox.db"]
        assert (cfg.state_dir / "outbox.db-wal").stat().st_mtime_ns == mtimes["outbox.db-wal"]
        box.put("edgefl/f/dev-a/data/x", b"after")  # the writer is not locked out
