"""Certificates that expire: the server renews its own, devices renew theirs over MQTT.

One real ``Server`` (mosquitto on the shipped config, SuperLink, ingest, the certificate
service) for the module. Short validities stand for a year passing: certificates issued
for one day are inside the 30-day renewal window at once.

The attacks come from an admitted device holding only its own certificate and key: it
asks for a certificate in another device's name, or on another device's topic. Before
this change nothing renewed anything (a year after enrollment the fleet went dark) and
there was no renewal channel to attack.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from probes.broker import NOT_AUTHORIZED, MqttProbe

from edgefl.edge_agent.daemon import Agent, AgentConfig
from edgefl.edge_agent.identity import install_bundle, prepare_enrollment
from edgefl.enrollment import RenewalRequest, renewal_request_topic, write_json_document
from edgefl.errors import EdgeflError
from edgefl.server.enrollment import admit, get_enrollment
from edgefl.server.fleet_ca import CERTS_IDENTITY, INGEST_IDENTITY, FleetCA, IssuedCert
from edgefl.server.registry import make_engine
from edgefl.server.serve import Server, ServerConfig
from edgefl.testing import wait_for

pytestmark = pytest.mark.slow

TIMEOUT = 60.0
FLEET = "lab"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("renewal")
    config = ServerConfig.model_validate(
        {
            "state_dir": str(root / "server"),
            "superlink": {"port": 0},
            "broker": {"port": 0},
            "cert_check_s": 0.5,
        }
    )
    srv = Server(config)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def engine(server: Server) -> Iterator[sa.Engine]:
    eng = make_engine(server.db_url)
    yield eng
    eng.dispose()


def _not_after(path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def _days_left(path: Path) -> float:
    return (_not_after(path) - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def _admit(server: Server, engine: sa.Engine, root: Path, device: str) -> Path:
    """Enroll ``device`` with a one-day certificate; return its state dir."""
    state_dir = root / device
    enrollment = prepare_enrollment(device, FLEET, state_dir)
    bundle = admit(
        enrollment.request, ca=server.ca, admin=server.admin(), engine=engine, cert_days=1
    )
    bundle_path = root / f"{device}.bundle.json"
    write_json_document(bundle_path, bundle)
    install_bundle(bundle_path, device, FLEET, state_dir)
    # The broker's ACL names each admitted device: wait for the server's reload.
    broker = server.broker
    assert broker is not None
    wait_for(lambda: f"user {device}\n" in broker.acl_path.read_text(), TIMEOUT, "the ACL")
    time.sleep(0.2)  # mosquitto reads it on the SIGHUP that follows the write
    return state_dir


def _device_cert(state_dir: Path) -> IssuedCert:
    identity = state_dir / "identity"
    pem = (identity / "device.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    return IssuedCert(
        pem, None, cert.serial_number, identity / "device.pem", identity / "device.key"
    )


def test_server_renews_its_own_certificates_and_restarts_their_users(server: Server) -> None:
    assert server.ingest is not None
    assert server.ingest.wait_ready(TIMEOUT)
    ca = FleetCA.load(server.ca_dir)
    # As if a year had passed: one day left on the ingest's and the broker's certificates.
    ca.issue_service_cert(INGEST_IDENTITY, days=1)
    ca.issue_server_cert(["localhost"], ["127.0.0.1"], days=1)
    wait_for(
        lambda: {"server", INGEST_IDENTITY} <= set(server.cert_renewals),
        TIMEOUT,
        "the server to re-issue its certificates",
    )
    assert _days_left(server.ca_dir / "services" / INGEST_IDENTITY / "cert.pem") > 300
    assert _days_left(server.ca_dir / "server" / "cert.pem") > 300
    assert _days_left(server.ca_dir / "services" / CERTS_IDENTITY / "cert.pem") > 300
    # The new ingest (new certificate) is subscribed again on the restarted broker.
    assert server.ingest is not None
    assert server.ingest.wait_ready(TIMEOUT)
    assert server.cert_service is not None
    assert server.cert_service.wait_ready(TIMEOUT)
    # The SuperLink restarted on the new certificate answers again.
    wait_for(lambda: _superlink_answers(server), TIMEOUT, "the SuperLink to answer")


def _superlink_answers(server: Server) -> bool:
    try:
        server.admin().list_nodes()
    except EdgeflError:
        return False
    return True


def test_agent_renews_its_certificate_over_mqtt_and_reconnects(
    server: Server, engine: sa.Engine, tmp_path: Path
) -> None:
    device = f"dev-{uuid.uuid4().hex[:6]}"
    state_dir = _admit(server, engine, tmp_path, device)
    identity = state_dir / "identity"
    old_serial = _device_cert(state_dir).serial
    assert _days_left(identity / "device.pem") < 2
    assert server.cert_service is not None
    assert server.cert_service.wait_ready(TIMEOUT)
    config = AgentConfig.model_validate(
        {
            "device_id": device,
            "fleet": FLEET,
            "state_dir": str(state_dir),
            "mqtt": {
                "host": "127.0.0.1",
                "port": server.broker_port,
                "tls": {
                    "ca_file": str(identity / "ca.pem"),
                    "cert_file": str(identity / "device.pem"),
                    "key_file": str(identity / "device.key"),
                },
            },
            "cert_renew_retry_s": 5,
        }
    )
    agent = Agent(config)
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_for(lambda: _days_left(identity / "device.pem") > 300, TIMEOUT, "a renewal")
        renewed = _device_cert(state_dir)
        assert renewed.serial != old_serial
        info = get_enrollment(engine, device)
        assert info is not None
        assert info.cert_serial == f"{renewed.serial:x}"  # a revoke now revokes the new one
        assert agent.renewer is not None
        wait_for(lambda: agent.renewer is not None and agent.renewer.installed == 1, TIMEOUT, "")
        # Reconnected with the new certificate: connected again on a new client.
        wait_for(lambda: agent.link.client_epoch >= 1 and agent.link.connected, TIMEOUT, "")
        assert agent.renewer.requests == 1
    finally:
        stop.set()
        runner.join(30)
    # The key never changed: the renewed certificate is for the device's own key.
    key = serialization.load_pem_private_key((identity / "device.key").read_bytes(), None)
    assert renewed.certificate.public_key() == key.public_key()
    # Asking again at once (a lost answer, or a flood) gets the same certificate again,
    # not a new signature each time.
    assert agent.renewer is not None
    topic, payload = agent.renewer.request()
    assert server.cert_service is not None
    assert server.cert_service.handle(topic, payload)
    again = get_enrollment(engine, device)
    assert again is not None
    assert again.cert_serial == f"{renewed.serial:x}"


def test_device_cannot_get_a_certificate_in_another_devices_name(
    server: Server, engine: sa.Engine, tmp_path: Path
) -> None:
    victim = f"dev-{uuid.uuid4().hex[:6]}"
    attacker = f"dev-{uuid.uuid4().hex[:6]}"
    _admit(server, engine, tmp_path, victim)
    attacker_dir = _admit(server, engine, tmp_path, attacker)
    assert server.cert_service is not None
    assert server.cert_service.wait_ready(TIMEOUT)
    before_victim = get_enrollment(engine, victim)
    issued_before, refused_before = server.cert_service.issued, server.cert_service.refused

    # A key of the attacker's choosing, CN = the victim.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, victim)]))
        .sign(key, hashes.SHA256())
    )
    request = RenewalRequest(
        request_id="x", csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode()
    )
    payload = json.dumps(request.model_dump(mode="json")).encode()
    ca = FleetCA.load(server.ca_dir)
    probe = MqttProbe(server.broker_port, ca, _device_cert(attacker_dir), attacker).connect()
    try:
        # mosquitto applies the ACL naming the attacker on the SIGHUP after its write: wait
        # until its own topics are open to it, so the refusals below are the ACL's verdict.
        own = f"edgefl/{FLEET}/{attacker}/telemetry/probe"
        wait_for(lambda: not probe.publish(own, b"{}").is_failure, TIMEOUT, "the ACL reload")
        # On the victim's topic: the ACL refuses it.
        rc = probe.publish(renewal_request_topic(FLEET, victim), payload)
        assert rc.value == NOT_AUTHORIZED, rc
        # On its own topic: the service refuses the CN.
        assert not probe.publish(renewal_request_topic(FLEET, attacker), payload).is_failure
        wait_for(
            lambda: (
                server.cert_service is not None
                and server.cert_service.refused == refused_before + 1
            ),
            TIMEOUT,
            "the refusal",
        )
    finally:
        probe.close()
    assert server.cert_service.issued == issued_before
    assert get_enrollment(engine, victim) == before_victim
