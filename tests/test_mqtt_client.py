"""The one paho client builder (edgefl.mqtt_client)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from pydantic import SecretStr

from edgefl.config import TlsFiles
from edgefl.errors import ConfigError, ServiceUnavailableError
from edgefl.mqtt_client import SESSION_LOCK, build_client, identity_session


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


# --- one session per client certificate on a host ------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from edgefl.config import TlsFiles
from edgefl.mqtt_client import identity_session
tls = TlsFiles(ca_file=Path(sys.argv[1]) / "ca.pem", cert_file=Path(sys.argv[1]) / "cert.pem")
with identity_session(tls, wait_s=10):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _identity(folder: Path) -> TlsFiles:
    folder.mkdir(parents=True, exist_ok=True)
    return TlsFiles(ca_file=folder / "ca.pem", cert_file=folder / "cert.pem")


def _hold(folder: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the identity's session for ``seconds``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_session_waits_for_another_processs_session_of_the_same_identity(
    tmp_path: Path,
) -> None:
    identity = tmp_path / "services" / "edgefl-commands"
    tls = _identity(identity)
    other = _hold(identity, 1.0)
    try:
        started = time.monotonic()
        with identity_session(tls, wait_s=10):
            waited = time.monotonic() - started
        assert waited > 0.5  # until the other one ended its session (after 1 s)
        assert (identity / SESSION_LOCK).is_file()
    finally:
        other.wait(10)


def test_another_identitys_session_does_not_wait(tmp_path: Path) -> None:
    other = _hold(tmp_path / "services" / "edgefl-rollout", 30.0)
    try:
        started = time.monotonic()
        with identity_session(_identity(tmp_path / "services" / "edgefl-commands"), wait_s=10):
            assert time.monotonic() - started < 1.0
        # Nor does a client without a certificate (callers give it a random client id).
        with identity_session(TlsFiles(ca_file=tmp_path / "ca.pem"), wait_s=0):
            pass
        with identity_session(None, wait_s=0):
            pass
    finally:
        other.kill()
        other.wait(10)


def test_a_session_held_too_long_is_a_clear_error_and_leaves_it_held(tmp_path: Path) -> None:
    identity = tmp_path / "services" / "edgefl-commands"
    tls = _identity(identity)
    other = _hold(identity, 30.0)
    try:
        with (
            pytest.raises(ServiceUnavailableError, match="stayed connected as edgefl-commands"),
            identity_session(tls, wait_s=0.3, what="the command publisher"),
        ):
            pytest.fail("entered a session another process holds")
        # Ended with its holder, not before: the lock goes with the process.
        other.kill()
        other.wait(10)
        with identity_session(tls, wait_s=1):
            pass
    finally:
        other.kill()
        other.wait(10)


def test_a_lock_that_cannot_be_made_is_logged_and_not_held(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone"  # the lock would go in a folder that does not exist
    tls = TlsFiles(ca_file=tmp_path / "ca.pem", cert_file=missing / "cert.pem")
    with caplog.at_level(logging.WARNING), identity_session(tls, wait_s=0):
        pass
    assert "connecting without it" in caplog.text
