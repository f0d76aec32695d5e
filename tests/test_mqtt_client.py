"""The one paho client builder (edgefl.mqtt_client)."""

from __future__ import annotations

import logging
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from pydantic import SecretStr

from edgefl.config import TlsFiles
from edgefl.errors import ConfigError
from edgefl.mqtt_client import build_client


def test_mqtt5_client_with_credentials() -> None:
    client = build_client("dev-1", username="ops", password=SecretStr("s3cret"), manual_ack=True)
    assert client.protocol == MQTTProtocolVersion.MQTTv5
    assert client._client_id == b"dev-1"
    assert (client.username, client.password) == ("ops", "s3cret")
    assert client._manual_ack


def test_mqtt311_client_keeps_its_session() -> None:
    client = build_client("dev-1", protocol="3.1.1")
    assert client.protocol == MQTTProtocolVersion.MQTTv311
    assert client._clean_session is False


def test_unusable_tls_files_are_a_config_error_naming_the_client(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ingest TLS files unusable") as info:
        build_client(
            "x", tls=TlsFiles(ca_file=tmp_path / "missing.pem"), what="ingest", tls_hint="fix it"
        )
    assert info.value.hint == "fix it"


def test_no_tls_without_a_ca_file() -> None:
    client = build_client("x", tls=TlsFiles())
    assert client._ssl is False


def test_debug_lines_only_when_the_logger_wants_them(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("edgefl.test.paho")
    client = build_client("x", logger=log)
    with caplog.at_level(logging.INFO, logger="edgefl.test.paho"):
        client._easy_log(mqtt.MQTT_LOG_DEBUG, "packet %s", 1)
        client._easy_log(mqtt.MQTT_LOG_WARNING, "trouble %s", 2)
    assert [r.getMessage() for r in caplog.records] == ["trouble 2"]
    with caplog.at_level(logging.DEBUG, logger="edgefl.test.paho"):
        client._easy_log(mqtt.MQTT_LOG_DEBUG, "packet %s", 3)
    assert caplog.records[-1].getMessage() == "packet 3"
