"""The nginx Fleet API proxy against a real flower-superlink (TLS, node authentication).

nginx and the SuperLink are real processes on loopback ports; the client is Python's own
TLS stack holding only the fleet CA certificate.
"""

from __future__ import annotations

import http.client
import os
import signal
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from edgefl.config import TlsFiles
from edgefl.netutil import free_port, port_open
from edgefl.procs import pid_alive
from edgefl.server.fl.fleet_proxy import FleetProxy, FleetProxyConfig, ProxyTLS
from edgefl.server.fl.superlink import SuperLink, SuperLinkConfig
from edgefl.server.fleet_ca import FleetCA

pytestmark = pytest.mark.slow


@dataclass
class _Setup:
    ca: FleetCA
    link: SuperLink
    proxy: FleetProxy


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[_Setup]:
    ca = FleetCA.create(tmp_path / "ca")
    ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    cert, key = tmp_path / "ca" / "server" / "cert.pem", tmp_path / "ca" / "server" / "key.pem"
    link = SuperLink(
        SuperLinkConfig(
            host="127.0.0.1",
            port=0,
            tls=TlsFiles(ca_file=ca.cert_path, cert_file=cert, key_file=key),
        ),
        tmp_path / "superlink",
    )
    link.start()
    proxy = FleetProxy(
        tmp_path / "proxy",
        FleetProxyConfig(),
        listen_host="127.0.0.1",
        listen_port=free_port(),
        upstream_port=link.port,
        tls=ProxyTLS(cert, key, ca.cert_path),
    )
    try:
        proxy.start()
        yield _Setup(ca, link, proxy)
    finally:
        proxy.stop()
        link.stop()


def _post(setup: _Setup, path: str, method: str = "POST") -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(setup.ca.cert_path))
    conn = http.client.HTTPSConnection("127.0.0.1", setup.proxy.port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=b"", headers={"Content-Type": "application/protobuf"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _served_serial(setup: _Setup) -> int:
    ctx = ssl.create_default_context(cafile=str(setup.ca.cert_path))
    conn = http.client.HTTPSConnection("127.0.0.1", setup.proxy.port, context=ctx, timeout=10)
    try:
        conn.connect()
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)
    finally:
        conn.close()
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_fleet_routes_reach_the_superlink_and_nothing_else_does(setup: _Setup) -> None:
    # A Fleet route gets the SuperLink's own answer (an empty body is not a valid
    # request), not the proxy's 403/404/502.
    status, _ = _post(setup, "/v1/fleet/activate-node")
    assert status not in (403, 404, 502), status
    # nginx writes the access log line when it finalises the request, which can be just
    # after the client has read the answer.
    deadline = time.monotonic() + 10
    while "POST /v1/fleet/activate-node" not in setup.proxy.access_log.read_text():
        assert time.monotonic() < deadline, setup.proxy.access_log.read_text()
        time.sleep(0.05)
    # The same route with another method, the Control and Runtime APIs, anything else.
    assert _post(setup, "/v1/fleet/activate-node", "GET")[0] == 403
    assert _post(setup, "/v1/control/list-nodes")[0] == 403
    assert _post(setup, "/v1/control/register-node")[0] == 403
    assert _post(setup, "/v1/runtime/acquire-task")[0] == 403
    assert _post(setup, "/v1/fleet/register-node")[0] == 404  # node auth: never self-registered
    assert _post(setup, "/v1/fleet/activate-node/../../control/list-nodes")[0] in (403, 404)
    assert _post(setup, "/health")[0] == 404
    # The SuperLink still answers its admin on loopback.
    assert setup.link.admin().list_nodes() == []


def test_a_reissued_certificate_is_served_after_a_reload(setup: _Setup) -> None:
    before = _served_serial(setup)
    assert not setup.proxy.reload_if_certificates_changed()
    issued = setup.ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    assert setup.proxy.reload_if_certificates_changed()
    # nginx's master starts new workers and tells the old ones to finish; on a loaded
    # machine that can take a while, and until then an old worker may still answer with
    # an older certificate. nginx's error log says why if the new one is never served.
    deadline = time.monotonic() + 30
    while _served_serial(setup) != issued.serial and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _served_serial(setup) == issued.serial, setup.proxy.error_log.read_text()[-3000:]
    assert issued.serial != before


def test_a_master_killed_with_sigkill_leaves_no_worker_on_the_port(setup: _Setup) -> None:
    master = setup.proxy.pid
    assert master is not None
    os.kill(master, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while setup.proxy.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not setup.proxy.running()
    # Its worker still holds the port until stop() ends the whole group.
    assert port_open("127.0.0.1", setup.proxy.port)
    setup.proxy.stop()
    assert not port_open("127.0.0.1", setup.proxy.port)
    setup.proxy.start()  # the supervisor's restart, on the same port
    assert setup.proxy.pid is not None
    assert pid_alive(setup.proxy.pid)
    assert _post(setup, "/v1/control/list-nodes")[0] == 403
