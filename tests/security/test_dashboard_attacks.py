"""Attacks on the web dashboard, from the attacker's position, against a live server.

The admin API (with the dashboard) serves over HTTPS on a free loopback port; the
attacker holds either a device's fleet-CA certificate and key, or only the public CA
certificate, or is a foreign web page whose form a signed-in operator's browser submits.
Each attack must read nothing and change nothing: no data in the answer, no audit entry,
no session.
"""

from __future__ import annotations

import re
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(_ROOT / "benchmarks"))

from admin_fleet import LiveAdminServer, Seeded, live_admin_server, seed_registry  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveAdminServer, Seeded]]:
    with live_admin_server(tmp_path_factory.mktemp("dashboard-attacks")) as server:
        yield server, seed_registry(server.engine, 4, rounds=2)


def _client(server: LiveAdminServer, **kwargs: object) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60, **kwargs)  # type: ignore[arg-type]


def _signed_in(server: LiveAdminServer, role: str) -> tuple[httpx.Client, str]:
    """A client with a dashboard session (token login through the form) and its CSRF token."""
    client = _client(server, verify=str(server.ca_file))
    form = client.get("/dashboard/login")
    nonce = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert nonce is not None
    signed = client.post(
        "/dashboard/login", data={"csrf_token": nonce.group(1), "token": server.tokens[role]}
    )
    assert signed.status_code == 303
    page = client.get("/dashboard/")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf is not None
    return client, csrf.group(1)


def _audit_count(server: LiveAdminServer) -> int:
    with server.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM audit_log")).scalar_one())


def test_a_device_certificate_gets_403_and_no_fleet_data(
    live: tuple[LiveAdminServer, Seeded],
) -> None:
    from edgefl.server.fleet_ca import FleetCA

    server, seeded = live
    issued = FleetCA.load(server.state_dir / "ca").issue_device_cert("attacker-dev")
    context = ssl.create_default_context(cafile=str(server.ca_file))
    assert issued.key_path is not None
    context.load_cert_chain(str(issued.cert_path), str(issued.key_path))
    with _client(server, verify=context) as client:
        for path in ("/dashboard/", f"/dashboard/devices/{seeded.devices[0]}", "/dashboard/audit"):
            answer = client.get(path)
            assert answer.status_code == 403
            assert seeded.devices[1] not in answer.text
        before = _audit_count(server)
        posted = client.post(
            f"/dashboard/devices/{seeded.devices[0]}/command", data={"name": "reboot"}
        )
        assert posted.status_code == 403
        assert _audit_count(server) == before


def test_without_credentials_every_page_sends_to_the_login_form(
    live: tuple[LiveAdminServer, Seeded],
) -> None:
    server, seeded = live
    with _client(server, verify=str(server.ca_file)) as client:
        for path in ("/dashboard/", f"/dashboard/runs/{seeded.run_id}", "/dashboard/releases"):
            answer = client.get(path)
            assert answer.status_code == 303
            assert answer.headers["location"].startswith("/dashboard/login?next=")
        before = _audit_count(server)
        posted = client.post(f"/dashboard/runs/{seeded.run_id}/stop", data={"csrf_token": "x"})
        assert posted.status_code == 401
        assert _audit_count(server) == before


def test_a_foreign_sites_form_is_refused_even_with_a_leaked_csrf_token(
    live: tuple[LiveAdminServer, Seeded],
) -> None:
    server, seeded = live
    client, csrf = _signed_in(server, "operator")
    try:
        before = _audit_count(server)
        answer = client.post(
            f"/dashboard/runs/{seeded.run_id}/stop",
            data={"csrf_token": csrf},
            headers={"Origin": "https://attacker.example"},
        )
        assert answer.status_code == 403
        assert _audit_count(server) == before
    finally:
        client.close()


def test_login_csrf_an_attackers_token_cannot_be_planted_in_a_victims_browser(
    live: tuple[LiveAdminServer, Seeded],
) -> None:
    """A foreign page posting the attacker's own token to the login form gets no session."""
    server, _ = live
    with _client(server, verify=str(server.ca_file)) as victim:
        answer = victim.post(
            "/dashboard/login",
            data={"csrf_token": "guessed", "token": server.tokens["viewer"]},
            headers={"Origin": "https://attacker.example"},
        )
        assert answer.status_code == 403
        assert "edgefl_session" not in victim.cookies
        # Without the login form's cookie the same post fails as well.
        answer = victim.post(
            "/dashboard/login", data={"csrf_token": "guessed", "token": server.tokens["viewer"]}
        )
        assert answer.status_code == 403
        assert "edgefl_session" not in victim.cookies


def test_the_login_form_redirects_only_inside_the_dashboard(
    live: tuple[LiveAdminServer, Seeded],
) -> None:
    server, _ = live
    for target in ("https://attacker.example/", "//attacker.example/x", "/dashboard//evil"):
        with _client(server, verify=str(server.ca_file)) as client:
            form = client.get("/dashboard/login", params={"next": target})
            nonce = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
            assert nonce is not None
            signed = client.post(
                "/dashboard/login",
                params={"next": target},
                data={"csrf_token": nonce.group(1), "token": server.tokens["viewer"]},
            )
            assert signed.status_code == 303
            assert signed.headers["location"] == "/dashboard/"


def test_pages_cannot_be_framed_or_run_foreign_scripts(
    live: tuple[LiveAdminServer, Seeded],
) -> None:
    server, seeded = live
    client, _ = _signed_in(server, "viewer")
    try:
        page = client.get(f"/dashboard/devices/{seeded.devices[0]}")
        assert page.status_code == 200
        assert page.headers["x-frame-options"] == "DENY"
        policy = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy
        assert "script-src 'self'" in policy
        assert page.headers["cache-control"] == "no-store"
    finally:
        client.close()
