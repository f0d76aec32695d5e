"""The web dashboard in a real headless Chromium against a live admin API over HTTPS.

One server for the module: the real admin API app on uvicorn over HTTPS on a free port,
a SQLite registry seeded with 12 devices, a finished 5-round run with its privacy ledger,
a release, a rollout and audit entries (``benchmarks/admin_fleet.py``). One Debian
``chromium`` for the module, driven by playwright (``executable_path``: no browser is
downloaded). Each page is loaded after a token login, its content compared with what was
written to the registry, and a screenshot saved under ``test-artifacts/dashboard/`` (or
``$EDGEFL_TEST_ARTIFACTS/dashboard``).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(_ROOT / "benchmarks"))

from admin_fleet import LiveAdminServer, Seeded, live_admin_server, seed_registry  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("EDGEFL_TEST_ARTIFACTS", _ROOT / "test-artifacts")) / "dashboard"
DEVICES = 12
TIMEOUT_MS = 60_000  # the first run page imports the privacy accountant (seconds)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveAdminServer, Seeded]]:
    # The run page's privacy figures import the accountant (seconds on a busy machine):
    # import it while the browser starts and signs in, as a server that ran a while has.
    threading.Thread(
        target=importlib.import_module, args=("opacus.accountants.analysis.rdp",), daemon=True
    ).start()
    with live_admin_server(tmp_path_factory.mktemp("dashboard-server")) as server:
        seeded = seed_registry(server.engine, DEVICES, rounds=5)
        yield server, seeded


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield chromium
        chromium.close()


def _login(browser: Any, server: LiveAdminServer, role: str) -> Any:
    """A fresh browser context signed in with ``role``'s token through the login form."""
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    response = page.goto(f"{server.url}/dashboard/")
    assert response is not None
    assert response.ok
    assert "/dashboard/login" in page.url  # not signed in: sent to the login form
    page.fill("input[name=token]", server.tokens[role])
    page.click("#login button[type=submit]")
    page.wait_for_url(f"{server.url}/dashboard/")
    assert page.inner_text("#who") == f"token:{role}-1 ({role})"
    return page


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def operator_page(browser: Any, live: tuple[LiveAdminServer, Seeded]) -> Iterator[Any]:
    page = _login(browser, live[0], "operator")
    yield page
    page.context.close()


@pytest.fixture(scope="module")
def viewer_page(browser: Any, live: tuple[LiveAdminServer, Seeded]) -> Iterator[Any]:
    page = _login(browser, live[0], "viewer")
    yield page
    page.context.close()


def _audit_rows(server: LiveAdminServer, action: str) -> list[tuple[str, str, str]]:
    with server.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT actor, outcome, target FROM audit_log WHERE action = :a ORDER BY id"),
            {"a": action},
        ).all()
    return [(str(a), str(o), str(t)) for a, o, t in rows]


def test_the_session_cookie_is_secure_httponly_and_samesite_strict(
    operator_page: Any, live: tuple[LiveAdminServer, Seeded]
) -> None:
    cookies = {c["name"]: c for c in operator_page.context.cookies()}
    session = cookies["edgefl_session"]
    assert session["secure"]
    assert session["httpOnly"]
    assert session["sameSite"] == "Strict"
    assert session["value"] not in live[0].tokens.values()  # a session id, never the token


def test_fleet_page_shows_every_device_as_the_registry_has_it(
    operator_page: Any, live: tuple[LiveAdminServer, Seeded]
) -> None:
    server, seeded = live
    page = operator_page
    page.goto(f"{server.url}/dashboard/")
    rows = page.locator("#fleet tbody tr")
    assert rows.count() == DEVICES
    for device in seeded.devices:
        cells = page.locator(f'#fleet tr[data-device="{device}"] td').all_inner_texts()
        assert cells[0] == device
        assert cells[2] == ("online" if device in seeded.online else "offline")
        assert cells[4] == str(seeded.backlog[device])
        assert cells[5].startswith("digits-mlp v")
        assert cells[7] != "—"  # ε spent, from the ledger
    assert page.inner_text("#online-count") == str(len(seeded.online))
    _shot(page, "fleet")


