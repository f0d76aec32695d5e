"""The new ``edgefl server`` commands on a real SQLite registry, here and through a real
admin API over HTTPS (``--server`` with a token): the same JSON either way, the exit codes
of bad input, and the long commands (release, rollout) that run as the server's jobs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefl.cli import app as cli_app
from edgefl.errors import ExitCode

try:
    from tests.admin_api_helpers import AdminApi, start_admin_api, stop_admin_api
    from tests.test_ops_fleet import fill_registry
except ImportError:  # run from inside tests/
    from admin_api_helpers import (  # type: ignore[import-not-found,no-redef]
        AdminApi,
        start_admin_api,
        stop_admin_api,
    )
    from test_ops_fleet import fill_registry  # type: ignore[import-not-found,no-redef]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminApi]:
    running = start_admin_api(tmp_path_factory.mktemp("ops-cli"))
    fill_registry(running.config.resolved_db_url)
    try:
        yield running
    finally:
        stop_admin_api(running)


@pytest.fixture(scope="module")
def config(api: AdminApi) -> Path:
    path = api.root / "server.yaml"
    path.write_text(f"state_dir: {api.config.resolved_state_dir}\n", encoding="utf-8")
    return path


def server(*args: str) -> Any:
    return CliRunner().invoke(cli_app, ["server", *args])


def remote(api: AdminApi, role: str) -> list[str]:
    return ["--server", api.url, "--admin-ca", str(api.ca_file), "--token", api.tokens[role]]


@pytest.mark.parametrize(
    "command",
    [
        ["runs"],
        ["run-show", "run-a"],
        ["device-show", "pi-01"],
        ["dead-letters", "--reason", "bad_envelope"],
    ],
)
def test_remote_json_is_the_local_json(api: AdminApi, config: Path, command: list[str]) -> None:
    here = server(*command, "-c", str(config), "--json")
    assert here.exit_code == 0, here.output
    there = server(*command, *remote(api, "viewer"), "--json")
    assert there.exit_code == 0, there.output
    assert json.loads(there.stdout) == json.loads(here.stdout)


def test_tables_for_people(config: Path) -> None:
    out = server("run-show", "run-a", "-c", str(config)).stdout
    assert "run run-a: completed, 2/3 rounds" in out
    assert out.splitlines()[-2].split() == ["pi-01", "0.500", "1.000"]  # ε after rounds 1, 2
    out = server("runs", "-c", str(config)).stdout
    assert [line.split()[:3] for line in out.splitlines()[2:]] == [
        ["run-b", "running", "0/5"],
        ["run-a", "completed", "2/3"],
    ]
    out = server("dead-letters", "-c", str(config)).stdout
    assert out.splitlines()[0] == "2 bad_envelope, 1 unknown_device"


def test_bad_input_exits_with_its_code_and_changes_nothing(api: AdminApi, config: Path) -> None:
    before = server("audit", "-c", str(config), "--json")
    res = server("device-show", "ghost", "-c", str(config))
    assert res.exit_code == ExitCode.BAD_INPUT
    assert "no device 'ghost'" in res.output
    res = server("run-show", "nope", *remote(api, "viewer"))
    assert res.exit_code == ExitCode.BAD_INPUT
    assert "no federated run 'nope'" in res.output
    res = server("command", "pi-01", "ping", "--args", "{bad", "-c", str(config))
    assert res.exit_code == ExitCode.BAD_INPUT
    assert "--args is not JSON" in res.output
    assert server("audit", "-c", str(config), "--json").stdout == before.stdout
    # A viewer may not stop a run: refused (usage), audited as denied; the run runs on.
    res = server("stop", "run-b", *remote(api, "viewer"))
    assert res.exit_code == ExitCode.USAGE
    assert "needs the operator role" in res.output
    entries = json.loads(server("audit", "-c", str(config), "--json").stdout)["entries"]
    assert (entries[0]["action"], entries[0]["outcome"], entries[0]["actor"]) == (
        "stop",
        "denied",
        "token:viewer-bot",
    )
    runs = json.loads(server("runs", "-c", str(config), "--json").stdout)["runs"]
    assert runs[0]["status"] == "running"


def test_release_and_rollout_run_remotely_as_jobs_of_the_server(api: AdminApi) -> None:
    # This server has no release-signing key: the job starts, fails, and the CLI exits
    # with the code and message the local command gives.
    res = server("release", "--run", "run-a", *remote(api, "operator"))
    assert res.exit_code == ExitCode.CONFIG, res.output
    assert "runs on the server as job j-" in res.output
    assert "no release-signing key" in res.output
    # Bad options are refused before a job starts.
    res = server("rollout", "m", "1", "--canary", "150%", *remote(api, "operator"))
    assert res.exit_code != 0
    assert "--canary" in res.output
    assert "job" not in res.output
    # No release m v1: the rollout job fails as the local command does.
    res = server("rollout", "m", "1", *remote(api, "operator"))
    assert res.exit_code == ExitCode.BAD_INPUT, res.output
    assert "rollout runs on the server as job j-" in res.output
    assert "make one with `edgefl server release`" in res.output
