from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefl.errors import BadInputError, ConfigError
from edgefl.server.fleet_ca import (
    CRL_VALIDITY_DAYS,
    SERVER_IDENTITY,
    SERVICE_IDENTITIES,
    FleetCA,
    check_not_reserved,
    validate_device_id,
)


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA.create(tmp_path / "ca")


def _cn(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _csr(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr


def test_ca_certificate_is_a_constrained_ca(ca: FleetCA) -> None:
    cert = ca.cert
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert ku.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    cert.verify_directly_issued_by(cert)  # self-signed
    assert _cn(cert.subject) == "edgefl fleet CA"
    assert _mode(ca.directory / "ca.key") == 0o600
    assert ca.crl_path.exists()


def test_create_refuses_to_overwrite(ca: FleetCA) -> None:
    with pytest.raises(BadInputError, match="already holds a CA"):
        FleetCA.create(ca.directory)


def test_device_cert_chain_cn_san_eku_and_key_mode(ca: FleetCA) -> None:
    issued = ca.issue_device_cert("pi-kitchen_01")
    cert = issued.certificate
    cert.verify_directly_issued_by(ca.cert)
    assert _cn(cert.subject) == "pi-kitchen_01"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["pi-kitchen_01"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.serial_number == issued.serial
    assert issued.cert_path == ca.directory / "devices" / "pi-kitchen_01" / "cert.pem"
    assert issued.key_path is not None
    assert issued.key_pem is not None
    assert issued.cert_path.read_bytes() == issued.cert_pem
    assert issued.key_path.read_bytes() == issued.key_pem
    assert _mode(issued.key_path) == 0o600
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert key.public_key() == cert.public_key()
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in issued.cert_path.parent.iterdir()) == ["cert.pem", "key.pem"]


def test_device_cert_from_csr_keeps_the_key_on_the_device(ca: FleetCA) -> None:
    key, csr = _csr("dev-7")
    issued = ca.issue_device_cert("dev-7", csr=csr, days=30)
    assert issued.key_pem is None
    assert issued.key_path is None
    assert not (issued.cert_path.parent / "key.pem").exists()
    cert = issued.certificate
    cert.verify_directly_issued_by(ca.cert)
    assert cert.public_key() == key.public_key()
    assert _cn(cert.subject) == "dev-7"


def test_csr_with_another_cn_is_refused(ca: FleetCA) -> None:
    _, csr = _csr("dev-B")
    with pytest.raises(BadInputError, match="does not match device id"):
        ca.issue_device_cert("dev-A", csr=csr)
    assert not (ca.directory / "devices" / "dev-A").exists()


def test_csr_with_a_bad_signature_is_refused(ca: FleetCA) -> None:
    _, good = _csr("dev-A")
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # flip a bit of the signature
    tampered = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(BadInputError, match="signature"):
        ca.issue_device_cert("dev-A", csr=tampered)


@pytest.mark.parametrize(
    "bad", ["", "a" * 65, "dev/1", "dev+", "dev#", "dev 1", "dév", "a\nb", "../x"]
)
def test_bad_device_id_is_refused(ca: FleetCA, bad: str) -> None:
    with pytest.raises(BadInputError, match="invalid device id"):
        ca.issue_device_cert(bad)
    with pytest.raises(BadInputError):
        validate_device_id(bad)


def test_server_identity_is_not_a_device_id(ca: FleetCA) -> None:
    with pytest.raises(BadInputError, match="reserved"):
        ca.issue_device_cert(SERVER_IDENTITY)
    issued = ca.issue_service_cert()
    assert _cn(issued.certificate.subject) == SERVER_IDENTITY
    eku = issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize(
    "name", ["edgefl-ingest", "edgefl-commands", "edgefl-certs", "EDGEFL-x", "edgefl-server"]
)
def test_service_namespace_is_never_a_device_id(ca: FleetCA, name: str) -> None:
    # The broker takes the CN as username and client id: a device enrolled as a service
    # name would be that service.
    _key, csr = _csr(name)
    with pytest.raises(BadInputError, match="reserved"):
        ca.issue_device_cert(name, csr=csr)
    with pytest.raises(BadInputError, match="reserved"):
        check_not_reserved(name)


def test_only_known_services_get_a_service_certificate(ca: FleetCA) -> None:
    for name in SERVICE_IDENTITIES:
        assert _cn(ca.issue_service_cert(name).certificate.subject) == name
    with pytest.raises(BadInputError, match="not a service identity"):
        ca.issue_service_cert("dev-a")


def test_operator_certificates_are_listed_until_revoked(ca: FleetCA) -> None:
    alice = ca.issue_operator_cert("alice")
    bob = ca.issue_operator_cert("bob")
    assert _cn(alice.certificate.subject) == "edgefl-op-alice"
    assert ca.operator_names() == ["edgefl-op-alice", "edgefl-op-bob"]
    ca.revoke(bob.serial)
    assert ca.operator_names() == ["edgefl-op-alice"]
    assert ca.live_serials("edgefl-op-alice", kind="operator") == [alice.serial]
    with pytest.raises(BadInputError):
        ca.issue_operator_cert("x" * 60)  # the CN would pass 64 characters


def test_key_history_names_every_certificate_of_a_key_except_voided_ones(ca: FleetCA) -> None:
    key, csr = _csr("dev-k")
    node_key = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQ= comment"
    first = ca.issue_device_cert("dev-k", csr=csr, node_key=node_key)
    uses = ca.key_history(public_key=key.public_key())
    assert [(u.serial, u.cn, u.revoked) for u in uses] == [(first.serial, "dev-k", False)]
    # The node key is matched without its comment.
    assert ca.key_history(node_key=node_key.rsplit(" ", 1)[0] + " other")[0].serial == first.serial
    ca.revoke(first.serial)
    assert ca.key_history(public_key=key.public_key())[0].revoked
    # A certificate of a failed admission is voided: its key may be admitted again.
    other_key, other_csr = _csr("dev-v")
    voided = ca.issue_device_cert("dev-v", csr=other_csr)
    ca.revoke(voided.serial, void=True)
    assert ca.key_history(public_key=other_key.public_key()) == []
    assert ca.device_serials("dev-v") == []


def test_short_validities_for_renewal_tests(ca: FleetCA) -> None:
    issued = ca.issue_service_cert(days=2 / 1440)  # two minutes
    left = issued.certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=1) < left <= dt.timedelta(minutes=2)


def test_server_cert_has_dns_and_ip_sans(ca: FleetCA) -> None:
    import ipaddress

    issued = ca.issue_server_cert(["broker.local", "localhost"], ["127.0.0.1", "::1"])
    cert = issued.certificate
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.local", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert issued.key_path is not None
    assert _mode(issued.key_path) == 0o600
    with pytest.raises(BadInputError):
        ca.issue_server_cert(["x"], ["not-an-ip"])
    with pytest.raises(BadInputError):
        ca.issue_server_cert([], [])


def test_load_round_trip(ca: FleetCA) -> None:
    issued = ca.issue_device_cert("dev-1")
    loaded = FleetCA.load(ca.directory)
    assert loaded.cert == ca.cert
    # The loaded CA signs with the same key and remembers what it issued.
    other = loaded.issue_device_cert("dev-2")
    other.certificate.verify_directly_issued_by(ca.cert)
    loaded.revoke(issued.serial)
    assert issued.serial in FleetCA.load(ca.directory).revoked_serials


def test_load_errors(tmp_path: Path, ca: FleetCA) -> None:
    with pytest.raises(ConfigError, match="cannot read fleet CA"):
        FleetCA.load(tmp_path / "missing")
    other = FleetCA.create(tmp_path / "other")
    (ca.directory / "ca.key").write_bytes((other.directory / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match="does not match"):
        FleetCA.load(ca.directory)


def test_revoke_lists_serial_in_signed_crl(ca: FleetCA) -> None:
    keep = ca.issue_device_cert("dev-keep")
    gone = ca.issue_device_cert("dev-gone")
    empty = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert len(empty) == 0
    ca.revoke(gone.serial)
    ca.revoke(gone.serial)  # idempotent
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.cert.subject
    assert crl.get_revoked_certificate_by_serial_number(gone.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(keep.serial) is None
    assert len(crl) == 1
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    fresh = x509.load_pem_x509_crl(ca.crl_pem())
    assert fresh.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    assert fresh.get_revoked_certificate_by_serial_number(gone.serial) is not None
    assert ca.crl_path.read_bytes() == fresh.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(BadInputError, match="not issued"):
        ca.revoke(12345)


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


def test_refresh_crl_re_signs_only_when_due(ca: FleetCA) -> None:
    gone = ca.issue_device_cert("dev-gone")
    ca.revoke(gone.serial)
    before = dt.timedelta(days=10)
    assert ca.refresh_crl(before=before) is None  # fresh: 30 days left
    kept = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    ca.crl_pem(days=3)  # as if 27 days had passed
    short = ca.crl_next_update()
    assert short is not None
    fresh = ca.refresh_crl(before=before)
    assert fresh is not None
    assert fresh > short
    left = fresh - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=CRL_VALIDITY_DAYS - 1) < left <= dt.timedelta(days=CRL_VALIDITY_DAYS)
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(gone.serial) is not None
    assert _crl_number(crl) == _crl_number(kept) + 2
    with pytest.raises(BadInputError, match="due for refresh at once"):
        ca.refresh_crl(before=dt.timedelta(days=30))


def test_expired_or_missing_crl_is_re_signed(
    ca: FleetCA, sign_expired_crl: Callable[[FleetCA], dt.datetime]
) -> None:
    sign_expired_crl(ca)
    assert ca.refresh_crl(before=dt.timedelta(days=10)) is not None
    assert ca.crl_next_update() > dt.datetime.now(dt.UTC)  # type: ignore[operator]
    ca.crl_path.write_bytes(b"not a CRL")
    assert ca.crl_next_update() is None
    assert ca.refresh_crl(before=dt.timedelta(days=10)) is not None
    assert ca.crl_next_update() is not None


def test_two_instances_keep_each_others_changes(ca: FleetCA) -> None:
    # The server holds one instance while an admin command loads another: each change is
    # made on the state as it is on disk, not as the instance last saw it.
    other = FleetCA.load(ca.directory)
    issued = ca.issue_device_cert("dev-a")
    other.revoke(issued.serial)  # other never saw the serial being issued
    ca.crl_pem()  # ca never saw the revocation
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(issued.serial) is not None
    assert FleetCA.load(ca.directory).revoked_serials == {issued.serial}


_ISSUE_MANY = """
import sys
from pathlib import Path
from edgefl.server.fleet_ca import FleetCA
ca = FleetCA.load(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    ca.issue_device_cert(f"{sys.argv[2]}-{i}")
    if i % 5 == 0:
        ca.crl_pem()
"""


@pytest.mark.slow
def test_concurrent_writers_in_two_processes_lose_nothing(ca: FleetCA) -> None:
    n = 25
    procs = [
        subprocess.Popen([sys.executable, "-c", _ISSUE_MANY, str(ca.directory), name, str(n)])
        for name in ("left", "right")
    ]
    for proc in procs:
        assert proc.wait(120) == 0
    state = json.loads((ca.directory / "state.json").read_text(encoding="utf-8"))
    names = {entry["cn"] for entry in state["issued"].values()}
    assert {f"{side}-{i}" for side in ("left", "right") for i in range(n)} <= names
    # Every CRL signing got its own number: 1 at creation, 5 per process.
    assert state["crl_number"] == 1 + 2 * len(range(0, n, 5))