def test_device_page_shows_status_telemetry_results_and_a_command_form(
    operator_page: Any, live: tuple[LiveAdminServer, Seeded]
) -> None:
    server, seeded = live
    device = seeded.devices[1]
    page = operator_page
    page.goto(f"{server.url}/dashboard/devices/{device}")
    assert page.inner_text("#device-id") == device
    status = page.inner_text("#status")
    assert "online" in status
    assert "digits-mlp v2 (int8)" in status
    assert f"Outbox backlog\n{seeded.backlog[device]}" in status
    assert page.locator("#telemetry tbody tr").count() == 3
    assert page.locator("#results tbody tr").count() == 3
    assert '"temp_c"' in page.inner_text("#telemetry")
    assert "telemetry/inference" in page.inner_text("#telemetry")
    assert "telemetry/inference" in page.inner_text("#telemetry")
    assert page.locator("#command-form").count() == 1  # an operator may send one
    _shot(page, "device")
    response = page.goto(f"{server.url}/dashboard/devices/no-such-device")
    assert response is not None
    assert response.status == 404
    assert "no-such-device" in page.inner_text("#error-message")


def test_run_page_plots_accuracy_and_each_devices_epsilon(
    operator_page: Any, live: tuple[LiveAdminServer, Seeded]
) -> None:
    server, seeded = live
    page = operator_page
    page.goto(f"{server.url}/dashboard/runs")
    assert page.locator(f'#runs tr[data-run="{seeded.run_id}"]').count() == 1
    page.click(f'#runs a:text("{seeded.run_id}")')
    page.wait_for_url(f"**/dashboard/runs/{seeded.run_id}")
    assert page.inner_text("#run-status") == "completed"
    assert page.inner_text("#final-accuracy") == f"{seeded.accuracy[-1]:.4g}"
    accuracy = page.locator("#accuracy-chart svg")
    assert accuracy.get_attribute("data-series") == "1"
    assert accuracy.get_attribute("data-points") == str(seeded.rounds)
    epsilon = page.locator("#epsilon-chart svg")
    assert epsilon.get_attribute("data-series") == str(DEVICES)
    assert epsilon.get_attribute("data-points") == str(DEVICES * seeded.rounds)
    assert epsilon.locator("polyline").count() == DEVICES
    # Each dot's tooltip carries the ledger's value.
    first = seeded.devices[0]
    titles = epsilon.locator("circle title").all_text_contents()
    assert f"{first}: 5, {seeded.epsilon[first][-1]:.4g}" in titles
    rounds = page.locator("#rounds tbody tr")
    assert rounds.count() == seeded.rounds
    assert rounds.nth(0).locator("td").nth(1).inner_text() == f"{seeded.accuracy[0]:.4g}"
    assert page.locator("#run-devices tbody tr").count() == DEVICES
    assert page.locator("meta[name=edgefl-refresh]").count() == 0  # finished: no refresh
    _shot(page, "run")


def test_releases_and_rollout_pages_show_each_devices_state(
    operator_page: Any, live: tuple[LiveAdminServer, Seeded]
) -> None:
    server, seeded = live
    page = operator_page
    page.goto(f"{server.url}/dashboard/releases")
    model, version = seeded.release
    release = page.locator(f'#releases tr[data-release="{model}@{version}"]')
    assert release.count() == 1
    assert "published" in release.inner_text()
    rollout = page.locator(f'#rollouts tr[data-rollout="{seeded.rollout_id}"]')
    installed = sum(1 for s in seeded.rollout_states.values() if s == "installed")
    assert f"installed: {installed}" in rollout.inner_text()
    _shot(page, "releases")
    rollout.locator("a").click()
    page.wait_for_url(f"**/dashboard/rollouts/{seeded.rollout_id}")
    assert page.inner_text("#rollout-state") == "completed"
    for device, state in seeded.rollout_states.items():
        cells = page.locator(f'#rollout-devices tr[data-device="{device}"] td').all_inner_texts()
        assert cells[2] == state
        assert cells[4] == "digits-mlp v1"
    _shot(page, "rollout")


