"""The metrics endpoints, attacked from another host and from the device itself.

The agent's metrics port has no authentication (a scraper on the device or its gateway
reads it), so its defences are where it listens and what it says: by default loopback
only, answering reads of counters and nothing else. The server's ``/metrics`` is behind
the admin API's authentication (tests/security/test_admin_api_auth.py and
tests/test_metrics.py: no credential, 401).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from probes.netns import VethNamespace

from edgefl.edge_agent.daemon import Agent, AgentConfig
from edgefl.edge_agent.metrics import AgentMetrics, AgentMetricsConfig
from edgefl.server.config import ServerConfig
from edgefl.server.fleet_ca import FleetCA
from edgefl.testing import free_port


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    """A real agent with a TLS identity (never connected: the attacks are on its port)."""
    ca = FleetCA.create(tmp_path / "ca")
    issued = ca.issue_device_cert("dev-x")
    config = AgentConfig.model_validate(
        {
            "device_id": "dev-x",
            "fleet": "lab",
            "state_dir": str(tmp_path / "state"),
            "mqtt": {
                "port": free_port(),
                "tls": {
                    "ca_file": str(ca.cert_path),
                    "cert_file": str(issued.cert_path),
                    "key_file": str(issued.key_path),
                },
            },
            "metrics": {"enabled": True, "port": 0},
        }
    )
    running = Agent(config)
    try:
        yield running
    finally:
        running.outbox.close()


def _read(url: str, method: str = "GET") -> tuple[int, bytes]:
    data = b"edgefl_agent_outbox_records 0\n" if method in ("POST", "PUT") else None
    request = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_the_agent_metrics_port_listens_on_loopback_by_default() -> None:
    assert AgentMetricsConfig().host == "127.0.0.1"
    assert AgentMetricsConfig().enabled is False


@pytest.mark.slow
def test_another_host_cannot_reach_the_agent_metrics_port(
    agent: Agent, veth_ns: VethNamespace
) -> None:
    metrics = agent.metrics
    assert metrics is not None
    metrics.start()
    try:
        assert _read(f"http://127.0.0.1:{metrics.port}/metrics")[0] == 200
        # The other host dials every address of this one it can reach: refused.
        assert not veth_ns.can_connect(veth_ns.host_ip, metrics.port)
    finally:
        metrics.stop()
    # The probe sees a port that is exposed: the same endpoint on the veth address.
    exposed = AgentMetrics(agent, AgentMetricsConfig(enabled=True, host=veth_ns.host_ip, port=0))
    exposed.start()
    try:
        assert veth_ns.can_connect(veth_ns.host_ip, exposed.port)
    finally:
        exposed.stop()


def test_the_agent_metrics_port_reveals_no_secret_and_takes_no_writes(agent: Agent) -> None:
    metrics = agent.metrics
    assert metrics is not None
    metrics.start()
    try:
        url = f"http://127.0.0.1:{metrics.port}/metrics"
        status, body = _read(url)
        assert status == 200
        key = Path(agent.config.mqtt.tls.key_file or "").read_bytes()
        text = body.decode()
        assert b"PRIVATE KEY" not in body
        assert key.strip().splitlines()[1].decode() not in text
        assert str(agent.config.state_dir) not in text  # no paths of its files
        for method in ("POST", "PUT", "DELETE"):
            assert _read(url, method)[0] == 405
        assert _read(url)[1] == body  # nothing changed
    finally:
        metrics.stop()


@pytest.mark.slow  # imports the inference package (torch)
def test_the_inference_child_metrics_stay_on_loopback_when_it_serves_everyone(
    tmp_path: Path,
) -> None:
    from edgefl.server.inference.supervised import InferenceChild

    config = ServerConfig.model_validate(
        {"state_dir": str(tmp_path), "inference": {"enabled": True, "host": "0.0.0.0"}}
    )
    child = InferenceChild(config, tmp_path / "inference")
    assert child.settings.host == "0.0.0.0"  # devices dial the service from anywhere
    # ... but its metrics (served by `edgefl server inference` on 127.0.0.1) are read by
    # the server on this host only, behind the admin API's authentication.
    assert child.settings.metrics_port is not None
    assert child.metrics_url == f"http://127.0.0.1:{child.settings.metrics_port}/metrics"
    # With metrics off there is no such port at all.
    metrics_off = config.metrics.model_copy(update={"enabled": False})
    off = config.model_copy(update={"metrics": metrics_off})
    assert InferenceChild(off, tmp_path / "off").metrics_url is None
