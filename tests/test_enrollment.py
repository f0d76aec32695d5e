"""Enrollment end to end with real parts: fleet CA, flower-superlink/-supernode, mosquitto.

A device's request comes from the agent's own ``prepare_enrollment`` (its keys never leave
its state directory). Admission is checked on all three identities: the certificate CN,
the registry row (SQLite and PostgreSQL) and the SuperLink's node registration, which a
real ``flower-supernode`` with the device's node key then uses. Revocation is checked the
same way, through ``Server`` so the broker restart on the CRL change is the shipped one.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import re
import ssl
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from typer.testing import CliRunner

from edgefl.cli import app as cli_app
from edgefl.config import TlsFiles
from edgefl.edge_agent.identity import EnrollmentResult, prepare_enrollment
from edgefl.errors import BadInputError, ExitCode
from edgefl.process import ManagedProcess
from edgefl.server.enrollment import (
    AlreadyEnrolledError,
    NotEnrolledError,
    ReusedKeyError,
    RevokedDeviceError,
    admit,
    enrolled_nodes,
    get_enrollment,
    is_admitted,
    list_enrollments,
    revoke,
)
from edgefl.server.fl.superlink import (
    FlowerAdmin,
    FlowerCommandError,
    SuperLink,
    SuperLinkConfig,
    flower_env,
)
from edgefl.server.fleet_ca import FleetCA
from edgefl.server.registry import Enrollment, make_engine, session_factory, upgrade
from edgefl.server.serve import Server, ServerConfig
from edgefl.testing import free_port, wait_for

pytestmark = pytest.mark.slow

TIMEOUT = 90.0
FLEET = "lab"


# -- helpers ------------------------------------------------------------------------------


def _device_id(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _enroll(tmp_path: Path, device_id: str) -> EnrollmentResult:
    """What `edgefl agent enroll` does on the device: keys + request, in its state dir."""
    return prepare_enrollment(device_id, FLEET, tmp_path / "devices" / device_id)


@dataclass
class Link:
    superlink: SuperLink
    admin: FlowerAdmin
    ca: FleetCA


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Link]:
    """One TLS + node-auth SuperLink for the module (each test uses its own device ids)."""
    root = tmp_path_factory.mktemp("link")
    ca = FleetCA.create(root / "ca")
    server = ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    assert server.key_path is not None
    config = SuperLinkConfig(
        port=0,
        tls=TlsFiles(ca_file=ca.cert_path, cert_file=server.cert_path, key_file=server.key_path),
    )
    superlink = SuperLink(config, root / "superlink")
    superlink.start()
    try:
        yield Link(superlink, superlink.admin(), ca)
    finally:
        superlink.stop()


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    upgrade(db_url)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def _nodes(admin: FlowerAdmin) -> dict[int, str]:
    return {n.node_id: n.status for n in admin.list_nodes()}


class SuperNode:
    """A real ``flower-supernode`` with a device's node key, in its own process group."""

    def __init__(self, workdir: Path, address: str, ca_file: Path, node_key: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"supernode-{uuid.uuid4().hex[:6]}.log"
        self.proc = ManagedProcess(
            [
                str(Path(sys.executable).parent / "flower-supernode"),
                "--superlink",
                address,
                "--root-certificates",
                str(ca_file),
                "--auth-supernode-private-key",
                str(node_key),
                "--port",
                str(free_port()),
                "--max-retries",
                "2",
            ],
            self.log,
            env=flower_env(workdir / "flwr-home"),
        )
        self.proc.start()

    def text(self) -> str:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text(encoding="utf-8", errors="replace"))

    def wait_activated(self) -> int:
        wait_for(
            lambda: "SuperNode ID:" in self.text() or self.proc.poll() is not None,
            TIMEOUT,
            "the SuperNode to activate",
        )
        match = re.search(r"SuperNode ID: (\d+)", self.text())
        assert match is not None, self.text()[-2000:]
        return int(match.group(1))

    def wait_exit(self) -> int:
        wait_for(lambda: self.proc.poll() is not None, TIMEOUT, "the SuperNode to exit")
        code = self.proc.poll()
        assert code is not None
        return code

    def stop(self) -> None:
        self.proc.stop(15.0)


@pytest.fixture
def supernodes() -> Iterator[list[SuperNode]]:
    made: list[SuperNode] = []
    yield made
    for node in made:
        node.stop()


