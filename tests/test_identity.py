"""Device enrollment: real keys, a real fleet CA, the `edgefl agent enroll` command."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.edge_agent.identity import install_bundle, prepare_enrollment
from edgefl.enrollment import EnrollmentBundle, IdentityPaths, read_request, write_json_document
from edgefl.errors import BadInputError, ExitCode
from edgefl.server.fleet_ca import FleetCA


def _config(tmp_path: Path, device_id: str = "pi-01", fleet: str = "lab") -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "device_id": device_id,
                "fleet": fleet,
                "state_dir": str(tmp_path / "state"),
                "mqtt": {"port": 1883},
            }
        )
    )
    return path


def _admit(ca: FleetCA, request_path: Path, out: Path, **overrides: str) -> Path:
    """What the server's `admit` does with a request, as far as the device can tell."""
    req = read_request(request_path)
    csr = x509.load_pem_x509_csr(req.csr_pem.encode())
    issued = ca.issue_device_cert(req.device_id, csr=csr)
    fields = {
        "device_id": req.device_id,
        "fleet": req.fleet,
        "cert_pem": issued.cert_pem.decode(),
        "ca_pem": ca.cert_pem.decode(),
        "cert_serial": f"{issued.serial:x}",
        "node_id": "12345",
        **overrides,
    }
    write_json_document(out, EnrollmentBundle.model_validate(fields))
    return out


