"""One server config file: every `edgefl server` command with -c reads server.yaml."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.config import RenamedKeyWarning, TlsFiles
from edgefl.server.admin import ingest_settings
from edgefl.server.config import InferenceServerConfig
from edgefl.server.fleet_ca import SERVER_IDENTITY


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[InferenceServerConfig]:
    """The configs `server inference` would serve (the server itself is not started)."""
    import edgefl.server.inference.service as service

    got: list[InferenceServerConfig] = []

    def fake_serve(config: InferenceServerConfig, **kwargs: Any) -> None:
        got.append(config)

    monkeypatch.setattr(service, "serve", fake_serve)
    return got


def test_inference_reads_its_section_of_the_server_config(
    tmp_path: Path, served: list[InferenceServerConfig]
) -> None:
    config = write(
        tmp_path / "server.yaml",
        "inference:\n  port: 7001\n  max_batch: 8\n  tls:\n    cert_file: s.pem\n"
        "    key_file: s.key\n",
    )
    result = CliRunner().invoke(
        app, ["server", "inference", "-c", str(config), "--max-wait-ms", "5", "--ca", "ca.pem"]
    )
    assert result.exit_code == 0, result.output
    (got,) = served
    assert (got.port, got.max_batch, got.max_wait_ms) == (7001, 8, 5.0)
    assert got.tls == TlsFiles(
        cert_file=Path("s.pem"), key_file=Path("s.key"), ca_file=Path("ca.pem")
    )


def test_inference_flags_override_the_file_and_old_flag_names_still_work(
    tmp_path: Path, served: list[InferenceServerConfig]
) -> None:
    config = write(tmp_path / "server.yaml", "inference:\n  port: 7001\n  model: digits\n")
    result = CliRunner().invoke(
        app,
        [
            "server",
            "inference",
            "-c",
            str(config),
            "--port",
            "7002",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--no-batching",
        ],
    )
    assert result.exit_code == 0, result.output
    (got,) = served
    assert (got.port, got.max_batch) == (7002, 1)
    assert (got.tls.cert_file, got.tls.key_file) == (Path("c.pem"), Path("k.pem"))


def test_inference_without_a_file_keeps_its_defaults(
    served: list[InferenceServerConfig],
) -> None:
    result = CliRunner().invoke(app, ["server", "inference"])
    assert result.exit_code == 0, result.output
    assert served == [InferenceServerConfig()]


def test_inference_refuses_a_bad_section_naming_the_key(
    tmp_path: Path, served: list[InferenceServerConfig]
) -> None:
    config = write(tmp_path / "server.yaml", "inference:\n  max_batch: 0\n")
    result = CliRunner().invoke(app, ["server", "inference", "-c", str(config)])
    assert result.exit_code == 3
    assert "inference.max_batch" in result.output
    assert served == []


# -- ingest and devices read server.yaml too ------------------------------------------


def test_ingest_reads_the_ingest_section_filled_in_like_server_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write(
        tmp_path / "server.yaml",
        f"state_dir: {state}\nbroker: {{port: 8884}}\n"
        "ingest:\n  fleet: lab\n  password: hunter2\n  username: ops\n",
    )
    settings = ingest_settings(config, {"broker_port": None, "db_url": None})
    assert (settings.broker.host, settings.broker.port) == ("127.0.0.1", 8884)
    assert settings.fleet == "lab"
    assert settings.db_url == f"sqlite:///{state.resolve() / 'edgefl.db'}"
    ca = state.resolve() / "ca"
    assert settings.tls == TlsFiles(
        ca_file=ca / "ca.pem",
        cert_file=ca / "services" / SERVER_IDENTITY / "cert.pem",
        key_file=ca / "services" / SERVER_IDENTITY / "key.pem",
    )
    assert settings.password is not None
    assert settings.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in settings.model_dump_json()
    flags = ingest_settings(config, {"broker_port": 1999, "db_url": "sqlite:///x.db"})
    assert (flags.broker.port, flags.db_url) == (1999, "sqlite:///x.db")


def test_ingest_uses_the_running_servers_broker_port(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "server.json").write_text(json.dumps({"broker": {"host": "127.0.0.1", "port": 4242}}))
    config = write(tmp_path / "server.yaml", f"state_dir: {state}\nbroker: {{port: 0}}\n")
    assert ingest_settings(config, {}).broker.port == 4242


def test_ingest_still_reads_a_bare_ingest_file_with_old_keys_and_warns(
    tmp_path: Path,
) -> None:
    config = write(
        tmp_path / "ingest.yaml",
        "broker_host: mqtt.local\nbroker_port: 1884\nclient_id: ingest-a\nfleet: lab\n"
        "ca_file: /etc/ca.pem\n",
    )
    with pytest.warns(RenamedKeyWarning) as warned:
        settings = ingest_settings(config, {"broker_port": None, "db_url": None})
    texts = [str(w.message) for w in warned]
    assert any("a bare ingest config is read as before" in t for t in texts)
    assert any("key broker_host is renamed broker.host" in t for t in texts)
    assert (settings.broker.host, settings.broker.port) == ("mqtt.local", 1884)
    assert settings.tls.ca_file == Path("/etc/ca.pem")
    assert settings.tls.cert_file is None


def test_ingest_section_with_old_keys_names_their_full_path(tmp_path: Path) -> None:
    config = write(
        tmp_path / "server.yaml",
        f"state_dir: {tmp_path}\ningest:\n  broker_port: 1885\n  ca_file: null\n",
    )
    with pytest.warns(RenamedKeyWarning, match="key ingest.broker_port is renamed ingest.broker"):
        settings = ingest_settings(config, {})
    assert settings.broker.port == 1885
    assert settings.tls == TlsFiles()  # tls.ca_file given (null): no TLS


def _registry_with_a_device(url: str) -> None:
    from sqlalchemy import insert

    from edgefl.server.registry import Device, make_engine, upgrade

    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            insert(Device).values(
                device_id="pi-1",
                fleet="lab",
                online=True,
                first_seen=datetime(2026, 1, 1, tzinfo=UTC),
                last_seen=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            )
        )
    engine.dispose()


def test_devices_reads_the_registry_of_server_yaml_and_prints_utc_times(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _registry_with_a_device(f"sqlite:///{state / 'edgefl.db'}")
    config = write(tmp_path / "server.yaml", f"state_dir: {state}\n")
    result = CliRunner().invoke(app, ["server", "devices", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["devices"]
    assert row["last_seen"] == "2026-01-02T03:04:05+00:00"
    text = CliRunner().invoke(app, ["server", "devices", "-c", str(config)])
    assert text.exit_code == 0, text.output
    header, _, line = text.stdout.splitlines()[:3]
    assert header.split()[:7] == ["device", "fleet", "presence", "last", "seen", "records", "model"]
    # No reported state, agent version, ledger row or status answer yet: "-".
    assert line.split() == ["pi-1", "lab", "online", "2026-01-02T03:04:05+00:00", "0"] + ["-"] * 8


def test_devices_refuses_an_invalid_server_yaml_naming_the_key(tmp_path: Path) -> None:
    config = write(tmp_path / "server.yaml", "broker: {port: -1}\n")
    result = CliRunner().invoke(app, ["server", "devices", "-c", str(config)])
    assert result.exit_code == 3
    assert "broker.port" in result.output


# -- server train --wait has a deadline ------------------------------------------------


class _Admin:
    def __init__(self, statuses: list[str]) -> None:
        self.statuses = statuses
        self.asked = 0

    def run_info(self, run_id: int) -> dict[str, str]:
        self.asked += 1
        return {"status": self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]}


class _Ctx:
    def __init__(self, tmp_path: Path, statuses: list[str]) -> None:
        from edgefl.server.config import ServerConfig

        self.config = ServerConfig(state_dir=tmp_path)
        self.admin = _Admin(statuses)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_waiting_for_a_run_that_never_finishes_stops_at_the_deadline(tmp_path: Path) -> None:
    from edgefl.errors import ExitCode, RunFailedError
    from edgefl.server.runs import wait_for_run

    ctx = _Ctx(tmp_path, ["running"])
    clock = _Clock()
    with pytest.raises(RunFailedError) as info:
        wait_for_run(ctx, 7, "r-1", 3, 3.0, 10.0, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    assert info.value.exit_code == ExitCode.RUN_FAILED
    assert info.value.message == (
        "run r-1 (Flower run 7) has not finished after 10 s: running, round 0/3 committed"
    )
    assert "flwr stop 7" in (info.value.hint or "")
    assert clock.now == 10.0  # the last sleep is cut to the deadline
    assert ctx.admin.asked == 5  # at 0, 3, 6, 9 and 10 s


def test_waiting_for_a_run_returns_its_final_status(tmp_path: Path) -> None:
    from edgefl.server.runs import wait_for_run

    ctx = _Ctx(tmp_path, ["pending", "running", "finished:completed"])
    clock = _Clock()
    status = wait_for_run(ctx, 7, "r-1", 3, 1.0, 60.0, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    assert status == "finished:completed"
    assert clock.now == 2.0


def test_the_default_deadline_follows_the_plan() -> None:
    from edgefl.federation import load_plan
    from edgefl.server.runs import default_timeout_s

    plan = load_plan({"num_devices": 3, "rounds": 4, "node_wait_s": 60, "round_timeout_s": 100})
    assert default_timeout_s(plan) == 60 + 4 * 2 * 100 + 300


def test_validate_config_reports_each_renamed_key_and_never_prints_a_secret(
    tmp_path: Path,
) -> None:
    config = write(
        tmp_path / "server.yaml",
        "db_url: postgresql+psycopg2://edgefl:hunter2@db/edgefl\n"
        "ingest:\n  broker_host: mqtt.local\n  username: ops\n  password: hunter2\n"
        "  db_url: postgresql+psycopg2://edgefl:hunter2@db/edgefl\n"
        "inference:\n  tls_cert: s.pem\n  tls_key: s.key\n",
    )
    result = CliRunner().invoke(app, ["server", "validate-config", "-c", str(config)])
    assert result.exit_code == 0, result.output
    for old, new in [
        ("ingest.broker_host", "ingest.broker.host"),
        ("inference.tls_cert", "inference.tls.cert_file"),
        ("inference.tls_key", "inference.tls.key_file"),
    ]:
        assert f"key {old} is renamed {new}; accepted until the next release" in result.stdout
    result = CliRunner().invoke(app, ["server", "validate-config", "-c", str(config), "--json"])
    doc = json.loads(result.stdout)
    assert doc["config"]["ingest"]["broker"]["host"] == "mqtt.local"
    assert len(doc["renamed_keys"]) == 3
    assert "hunter2" not in result.stdout
    bad = write(tmp_path / "bad.yaml", "ingest: {broker: {port: 0}}\n")
    result = CliRunner().invoke(app, ["server", "validate-config", "-c", str(bad)])
    assert result.exit_code == 3
    assert "ingest.broker.port" in result.output


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"cert_file": "cert.pem"}, "tls.cert_file and tls.key_file go together"),
        ({"key_file": "key.pem"}, "tls.cert_file and tls.key_file go together"),
        ({"ca_file": "ca.pem"}, "checked against the admin CA"),
    ],
)
def test_admin_section_takes_the_tls_section_of_every_listener(
    tls: dict[str, str], message: str
) -> None:
    """The admin API's certificate is set like the other listeners' (admin.tls); the client
    CA is always the admin CA, so a ca_file there is refused rather than ignored."""
    from edgefl.server.config import AdminApiConfig

    ok = AdminApiConfig.model_validate({"tls": {"cert_file": "c.pem", "key_file": "k.pem"}})
    assert ok.tls.cert_file == Path("c.pem")
    with pytest.raises(ValueError, match=message):
        AdminApiConfig.model_validate({"tls": tls})
