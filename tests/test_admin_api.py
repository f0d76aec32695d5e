"""The admin API served by real uvicorn over HTTPS, on a real SQLite registry.

Operations run through ``POST /api/v1/ops/{name}`` and the remote client
(:func:`edgefl.server.admin_client.invoke_remote`, ``run_op`` with ``--server``), with an
API token and with an admin client certificate; the CLI's access commands run remotely
through typer with a client config file that ``admin-cert`` wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefl.cli import app as cli_app
from edgefl.server.admin_api.sessions import CSRF_HEADER, SESSION_COOKIE
from edgefl.server.admin_client import UnauthenticatedError, invoke_remote
from edgefl.server.cli_ops import RemoteOptions, read_client_config, run_op
from edgefl.server.ops import ForbiddenError, InvalidError, NotFoundError
from edgefl.server.registry.models import AdminToken
from tests.admin_api_helpers import AdminApi, add_devices, start_admin_api, stop_admin_api

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminApi]:
    running = start_admin_api(tmp_path_factory.mktemp("admin-api"))
    add_devices(running.engine, "pi-01", "pi-02", "pi-03")
    try:
        yield running
    finally:
        stop_admin_api(running)


def test_health_needs_no_credential_and_says_nothing_else(api: AdminApi) -> None:
    with api.client() as client:
        res = client.get("/api/v1/health")
    assert res.status_code == 200
    assert res.json() == {"result": {"status": "ok"}}


def test_devices_over_https_with_a_token_and_a_certificate(api: AdminApi) -> None:
    with api.client() as client:
        by_token = client.get("/api/v1/devices", headers=api.bearer("viewer"))
    with api.client(api.certs["viewer"]) as client:
        by_cert = client.post("/api/v1/ops/devices", json={})
        who = client.get("/api/v1/whoami").json()["result"]
    assert by_token.status_code == 200, by_token.text
    assert by_cert.status_code == 200, by_cert.text
    ids = [d["device_id"] for d in by_token.json()["result"]["devices"]]
    assert ids == ["pi-01", "pi-02", "pi-03"]
    assert by_cert.json()["result"] == by_token.json()["result"]
    assert who == {"name": "viewer-person", "role": "viewer", "via": "api"}


def test_remote_run_op_returns_what_the_local_one_does(api: AdminApi) -> None:
    remote = RemoteOptions(api.url, ca=api.ca_file, token=api.tokens["viewer"])
    assert remote.remote
    got = run_op("devices", {"fleet": "default"}, config=None, remote=remote)
    # The same operation run locally on the server's registry.
    from edgefl.server.audit import Principal
    from edgefl.server.ops import OpContext, invoke

    with OpContext(Principal.local(), config=api.config, engine=api.engine) as ctx:
        local = invoke("devices", {"fleet": "default"}, ctx)
    assert [d["device_id"] for d in got["devices"]] == ["pi-01", "pi-02", "pi-03"]
    assert json.loads(json.dumps(local)) == got


def test_remote_errors_come_back_as_the_matching_op_errors(api: AdminApi) -> None:
    viewer = RemoteOptions(api.url, ca=api.ca_file, token=api.tokens["viewer"])
    with pytest.raises(NotFoundError, match="unknown operation"):
        invoke_remote("no-such-op", {}, viewer)
    with pytest.raises(InvalidError, match="bogus"):
        invoke_remote("devices", {"bogus": 1}, viewer)
    with pytest.raises(ForbiddenError, match="needs the admin role") as forbidden:
        invoke_remote("admin-token", {"name": "x", "role": "admin"}, viewer)
    assert forbidden.value.hint
    with pytest.raises(UnauthenticatedError, match="token refused"):
        invoke_remote("devices", {}, RemoteOptions(api.url, ca=api.ca_file, token="efl_x_y"))


def test_children_and_ops_listing(api: AdminApi) -> None:
    with api.client() as client:
        children = client.get("/api/v1/children", headers=api.bearer("viewer"))
        ops = client.get("/api/v1/ops", headers=api.bearer("operator"))
    assert children.status_code == 200
    assert children.json() == {"result": []}  # no supervisor in this server
    listed = {op["name"]: op for op in ops.json()["result"]}
    assert listed["devices"]["allowed"] is True
    assert listed["admin-token"]["allowed"] is False
    assert listed["admin-token"]["mutating"] is True


def test_cli_access_commands_run_remotely_with_the_client_config_they_wrote(
    api: AdminApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEFL_SERVER", raising=False)
    monkeypatch.setenv("EDGEFL_ADMIN_TOKEN", api.tokens["admin"])
    runner = CliRunner()
    folder = tmp_path / "carol"
    res = runner.invoke(
        cli_app,
        [
            "server", "admin-cert", "carol", "--role", "admin", "--out", str(folder),
            "--server", api.url, "--admin-ca", str(api.ca_file), "--json",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    issued = json.loads(res.stdout)
    assert issued["role"] == "admin"
    assert (folder / "key.pem").stat().st_mode & 0o077 == 0
    settings = read_client_config(folder / "admin.yaml")
    assert settings["server"] == api.url
    assert settings["ca_file"] == folder / "ca.pem"
    # carol's certificate alone (no token): the client config is all it takes.
    monkeypatch.delenv("EDGEFL_ADMIN_TOKEN")
    res = runner.invoke(
        cli_app,
        ["server", "admin-certs", "--client-config", str(folder / "admin.yaml"), "--json"],
    )
    assert res.exit_code == 0, res.output
    names = {c["name"]: c for c in json.loads(res.stdout)["certs"]}
    assert names["carol"]["state"] == "active"
    assert names["carol"]["serial"] == issued["serial"]
    res = runner.invoke(
        cli_app,
        [
            "server", "admin-token", "ci", "--role", "viewer", "--expires", "2h",
            "--client-config", str(folder / "admin.yaml"),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    token = res.stdout.strip()
    assert token.startswith("efl_")
    assert run_op("devices", {}, config=None, remote=RemoteOptions(
        api.url, ca=api.ca_file, token=token
    ))["devices"]  # fmt: skip
    # The audit log names carol (her certificate's CN), and never holds the token.
    rows = [r for r in api.audit_rows() if r.action == "admin-token" and r.actor == "carol"]
    assert len(rows) == 1
    assert rows[0].outcome == "ok"
    assert rows[0].via == "api"
    secret = token.split("_", 2)[2]
    assert all(secret not in r.arguments_json + r.detail for r in api.audit_rows())


def test_a_session_needs_its_csrf_token_on_every_post(api: AdminApi) -> None:
    with api.client() as client:
        login = client.post("/api/v1/session", json={"token": api.tokens["viewer"]})
        assert login.status_code == 200, login.text
        cookie = login.headers["set-cookie"]
        for attribute in ("Secure", "HttpOnly", "SameSite=strict", "Path=/"):
            assert attribute.lower() in cookie.lower()
        csrf = login.json()["result"]["csrf_token"]
        assert client.cookies.get(SESSION_COOKIE)
        assert client.get("/api/v1/whoami").json()["result"]["name"] == "token:viewer-bot"
        no_csrf = client.post("/api/v1/ops/devices", json={})
        assert no_csrf.status_code == 403
        assert "CSRF" in no_csrf.json()["error"]["message"]
        wrong = client.post("/api/v1/ops/devices", json={}, headers={CSRF_HEADER: "x" * 43})
        assert wrong.status_code == 403
        form = client.post(
            "/api/v1/logout",
            content=f"csrf_token={csrf}",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert form.status_code == 200, form.text
        assert client.get("/api/v1/whoami").status_code == 401


def test_a_session_ends_when_its_token_is_revoked(api: AdminApi) -> None:
    from edgefl.server import admin_tokens

    issued = admin_tokens.create(api.engine, "short", "viewer", expires_in=timedelta(hours=1))
    with api.client() as client:
        assert client.post("/api/v1/session", json={"token": issued.token}).status_code == 200
        assert client.get("/api/v1/whoami").status_code == 200
        admin_tokens.revoke(api.engine, issued.id)
        res = client.get("/api/v1/whoami")
    assert res.status_code == 401
    assert "revoked" in res.json()["error"]["message"]
    assert api.count(AdminToken) >= 4


def test_server_start_serves_the_admin_api_and_its_children(tmp_path: Path) -> None:
    from edgefl.server import admin_tokens
    from edgefl.server.registry import make_engine
    from edgefl.server.serve import Server, ServerConfig, read_runtime

    config = ServerConfig.model_validate(
        {
            "state_dir": str(tmp_path / "server"),
            "superlink": {"port": 0},
            "broker": {"port": 0},
            "models": {"enabled": False},
            "admin": {"port": 0},
        }
    )
    server = Server(config)
    server.start()
    try:
        info = read_runtime(server.state_dir) or {}
        url = info["admin"]["url"]
        assert url == server.admin_url
        assert url.startswith("https://127.0.0.1:")
        assert (server.ca_dir / "admin" / "ca.pem").exists()  # the admin CA, made at start
        engine = make_engine(server.db_url)
        try:
            token = admin_tokens.create(
                engine, "ops", "viewer", expires_in=timedelta(minutes=5)
            ).token
        finally:
            engine.dispose()
        remote = RemoteOptions(url, ca=server.ca_dir / "ca.pem", token=token)
        assert run_op("devices", {}, config=None, remote=remote)["devices"] == []
        import httpx

        with httpx.Client(verify=str(server.ca_dir / "ca.pem")) as client:
            res = client.get(f"{url}/api/v1/children", headers={"Authorization": f"Bearer {token}"})
        assert res.status_code == 200, res.text
        children = {c["name"]: c for c in res.json()["result"]}
        assert {"broker", "superlink", "admin_api", "ingest"} <= set(children)
        assert children["broker"]["pid"] == info["pids"]["broker"]
        assert all(c["running"] for c in children.values())
        assert children["admin_api"]["restarts"] == 0
    finally:
        server.stop()
    assert server.admin_api is not None
    assert not server.admin_api.running()


def test_metrics_need_a_credential(api: AdminApi) -> None:
    with api.client() as client:
        assert client.get("/metrics").status_code == 401
        res = client.get("/metrics", headers=api.bearer("viewer"))
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/plain")
    assert b"# TYPE" in res.content


def test_a_slow_metrics_scrape_leaves_other_requests_answered(api: AdminApi) -> None:
    """Collecting runs in a worker thread: a scrape held inside a collector (the fault: a
    collector that waits) does not stop the API from answering meanwhile."""
    import threading

    from prometheus_client.core import GaugeMetricFamily

    from edgefl.server import metrics

    entered, release = threading.Event(), threading.Event()

    class Held:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            entered.set()
            release.wait(30)
            yield GaugeMetricFamily("edgefl_test_held", "A collector held by the test.", 1.0)

    registry = metrics.current().registry
    held = Held()
    registry.register(held)
    scrape: dict[str, int] = {}

    def scrape_once() -> None:
        with api.client() as client:
            scrape["status"] = client.get("/metrics", headers=api.bearer("viewer")).status_code

    scraper = threading.Thread(target=scrape_once)
    try:
        scraper.start()
        assert entered.wait(20), "the scrape never reached the collector"
        with api.client() as client:
            res = client.get("/api/v1/whoami", headers=api.bearer("viewer"), timeout=5)
        assert res.status_code == 200
        assert scraper.is_alive()  # the scrape is still held
    finally:
        release.set()
        scraper.join(30)
        registry.unregister(held)
    assert scrape == {"status": 200}


def test_cli_devices_runs_remotely_with_a_token_from_the_environment(
    api: AdminApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFL_SERVER", api.url)
    monkeypatch.setenv("EDGEFL_ADMIN_TOKEN", api.tokens["viewer"])
    runner = CliRunner()
    res = runner.invoke(cli_app, ["server", "devices", "--admin-ca", str(api.ca_file), "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert [d["device_id"] for d in shown["devices"]] == ["pi-01", "pi-02", "pi-03"]
    # A viewer's remote command needing the operator role: refused, with the reason.
    res = runner.invoke(
        cli_app, ["server", "command", "pi-01", "status", "--admin-ca", str(api.ca_file)]
    )
    assert res.exit_code != 0
    assert "needs the operator role" in res.output


def test_devices_of_one_fleet(api: AdminApi) -> None:
    with api.client() as client:
        one = client.get("/api/v1/devices?fleet=default", headers=api.bearer("viewer"))
        none = client.get("/api/v1/devices?fleet=elsewhere", headers=api.bearer("viewer"))
    assert len(one.json()["result"]["devices"]) == 3
    assert none.json()["result"]["devices"] == []