def test_keys_have_the_right_types_modes_and_subject(tmp_path: Path) -> None:
    result = prepare_enrollment("pi-01", "lab", tmp_path / "state")
    paths = result.paths
    assert result.created_tls_key
    assert result.created_node_key
    for private in (paths.tls_key, paths.node_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    tls = serialization.load_pem_private_key(paths.tls_key.read_bytes(), password=None)
    assert isinstance(tls, ec.EllipticCurvePrivateKey)
    assert tls.curve.name == "secp256r1"
    assert paths.tls_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    node = serialization.load_ssh_private_key(paths.node_key.read_bytes(), password=None)
    assert isinstance(node, ec.EllipticCurvePrivateKey)
    assert node.curve.name == "secp384r1"
    pub = paths.node_public_key.read_text().strip()
    assert pub.startswith("ecdsa-sha2-nistp384 ")
    loaded = serialization.load_ssh_public_key(pub.encode())
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    assert loaded.public_numbers() == node.public_key().public_numbers()
    csr = x509.load_pem_x509_csr(paths.csr.read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-01"
    request = read_request(paths.request)
    assert request.device_id == "pi-01"
    assert request.fleet == "lab"
    assert request.node_public_key == pub
    assert "PRIVATE" not in paths.request.read_text()


def test_enroll_is_idempotent_and_force_replaces_keys(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = prepare_enrollment("pi-01", "lab", state)
    tls, node = first.paths.tls_key.read_bytes(), first.paths.node_key.read_bytes()
    again = prepare_enrollment("pi-01", "lab", state)
    assert not again.created_tls_key
    assert not again.created_node_key
    assert first.paths.tls_key.read_bytes() == tls
    assert first.paths.node_key.read_bytes() == node
    assert again.request.node_public_key == first.request.node_public_key
    forced = prepare_enrollment("pi-01", "lab", state, force=True)
    assert forced.created_tls_key
    assert forced.created_node_key
    assert forced.paths.tls_key.read_bytes() != tls
    assert forced.request.node_public_key != first.request.node_public_key


def test_a_real_ca_signs_the_request_and_the_bundle_installs(tmp_path: Path) -> None:
    ca = FleetCA.create(tmp_path / "ca")
    result = prepare_enrollment("pi-01", "lab", tmp_path / "state")
    bundle = _admit(ca, result.request_path, tmp_path / "bundle.json")
    done = install_bundle(bundle, "pi-01", "lab", tmp_path / "state")
    paths = IdentityPaths(tmp_path / "state")
    assert paths.cert.read_text() == done.bundle.cert_pem
    assert paths.ca.read_bytes() == ca.cert_pem
    assert json.loads(paths.bundle.read_text())["node_id"] == "12345"
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))


def _refusal(tmp_path: Path, bundle: Path, device: str = "pi-01", fleet: str = "lab") -> str:
    with pytest.raises(BadInputError) as info:
        install_bundle(bundle, device, fleet, tmp_path / "state")
    assert not IdentityPaths(tmp_path / "state").cert.exists()
    return str(info.value)


def test_install_refuses_a_bundle_for_another_device_or_fleet(tmp_path: Path) -> None:
    ca = FleetCA.create(tmp_path / "ca")
    result = prepare_enrollment("pi-01", "lab", tmp_path / "state")
    bundle = _admit(ca, result.request_path, tmp_path / "bundle.json")
    assert "is for device 'pi-01', this device is 'pi-02'" in _refusal(tmp_path, bundle, "pi-02")
    assert "is for fleet 'lab'" in _refusal(tmp_path, bundle, fleet="other")


def test_install_refuses_a_certificate_for_another_key(tmp_path: Path) -> None:
    ca = FleetCA.create(tmp_path / "ca")
    first = prepare_enrollment("pi-01", "lab", tmp_path / "state")
    bundle = _admit(ca, first.request_path, tmp_path / "bundle.json")
    prepare_enrollment("pi-01", "lab", tmp_path / "state", force=True)  # keys replaced
    message = _refusal(tmp_path, bundle)
    assert "not for this device's TLS key" in message
    assert "edgefl server admit" in message


def test_install_refuses_a_certificate_with_another_cn(tmp_path: Path) -> None:
    ca = FleetCA.create(tmp_path / "ca")
    prepare_enrollment("pi-01", "lab", tmp_path / "state")
    key = serialization.load_pem_private_key(
        IdentityPaths(tmp_path / "state").tls_key.read_bytes(), password=None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")]))
        .sign(key, hashes.SHA256())
    )
    issued = ca.issue_device_cert("intruder", csr=csr)
    bundle = tmp_path / "bundle.json"
    write_json_document(
        bundle,
        EnrollmentBundle(
            device_id="pi-01",
            fleet="lab",
            cert_pem=issued.cert_pem.decode(),
            ca_pem=ca.cert_pem.decode(),
            cert_serial=f"{issued.serial:x}",
            node_id="1",
        ),
    )
    assert "has CN ['intruder'], not the device id 'pi-01'" in _refusal(tmp_path, bundle)


def test_install_refuses_a_certificate_from_another_ca(tmp_path: Path) -> None:
    ours, theirs = FleetCA.create(tmp_path / "ours"), FleetCA.create(tmp_path / "theirs")
    result = prepare_enrollment("pi-01", "lab", tmp_path / "state")
    bundle = _admit(
        theirs, result.request_path, tmp_path / "bundle.json", ca_pem=ours.cert_pem.decode()
    )
    assert "does not verify against its CA" in _refusal(tmp_path, bundle)


def test_enroll_command_writes_request_and_installs_the_bundle(tmp_path: Path) -> None:
    config = _config(tmp_path)
    runner = CliRunner()
    out = tmp_path / "req.json"
    made = runner.invoke(app, ["agent", "enroll", "--config", str(config), "--out", str(out)])
    assert made.exit_code == 0, made.output
    assert read_request(out).device_id == "pi-01"
    again = runner.invoke(app, ["agent", "enroll", "--config", str(config), "--json"])
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert report["created_tls_key"] is False
    assert report["created_node_key"] is False
    ca = FleetCA.create(tmp_path / "ca")
    bundle = _admit(ca, out, tmp_path / "bundle.json")
    installed = runner.invoke(
        app, ["agent", "enroll", "--config", str(config), "--install", str(bundle), "--json"]
    )
    assert installed.exit_code == 0, installed.output
    assert json.loads(installed.stdout)["node_id"] == "12345"


def test_enroll_command_refuses_a_foreign_bundle_with_exit_4(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    ca = FleetCA.create(tmp_path / "ca")
    theirs = prepare_enrollment("pi-02", "lab", other / "state")
    bundle = _admit(ca, theirs.request_path, tmp_path / "bundle.json")
    config = _config(tmp_path)
    CliRunner().invoke(app, ["agent", "enroll", "--config", str(config)])
    result = CliRunner().invoke(
        app, ["agent", "enroll", "--config", str(config), "--install", str(bundle)]
    )
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "this device is 'pi-01'" in result.output
    assert "hint:" in result.output
