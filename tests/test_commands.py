"""Fleet commands: answered exactly once, expired ones ignored, bad input survives.

Unit tests drive :class:`CommandProcessor` directly against a real SQLite outbox; the
``slow`` tests run the agent (in-process or as ``edgefl agent run``) against a real
mosquitto and count the responses a plain paho client receives.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.config import load_config
from edgefl.edge_agent.commands import (
    COMMANDS_FILE,
    CommandError,
    CommandProcessor,
    make_command,
    parse_command,
    ping_handler,
)
from edgefl.edge_agent.daemon import Agent, AgentConfig
from edgefl.edge_agent.mqtt_link import InboundMessage
from edgefl.edge_agent.outbox import Outbox, OutboxPolicy
from edgefl.process import ManagedProcess
from edgefl.proto.serde import (
    MAX_ENVELOPE_BYTES,
    Envelope,
    canonical_json_body,
    decode_envelope,
    encode_envelope,
)
from edgefl.testing import EdgeflProcesses, Mosquitto, wait_for

DEVICE = "dev-c"


def _message(topic: str, payload: bytes) -> InboundMessage:
    return InboundMessage(topic=topic, payload=payload, qos=1, mid=1, client_epoch=0, generation=0)


# -- unit tests (no broker) --------------------------------------------------------------


class _Harness:
    def __init__(self, tmp_path: Path, max_bytes: int = 1 << 20) -> None:
        self.tmp_path = tmp_path
        self.fleet = "fl"
        self.now_ms = 1_700_000_000_000
        self.outbox = Outbox(tmp_path / "outbox.db", DEVICE, OutboxPolicy(max_bytes=max_bytes))
        self.processor = self._processor()

    def _processor(self) -> CommandProcessor:
        return CommandProcessor(
            self.tmp_path,
            fleet=self.fleet,
            device_id=DEVICE,
            outbox=self.outbox,
            clock_ms=lambda: self.now_ms,
        )

    def reopen(self, max_bytes: int = 1 << 20) -> None:
        """What a restart does: new outbox and processor on the same files."""
        self.processor.close()
        self.outbox.close()
        self.outbox = Outbox(self.tmp_path / "outbox.db", DEVICE, OutboxPolicy(max_bytes=max_bytes))
        self.processor = self._processor()

    def send(self, name: str, args: dict[str, Any], cid: str, ttl_s: float = 60) -> None:
        topic, payload = make_command(
            self.fleet, DEVICE, name, args, ttl_s, cid, now_ms=self.now_ms
        )
        self.processor.handle(_message(topic, payload))

    def responses(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for record in self.outbox.next_batch(1000):
            env = decode_envelope(record.payload)
            assert env.kind == "response"
            assert env.seq == record.seq
            out.append((record.topic, json.loads(env.body)))
        self.outbox.release_all()
        return out


def test_make_and_parse_command_round_trip() -> None:
    topic, payload = make_command("fl", DEVICE, "ping", {"a": 1}, 5, "c-1", now_ms=1000)
    assert topic == f"edgefl/fl/{DEVICE}/cmd/ping"
    command = parse_command(topic, payload, DEVICE)
    assert (command.name, command.correlation_id, command.expires_at_ms, command.args) == (
        "ping",
        "c-1",
        6000,
        {"a": 1},
    )
    env = decode_envelope(payload)
    assert env.kind == "command"
    assert env.device_id == DEVICE
    assert env.seq >= 1
    with pytest.raises(CommandError, match="addressed to"):
        parse_command(topic, payload, "other")
    with pytest.raises(CommandError, match="correlation_id"):
        make_command("fl", DEVICE, "ping", {}, 5, "a/b")


def test_processor_answers_once_and_refuses_bad_input(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = _Harness(tmp_path)
    calls: list[dict[str, Any]] = []

    def counted(args: dict[str, Any]) -> dict[str, Any]:
        calls.append(args)
        return {"n": len(calls)}

    def broken(args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("sensor offline")

    h.processor.register("ping", ping_handler)
    h.processor.register("count", counted)
    h.processor.register("broken", broken)
    with pytest.raises(ValueError, match="already registered"):
        h.processor.register("ping", ping_handler)
    caplog.set_level(logging.INFO, logger="edgefl.edge_agent.commands")

    h.send("ping", {"x": [1, 2]}, "p1")
    h.send("count", {}, "c1")
    h.send("count", {}, "c1")  # duplicate publish / redelivery
    h.send("nope", {}, "u1")
    h.send("broken", {}, "b1")
    h.send("ping", {}, "e1", ttl_s=-2.5)
    topic = f"edgefl/fl/{DEVICE}/cmd/ping"
    h.processor.handle(_message(topic, b"\x00garbage"))
    no_args = canonical_json_body({"correlation_id": "m1", "expires_at_ms": h.now_ms + 1000})
    env = Envelope(1, DEVICE, 1, h.now_ms, "command", "application/json", no_args)
    h.processor.handle(_message(topic, encode_envelope(env, "json")))

    by_cid = {body["correlation_id"]: (t, body) for t, body in h.responses()}
    assert sorted(by_cid) == ["b1", "c1", "m1", "p1", "u1"]
    assert by_cid["p1"] == (
        f"edgefl/fl/{DEVICE}/cmd-resp/p1",
        {"correlation_id": "p1", "command": "ping", "ok": True, "result": {"x": [1, 2]}},
    )
    assert len(calls) == 1
    assert by_cid["c1"][1]["result"] == {"n": 1}
    assert by_cid["u1"][1]["ok"] is False
    assert by_cid["u1"][1]["error"] == "unknown command 'nope'"
    assert by_cid["u1"][1]["known"] == ["broken", "count", "ping"]
    assert by_cid["b1"][1] == {
        "correlation_id": "b1",
        "command": "broken",
        "ok": False,
        "error": "sensor offline",
    }
    assert by_cid["m1"][1]["ok"] is False
    assert "malformed" in by_cid["m1"][1]["error"]
    stats = h.processor.stats.as_dict()
    assert stats["received"] == 8
    assert stats["duplicate"] == 1
    assert stats["expired"] == 1
    assert stats["malformed"] == 2
    assert stats["answered"] == 5
    assert stats["unknown"] == 1
    assert stats["failed"] == 1
    assert "ignoring expired command ping (correlation e1) expired 2500 ms ago" in caplog.text

    # Across a restart the answered ids are remembered and nothing is re-enqueued.
    h.reopen()
    h.processor.register("count", counted)
    assert h.processor.recover() == 0
    h.send("count", {}, "c1")
    assert len(calls) == 1
    assert h.processor.stats.duplicate == 1
    assert len(h.responses()) == 5


def _doc_style_command(cid: str, expires_at_ms: int, key: str = "version") -> bytes:
    """A JSON command as a reader of an older contract doc wrote it: ``version``, not ``v``."""
    document = {
        key: 1,
        "device_id": DEVICE,
        "seq": 1,
        "ts_ms": 1,
        "kind": "command",
        "content_type": "application/json",
        "body": {"correlation_id": cid, "expires_at_ms": expires_at_ms, "args": {}},
    }
    return json.dumps(document).encode()


def test_a_malformed_command_with_a_readable_correlation_id_is_answered(tmp_path: Path) -> None:
    h = _Harness(tmp_path)
    h.processor.register("ping", ping_handler)
    topic = f"edgefl/fl/{DEVICE}/cmd/ping"
    expires = h.now_ms + 60_000
    h.processor.handle(_message(topic, _doc_style_command("doc-1", expires)))
    h.processor.handle(_message(topic, _doc_style_command("doc-1", expires)))  # once only
    # A protobuf envelope of the wrong kind whose body still names its correlation id.
    body = canonical_json_body({"correlation_id": "kind-1", "expires_at_ms": expires, "args": {}})
    wrong_kind = Envelope(1, DEVICE, 1, h.now_ms, "telemetry", "application/json", body)
    h.processor.handle(_message(topic, encode_envelope(wrong_kind, "protobuf")))
    # Addressed to another device but on this device's topic: answered here, never there.
    other_body = body.replace(b"kind-1", b"other-1")
    other = Envelope(1, "other-dev", 1, h.now_ms, "command", "application/json", other_body)
    h.processor.handle(_message(topic, encode_envelope(other, "json")))
    # A correct command with the right key still works.
    h.processor.handle(_message(topic, _doc_style_command("ok-1", expires, key="v")))

    by_cid = {body["correlation_id"]: (t, body) for t, body in h.responses()}
    assert sorted(by_cid) == ["doc-1", "kind-1", "ok-1", "other-1"]
    assert {t for t, _ in by_cid.values()} == {
        f"edgefl/fl/{DEVICE}/cmd-resp/{cid}" for cid in by_cid
    }
    doc = by_cid["doc-1"][1]
    assert doc["ok"] is False
    assert doc["command"] == "ping"
    assert "unknown key(s) ['version']" in doc["error"]
    assert "the version key is 'v'" in doc["error"]
    assert "not 'command'" in by_cid["kind-1"][1]["error"]
    assert "addressed to 'other-dev'" in by_cid["other-1"][1]["error"]
    assert by_cid["ok-1"][1]["ok"] is True
    stats = h.processor.stats
    assert (stats.malformed, stats.unanswered, stats.answered) == (4, 1, 4)


def test_an_unreadable_or_unsafe_malformed_command_is_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = _Harness(tmp_path)
    caplog.set_level(logging.INFO, logger="edgefl.edge_agent.commands")
    topic = f"edgefl/fl/{DEVICE}/cmd/ping"
    future = h.now_ms + 60_000
    junk = [
        (topic, b"\x00garbage"),
        (topic, b"{not json"),
        (topic, b'{"v":1,"device_id":"dev-c"}'),  # no body
        (topic, _doc_style_command("a/b", future)),  # would add a topic level
        (topic, _doc_style_command("#", future)),  # a wildcard
        (topic, _doc_style_command("x" * 129, future)),  # too long
        (topic, _doc_style_command("old-1", h.now_ms - 1)),  # expired
        # Not this device's command topic: no answer anywhere.
        ("edgefl/fl/victim/cmd/ping", _doc_style_command("v-1", future)),
        (f"edgefl/other-fleet/{DEVICE}/cmd/ping", _doc_style_command("v-2", future)),
        (f"edgefl/fl/{DEVICE}/state/desired", _doc_style_command("v-3", future)),
    ]
    for t, payload in junk:
        h.processor.handle(_message(t, payload))
    assert h.responses() == []
    stats = h.processor.stats
    assert (stats.malformed, stats.unanswered, stats.answered) == (len(junk), len(junk), 0)
    assert "malformed command on" in caplog.text


def test_answers_to_malformed_commands_are_rate_limited(tmp_path: Path) -> None:
    h = _Harness(tmp_path)
    topic = f"edgefl/fl/{DEVICE}/cmd/ping"
    for i in range(30):
        h.processor.handle(_message(topic, _doc_style_command(f"m-{i}", h.now_ms + 600_000)))
    assert len(h.responses()) == 20
    assert h.processor.stats.rate_limited == 10
    h.now_ms += 5_000  # five more tokens
    for i in range(30, 40):
        h.processor.handle(_message(topic, _doc_style_command(f"m-{i}", h.now_ms + 600_000)))
    assert len(h.responses()) == 25  # the outbox still holds the first 20 (not sent)
    assert h.processor.stats.rate_limited == 15
    assert h.processor.stats.unanswered == 15
    # Valid commands are never limited.
    h.processor.register("ping", ping_handler)
    for i in range(30):
        h.send("ping", {}, f"p-{i}")
    assert len(h.responses()) == 55


def test_a_response_too_large_to_send_is_answered_with_the_reason(tmp_path: Path) -> None:
    h = _Harness(tmp_path)
    h.processor.register("dump", lambda args: {"blob": "x" * (MAX_ENVELOPE_BYTES + 10)})
    h.processor.register("ping", ping_handler)
    h.send("dump", {}, "d1")
    h.send("ping", {}, "p1")  # the processor goes on
    by_cid = {body["correlation_id"]: body for _, body in h.responses()}
    assert sorted(by_cid) == ["d1", "p1"]
    assert by_cid["d1"]["ok"] is False
    assert by_cid["d1"]["error"].startswith("response too large to send")
    assert by_cid["p1"]["ok"] is True
    # Nothing is left to retry, across a restart too.
    h.reopen()
    assert h.processor.recover() == 0


def test_recover_enqueues_only_responses_missing_from_the_outbox(tmp_path: Path) -> None:
    h = _Harness(tmp_path, max_bytes=64)
    h.processor.register("ping", ping_handler)
    # The outbox refuses the response (too big for it): recorded but not enqueued.
    h.send("ping", {"pad": "x" * 100}, "big")
    assert h.responses() == []
    assert h.processor.stats.response_retries == 1
    # As if the process died with outbox_seq written but the outbox transaction not
    # committed: that seq was never handed out, so the response is not in the outbox.
    h.reopen()
    h.processor.register("ping", ping_handler)
    with closing(sqlite3.connect(tmp_path / COMMANDS_FILE)) as db, db:
        db.execute(
            "INSERT INTO answered VALUES ('ghost', 'ping', ?, ?, ?, ?)",
            (
                h.now_ms + 60_000,
                h.now_ms,
                canonical_json_body({"correlation_id": "ghost", "ok": True, "result": {}}),
                h.outbox.stats().next_seq,
            ),
        )
    h.reopen(max_bytes=1 << 20)
    assert h.processor.recover() == 2
    assert sorted(body["correlation_id"] for _, body in h.responses()) == ["big", "ghost"]
    h.reopen(max_bytes=1 << 20)
    assert h.processor.recover() == 0
    # Rows are pruned a day after their command expired.
    h.now_ms += 2 * 24 * 3600 * 1000
    assert h.processor.prune() == 2


# -- against a real broker ---------------------------------------------------------------


class Client:
    """A plain paho client that sends commands and records every response."""

    def __init__(self, port: int, fleet: str) -> None:
        self.fleet = fleet
        self.responses: list[tuple[str, dict[str, Any]]] = []
        self.seqs: list[tuple[str, int]] = []  # (correlation id, envelope seq) per delivery
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"admin-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edgefl/{fleet}/{DEVICE}/cmd-resp/#", qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        env = decode_envelope(bytes(msg.payload))
        body = json.loads(env.body)
        with self._lock:
            self.responses.append((msg.topic, body))
            self.seqs.append((body["correlation_id"], env.seq))

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def send(
        self, name: str, args: dict[str, Any], cid: str, ttl_s: float = 60
    ) -> tuple[str, bytes]:
        topic, payload = make_command(self.fleet, DEVICE, name, args, ttl_s, cid)
        self.publish(topic, payload)
        return topic, payload

    def for_cid(self, cid: str) -> list[dict[str, Any]]:
        with self._lock:
            return [body for _, body in self.responses if body["correlation_id"] == cid]

    def answer_seqs(self, cid: str) -> set[int]:
        """Distinct envelope seqs answering ``cid``: (device, seq) is the ingest's key."""
        with self._lock:
            return {seq for c, seq in self.seqs if c == cid}

    def wait_answer(self, cid: str, timeout: float = 30) -> dict[str, Any]:
        wait_for(lambda: len(self.for_cid(cid)) >= 1, timeout, f"response to {cid}")
        return self.for_cid(cid)[0]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _config(tmp_path: Path, port: int, fleet: str, **extra: Any) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "fleet": fleet,
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "status_interval_s": 0.2,
        **extra,
    }


