"""The agent's SuperNode supervisor: pure policy tests and real flower-supernode processes."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from edgefl.config import TlsFiles
from edgefl.edge_agent.fl.supernode import (
    Resources,
    SuperNodeSupervisor,
    TrainingConfig,
    TrainingPolicy,
    meaningful_line,
    node_config_arg,
)
from edgefl.edge_agent.identity import prepare_enrollment
from edgefl.errors import ConfigError
from edgefl.server.fl.superlink import SuperLink, SuperLinkConfig
from edgefl.server.fleet_ca import FleetCA
from edgefl.testing import wait_for

AT = dt.datetime(2026, 12, 1, 14, 30)


def _policy(**fields: Any) -> TrainingPolicy:
    return TrainingPolicy(TrainingConfig.model_validate({"superlink": "h:1", **fields}))


# ---------------------------------------------------------------------- pure policy


def test_policy_needs_connection_then_samples() -> None:
    policy = _policy(min_samples=50)
    assert policy.evaluate(AT, connected=False, samples=100) == (
        False,
        "not connected (the MQTT link is down)",
    )
    assert policy.evaluate(AT, connected=True, samples=49) == (False, "49 of 50 samples collected")
    assert policy.evaluate(AT, connected=True, samples=50)[0]
    assert _policy(require_connected=False).evaluate(AT, connected=False, samples=100)[0]


def test_policy_windows_wrap_midnight() -> None:
    policy = _policy(min_samples=1, windows=["22:00-06:00", "12:00-13:00"])
    allowed = {
        (h, m): policy.evaluate(AT.replace(hour=h, minute=m), True, 5)[0]
        for h, m in [(21, 59), (22, 0), (23, 30), (0, 0), (5, 59), (6, 0), (12, 30), (13, 0)]
    }
    assert allowed == {
        (21, 59): False,
        (22, 0): True,
        (23, 30): True,
        (0, 0): True,
        (5, 59): True,
        (6, 0): False,
        (12, 30): True,
        (13, 0): False,
    }
    ok, reason = policy.evaluate(AT, True, 5)
    assert not ok
    assert reason == "outside the training windows 22:00-06:00, 12:00-13:00 (14:30)"


def test_policy_resource_thresholds_skip_unknown_readings() -> None:
    policy = _policy(min_samples=1, max_load_per_cpu=1.5, min_free_memory_mb=256)
    assert policy.evaluate(AT, True, 5, Resources(2.0, 1000)) == (
        False,
        "load 2.00 per CPU is above 1.5",
    )
    assert policy.evaluate(AT, True, 5, Resources(0.5, 100)) == (
        False,
        "100 MB free memory is below 256 MB",
    )
    assert policy.evaluate(AT, True, 5, Resources(0.5, 1000))[0]
    assert policy.evaluate(AT, True, 5, Resources(None, None))[0]


def test_config_rejects_bad_windows_and_unquotable_node_config() -> None:
    with pytest.raises(ValidationError, match="is not a window"):
        TrainingConfig.model_validate({"superlink": "h:1", "windows": ["25:00-01:00"]})
    with pytest.raises(ValidationError, match="quotes or backslashes"):
        TrainingConfig.model_validate({"superlink": "h:1", "node_config": {"k": 'a"b'}})
    with pytest.raises(ValidationError, match="superlink"):
        TrainingConfig.model_validate({"superlink": "no-port"})
    with pytest.raises(ConfigError):
        node_config_arg({"bad key": 1})


def test_node_config_string_is_toml_values() -> None:
    arg = node_config_arg({"device-id": "pi 01", "n": 3, "f": 0.5, "on": True})
    assert arg == 'device-id="pi 01" n=3 f=0.5 on=true'
    from flwr.common.config import parse_config_args

    assert parse_config_args([arg]) == {"device-id": "pi 01", "n": 3, "f": 0.5, "on": True}


# What flower-supernode 1.41 printed here for an unregistered key and for a wrong CA.
UNREGISTERED = """\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.
The SuperNode could not establish a connection to the SuperLink.

