"""Attacks on the admin API's authentication and roles (real uvicorn, real TLS, SQLite).

The attacker holds a device's fleet-CA certificate and key, or a certificate of a CA of
their own (even one named like the admin CA), or an expired, revoked or unknown admin
credential, or a viewer's; none of it may act, each refusal says why, and nothing
changes in the registry.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from edgefl.server import admin_tokens
from edgefl.server.admin_ca import AdminCA, revoke_admin_certs
from edgefl.server.audit import REDACTED
from edgefl.server.fleet_ca import FleetCA
from edgefl.server.registry import session_factory
from edgefl.server.registry.models import AdminCert, AdminToken, AuditEntry
from tests.admin_api_helpers import (
    AdminApi,
    Identity,
    sign_client_cert,
    start_admin_api,
    stop_admin_api,
    write_identity,
)

pytestmark = pytest.mark.slow

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminApi]:
    running = start_admin_api(tmp_path_factory.mktemp("admin-auth"))
    try:
        yield running
    finally:
        stop_admin_api(running)


def _refused(res: httpx.Response, status: int, words: str) -> None:
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert error["status"] == status
    assert words in error["message"]


def _state(api: AdminApi) -> tuple[int, int, int]:
    return api.count(AdminToken), api.count(AdminCert), api.count(AuditEntry)


def test_no_credential_is_401(api: AdminApi) -> None:
    with api.client() as client:
        _refused(client.get("/api/v1/devices"), 401, "no credentials")
        _refused(client.post("/api/v1/ops/devices", json={}), 401, "no credentials")
        _refused(
            client.get("/api/v1/devices", headers={"Authorization": "Basic YWRtaW46YWRtaW4="}),
            401,
            "Bearer",
        )


def test_a_device_certificate_of_the_fleet_ca_is_refused(api: AdminApi) -> None:
    device = api.fleet_ca.issue_device_cert("pi-07")
    assert device.key_path is not None
    stolen = Identity(device.cert_path, device.key_path)
    before = _state(api)
    with api.client(stolen) as client:
        _refused(client.get("/api/v1/devices"), 403, "not issued by the admin CA")
        _refused(
            client.post("/api/v1/ops/admin-token", json={"name": "x", "role": "admin"}),
            403,
            "not issued by the admin CA",
        )
        # A certificate that is no admin certificate is refused even beside a valid token.
        _refused(
            client.get("/api/v1/devices", headers=api.bearer("admin")),
            403,
            "not issued by the admin CA",
        )
    assert _state(api) == before


def test_a_fleet_certificate_claiming_an_admin_role_is_refused(
    api: AdminApi, tmp_path: Path
) -> None:
    # Whoever holds the fleet CA's key (or got it to sign CN=admin-person, OU=admin)
    # still holds no admin certificate.
    _, cert_pem, key_pem = sign_client_cert(
        api.fleet_ca.cert,
        api.fleet_ca._key,
        cn="admin-person",
        ou="admin",
        not_before=NOW - dt.timedelta(hours=1),
        not_after=NOW + dt.timedelta(days=1),
    )
    forged = write_identity(tmp_path / "forged", cert_pem, key_pem)
    with api.client(forged) as client:
        _refused(client.get("/api/v1/whoami"), 403, "not issued by the admin CA")


@pytest.mark.parametrize("same_name", [False, True], ids=["other-ca", "lookalike-admin-ca"])
def test_a_certificate_of_another_ca_fails_the_handshake(
    api: AdminApi, tmp_path: Path, same_name: bool
) -> None:
    name = "edgefl admin CA" if same_name else "mallory CA"
    other = AdminCA.create(tmp_path / "other", common_name=name)
    assert isinstance(other, AdminCA)
    issued = other.issue_admin_cert("admin-person", "admin")
    identity = write_identity(tmp_path / "mallory", issued.cert_pem, issued.key_pem)
    before = _state(api)
    with api.client(identity) as client, pytest.raises(httpx.TransportError):
        client.post("/api/v1/ops/admin-token", json={"name": "m", "role": "admin"})
    assert _state(api) == before


def test_an_expired_admin_certificate_is_401_and_says_so(api: AdminApi, tmp_path: Path) -> None:
    cert, cert_pem, key_pem = sign_client_cert(
        api.admin_ca.cert,
        api.admin_ca._key,
        cn="old-admin",
        ou="admin",
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW - dt.timedelta(days=1),
    )
    with session_factory(api.engine)() as session, session.begin():
        session.add(
            AdminCert(
                serial=f"{cert.serial_number:x}",
                name="old-admin",
                role="admin",
                issued_at=NOW - dt.timedelta(days=30),
                expires_at=NOW - dt.timedelta(days=1),
                revoked_at=None,
            )
        )
    expired = write_identity(tmp_path / "old", cert_pem, key_pem)
    with api.client(expired) as client:
        _refused(client.get("/api/v1/devices"), 401, "expired")


def test_an_admin_certificate_unknown_to_the_registry_is_refused(
    api: AdminApi, tmp_path: Path
) -> None:
    issued = api.admin_ca.issue_admin_cert("unrecorded", "admin")  # never recorded
    identity = write_identity(tmp_path / "unrecorded", issued.cert_pem, issued.key_pem)
    with api.client(identity) as client:
        _refused(client.get("/api/v1/devices"), 403, "unknown to this server")


def test_a_revoked_admin_certificate_is_401_at_once(api: AdminApi) -> None:
    dave = api.issue_admin("dave", "admin")
    with api.client(dave) as client:
        assert client.get("/api/v1/devices").status_code == 200
        revoke_admin_certs(api.engine, api.admin_ca, name="dave")
        _refused(client.get("/api/v1/devices"), 401, "revoked")
    with api.client(dave) as client:  # a new connection too
        _refused(client.get("/api/v1/whoami"), 401, "revoked")
    assert api.admin_ca.revoked_serials  # and in the admin CA's CRL


def test_expired_revoked_and_forged_tokens_are_401(api: AdminApi) -> None:
    expired = admin_tokens.create(api.engine, "old", "admin", expires_in=dt.timedelta(hours=1))
    with session_factory(api.engine)() as session, session.begin():
        session.execute(
            update(AdminToken)
            .where(AdminToken.id == expired.id)
            .values(expires_at=NOW - dt.timedelta(seconds=1))
        )
    revoked = admin_tokens.create(api.engine, "gone", "admin", expires_in=dt.timedelta(hours=1))
    admin_tokens.revoke(api.engine, revoked.id)
    good = api.tokens["admin"]
    token_id = good.split("_")[1]
    forged = f"efl_{token_id}_{'A' * 43}"  # a real id, a guessed secret
    before = _state(api)
    with api.client() as client:
        for token, words in (
            (expired.token, "expired"),
            (revoked.token, "revoked"),
            (forged, "unknown token"),
            ("efl_000000000000_" + "B" * 43, "unknown token"),
            ("not-a-token", "malformed"),
        ):
            res = client.post(
                "/api/v1/ops/admin-token",
                json={"name": "x", "role": "admin"},
                headers={"Authorization": f"Bearer {token}"},
            )
            _refused(res, 401, words)
    assert _state(api) == before


def test_a_viewer_calling_an_operator_op_is_403_and_audited_denied(api: AdminApi) -> None:
    before = len(api.audit_rows())
    with api.client() as client:
        res = client.post(
            "/api/v1/ops/command",
            json={"device": "pi-01", "name": "status"},
            headers=api.bearer("viewer"),
        )
        _refused(res, 403, "needs the operator role")
    with api.client(api.certs["operator"]) as client:
        res = client.post("/api/v1/ops/admin-token", json={"name": "x", "role": "admin"})
        _refused(res, 403, "needs the admin role")
    rows = api.audit_rows()[before:]
    assert [(r.action, r.actor, r.role, r.outcome) for r in rows] == [
        ("command", "token:viewer-bot", "viewer", "denied"),
        ("admin-token", "operator-person", "operator", "denied"),
    ]
    with api.client() as client:
        listed = client.post("/api/v1/ops/admin-tokens", json={}, headers=api.bearer("admin"))
    assert "x" not in {t["name"] for t in listed.json()["result"]["tokens"]}


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"admin"', b"\xff\xfe", b'{"name": "x", "role": "admin"'],
    ids=["garbage", "array", "string", "not-utf8", "truncated"],
)
def test_malformed_json_is_400_and_changes_nothing(api: AdminApi, body: bytes) -> None:
    before = _state(api)
    with api.client() as client:
        res = client.post(
            "/api/v1/ops/admin-token",
            content=body,
            headers={**api.bearer("admin"), "Content-Type": "application/json"},
        )
    assert res.status_code == 400, res.text
    message = res.json()["error"]["message"]
    assert "JSON" in message
    assert _state(api) == before


def test_token_secrets_never_reach_the_audit_log(api: AdminApi) -> None:
    with api.client() as client:
        made = client.post(
            "/api/v1/ops/admin-token",
            json={"name": "auditor", "role": "viewer", "expires": "1h"},
            headers=api.bearer("admin"),
        )
        assert made.status_code == 200, made.text
        new_token = made.json()["result"]["token"]
        # A token among the arguments: refused (unknown key) and never written down.
        client.post(
            "/api/v1/ops/admin-token",
            json={"name": "y", "role": "viewer", "token": new_token},
            headers=api.bearer("admin"),
        )
    secrets = [t.split("_", 2)[2] for t in (*api.tokens.values(), new_token)]
    rows = api.audit_rows()
    assert any(r.action == "admin-token" and r.outcome == "ok" for r in rows)
    for row in rows:
        text = row.arguments_json + row.detail + row.target
        assert not any(secret in text for secret in secrets), text
    with session_factory(api.engine)() as session:
        hashes = [t.secret_hash for t in session.query(AdminToken)]
    assert not any(secret in h for secret in secrets for h in hashes)
    assert REDACTED == "***"


def test_a_foreign_fleet_ca_device_cannot_reach_even_the_handshake(
    api: AdminApi, tmp_path: Path
) -> None:
    other_fleet = FleetCA.create(tmp_path / "fleet2")
    device = other_fleet.issue_device_cert("pi-99")
    assert device.key_path is not None
    with (
        api.client(Identity(device.cert_path, device.key_path)) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.get("/api/v1/devices")


def test_an_oversized_body_is_413_and_changes_nothing(api: AdminApi) -> None:
    before = _state(api)
    padding = "x" * (1024 * 1024 + 1)
    with api.client() as client:
        res = client.post(
            "/api/v1/ops/admin-token",
            content=f'{{"name": "big", "role": "admin", "pad": "{padding}"}}',
            headers={**api.bearer("admin"), "Content-Type": "application/json"},
        )
        _refused(res, 413, "over")
        login = client.post(
            "/api/v1/session",
            content=f"token={padding}",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        _refused(login, 413, "form over")
    assert _state(api) == before