class RunningAgent:
    """An in-process agent on its own thread."""

    def __init__(self, config: dict[str, Any], setup: Callable[[Agent], None] | None = None):
        self.agent = Agent(AgentConfig.model_validate(config))
        if setup is not None:
            setup(self.agent)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop,), daemon=True)
        self.thread.start()
        assert self.agent.link.wait_subscribed(30)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def admin(broker: Mosquitto, fleet: str) -> Iterator[Client]:
    client = Client(broker.port, fleet)
    yield client
    client.close()


@pytest.mark.slow
def test_ping_is_answered_exactly_once(
    tmp_path: Path, broker: Mosquitto, fleet: str, admin: Client
) -> None:
    agent = RunningAgent(_config(tmp_path, broker.port, fleet))
    try:
        admin.send("ping", {"hello": "edge"}, "ping-1")
        answer = admin.wait_answer("ping-1")
        assert answer == {
            "correlation_id": "ping-1",
            "command": "ping",
            "ok": True,
            "result": {"hello": "edge"},
        }
        # A later command's answer proves the agent finished with the first one.
        admin.send("ping", {}, "marker")
        admin.wait_answer("marker")
    finally:
        agent.close()
    assert len(admin.for_cid("ping-1")) == 1
    topics = [t for t, body in admin.responses if body["correlation_id"] == "ping-1"]
    assert topics == [f"edgefl/{fleet}/{DEVICE}/cmd-resp/ping-1"]


