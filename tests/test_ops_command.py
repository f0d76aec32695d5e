"""``command`` over the fleet's command contract: a real mosquitto (shipped config and ACL,
mutual TLS) and real agents holding their device certificates.

The operation publishes as the ``edgefl-commands`` service identity; an online agent
answers on ``cmd-resp/{correlation_id}``; an offline device's command is ``queued``: its
persistent MQTT session keeps it, so the agent runs it when it reconnects, unless the
command expired by then (the contract: an expired command is ignored, never answered).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edgefl.server.audit import Principal
from edgefl.server.ops import InvalidError, NotFoundError, OpContext, invoke
from edgefl.server.registry import Device, make_engine, session_factory
from edgefl.testing import mosquitto_executable, wait_for

try:
    from tests.delivery_helpers import Delivery, TlsBroker, make_delivery, tls_of
except ImportError:  # run from inside tests/
    from delivery_helpers import (  # type: ignore[import-not-found,no-redef]
        Delivery,
        TlsBroker,
        make_delivery,
        tls_of,
    )

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_executable() is None, reason="mosquitto is not installed"),
]

OPERATOR = Principal("ops-carol", "operator", "api")


class Fleet:
    def __init__(self, root: Path, delivery: Delivery, broker: TlsBroker) -> None:
        self.root = root
        self.delivery = delivery
        self.broker = broker
        self.config = root / "server.yaml"
        self.config.write_text(
            f"state_dir: {root / 'state'}\n"
            f"ca_dir: {delivery.ca.directory}\n"
            f"db_url: {delivery.db_url}\n"
            f"broker: {{host: 127.0.0.1, port: {broker.port}}}\n",
            encoding="utf-8",
        )

    def op(self, name: str, args: dict[str, Any]) -> Any:
        with OpContext(OPERATOR, config_path=self.config) as ctx:
            return invoke(name, args, ctx)

    def set_online(self, device: str, online: bool) -> None:
        engine = make_engine(self.delivery.db_url)
        now = datetime.now(UTC)
        try:
            with session_factory(engine)() as s, s.begin():
                row = s.get(Device, device)
                if row is None:
                    s.add(
                        Device(
                            device_id=device,
                            fleet="f1",
                            first_seen=now,
                            last_seen=now,
                            online=online,
                        )
                    )
                else:
                    row.online = online
        finally:
            engine.dispose()


class RunningAgent:
    """An in-process agent with its device certificate, on its own thread."""

    def __init__(self, fleet: Fleet, device: str) -> None:
        from edgefl.edge_agent.daemon import Agent, AgentConfig

        tls = tls_of(fleet.delivery, fleet.delivery.devices[device])
        config = {
            "device_id": device,
            "fleet": "f1",
            "state_dir": str(fleet.root / device),
            "mqtt": {
                "host": "127.0.0.1",
                "port": fleet.broker.port,
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 1.0,
                "tls": {k: str(v) for k, v in tls.model_dump().items()},
            },
            "status_interval_s": 0.2,
            "agent_report_s": 0.5,
        }
        self.agent = Agent(AgentConfig.model_validate(config))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop,), daemon=True)
        self.thread.start()
        assert self.agent.link.wait_subscribed(30)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from edgefl.server.config import read_server_config
    from edgefl.server.fleet_ca import INGEST_IDENTITY
    from edgefl.server.ingest import Ingest

    root = tmp_path_factory.mktemp("cmd")
    delivery = make_delivery(root / "d", size=1000)
    delivery.ca.issue_service_cert(INGEST_IDENTITY)
    with TlsBroker(root / "broker", delivery, {"pi-01": "f1", "pi-02": "f1"}) as broker:
        fleet = Fleet(root, delivery, broker)
        # The server's ingest, so that what the agents report reaches the registry.
        ingest = Ingest(read_server_config(fleet.config).ingest_settings("127.0.0.1", broker.port))
        ingest.start()
        try:
            assert ingest.wait_ready(20), "ingest did not subscribe"
            yield fleet
        finally:
            ingest.stop()


def test_an_online_device_answers_and_the_command_is_audited(fleet: Fleet) -> None:
    fleet.set_online("pi-01", True)
    agent = RunningAgent(fleet, "pi-01")
    try:
        doc = fleet.op(
            "command",
            {"device": "pi-01", "name": "ping", "args": {"hello": "edge"}, "wait": True},
        )
        assert doc["status"] == "answered"
        assert doc["response"] == {
            "correlation_id": doc["correlation_id"],
            "command": "ping",
            "ok": True,
            "result": {"hello": "edge"},
        }
        status = fleet.op("command", {"device": "pi-01", "name": "status", "wait": True})
        assert status["response"]["ok"] is True
        assert set(status["response"]["result"]["outbox"]) >= {"depth", "bytes"}
        unknown = fleet.op("command", {"device": "pi-01", "name": "nope", "wait": True})
        assert unknown["response"]["ok"] is False
        assert "ping" in unknown["response"]["known"]
        # The agent reports its outbox (telemetry/agent) on its own; the ingest stores it.
        wait_for(
            lambda: fleet.op("devices", {})["devices"][0]["outbox"] is not None,
            20,
            "pi-01's outbox report in the registry",
        )
        row = fleet.op("devices", {})["devices"][0]
        assert row["device_id"] == "pi-01"
        assert row["presence"] == "online"
        assert row["outbox"]["depth"] >= 0
        shown = fleet.op("device-show", {"device": "pi-01"})
        answered = {c["correlation_id"]: c for c in shown["commands"]}
        wait_for(
            lambda: (
                fleet.op("device-show", {"device": "pi-01"})["commands"][0]["response"] is not None
            ),
            20,
            "the answers stored by the ingest",
        )
        shown = fleet.op("device-show", {"device": "pi-01"})
        answered = {c["correlation_id"]: c for c in shown["commands"]}
        assert answered[doc["correlation_id"]]["response"]["result"] == {"hello": "edge"}
    finally:
        agent.close()
    entries = fleet.op("audit", {"action": "command"})["entries"]
    assert [(e["actor"], e["target"], e["outcome"]) for e in entries[:3]] == [
        ("ops-carol", "pi-01", "ok")
    ] * 3
    assert entries[2]["arguments"]["args"] == {"hello": "edge"}


def test_an_offline_device_gets_a_queued_command_unless_it_expired(fleet: Fleet) -> None:
    # Connect once so the broker holds pi-02's persistent session, then go away.
    RunningAgent(fleet, "pi-02").close()
    fleet.set_online("pi-02", False)
    queued = fleet.op(
        "command",
        {
            "device": "pi-02",
            "name": "ping",
            "args": {"n": 1},
            "wait": True,
            "correlation_id": "q-1",
        },
    )
    assert queued["status"] == "queued"
    assert queued["response"] is None
    expires = datetime.fromisoformat(queued["expires_at"])
    assert 290 < (expires - datetime.now(UTC)).total_seconds() <= 300
    stale = fleet.op(
        "command", {"device": "pi-02", "name": "ping", "ttl_s": 1, "correlation_id": "q-2"}
    )
    assert stale["status"] == "queued"
    time.sleep(1.5)  # q-2 expires while the device is away
    agent = RunningAgent(fleet, "pi-02")
    try:
        commands = agent.agent.commands
        wait_for(
            lambda: commands.response_for("q-1") is not None, 20, "the queued command's answer"
        )
        assert commands.response_for("q-1")["result"] == {"n": 1}  # type: ignore[index]
        wait_for(lambda: commands.stats.expired >= 1, 10, "the expired command ignored")
        assert commands.response_for("q-2") is None
    finally:
        agent.close()


def test_bad_commands_are_refused_before_anything_is_sent(fleet: Fleet) -> None:
    with pytest.raises(NotFoundError, match="pi-09"):
        fleet.op("command", {"device": "pi-09", "name": "ping"})
    with pytest.raises(InvalidError, match="command name"):
        fleet.op("command", {"device": "pi-01", "name": "a/b"})
    with pytest.raises(InvalidError, match="correlation_id"):
        fleet.op("command", {"device": "pi-01", "name": "ping", "correlation_id": "x/#"})
    with pytest.raises(InvalidError, match="args"):
        fleet.op("command", {"device": "pi-01", "name": "ping", "args": [1, 2]})


_WAITING_PUBLISHER = """
import json, sys
from pathlib import Path
from edgefl.server.ops.fleet import _commands_identity, send_command
host, port, ca_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
sent = send_command(host=host, port=port, tls=_commands_identity(ca_dir), fleet="f1",
                    device="pi-02", name="ping", args={}, ttl_s=1.0, wait_s=3.0)
