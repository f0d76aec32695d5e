"""The server's release-signing keys: create, rotate, revoke, the CLI, and pinning at enrollment."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from edgefl.cli import app as cli_app
from edgefl.edge_agent.identity import install_bundle, prepare_enrollment
from edgefl.enrollment import EnrollmentBundle, IdentityPaths, read_request, write_json_document
from edgefl.errors import BadInputError, ConfigError, ExitCode
from edgefl.proto.desired import DesiredState
from edgefl.releasesign import ReleaseTrustError, TrustStore, key_id, parse_public_keys, sign
from edgefl.server.fleet_ca import FleetCA
from edgefl.server.release_keys import (
    create_release_key,
    current_signing_key,
    list_release_keys,
    release_key_dir,
    revoke_release_key,
    revoked_key_ids,
    rotate_release_key,
    trusted_public_keys,
)

NOW = 1_800_000_000


def _desired(issued_at: int = NOW, revoked: list[str] | None = None) -> DesiredState:
    return DesiredState(
        fleet="lab",
        device="pi-01",
        issued_at=issued_at,
        expires_at=issued_at + 86_400,
        model=None,
        revoked_keys=revoked or [],
    )


def test_create_writes_private_keys_0600_and_refuses_a_second(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert trusted_public_keys(ca_dir) == []
    assert revoked_key_ids(ca_dir) == []
    with pytest.raises(ConfigError, match="release-key --create"):
        current_signing_key(ca_dir)
    kid = create_release_key(ca_dir)
    folder = release_key_dir(ca_dir)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / f"{kid}.key").stat().st_mode) == 0o600
    assert (folder / "current").read_text().strip() == kid
    current, key = current_signing_key(ca_dir)
    assert current == kid == key_id(key.public_key())
    [pem] = trusted_public_keys(ca_dir)
    assert [key_id(k) for k in parse_public_keys(pem)] == [kid]
    with pytest.raises(ConfigError, match="--rotate"):
        create_release_key(ca_dir)


def test_rotate_keeps_the_old_key_trusted_until_it_is_revoked(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    with pytest.raises(ConfigError, match="release-key --create"):
        rotate_release_key(ca_dir)
    first = create_release_key(ca_dir)
    with pytest.raises(BadInputError, match="only one devices trust") as info:
        revoke_release_key(ca_dir, first)
    assert "--rotate" in info.value.hint
    second, old = rotate_release_key(ca_dir)
    assert old == first
    assert current_signing_key(ca_dir)[0] == second
    assert [k.key_id for k in list_release_keys(ca_dir)] == [second, first]  # current first
    assert len(trusted_public_keys(ca_dir)) == 2
    with pytest.raises(BadInputError, match="current release-signing key"):
        revoke_release_key(ca_dir, second)
    with pytest.raises(BadInputError, match="not a release-signing key"):
        revoke_release_key(ca_dir, "0123456789abcdef")
    revoke_release_key(ca_dir, first)
    revoke_release_key(ca_dir, first)  # idempotent
    assert revoked_key_ids(ca_dir) == [first]
    assert not (release_key_dir(ca_dir) / f"{first}.key").exists()  # it can never sign again
    [pem] = trusted_public_keys(ca_dir)
    assert key_id(parse_public_keys(pem)[0]) == second


def test_cli_release_key(tmp_path: Path) -> None:
    runner = CliRunner()
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"state_dir": str(tmp_path / "state")}))
    args = ["--config", str(config), "--json"]
    res = runner.invoke(cli_app, ["server", "release-key", *args])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["keys"] == []
    res = runner.invoke(cli_app, ["server", "release-key", "--create", *args])
    assert res.exit_code == 0, res.output
    created = json.loads(res.stdout)
    first = created["created"]
    assert created["current"] == first
    assert created["folder"] == str(tmp_path / "state" / "ca" / "release-signing")
    res = runner.invoke(cli_app, ["server", "release-key", "--revoke", first, *args])
    assert res.exit_code == ExitCode.BAD_INPUT
    assert "rotate" in res.output
    res = runner.invoke(cli_app, ["server", "release-key", "--rotate", "--config", str(config)])
    assert res.exit_code == 0, res.output
    assert f"--revoke {first}" in res.output
    res = runner.invoke(cli_app, ["server", "release-key", "--revoke", first, *args])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["revoked"] == first
    assert [(k["key_id"] == first, k["revoked"], k["current"]) for k in doc["keys"]] == [
        (False, False, True),
        (True, True, False),
    ]
    res = runner.invoke(cli_app, ["server", "release-key", "--create", "--rotate", *args])
    assert res.exit_code == ExitCode.BAD_INPUT


def test_the_installed_identity_pins_the_release_keys(tmp_path: Path) -> None:
    """A device admitted while the server has release keys trusts them with no config."""
    ca_dir = tmp_path / "server-ca"
    ca = FleetCA.create(ca_dir)
    old = create_release_key(ca_dir)
    new, _ = rotate_release_key(ca_dir)
    result = prepare_enrollment("pi-01", "lab", tmp_path / "state")
    req = read_request(result.request_path)
    issued = ca.issue_device_cert(req.device_id, csr=x509.load_pem_x509_csr(req.csr_pem.encode()))
    bundle = EnrollmentBundle(
        device_id="pi-01",
        fleet="lab",
        cert_pem=issued.cert_pem.decode(),
        ca_pem=ca.cert_pem.decode(),
        cert_serial=f"{issued.serial:x}",
        node_id="1",
        release_signing_keys=trusted_public_keys(ca_dir),
    )
    path = tmp_path / "bundle.json"
    write_json_document(path, bundle)
    install_bundle(path, "pi-01", "lab", tmp_path / "state")
    paths = IdentityPaths(tmp_path / "state")
    assert {key_id(k) for k in parse_public_keys(paths.release_signing_keys.read_text())} == {
        old,
        new,
    }
    trust = TrustStore.load(paths.directory)
    assert trust.trusted_ids == sorted([old, new])
    kid, key = current_signing_key(ca_dir)
    # The server revokes the old key; its next signed desired state tells the device.
    revoke_release_key(ca_dir, old)
    state = sign(_desired(revoked=revoked_key_ids(ca_dir)), key)
    assert trust.accept_desired(state, fleet="lab", device="pi-01") == kid
    assert TrustStore.load(paths.directory).trusted_ids == [new]
    # A bundle from a server with no release keys still validates (old bundles, old servers).
    legacy = json.loads(path.read_text())
    del legacy["release_signing_keys"]
    assert EnrollmentBundle.model_validate(legacy).release_signing_keys == []


def test_bundle_refuses_a_release_key_that_is_not_an_ed25519_pem(tmp_path: Path) -> None:
    ca = FleetCA.create(tmp_path / "ca")
    fields = {
        "device_id": "pi-01",
        "fleet": "lab",
        "cert_pem": "x",
        "ca_pem": ca.cert_pem.decode(),
        "cert_serial": "1",
        "node_id": "1",
    }
    with pytest.raises(ValueError, match="PEM public key"):
        EnrollmentBundle.model_validate({**fields, "release_signing_keys": ["ssh-ed25519 AAAA"]})
    ec_pem = (
        x509.load_pem_x509_certificate(ca.cert_pem)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ValueError, match="not an Ed25519"):
        EnrollmentBundle.model_validate({**fields, "release_signing_keys": [ec_pem]})


def test_a_trust_store_error_is_an_edgefl_error() -> None:
    assert issubclass(ReleaseTrustError, Exception)
    assert ReleaseTrustError("expired", "x").exit_code == ExitCode.ARTIFACT