@pytest.mark.slow
def test_same_command_twice_runs_once_and_answers_once(
    tmp_path: Path, broker: Mosquitto, fleet: str, admin: Client
) -> None:
    calls: list[int] = []

    def count(args: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        return {"calls": len(calls)}

    def setup(agent: Agent) -> None:
        agent.commands.register("count", count)

    agent = RunningAgent(_config(tmp_path, broker.port, fleet), setup)
    try:
        topic, payload = admin.send("count", {}, "dup-1")
        admin.publish(topic, payload)
        admin.send("ping", {}, "marker")
        admin.wait_answer("marker")
        wait_for(lambda: agent.agent.commands.stats.duplicate == 1, 10, "duplicate counted")
        # The second publish's answer (if any) would have been enqueued before the marker's.
        assert admin.for_cid("dup-1") == [
            {"correlation_id": "dup-1", "command": "count", "ok": True, "result": {"calls": 1}}
        ]
    finally:
        agent.close()
    assert calls == [1]
    assert len(admin.for_cid("dup-1")) == 1


@pytest.mark.slow
def test_unknown_command_is_answered_with_the_known_ones(
    tmp_path: Path, broker: Mosquitto, fleet: str, admin: Client
) -> None:
    agent = RunningAgent(_config(tmp_path, broker.port, fleet))
    try:
        admin.send("reboot-now", {"force": True}, "unk-1")
        answer = admin.wait_answer("unk-1")
    finally:
        agent.close()
    assert answer == {
        "correlation_id": "unk-1",
        "command": "reboot-now",
        "ok": False,
        "error": "unknown command 'reboot-now'",
        "known": ["ping", "set-rate", "status"],
    }
    assert agent.agent.commands.stats.unknown == 1


@pytest.mark.slow
def test_expired_command_is_ignored_with_a_logged_reason(
    tmp_path: Path,
    broker: Mosquitto,
    fleet: str,
    admin: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edgefl.edge_agent.commands")
    agent = RunningAgent(_config(tmp_path, broker.port, fleet))
    try:
        admin.send("ping", {}, "old-1", ttl_s=-30)
        admin.send("ping", {}, "marker")  # same topic: delivered and handled after old-1
        admin.wait_answer("marker")
        assert agent.agent.commands.stats.expired == 1
    finally:
        agent.close()
    assert admin.for_cid("old-1") == []
    assert "ignoring expired command ping (correlation old-1) expired" in caplog.text


@pytest.mark.slow
def test_malformed_payloads_do_not_stop_the_agent(
    tmp_path: Path, broker: Mosquitto, fleet: str, admin: Client
) -> None:
    agent = RunningAgent(_config(tmp_path, broker.port, fleet))
    base = f"edgefl/{fleet}/{DEVICE}/cmd"
    try:
        admin.publish(f"{base}/ping", b"not an envelope")
        admin.publish(f"{base}/ping", b"")
        admin.publish(f"{base}/ping", b'{"v":1,"device_id":"dev-c"}')
        telemetry = Envelope(1, DEVICE, 3, 1, "telemetry", "application/json", b"{}")
        admin.publish(f"{base}/ping", encode_envelope(telemetry, "protobuf"))
        admin.send("ping", {"still": "alive"}, "after-junk")
        answer = admin.wait_answer("after-junk")
        assert answer["ok"] is True
        assert answer["result"] == {"still": "alive"}
        assert agent.agent.commands.stats.malformed == 4
    finally:
        agent.close()
    assert [body["correlation_id"] for _, body in admin.responses] == ["after-junk"]


@pytest.mark.slow
def test_status_and_set_rate(tmp_path: Path, broker: Mosquitto, fleet: str, admin: Client) -> None:
    source = {"type": "dataset-replay", "name": "cam", "rate_hz": 1, "limit": 3}
    agent = RunningAgent(_config(tmp_path, broker.port, fleet, sources=[source]))
    try:
        admin.send("set-rate", {"rate_hz": 25}, "rate-1")
        admin.send("set-rate", {"rate_hz": -1}, "rate-2")
        admin.send("set-rate", {"rate_hz": 5, "source": "nope"}, "rate-3")
        admin.send("status", {}, "status-1")
        ok = admin.wait_answer("rate-1")
        bad = admin.wait_answer("rate-2")
        missing = admin.wait_answer("rate-3")
        status = admin.wait_answer("status-1")
    finally:
        agent.close()
    assert ok["ok"] is True
    assert ok["result"] == {"source": "cam", "rate_hz": 25.0, "previous_rate_hz": 1.0}
    assert bad["ok"] is False
    assert "rate_hz" in bad["error"]
    assert missing["ok"] is False
    assert "no replay source 'nope'" in missing["error"]
    assert status["ok"] is True
    assert status["result"]["device_id"] == DEVICE
    assert status["result"]["commands"]["received"] >= 3


def _write_config(tmp_path: Path, port: int, fleet: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, port, fleet)))
    return path