print(json.dumps(sent))
"""
_TAKEOVER = "Client edgefl-commands already connected, closing old connection"


def test_command_publishers_of_two_processes_take_turns_and_both_keep_their_session(
    fleet: Fleet,
) -> None:
    """The broker takes a client's id from its certificate's CN, so a second connection as
    ``edgefl-commands`` would close the first one (and lose the answer it waits for).
    Another process waiting 3 s for an answer holds the session; a command sent meanwhile
    waits its turn, is answered, and the broker never closed one connection for another."""
    fleet.set_online("pi-01", True)
    agent = RunningAgent(fleet, "pi-01")

    def connections() -> int:
        return fleet.broker.log.read_text(errors="replace").count("as edgefl-commands (")

    try:
        before = connections()
        other = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WAITING_PUBLISHER,
                "127.0.0.1",
                str(fleet.broker.port),
                str(fleet.delivery.ca.directory),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: connections() > before, 20, "the other process's publisher")
            started = time.monotonic()
            doc = fleet.op("command", {"device": "pi-01", "name": "ping", "wait": True})
            took = time.monotonic() - started
            out, _ = other.communicate(timeout=30)
        finally:
            other.kill()
            other.wait(10)
        assert other.returncode == 0
        assert json.loads(out)["response"] is None  # pi-02 is away: it waited its 3 s
        assert doc["status"] == "answered", doc
        assert doc["response"]["ok"] is True
        assert took > 1.0  # it waited for the other's session to end
        assert connections() >= before + 2
        assert _TAKEOVER not in fleet.broker.log.read_text(errors="replace")
    finally:
        agent.close()


def test_an_answer_the_publisher_missed_is_read_from_the_registry(fleet: Fleet) -> None:
    """A wait that ends before the answer (here 1 ms; in life, a connection dropped while it
    waited) still reports the answer once the ingest stored it."""
    fleet.set_online("pi-01", True)
    agent = RunningAgent(fleet, "pi-01")
    try:
        doc = fleet.op(
            "command",
            {
                "device": "pi-01",
                "name": "ping",
                "args": {"late": 1},
                "wait": True,
                "timeout_s": 0.001,
            },
        )
        assert doc["status"] == "answered", doc
        assert doc["response"]["correlation_id"] == doc["correlation_id"]
        assert doc["response"]["result"] == {"late": 1}
    finally:
        agent.close()