def test_audit_page_lists_the_registrys_entries(
    operator_page: Any, live: tuple[LiveAdminServer, Seeded]
) -> None:
    server, seeded = live
    page = operator_page
    page.goto(f"{server.url}/dashboard/audit")
    actions = page.locator("#audit tbody tr td:nth-child(6)").all_inner_texts()
    for action in seeded.audit_actions:
        assert action in actions
    _shot(page, "audit")


def test_a_running_run_refreshes_its_page(
    operator_page: Any, live: tuple[LiveAdminServer, Seeded]
) -> None:
    server, seeded = live
    page = operator_page
    with server.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE fl_runs SET status = 'running' WHERE run_id = :r"), {"r": seeded.run_id}
        )
    try:
        page.goto(f"{server.url}/dashboard/runs/{seeded.run_id}")
        assert page.locator("meta[name=edgefl-refresh]").get_attribute("content") == "5"
        assert page.locator("#stop-form").count() == 1
        with page.expect_event("load", timeout=15_000):  # the script reloads the page
            pass
    finally:
        with server.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE fl_runs SET status = 'completed' WHERE run_id = :r"),
                {"r": seeded.run_id},
            )


def _post(page: Any, path: str, fields: dict[str, str]) -> dict[str, Any]:
    """Submit a form the page builds (a real browser form POST, with the page's cookies)."""
    with page.expect_navigation() as navigation:
        page.evaluate(
            """([path, fields]) => {
                const form = document.createElement("form");
                form.method = "post";
                form.action = path;
                for (const [name, value] of Object.entries(fields)) {
                    const input = document.createElement("input");
                    input.type = "hidden";
                    input.name = name;
                    input.value = value;
                    form.appendChild(input);
                }
                document.body.appendChild(form);
                form.submit();
            }""",
            [path, fields],
        )
    return {"status": navigation.value.status, "text": page.content()}


def _csrf(page: Any) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.content())
    assert match is not None
    return match.group(1)


def test_a_viewer_cannot_reach_the_forms_that_act(
    viewer_page: Any, live: tuple[LiveAdminServer, Seeded]
) -> None:
    server, seeded = live
    page = viewer_page
    device = seeded.devices[0]
    page.goto(f"{server.url}/dashboard/devices/{device}")
    assert page.locator("#command-form").count() == 0  # not offered
    csrf = _csrf(page)  # the logout form's: a valid token for this session
    before = _audit_rows(server, "command")
    sent = _post(page, f"/dashboard/devices/{device}/command", {"csrf_token": csrf, "name": "ping"})
    assert sent["status"] == 403
    assert "needs the operator role" in sent["text"]
    stop = _post(page, f"/dashboard/runs/{seeded.run_id}/stop", {"csrf_token": csrf})
    assert stop["status"] == 403
    # The API's own endpoint refuses the same session just as well.
    api = page.request.post(
        f"{server.url}/api/v1/ops/command",
        data={"device": device, "name": "ping"},
        headers={"X-CSRF-Token": csrf},
    )
    assert api.status == 403
    after = _audit_rows(server, "command")
    assert [r for r in after if r not in before] == [
        ("token:viewer-1", "denied", ""),
        ("token:viewer-1", "denied", ""),
    ]
    _shot(page, "viewer-device")


