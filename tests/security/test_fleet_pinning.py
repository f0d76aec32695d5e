"""Fleet pinning at the broker: a device publishes only under the fleet it enrolled in.

The attacker is an admitted device holding only its own certificate and key. Before this
change the shipped ACL granted devices ``pattern write edgefl/+/%u/...``: mosquitto
patterns substitute only ``%u``/``%c``, so a device could publish under ANY fleet's
prefix, and only the ingest refused it. Now the broker's ACL has one block per admitted
device, rendered from the registry's enrollments with the device's fleet, and the running
server renders it again (and SIGHUPs mosquitto) when devices are admitted or revoked.

- ``fleet_spoof`` (``benchmarks/probes/ingest.py``): the broker answers PUBACK 0x87 and
  nothing reaches the ingest; the ingest alone, in the window before a reload, still
  dead-letters it.
- An admitted device whose block the broker has not loaded yet gets 0x87: its agent's
  outbox keeps every record and retries, and after the reload all of them are stored.
- The real server: a device admitted while it was down can publish at once (the ACL is
  rendered at start-up); one admitted while it runs can publish within a poll; a revoked
  device's block goes away.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from probes.broker import NOT_AUTHORIZED, MqttProbe
from probes.ingest import IngestRig, envelope, ingest_rig, probe_fleet_spoof

from edgefl.edge_agent.daemon import Agent, AgentConfig
from edgefl.edge_agent.identity import install_bundle, prepare_enrollment
from edgefl.edge_agent.sources import SourceRecord
from edgefl.enrollment import write_json_document
from edgefl.server.enrollment import admit, revoke
from edgefl.server.fleet_ca import FleetCA, IssuedCert
from edgefl.server.registry import Enrollment, make_engine, upgrade
from edgefl.server.registry.db import DEFAULT_DB_FILENAME
from edgefl.server.serve import Server, ServerConfig
from edgefl.testing import mosquitto_executable, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_executable() is None, reason="mosquitto is not installed"),
]

TIMEOUT = 30.0
FLEET = "lab"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestRig]:
    with ingest_rig(tmp_path_factory.mktemp("pinning-rig")) as running:
        yield running


def test_fleet_spoof_is_refused_by_the_broker_and_by_the_ingest(rig: IngestRig) -> None:
    result = probe_fleet_spoof(rig)
    assert result.held, result.detail
    counts = result.counts
    assert counts["broker_refused"] is True  # PUBACK 0x87 for the record and the status
    assert counts["delivered"] == 0
    assert counts["dead_letters"] == {}  # nothing reached the ingest
    assert counts["rows_under_other_fleet"] == 0
    # Behind a broker that has not reloaded yet, the ingest refuses it on its own.
    assert counts["stale_acl_dead_letters"] == {"fleet_mismatch": 2}
    assert counts["stale_acl_rows"] == 0


def _agent_config(
    rig: IngestRig, name: str, fleet: str, cert: IssuedCert, state: Path
) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": name,
            "fleet": fleet,
            "state_dir": str(state),
            "mqtt": {
                "host": "127.0.0.1",
                "port": rig.broker.port,
                "protocol": "5",
                "tls": {
                    "ca_file": str(rig.ca.cert_path),
                    "cert_file": str(cert.cert_path),
                    "key_file": str(cert.key_path),
                },
                "reconnect_min_s": 0.2,
            },
        }
    )


def test_not_yet_authorized_records_stay_in_the_outbox_until_the_reload(
    rig: IngestRig, tmp_path: Path
) -> None:
    """Admitted, but the broker has not reloaded its ACL yet: 0x87, and nothing is lost."""
    device = rig.enroll(f"new-{uuid.uuid4().hex[:6]}", reload=False)
    agent = Agent(_agent_config(rig, device.name, device.fleet, device.cert, tmp_path))
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    runner.start()
    try:
        assert agent.link.wait_connected(TIMEOUT)
        records = [
            SourceRecord(stream="s", kind="data", content_type="application/json", body=b"{}")
            for _ in range(20)
        ]
        assert len(agent.submit(records)) == 20
        wait_for(lambda: agent.sender.failed >= 20, TIMEOUT, "the broker's refusals")
        # Refused (PUBACK 0x87), so kept: every record is still in the outbox.
        assert agent.outbox.stats().depth == 20
        assert rig.records(device.name) == []
        rig.reload_broker_acl()  # what the running server does within a second
        wait_for(lambda: len(rig.records(device.name)) == 20, TIMEOUT, "20 stored records")
        wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "an empty outbox")
        assert sorted(r.seq for r in rig.records(device.name)) == list(range(1, 21))
    finally:
        stop.set()
        runner.join(TIMEOUT)


# -- the running server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pinning-server")


@pytest.fixture(scope="module")
def offline_device(server_root: Path) -> IssuedCert:
    """A device admitted while the server was down: CA and registry row written before."""
    state = server_root / "server"
    ca = FleetCA.create(state / "ca")
    cert = ca.issue_device_cert("early")
    db_url = f"sqlite:///{state / DEFAULT_DB_FILENAME}"
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Enrollment).values(
                device_id="early",
                fleet=FLEET,
                status="admitted",
                cert_serial=format(cert.serial, "x"),
                cert_pem=cert.cert_pem.decode(),
                node_public_key="",
                node_id="1",
                admitted_at=datetime.now(UTC),
                revoked_at=None,
                revoke_reason="",
            )
        )
    engine.dispose()
    return cert


@pytest.fixture(scope="module")
def server(server_root: Path, offline_device: IssuedCert) -> Iterator[Server]:
    config = ServerConfig.model_validate(
        {
            "state_dir": str(server_root / "server"),
            "superlink": {"port": 0},
            "broker": {"port": 0},
            "fleet_proxy": {"enabled": False},
        }
    )
    srv = Server(config)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _probe(server: Server, cert: IssuedCert) -> MqttProbe:
    return MqttProbe(server.broker_port, server.ca, cert, client_id="ignored").connect()


def test_server_pins_devices_admitted_before_start_and_while_running(
    server: Server, offline_device: IssuedCert, server_root: Path
) -> None:
    assert server.broker is not None
    # Admitted while the server was down: rendered at start-up, it publishes at once.
    early = _probe(server, offline_device)
    try:
        own = early.publish(f"edgefl/{FLEET}/early/data/s", envelope("early", 1))
        other = early.publish("edgefl/other/early/data/s", envelope("early", 2))
        assert not own.is_failure, own
        assert other.value == NOT_AUTHORIZED
    finally:
        early.close()

    # Admitted while it runs, from another process's point of view (the registry and the
    # CA change; the server only polls): it can publish once the server reloaded.
    engine = make_engine(server.db_url)
    try:
        state = server_root / "late"
        enrollment = prepare_enrollment("late", FLEET, state)
        bundle = admit(enrollment.request, ca=server.ca, admin=server.admin(), engine=engine)
        write_json_document(server_root / "late.bundle.json", bundle)
        install_bundle(server_root / "late.bundle.json", "late", FLEET, state)
        identity = state / "identity"
        cert = IssuedCert(
            (identity / "device.pem").read_bytes(),
            None,
            0,
            identity / "device.pem",
            identity / "device.key",
        )
        wait_for(
            lambda: "user late\n" in server.broker.acl_path.read_text(),  # type: ignore[union-attr]
            TIMEOUT,
            "the server to render the new device's ACL block",
        )
        late = _probe(server, cert)
        try:
            codes: list[int] = []

            def accepted() -> bool:
                rc = late.publish(f"edgefl/{FLEET}/late/data/s", envelope("late", len(codes) + 1))
                codes.append(rc.value)
                return not rc.is_failure

            wait_for(accepted, TIMEOUT, "the broker to accept the new device")
            spoof = late.publish("edgefl/other/late/data/s", envelope("late", 99))
            assert spoof.value == NOT_AUTHORIZED
        finally:
            late.close()
        acl = server.broker.acl_path.read_text()
        assert f"topic write edgefl/{FLEET}/late/telemetry/#" in acl
        # No pattern grants a device any fleet.
        assert not [line for line in acl.splitlines() if line.startswith("pattern")]

        revoke("late", "test", ca=server.ca, admin=server.admin(), engine=engine)
        wait_for(
            lambda: "user late\n" not in server.broker.acl_path.read_text(),  # type: ignore[union-attr]
            TIMEOUT,
            "the revoked device's ACL block to go",
        )
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("device", "fleet"),
    [
        ("dev\ntopic write edgefl/#", FLEET),  # a line of its own
        ("dev", "lab/+"),  # a wildcard in the fleet
        ("edgefl-ingest", FLEET),  # a service identity is no device
        ("dev a", FLEET),
    ],
)
def test_acl_refuses_names_that_would_add_lines_or_topics(device: str, fleet: str) -> None:
    from edgefl.errors import ConfigError
    from edgefl.server.broker_config import render_acl

    with pytest.raises(ConfigError):
        render_acl(devices={device: fleet})
