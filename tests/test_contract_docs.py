"""docs/fleet-contract.md is executed: its envelope table, its JSON examples and its
``mosquitto_pub`` / ``mosquitto_sub`` blocks, the latter against a real broker and a real
``edgefl agent run``.

A doc that drifts from the wire (a field renamed, an example that no longer decodes, a
command the agent would drop) fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.config import load_config
from edgefl.edge_agent.daemon import AgentConfig
from edgefl.process import ManagedProcess
from edgefl.proto import envelope_pb2, topics
from edgefl.proto.ids import ID_REGEX, InvalidIdError, check_id, is_id
from edgefl.proto.serde import Envelope, EnvelopeError, decode_envelope, encode_envelope
from edgefl.testing import EdgeflProcesses, Mosquitto, wait_for

DOC = Path(__file__).resolve().parent.parent / "docs" / "fleet-contract.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_PLACEHOLDERS = re.compile(r"HOST=\S+ PORT=\S+ FLEET=\S+ DEVICE=\S+")


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return [body for kind, body in _FENCE.findall(_text()) if kind == lang]


def _json_examples() -> list[dict[str, Any]]:
    return [json.loads(block) for block in _blocks("json")]


def _envelope_examples() -> list[dict[str, Any]]:
    return [doc for doc in _json_examples() if "content_type" in doc]


def _shell_block(command: str) -> str:
    """The one ``sh`` block that runs ``command``."""
    found = [b for b in _blocks("sh") if re.search(rf"^{command} ", b, re.M)]
    assert len(found) == 1, f"expected one sh block running {command}, found {len(found)}"
    return found[0]


def _table(header: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with ``header``."""
    lines = _text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


# -- ids and topics ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "pi-01", "A_b-9", "x" * 64])
def test_ids_the_contract_allows(value: str) -> None:
    assert is_id(value)
    assert check_id(value, "device id") == value
    assert re.fullmatch(ID_REGEX, value)


@pytest.mark.parametrize(
    "value", ["", "x" * 65, "a/b", "a+", "#", "a b", "a\nb", "é", "a.b", None, 7]
)
def test_ids_the_contract_refuses(value: object) -> None:
    assert not is_id(value)
    with pytest.raises(InvalidIdError, match="device id"):
        check_id(value, "device id")


def test_every_topic_of_the_contract_table_is_built_by_the_topics_module() -> None:
    built = {
        topics.record_topic("{fleet}", "{device}", "telemetry", "{stream}"),
        topics.record_topic("{fleet}", "{device}", "data", "{stream}"),
        topics.record_topic("{fleet}", "{device}", "result", "{stream}"),
        topics.status_topic("{fleet}", "{device}"),
        topics.command_topic("{fleet}", "{device}", "{name}"),
        topics.response_topic("{fleet}", "{device}", "{correlation_id}"),
        topics.state_reported_topic("{fleet}", "{device}"),
        topics.state_desired_topic("{fleet}", "{device}"),
        topics.cert_request_topic("{fleet}", "{device}"),
    }
    documented = {row[0].strip("`") for row in _table("| topic |")}
    assert documented == built
    assert {"telemetry", "data", "result"} == topics.RECORD_KINDS


def test_split_topic_reads_what_the_builders_write() -> None:
    parts = topics.split_topic(topics.response_topic("f1", "pi-01", "c-1"))
    assert parts == topics.TopicParts("f1", "pi-01", ("cmd-resp", "c-1"))
    assert topics.cert_request_filter() == "edgefl/+/+/cert/request"
    assert topics.command_filter("f1", "pi-01") == "edgefl/f1/pi-01/cmd/+"
    for bad in (
        "edgefl/f1/pi-01",
        "other/f1/pi-01/status",
        "edgefl/+/pi-01/status",
        "edgefl/f1//x",
    ):
        assert topics.split_topic(bad) is None


# -- the envelope ------------------------------------------------------------------------


def test_the_envelope_table_names_the_wire_keys_and_protobuf_fields() -> None:
    rows = _table("| JSON key |")
    json_keys = {row[0].strip("`") for row in rows}
    v2 = Envelope(2, "pi-01", 1, 1, "telemetry", "application/json", b"{}", "0" * 32)
    assert json_keys == set(json.loads(encode_envelope(v2, "json")))
    fields = {
        f"`{field.name}` ({field.number})" for field in envelope_pb2.Envelope.DESCRIPTOR.fields
    }
    assert {row[1] for row in rows} == fields


def test_the_envelope_examples_decode_with_the_serde() -> None:
    examples = _envelope_examples()
    assert {doc["kind"] for doc in examples} >= {"telemetry", "response"}
    for doc in examples:
        payload = json.dumps(doc).encode()
        env = decode_envelope(payload)
        assert env.version == doc["v"]
        assert env.kind == doc["kind"]
        assert json.loads(env.body) == doc["body"]
        assert json.loads(encode_envelope(env, "json")) == doc
        # The doc's warning holds: the protobuf field's name is not the JSON key.
        misspelt = {("version" if key == "v" else key): value for key, value in doc.items()}
        with pytest.raises(EnvelopeError, match="the version key is 'v'"):
            decode_envelope(json.dumps(misspelt).encode())