def _superlink_log(link: Link) -> str:
    text = link.superlink.log_path.read_text(encoding="utf-8", errors="replace")
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# -- admission ----------------------------------------------------------------------------


def test_admitted_device_has_one_id_across_certificate_registry_and_superlink(
    tmp_path: Path, link: Link, engine: sa.Engine, supernodes: list[SuperNode]
) -> None:
    device = _device_id()
    enrolled = _enroll(tmp_path, device)
    bundle = admit(
        enrolled.request,
        ca=link.ca,
        admin=link.admin,
        engine=engine,
        superlink_address=link.superlink.public_address,
    )
    # The certificate: CN and SAN are the device id, signed by the fleet CA, its key is
    # the device's own TLS key (the CSR's).
    cert = x509.load_pem_x509_certificate(bundle.cert_pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device
    assert f"{cert.serial_number:x}" == bundle.cert_serial
    assert cert.issuer == link.ca.cert.subject
    device_key = serialization.load_pem_private_key(
        enrolled.paths.tls_key.read_bytes(), password=None
    )
    assert cert.public_key() == device_key.public_key()
    assert bundle.ca_pem.encode() == link.ca.cert_pem
    assert bundle.superlink == link.superlink.public_address

    # The registry row, under the same device id, names the same serial and node.
    row = get_enrollment(engine, device)
    assert row is not None
    assert (row.status, row.fleet, row.cert_serial, row.node_id) == (
        "admitted",
        FLEET,
        bundle.cert_serial,
        bundle.node_id,
    )
    assert row.node_public_key == enrolled.request.node_public_key.strip()
    assert is_admitted(engine, device)
    assert enrolled_nodes(engine)[bundle.node_id] == device
    assert int(bundle.node_id) > 0  # a u64; may exceed BIGINT (hence stored as text)

    # The SuperLink knows that node id, and a real SuperNode with the device's node key
    # activates as exactly that node and shows online.
    assert _nodes(link.admin)[int(bundle.node_id)] == "registered"
    node = SuperNode(
        tmp_path / "sn", link.superlink.address, link.ca.cert_path, enrolled.paths.node_key
    )
    supernodes.append(node)
    assert node.wait_activated() == int(bundle.node_id)
    assert _nodes(link.admin)[int(bundle.node_id)] == "online"
    assert f"Activated node_id={bundle.node_id}" in _superlink_log(link)


def test_unregistered_node_key_is_refused_on_both_sides(
    tmp_path: Path, link: Link, supernodes: list[SuperNode]
) -> None:
    enrolled = _enroll(tmp_path, _device_id("stranger"))  # keys made, never admitted
    before = _nodes(link.admin)
    node = SuperNode(
        tmp_path / "sn", link.superlink.address, link.ca.cert_path, enrolled.paths.node_key
    )
    supernodes.append(node)
    assert node.wait_exit() != 0
    assert "Failed to activate SuperNode" in node.text()
    assert "No SuperNode found with the given public key" in _superlink_log(link)
    assert _nodes(link.admin) == before


def test_bad_requests_are_refused_and_leave_nothing_behind(
    tmp_path: Path, link: Link, engine: sa.Engine
) -> None:
    device = _device_id()
    good = _enroll(tmp_path, device).request
    nodes_before = _nodes(link.admin)
    # FleetCA has no public listing of what it issued; its state is what we must not grow.
    issued_before = len(link.ca._state.issued)

    # A CSR whose CN is another device: refused before anything is issued or registered.
    other_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")]))
        .sign(other_key, hashes.SHA256())
    )
    wrong_cn = good.model_copy(
        update={"csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode()}
    )
    with pytest.raises(BadInputError, match="does not match device id"):
        admit(wrong_cn, ca=link.ca, admin=link.admin, engine=engine)
    garbage_csr = good.model_copy(update={"csr_pem": "not a csr"})
    with pytest.raises(BadInputError, match="not a PEM CSR"):
        admit(garbage_csr, ca=link.ca, admin=link.admin, engine=engine)
    garbage_key = good.model_copy(update={"node_public_key": "ssh-ed25519 AAAA"})
    with pytest.raises(BadInputError, match="node_public_key"):
        admit(garbage_key, ca=link.ca, admin=link.admin, engine=engine)
    assert get_enrollment(engine, device) is None
    assert len(link.ca._state.issued) == issued_before
    assert _nodes(link.admin) == nodes_before

    # Another device's node key: refused before anything is issued or registered.
    bundle = admit(good, ca=link.ca, admin=link.admin, engine=engine)
    thief = _device_id("thief")
    thief_enrollment = _enroll(tmp_path, thief)
    thief_request = thief_enrollment.request.model_copy(
        update={"node_public_key": good.node_public_key}
    )
    issued_before = len(link.ca._state.issued)
    with pytest.raises(ReusedKeyError, match=f"node key .* of '{device}'"):
        admit(thief_request, ca=link.ca, admin=link.admin, engine=engine)
    assert get_enrollment(engine, thief) is None
    assert len(FleetCA.load(link.ca.directory)._state.issued) == issued_before

    # The SuperLink refuses the registration (the node key was registered there by hand):
    # the certificate just issued is revoked again (voided) and no row is written.
    link.admin.register_node(thief_enrollment.paths.node_public_key, name="squatter")
    revoked_before = set(link.ca.revoked_serials)
    with pytest.raises(FlowerCommandError, match="Public key already in use"):
        admit(thief_enrollment.request, ca=link.ca, admin=link.admin, engine=engine)
    assert get_enrollment(engine, thief) is None
    new_revoked = set(link.ca.revoked_serials) - revoked_before
    assert len(new_revoked) == 1
    entry = link.ca._state.issued[new_revoked.pop()]
    assert entry["cn"] == thief
    assert entry["voided"]  # never served: the same request may be admitted once fixed

    # Double admission names the way out.
    with pytest.raises(AlreadyEnrolledError, match="already admitted") as err:
        admit(good, ca=link.ca, admin=link.admin, engine=engine)
    assert "edgefl server revoke" in err.value.hint
    assert get_enrollment(engine, device) is not None
    assert get_enrollment(engine, device).node_id == bundle.node_id  # type: ignore[union-attr]

    # Revoking an unknown device.
    with pytest.raises(NotEnrolledError, match="no enrollment"):
        revoke("never-enrolled", "x", ca=link.ca, admin=link.admin, engine=engine)


def test_revoke_is_idempotent_and_a_revoked_device_does_not_come_back_silently(
    tmp_path: Path, link: Link, engine: sa.Engine
) -> None:
    device = _device_id()
    first = _enroll(tmp_path, device)
    bundle = admit(first.request, ca=link.ca, admin=link.admin, engine=engine)
    result = revoke(device, "lost in transit", ca=link.ca, admin=link.admin, engine=engine)
    assert result.enrollment.status == "revoked"
    assert result.enrollment.revoke_reason == "lost in transit"
    assert result.node_was_registered
    assert not result.already_revoked
    assert int(bundle.cert_serial, 16) in link.ca.revoked_serials
    assert _nodes(link.admin)[int(bundle.node_id)] == "unregistered"
    assert not is_admitted(engine, device)
    assert bundle.node_id not in enrolled_nodes(engine)

    # A retry re-checks every step and changes nothing.
    again = revoke(device, "other reason", ca=link.ca, admin=link.admin, engine=engine)
    assert again.already_revoked
    assert not again.node_was_registered
    assert again.enrollment.revoke_reason == "lost in transit"

    # The same request again: refused, with the explicit way back named.
    with pytest.raises(RevokedDeviceError, match="revoked") as err:
        admit(first.request, ca=link.ca, admin=link.admin, engine=engine)
    assert "--readmit" in err.value.hint
    # Even with readmit, the revoked node key is refused.
    with pytest.raises(RevokedDeviceError, match="node key that was revoked"):
        admit(first.request, ca=link.ca, admin=link.admin, engine=engine, readmit=True)
    # New keys on the device + readmit: admitted again under a new node and certificate.
    fresh = prepare_enrollment(device, FLEET, tmp_path / "devices" / device, force=True)
    back = admit(fresh.request, ca=link.ca, admin=link.admin, engine=engine, readmit=True)
    assert back.node_id != bundle.node_id
    assert back.cert_serial != bundle.cert_serial
    assert is_admitted(engine, device)
    assert int(bundle.cert_serial, 16) in link.ca.revoked_serials  # the old one stays out


def test_a_revoke_that_failed_half_way_is_finished_by_a_retry(
    tmp_path: Path, link: Link, engine: sa.Engine
) -> None:
    """The SuperLink is unreachable during the revoke: the CA step is done, the row stays
    admitted (so the revoke is visibly unfinished), and a retry completes it."""
    device = _device_id()
    bundle = admit(_enroll(tmp_path, device).request, ca=link.ca, admin=link.admin, engine=engine)
    dead = FlowerAdmin(
        f"127.0.0.1:{free_port()}",
        tmp_path / "dead-home",
        root_certificates=link.ca.cert_path,
        timeout_s=30,
    )
    with pytest.raises(FlowerCommandError, match="flwr supernode"):
        revoke(device, "stolen", ca=link.ca, admin=dead, engine=engine)
    assert int(bundle.cert_serial, 16) in link.ca.revoked_serials
    assert get_enrollment(engine, device).status == "admitted"  # type: ignore[union-attr]
    assert _nodes(link.admin)[int(bundle.node_id)] == "registered"

    done = revoke(device, "stolen", ca=link.ca, admin=link.admin, engine=engine)
    assert done.enrollment.status == "revoked"
    assert done.node_was_registered
    assert _nodes(link.admin)[int(bundle.node_id)] == "unregistered"


def test_enrollment_rows_keep_u64_node_ids_exactly(engine: sa.Engine) -> None:
    big = str(2**64 - 1)
    with session_factory(engine).begin() as session:
        session.add(
            Enrollment(
                device_id="u64",
                fleet=FLEET,
                status="admitted",
                cert_serial="ab",
                cert_pem="-",
                node_public_key="-",
                node_id=big,
                admitted_at=dt.datetime.now(dt.UTC),
                revoke_reason="",
            )
        )
    assert enrolled_nodes(engine) == {big: "u64"}
    assert [e.device_id for e in list_enrollments(engine)] == ["u64"]


# -- revocation through the running server --------------------------------------------------


def _mqtt_outcome(port: int, ca: Path, cert: Path, key: Path) -> str:
    """``connected``, ``tls-error``, ``refused`` or ``timeout`` for one MQTT 5 TLS connect."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
    results: queue.Queue[str] = queue.Queue()

    def on_connect(c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        results.put("refused" if rc.is_failure else "connected")

    def on_disconnect(c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        results.put("refused")

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", port, keepalive=30)
    except (ssl.SSLError, OSError):
        return "tls-error"
    client.loop_start()
    try:
        return results.get(timeout=15)
    except queue.Empty:
        return "timeout"
    finally:
        client.disconnect()
        client.loop_stop()


def _server(tmp_path: Path, db_url: str) -> Iterator[Server]:
    config = ServerConfig.model_validate(
        {
            "state_dir": str(tmp_path / "server"),
            "db_url": db_url,
            "superlink": {"port": 0},
            "broker": {"port": 0},
            "restart_min_s": 0.5,
            "crl_poll_s": 0.5,
        }
    )
    srv = Server(config)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[Server]:
    """A running server on each registry backend."""
    yield from _server(tmp_path, db_url)


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[Server]:
    """A running server on SQLite (the CLI's registry access is backend-neutral code)."""
    yield from _server(tmp_path, f"sqlite:///{tmp_path / 'server' / 'edgefl.db'}")


def test_revocation_unregisters_the_node_refuses_the_certificate_and_marks_the_registry(
    tmp_path: Path, server: Server, supernodes: list[SuperNode]
) -> None:
    admin = server.admin()
    engine = make_engine(server.db_url)
    try:
        devices = {}
        for name in ("dev-a", "dev-b"):
            enrolled = _enroll(tmp_path, name)
            bundle = admit(
                enrolled.request,
                ca=server.ca,
                admin=admin,
                engine=engine,
                superlink_address=server.superlink_address,
            )
            cert = tmp_path / f"{name}.pem"
            cert.write_text(bundle.cert_pem, encoding="utf-8")
            devices[name] = (enrolled, bundle, cert)

        def outcome(name: str) -> str:
            enrolled, _bundle, cert = devices[name]
            return _mqtt_outcome(
                server.broker_port, server.ca.cert_path, cert, enrolled.paths.tls_key
            )

        assert outcome("dev-a") == "connected"
        assert outcome("dev-b") == "connected"
        node = SuperNode(
            tmp_path / "sn-a",
            server.superlink_address,
            server.ca.cert_path,
            devices["dev-a"][0].paths.node_key,
        )
        supernodes.append(node)
        node_a = int(devices["dev-a"][1].node_id)
        assert node.wait_activated() == node_a

        broker_pid = server.pids()["broker"]
        revoke("dev-a", "decommissioned", ca=server.ca, admin=admin, engine=engine)

        # The SuperLink: unregistered, the running SuperNode is dropped, and a new one with
        # the same key cannot activate.
        assert _nodes(admin)[node_a] == "unregistered"
        node.wait_exit()
        again = SuperNode(
            tmp_path / "sn-a2",
            server.superlink_address,
            server.ca.cert_path,
            devices["dev-a"][0].paths.node_key,
        )
        supernodes.append(again)
        assert again.wait_exit() != 0
        assert "Failed to activate SuperNode" in again.text()

        # The broker: restarted by the server on the CRL change, it refuses dev-a's
        # certificate at the TLS handshake while dev-b still connects.
        wait_for(lambda: server.broker_restarts_for_crl >= 1, TIMEOUT, "the CRL restart")
        assert server.pids()["broker"] != broker_pid
        assert outcome("dev-a") in {"tls-error", "refused"}
        broker_log = server.state_dir / "broker" / "mosquitto.log"
        wait_for(
            lambda: "certificate verify failed" in broker_log.read_text(errors="replace"),
            TIMEOUT,
            "mosquitto to log the refused certificate",
        )
        assert outcome("dev-b") == "connected"

        # The registry.
        row = get_enrollment(engine, "dev-a")
        assert row is not None
        assert row.status == "revoked"
        assert row.revoke_reason == "decommissioned"
        assert set(enrolled_nodes(engine).values()) == {"dev-b"}
    finally:
        engine.dispose()


# -- the CLI --------------------------------------------------------------------------------


def test_cli_refuses_bad_input_with_clear_errors(tmp_path: Path, sqlite_server: Server) -> None:
    server = sqlite_server
    runner = CliRunner()
    config = tmp_path / "server.json"
    config.write_text(
        json.dumps({"state_dir": str(server.state_dir), "db_url": server.db_url}),
        encoding="utf-8",
    )
    malformed = tmp_path / "bad.json"
    malformed.write_text('{"kind": "edgefl-enrollment-request", ', encoding="utf-8")
    res = runner.invoke(cli_app, ["server", "admit", str(malformed), "--config", str(config)])
    assert res.exit_code == ExitCode.BAD_INPUT, res.output
    assert "not a JSON enrollment request" in res.output

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"kind": "edgefl-enrollment-request", "device_id": "x"}))
    res = runner.invoke(cli_app, ["server", "admit", str(wrong), "--config", str(config)])
    assert res.exit_code == ExitCode.BAD_INPUT, res.output
    assert "csr_pem" in res.output

    enrolled = _enroll(tmp_path, "dev-cli")
    out = tmp_path / "bundle.json"
    args = ["--config", str(config), "--json"]
    res = runner.invoke(cli_app, ["server", "app-key", "--create", *args])
    assert res.exit_code == 0, res.output
    fleet_key = json.loads(res.stdout)["public_key"]
    res = runner.invoke(cli_app, ["server", "release-key", "--create", *args])
    assert res.exit_code == 0, res.output
    release_key = json.loads(res.stdout)["keys"][0]["public_key"]
    res = runner.invoke(
        cli_app, ["server", "admit", str(enrolled.request_path), "--out", str(out), *args]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["device_id"] == "dev-cli"
    assert json.loads(out.read_text())["node_id"] == summary["node_id"]
    assert summary["superlink"] == server.superlink_address
    assert summary["app_signing_keys"] == 1
    assert json.loads(out.read_text())["app_signing_keys"] == [fleet_key]
    assert summary["release_signing_keys"] == 1
    assert json.loads(out.read_text())["release_signing_keys"] == [release_key]

    res = runner.invoke(cli_app, ["server", "admit", str(enrolled.request_path), *args])
    assert res.exit_code == ExitCode.BAD_INPUT
    assert "already admitted" in res.output
    assert "edgefl server revoke" in res.output

    res = runner.invoke(cli_app, ["server", "revoke", "nobody", *args])
    assert res.exit_code == ExitCode.BAD_INPUT
    assert "no enrollment of device 'nobody'" in res.output

    res = runner.invoke(cli_app, ["server", "revoke", "dev-cli", "--reason", "test", *args])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "revoked"

    res = runner.invoke(cli_app, ["server", "admit", str(enrolled.request_path), *args])
    assert res.exit_code == ExitCode.BAD_INPUT
    assert "was revoked" in res.output
    assert "--readmit" in res.output

    res = runner.invoke(cli_app, ["server", "enrollments", *args])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["enrollments"]
    assert [(r["device_id"], r["status"]) for r in rows] == [("dev-cli", "revoked")]
    assert rows[0]["superlink_status"] == "unregistered"  # the SuperLink's own view


def test_admin_commands_without_a_server_say_how_to_start_one(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(f"state_dir: {tmp_path / 'nothing'}\n", encoding="utf-8")
    request = _enroll(tmp_path, "dev-x").request_path
    res = CliRunner().invoke(cli_app, ["server", "admit", str(request), "--config", str(config)])
    assert res.exit_code == ExitCode.CONFIG
    assert "no fleet CA" in res.output
    assert "edgefl server start" in res.output


def test_the_bundle_carries_the_fleet_app_signing_key_and_the_device_pins_it(
    tmp_path: Path, link: Link, engine: sa.Engine
) -> None:
    """A device admitted while the server has an app-signing key trusts it with no
    configuration: it runs an app bundle that key signed, and only that key's."""
    from flwr.cli.build import build_fab_from_disk

    from edgefl.appsign import key_id
    from edgefl.edge_agent.fl.apptrust import POLICY_FILE, AppTrustPolicy, write_policy
    from edgefl.edge_agent.identity import install_bundle
    from edgefl.enrollment import write_json_document
    from edgefl.server.fl.app_signing import (
        app_signing_public_keys,
        create_app_signing_key,
        load_app_signing_key,
        sign_app_dir,
    )

    server_state = tmp_path / "server"
    assert app_signing_public_keys(server_state) == []  # no key: the bundle carries none
    line = create_app_signing_key(server_state)
    key = load_app_signing_key(server_state)
    assert key is not None
    device = _device_id()
    enrolled = _enroll(tmp_path, device)
    bundle = admit(
        enrolled.request,
        ca=link.ca,
        admin=link.admin,
        engine=engine,
        app_signing_keys=app_signing_public_keys(server_state),
    )
    assert bundle.app_signing_keys == [line]
    path = tmp_path / "bundle.json"
    write_json_document(path, bundle)
    state = tmp_path / "devices" / device
    install_bundle(path, device, FLEET, state)
    assert enrolled.paths.app_signing_keys.read_text() == line + "\n"

    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        '[project]\nname = "byo"\nversion = "1.0.0"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "lab"\n'
        '[tool.flwr.app.components]\nserverapp = "byo:server"\nclientapp = "byo:app"\n'
        "[tool.flwr.app.config]\n"
    )
    (app / "byo.py").write_text("app = server = None\n")
    sign_app_dir(app, key)
    write_policy(state / POLICY_FILE, [], [])  # training.app_signing_keys is empty
    admission = AppTrustPolicy.load(state / POLICY_FILE).admit(build_fab_from_disk(app))
    assert (admission.kind, admission.key_id) == ("signed", key_id(key.public_key()))


def test_a_device_cannot_enroll_under_a_service_name(
    tmp_path: Path, link: Link, engine: sa.Engine
) -> None:
    """The broker takes the certificate CN as username and client id: a device admitted
    as ``edgefl-ingest`` would be the ingest. Refused on the device, when the request is
    read, and by admit itself."""
    from edgefl.enrollment import EnrollmentRequest, read_request

    with pytest.raises(BadInputError, match="reserved"):
        prepare_enrollment("edgefl-ingest", FLEET, tmp_path / "svc")
    data = _enroll(tmp_path, _device_id()).request.model_dump()
    for name in ("edgefl-ingest", "edgefl-certs", "Edgefl-commands"):
        data["device_id"] = name
        forged = tmp_path / f"{name}.json"
        forged.write_text(json.dumps(data))
        with pytest.raises(BadInputError, match="reserved"):
            read_request(forged)
        unchecked = EnrollmentRequest.model_construct(**data)  # past the document check
        with pytest.raises(BadInputError, match="reserved"):
            admit(unchecked, ca=link.ca, admin=link.admin, engine=engine)
    assert link.ca.live_serials("edgefl-ingest", kind="device") == []
