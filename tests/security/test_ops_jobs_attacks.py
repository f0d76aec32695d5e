"""Attacks on the background-job operations (``release``, ``rollout``, ``job``).

The attacker holds a device's fleet-CA certificate and key, no credential at all, or a
viewer's token; none may start a release or rollout, and a job id alone reads nothing
without a credential. Real uvicorn over real TLS, SQLite.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edgefl.server.jobs import JOBS
from edgefl.server.registry.models import AuditEntry
from tests.admin_api_helpers import AdminApi, Identity, start_admin_api, stop_admin_api

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminApi]:
    running = start_admin_api(tmp_path_factory.mktemp("jobs-attacks"))
    try:
        yield running
    finally:
        stop_admin_api(running)


def _jobs() -> int:
    return len(JOBS.list())


def test_a_device_certificate_cannot_start_or_read_jobs(api: AdminApi) -> None:
    device = api.fleet_ca.issue_device_cert("pi-07")
    assert device.key_path is not None
    stolen = Identity(device.cert_path, device.key_path)
    before = (_jobs(), api.count(AuditEntry))
    with api.client(stolen) as client:
        for name, args in (
            ("release", {"run": "r1"}),
            ("rollout", {"model": "m", "version": 1}),
            ("job", {"id": "j-000000000000"}),
        ):
            res = client.post(f"/api/v1/ops/{name}", json=args)
            assert res.status_code == 403, res.text
            assert "not issued by the admin CA" in res.json()["error"]["message"]
    assert (_jobs(), api.count(AuditEntry)) == before


def test_no_credential_and_a_viewer_cannot_start_jobs(api: AdminApi) -> None:
    before = _jobs()
    with api.client() as client:
        for name, args in (("release", {"run": "r1"}), ("rollout", {"model": "m", "version": 1})):
            assert client.post(f"/api/v1/ops/{name}", json=args).status_code == 401
            res = client.post(f"/api/v1/ops/{name}", json=args, headers=api.bearer("viewer"))
            assert res.status_code == 403, res.text
            last = api.audit_rows()[-1]
            assert (last.action, last.outcome, last.role) == (name, "denied", "viewer")
        assert client.post("/api/v1/ops/job", json={"id": "j-0"}).status_code == 401
    assert _jobs() == before