def test_every_json_example_parses() -> None:
    examples = _json_examples()
    assert len(examples) >= 3
    telemetry = [doc for doc in examples if "epsilon" in doc]
    assert len(telemetry) == 1
    assert telemetry[0]["status"] == "ok"


def test_the_response_example_has_the_documented_body_keys() -> None:
    (response,) = [doc for doc in _envelope_examples() if doc["kind"] == "response"]
    assert set(response["body"]) == {"correlation_id", "command", "ok", "result"}


def test_the_shell_examples_use_the_documented_placeholders() -> None:
    for command in ("mosquitto_pub", "mosquitto_sub"):
        first = _shell_block(command).splitlines()[0]
        assert _PLACEHOLDERS.fullmatch(first), first


# -- the mosquitto_pub example against a real agent --------------------------------------


def _with_values(block: str, port: int, fleet: str, device: str) -> str:
    lines = block.splitlines()
    lines[0] = f"HOST=127.0.0.1 PORT={port} FLEET={fleet} DEVICE={device}"
    return "\n".join(lines) + "\n"


class _Watcher:
    """The doc's ``mosquitto_sub`` block, run by bash; reads its ``-v`` lines from its log."""

    def __init__(self, script: str, log: Path) -> None:
        self.proc = ManagedProcess(["bash", "-c", script], log, name="mosquitto_sub")
        self.proc.start()

    def payload_on(self, topic: str) -> bytes | None:
        for line in self.proc.output().splitlines():
            line_topic, _, payload = line.partition(" ")
            if line_topic == topic:
                return payload.encode()
        return None

    def close(self) -> None:
        self.proc.stop(grace=10)


def _wait_until_watching(watcher: _Watcher, port: int, prefix: str) -> None:
    """Publish probes below the watched filter until the watcher prints one."""
    probe = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    probe.connect("127.0.0.1", port)
    probe.loop_start()
    try:
        for n in range(1, 31):
            topic = f"{prefix}/cmd-resp/probe-{n}"
            probe.publish(topic, b"probe", qos=1).wait_for_publish(10)
            seen_by = time.monotonic() + 1.0
            while time.monotonic() < seen_by:
                if watcher.payload_on(topic) is not None:
                    return
                time.sleep(0.02)
        raise TimeoutError("mosquitto_sub never printed a probe")
    finally:
        probe.loop_stop()
        probe.disconnect()


def _answer(watcher: _Watcher, topic: str) -> dict[str, Any]:
    wait_for(lambda: watcher.payload_on(topic) is not None, 30, f"an answer on {topic}")
    payload = watcher.payload_on(topic)
    assert payload is not None
    env = decode_envelope(payload)
    assert env.kind == "response"
    body: dict[str, Any] = json.loads(env.body)
    return body


def _agent_subscribed(config: Path) -> bool:
    state_dir = load_config(AgentConfig, config).state_dir
    try:
        report = json.loads((state_dir / "agent-status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return report.get("subscribed") is True


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None,
    reason="mosquitto-clients not installed",
)
def test_the_mosquitto_pub_example_is_answered_by_a_real_agent(
    tmp_path: Path, broker: Mosquitto, fleet: str, edgefl_procs: EdgeflProcesses
) -> None:
    device = "pi-01"
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device_id": device,
                "fleet": fleet,
                "state_dir": str(tmp_path / "state"),
                "mqtt": {"port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                "status_interval_s": 0.2,
            }
        )
    )
    publish = _with_values(_shell_block("mosquitto_pub"), broker.port, fleet, device)
    watch = _with_values(_shell_block("mosquitto_sub"), broker.port, fleet, device)
    prefix = f"edgefl/{fleet}/{device}"
    agent = edgefl_procs.start("agent", "run", "--config", str(config), log="agent.log")
    watcher = _Watcher(watch, tmp_path / "mosquitto_sub.log")
    try:
        wait_for(lambda: _agent_subscribed(config), 30, "agent subscribed")
        _wait_until_watching(watcher, broker.port, prefix)

        subprocess.run(["bash", "-c", publish], check=True, timeout=30)
        answer = _answer(watcher, f"{prefix}/cmd-resp/c-42")
        (documented,) = [doc for doc in _envelope_examples() if doc["kind"] == "response"]
        assert answer == documented["body"]

        # The doc's word on a misspelt version key: an answer, ok false, with the reason.
        misspelt = publish.replace('"v":1', '"version":1').replace("c-42", "c-43")
        assert misspelt.count('"version":1') == 1
        subprocess.run(["bash", "-c", misspelt], check=True, timeout=30)
        refused = _answer(watcher, f"{prefix}/cmd-resp/c-43")
        match = re.search(r'"error":"(malformed\s+command: [^.]*?) \.\.\."', _text())
        assert match is not None
        assert refused["ok"] is False
        assert refused["command"] == "ping"
        assert refused["error"].startswith(re.sub(r"\s+", " ", match.group(1)))
    finally:
        watcher.close()
        agent.send_signal(signal.SIGTERM)  # the agent alone, as systemd stops it
        agent.wait(timeout=30)
    assert agent.returncode == 0