def test_a_form_post_without_its_csrf_token_is_refused_and_does_nothing(
    operator_page: Any, live: tuple[LiveAdminServer, Seeded]
) -> None:
    server, seeded = live
    page = operator_page
    page.goto(f"{server.url}/dashboard/runs/{seeded.run_id}")
    before = _audit_rows(server, "stop") + _audit_rows(server, "command")
    for fields in ({}, {"csrf_token": "forged"}):
        sent = _post(page, f"/dashboard/runs/{seeded.run_id}/stop", fields)
        assert sent["status"] == 403
        assert "CSRF" in sent["text"]
        sent = _post(
            page, f"/dashboard/devices/{seeded.devices[0]}/command", {**fields, "name": "ping"}
        )
        assert sent["status"] == 403
    assert _audit_rows(server, "stop") + _audit_rows(server, "command") == before
    # With its token the same form reaches the operation: this run is finished, so the
    # stop is refused by the operation itself (409), and audited.
    page.goto(f"{server.url}/dashboard/runs/{seeded.run_id}")
    sent = _post(page, f"/dashboard/runs/{seeded.run_id}/stop", {"csrf_token": _csrf(page)})
    assert sent["status"] == 409
    assert "not running" in sent["text"]
    assert _audit_rows(server, "stop")[-1] == ("token:operator-1", "error", seeded.run_id)


def test_signing_out_ends_the_session(browser: Any, live: tuple[LiveAdminServer, Seeded]) -> None:
    server, _ = live
    page = _login(browser, server, "viewer")
    try:
        page.click("header form button[type=submit]")
        page.wait_for_url("**/dashboard/login")
        page.goto(f"{server.url}/dashboard/audit")
        assert "/dashboard/login" in page.url
    finally:
        page.context.close()


def test_a_wrong_token_is_refused_at_the_login_form(
    browser: Any, live: tuple[LiveAdminServer, Seeded]
) -> None:
    server, _ = live
    context = browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        page.goto(f"{server.url}/dashboard/login")
        page.fill("input[name=token]", "efl_0000000000000000_notavalidsecret")
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            page.click("#login button[type=submit]")
        assert answer.value.status == 401
        assert "sign-in refused" in page.inner_text("#flash")
        assert "edgefl_session" not in {c["name"] for c in context.cookies()}
    finally:
        context.close()


def test_an_admin_certificate_signs_in_without_a_form(live: tuple[LiveAdminServer, Seeded]) -> None:
    """A browser holding an admin certificate: pages open, forms need the page's token."""
    import ssl

    import httpx

    server, seeded = live
    cert, key = server.client_cert("carol", "operator")
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.load_cert_chain(str(cert), str(key))
    with httpx.Client(base_url=server.url, verify=context, timeout=60) as client:
        page = client.get("/dashboard/audit")
        assert page.status_code == 200
        assert "carol (operator)" in page.text
        assert "edgefl_session" not in client.cookies  # no session: the certificate suffices
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/dashboard/").text)
        assert token is None  # no logout form; the run page's stop form carries one
        forged = client.post(f"/dashboard/runs/{seeded.run_id}/stop", data={"csrf_token": "x"})
        assert forged.status_code == 403
        with server.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE fl_runs SET status = 'running' WHERE run_id = :r"),
                {"r": seeded.run_id},
            )
        try:
            run_page = client.get(f"/dashboard/runs/{seeded.run_id}").text
        finally:
            with server.engine.begin() as conn:
                conn.execute(
                    sa.text("UPDATE fl_runs SET status = 'completed' WHERE run_id = :r"),
                    {"r": seeded.run_id},
                )
        found = re.search(r'name="csrf_token" value="([^"]+)"', run_page)
        assert found is not None
        # The token is the certificate's: the run has finished meanwhile, so the
        # operation itself answers (409) and the audit log names the certificate.
        sent = client.post(
            f"/dashboard/runs/{seeded.run_id}/stop", data={"csrf_token": found.group(1)}
        )
        assert sent.status_code == 409
    assert _audit_rows(server, "stop")[-1] == ("carol", "error", seeded.run_id)