def _start_agent(procs: EdgeflProcesses, config: Path) -> ManagedProcess:
    return procs.start("agent", "run", "--config", str(config), log="agent.log")


def _stop_agent(agent: ManagedProcess) -> None:
    agent.send_signal(signal.SIGTERM)  # the agent alone, as systemd stops it
    agent.wait(timeout=30)


def _report(config: Path) -> dict[str, Any]:
    cfg = load_config(AgentConfig, config)
    try:
        report: dict[str, Any] = json.loads((cfg.state_dir / "agent-status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return report


def _status_commands(config: Path) -> dict[str, Any]:
    commands: dict[str, Any] = _report(config).get("commands", {})
    return commands


def _wait_subscribed(config: Path) -> None:
    wait_for(lambda: _report(config).get("subscribed") is True, 30, "agent subscribed")


@pytest.mark.slow
def test_command_sent_while_the_agent_is_down_is_answered_after_restart(
    tmp_path: Path, broker: Mosquitto, fleet: str, admin: Client, edgefl_procs: EdgeflProcesses
) -> None:
    config = _write_config(tmp_path, broker.port, fleet)
    agent = _start_agent(edgefl_procs, config)
    try:
        _wait_subscribed(config)
        # Answered once: the persistent session and its subscription exist.
        admin.send("ping", {}, "first")
        admin.wait_answer("first")
        _stop_agent(agent)
        assert agent.returncode == 0
        admin.send("ping", {"queued": True}, "while-down", ttl_s=120)
        _, stale = admin.send("ping", {}, "stale", ttl_s=0.2)
        expires_at = json.loads(decode_envelope(stale).body)["expires_at_ms"]
        wait_for(lambda: time.time() * 1000 > expires_at, 5, "the stale command to expire")
        agent = _start_agent(edgefl_procs, config)
        answer = admin.wait_answer("while-down")
        assert answer["ok"] is True
        assert answer["result"] == {"queued": True}
        wait_for(lambda: _status_commands(config).get("expired") == 1, 20, "expiry counted")
    finally:
        _stop_agent(agent)
    assert admin.for_cid("stale") == []
    assert len(admin.for_cid("while-down")) == 1
    assert len(admin.for_cid("first")) == 1


@pytest.mark.slow
def test_agent_killed_after_answering_does_not_answer_again(
    tmp_path: Path, broker: Mosquitto, fleet: str, admin: Client, edgefl_procs: EdgeflProcesses
) -> None:
    config = _write_config(tmp_path, broker.port, fleet)
    agent = _start_agent(edgefl_procs, config)
    try:
        _wait_subscribed(config)
        topic, payload = admin.send("ping", {"n": 1}, "once")
        admin.wait_answer("once")
        agent.kill()  # SIGKILL, reaped
        # The same command again (a resend by an impatient server) while it is down, and
        # once more after the restart.
        admin.publish(topic, payload)
        agent = _start_agent(edgefl_procs, config)
        admin.publish(topic, payload)
        admin.send("ping", {}, "marker")
        admin.wait_answer("marker")
        wait_for(lambda: _status_commands(config).get("duplicate") == 2, 20, "2 duplicates")
    finally:
        _stop_agent(agent)
    # Answered exactly once: one response record (one seq). The outbox may deliver that
    # record again if the kill came between the PUBACK and its (batched) delete; that is
    # the same (device, seq), which the ingest stores once.
    assert len(admin.answer_seqs("once")) == 1
    assert len(admin.answer_seqs("marker")) == 1