For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/305.html>
INFO:     Shutting down
INFO:     Finished server process [13797]
WARNING :   Connection attempt failed, retrying in 0.24 seconds
INFO :      SuperExec terminated gracefully.
"""
WRONG_CA = """ERROR :     SSL/TLS handshake error detected.
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer
The SuperNode could not establish a connection to the SuperLink.
INFO:     Shutting down
"""


def test_meaningful_line_names_the_cause() -> None:
    assert meaningful_line(UNREGISTERED) == "[code: 2004] Failed to activate SuperNode."
    assert meaningful_line(WRONG_CA).startswith("[SSL: CERTIFICATE_VERIFY_FAILED]")
    assert meaningful_line("INFO : hello\nWARNING : odd\nINFO : bye") == "WARNING : odd"
    assert meaningful_line("") == ""


# ---------------------------------------------------------------------- real processes


@dataclass
class Fleet:
    ca: FleetCA
    superlink: SuperLink
    root: Path


@pytest.fixture(scope="module")
def superlink_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    ca = FleetCA.create(root / "ca")
    server = ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    assert server.key_path is not None
    config = SuperLinkConfig(
        port=0,
        tls=TlsFiles(ca_file=ca.cert_path, cert_file=server.cert_path, key_file=server.key_path),
    )
    with SuperLink(config, root / "superlink") as link:
        yield Fleet(ca, link, root)


def _device(
    superlink_fleet: Fleet,
    tmp_path: Path,
    *,
    register: bool = True,
    ca: Path | None = None,
    **fields: Any,
) -> SuperNodeSupervisor:
    state = tmp_path / "state"
    paths = prepare_enrollment("dev", "lab", state).paths
    if register:
        superlink_fleet.superlink.admin().register_node(paths.node_public_key)
    paths.ca.write_bytes(ca.read_bytes() if ca is not None else superlink_fleet.ca.cert_pem)
    config = TrainingConfig.model_validate(
        {
            "superlink": superlink_fleet.superlink.address,
            "min_samples": 10,
            "restart_min_s": 0.5,
            "restart_max_s": 2.0,
            "stop_grace_s": 5.0,
            **fields,
        }
    )
    return SuperNodeSupervisor(
        config, device_id="dev", state_dir=state, data_store=state / "samples.db"
    )


def _poll_until(
    sup: SuperNodeSupervisor, cond: Any, what: str, timeout: float = 60, **kw: Any
) -> None:
    def step() -> bool:
        sup.poll(connected=kw.get("connected", True), samples=kw.get("samples", 100))
        time.sleep(0.1)
        return bool(cond())

    wait_for(step, timeout, what)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is reaped by the supervisor; treat "exists" as alive here.
    return True


@pytest.mark.slow
def test_starts_only_when_connected_with_enough_samples_then_stops(
    superlink_fleet: Fleet, tmp_path: Path
) -> None:
    sup = _device(superlink_fleet, tmp_path)
    try:
        sup.poll(connected=False, samples=500)
        assert sup.status()["state"] == "waiting"
        assert sup.pid is None
        sup.poll(connected=True, samples=9)
        assert sup.status()["reason"] == "9 of 10 samples collected"
        assert sup.pid is None
        sup.poll(connected=True, samples=10)
        assert sup.status()["state"] == "running"
        pid = sup.pid
        assert pid is not None
        _poll_until(sup, lambda: sup.node_id is not None, "the SuperNode to register")
        assert "as node" in sup.status()["reason"]
        node_config = (tmp_path / "state" / "supernode.log").read_text()
        assert "Starting Flower SuperNode" in node_config
        # The policy says no: SIGTERM to the group, reaped, waiting again.
        _poll_until(sup, lambda: sup.pid is None, "the SuperNode to stop", connected=False)
        assert sup.status()["state"] == "waiting"
        assert sup.status()["reason"].startswith("not connected")
        assert sup.restarts == 0
        assert not _alive(pid)
    finally:
        sup.close()


@pytest.mark.slow
def test_a_killed_supernode_is_restarted_with_backoff(
    superlink_fleet: Fleet, tmp_path: Path
) -> None:
    sup = _device(superlink_fleet, tmp_path)
    try:
        _poll_until(sup, lambda: sup.node_id is not None, "the SuperNode to register")
        first = sup.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        _poll_until(sup, lambda: sup.status()["state"] == "backoff", "the exit to be seen")
        killed_at = time.monotonic()
        assert sup.last_exit_code == -signal.SIGKILL
        assert sup.last_error == "killed by signal 9 (no error in its output)"
        assert sup.restarts == 1
        _poll_until(sup, lambda: sup.pid not in (None, first), "a restart")
        assert time.monotonic() - killed_at >= 0.2  # equal jitter: at least half of 0.5 s
        # Flower refuses to activate a node it still counts as online ("Failed to activate
        # SuperNode") until about a minute of missed heartbeats: the supervisor keeps
        # restarting with backoff until the SuperLink lets it back in.
        _poll_until(
            sup, lambda: sup.node_id is not None, "the new SuperNode to register", timeout=240
        )
        assert sup.status()["state"] == "running"
        assert sup.starts >= 2
        assert sup.restarts == sup.starts - 1
    finally:
        sup.close()
    assert sup.status()["state"] == "stopped"


@pytest.mark.slow
def test_an_unregistered_node_key_is_refused_with_a_clear_log_line(
    superlink_fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgefl.edge_agent.fl.supernode")
    sup = _device(superlink_fleet, tmp_path, register=False, restart_min_s=30.0, restart_max_s=60.0)
    try:
        _poll_until(sup, lambda: sup.last_exit_code is not None, "the SuperNode to exit")
    finally:
        sup.close()
    assert sup.last_error == "[code: 2004] Failed to activate SuperNode."
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        "Failed to activate SuperNode" in m and "edgefl server admit" in m for m in errors
    ), errors


@pytest.mark.slow
def test_a_wrong_root_ca_is_refused_with_a_clear_log_line(
    superlink_fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgefl.edge_agent.fl.supernode")
    other = FleetCA.create(tmp_path / "other-ca")
    sup = _device(
        superlink_fleet, tmp_path, ca=other.cert_path, restart_min_s=30.0, restart_max_s=60.0
    )
    try:
        _poll_until(sup, lambda: sup.last_exit_code is not None, "the SuperNode to exit")
    finally:
        sup.close()
    assert "CERTIFICATE_VERIFY_FAILED" in sup.last_error
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("CERTIFICATE_VERIFY_FAILED" in m and "TLS to" in m for m in errors), errors


def test_an_unenrolled_device_waits_and_says_why(tmp_path: Path) -> None:
    config = TrainingConfig.model_validate({"superlink": "127.0.0.1:1", "min_samples": 1})
    sup = SuperNodeSupervisor(
        config, device_id="dev", state_dir=tmp_path, data_store=tmp_path / "s.db"
    )
    sup.poll(connected=True, samples=5)
    status = sup.status()
    assert status["state"] == "waiting"
    assert status["pid"] is None
    assert status["reason"].startswith("not enrolled: no CA certificate")


@pytest.mark.parametrize(
    ("said", "warning"),
    [
        ("WARNING:   Giving up reconnection after 30.99 seconds and 2 tries.", "gave up"),
        ("ERROR:     SSL/TLS handshake error detected.", "silent for"),
    ],
)
def test_a_supernode_that_gave_up_but_lingers_is_killed_and_restarted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    said: str,
    warning: str,
) -> None:
    # Fault injection: Flower 1.41's SuperNode, after failing to reconnect through a long
    # network cut, logs that it gives up and then stays alive without retrying. A stand-in
    # process does exactly that (the real one needs a ~60 s cut to get there).
    import sys

    import edgefl.edge_agent.fl.supernode as supernode

    caplog.set_level(logging.INFO, logger="edgefl.edge_agent.fl.supernode")
    monkeypatch.setattr(supernode, "_LINGER_S", 0.5)
    monkeypatch.setattr(supernode, "_STALL_S", 0.5)
    hang = f"import time; print({said!r}, flush=True); time.sleep(600)"
    monkeypatch.setattr(SuperNodeSupervisor, "command", lambda self: [sys.executable, "-c", hang])
    state = tmp_path / "state"
    config = TrainingConfig.model_validate(
        {
            "superlink": "127.0.0.1:1",
            "insecure": True,
            "min_samples": 1,
            "restart_min_s": 30.0,
            "restart_max_s": 60.0,
        }
    )
    sup = SuperNodeSupervisor(
        config, device_id="dev", state_dir=state, data_store=state / "samples.db"
    )
    try:
        _poll_until(sup, lambda: sup.pid is not None, "the stand-in to start", timeout=10)
        pid = sup.pid
        assert pid is not None
        _poll_until(sup, lambda: sup.status()["state"] == "backoff", "the kill", timeout=20)
        assert not _alive(pid) or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        assert sup.restarts == 1
        assert sup.last_exit_code == -signal.SIGKILL
        assert said.split(":", 1)[1].strip() in sup.last_error
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(warning in m and "killing it" in m for m in warnings), warnings
    finally:
        sup.close()
