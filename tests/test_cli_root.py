"""Tests for the ``edgefl`` root command and ``edgefl quantize`` argument handling."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from edgefl import __version__
from edgefl.cli import app
from edgefl.errors import ExitCode

runner = CliRunner()


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def flat(text: str) -> str:
    # Rich wraps help text to the terminal width; compare it as one line.
    return " ".join(text.split())


def listing() -> dict[str, Any]:
    result = invoke("quantize", "list", "--json")
    assert result.exit_code == 0, result.output
    payload: dict[str, Any] = json.loads(result.stdout)
    return payload


def test_help_lists_quantize_and_exit_codes() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    text = flat(result.output)
    assert "quantize" in text
    assert "Exit codes: 0 ok" in text


def test_help_exit_code_line_matches_exit_code_enum() -> None:
    text = flat(invoke("--help").output)
    match = re.search(r"Exit codes: (.*?\.)", text)
    assert match is not None
    documented = {int(code) for code in re.findall(r"(\d+) [a-z][a-z ]*", match.group(1))}
    assert documented == {int(member) for member in ExitCode}


def test_no_arguments_shows_help() -> None:
    result = invoke()
    assert "Usage" in result.output
    assert "quantize" in result.output


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"edgefl {__version__}"


def test_quantize_list_json() -> None:
    payload = listing()
    assert {"digits-cnn", "mnist-cnn", "cancer-mlp"} <= set(payload["models"])
    assert payload["models"]["digits-cnn"]["dataset"] == "digits"
    assert {"fp32", "fp16", "int8", "int8-wo", "int8-dynamic"} <= set(payload["recipes"])
    assert all(isinstance(d, str) and d for d in payload["recipes"].values())
    assert payload["runtimes"]["ai-edge-litert"] is True
    assert all(isinstance(v, bool) for v in payload["runtimes"].values())
    assert "int8" in payload["default_variants"]


def test_quantize_list_text() -> None:
    result = invoke("quantize", "list")
    assert result.exit_code == 0
    for name in ("digits-cnn", "mnist-cnn", "cancer-mlp", "int8-dynamic"):
        assert name in result.output


def test_build_unknown_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("quantize", "build", "--model", "nope", "--out", str(tmp_path / "X"))
    assert result.exit_code == int(ExitCode.BAD_INPUT) == 4
    assert "unknown model" in result.stderr
    assert "'nope'" in result.stderr
    assert "digits-cnn" in result.stderr  # the hint names the choices
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_build_unknown_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "quantize",
        "build",
        "--model",
        "digits-cnn",
        "--out",
        str(tmp_path / "X"),
        "--recipes",
        "fp32,bogus",
    )
    assert result.exit_code == 4
    assert "bogus" in result.stderr
    assert "unknown recipe" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("recipes", "fragment"),
    [
        ("pruned99-int8", "1..95"),
        ("pruned0-int8", "1..95"),
        ("int8,int8", "twice"),
        ("INT8", "malformed"),
        (",", "no recipes"),
    ],
)
def test_build_bad_variants(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipes: str, fragment: str
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "quantize", "build", "--model", "digits-cnn", "--out", "X", "--recipes", recipes
    )
    assert result.exit_code == 4
    assert fragment in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_option_is_a_usage_error() -> None:
    result = invoke("quantize", "list", "--bogus")
    assert result.exit_code == int(ExitCode.USAGE) == 2
    assert "--bogus" in result.output


def test_unknown_root_option_is_a_usage_error() -> None:
    assert invoke("--bogus").exit_code == 2


def test_missing_required_option_is_a_usage_error() -> None:
    result = invoke("quantize", "build", "--model", "digits-cnn")
    assert result.exit_code == 2
    assert "--out" in result.output


@pytest.mark.slow
def test_console_script_list_json() -> None:
    script = Path(sys.executable).parent / "edgefl"
    assert script.exists()
    proc = subprocess.run(
        [str(script), "quantize", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert "digits-cnn" in payload["models"]
    assert "int8" in payload["recipes"]


@pytest.mark.slow
def test_console_script_maps_errors_to_exit_codes(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "edgefl"
    proc = subprocess.run(
        [str(script), "quantize", "build", "--model", "nope", "--out", str(tmp_path / "X")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 4
    assert "error: unknown model 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_a_central_dp_plan_that_fits_no_round(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(
        "num_devices = 10\nrounds = 10\n"
        "[central_dp]\nenabled = true\nnoise_multiplier = 1.0\nmax_epsilon = 3.0\n"
    )
    config = tmp_path / "server.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    result = invoke("server", "train", "--plan", str(plan), "--config", str(config))
    assert result.exit_code == ExitCode.CONFIG, result.output
    text = flat(result.output)
    assert "noise_multiplier 1 spends ε 4.729 in the first round, over max_epsilon 3" in text
    assert "noise_multiplier 1.5 or max_epsilon 4.73 allows 1 round" in text
    assert not (tmp_path / "state").exists()  # refused before anything was touched


def _run_whose_last_round_trained_nobody(url: str) -> None:
    from edgefl.federation import RoundReport, load_plan
    from edgefl.server.fl.ledger import Checkpoint, FlStore

    store = FlStore(url)
    try:
        store.start_run("r-idle", load_plan({"num_devices": 3, "rounds": 3}), resume=False)
        for rnd in (1, 2):
            report = RoundReport(rnd, 0.8, 0.5, num_selected=3, num_replies=3)
            store.commit_round("r-idle", report, [], Checkpoint(rnd, b"m", b"", {}))
        idle = RoundReport(
            3,
            0.8,
            0.5,
            num_selected=3,
            num_refused=3,
            aggregated=False,
            refusals={
                f"dev-{d}": f"dev-{d}: the next round would take ε from 7.1 to 8.3, past its cap 8"
                for d in "abc"
            },
        )
        store.commit_round("r-idle", idle, [], Checkpoint(3, b"m", b"", {}))
        store.finish("r-idle", "completed")
    finally:
        store.close()


@pytest.mark.parametrize("as_json", [False, True])
def test_wait_exits_9_when_the_last_round_trained_nobody(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    from edgefl.errors import RunFailedError
    from edgefl.server.registry import upgrade
    from edgefl.server.runs import report_run

    url = f"sqlite:///{tmp_path / 'edgefl.db'}"
    upgrade(url)
    _run_whose_last_round_trained_nobody(url)
    submitted = {"run_id": "r-idle", "flower_run_id": 7, "app_dir": "", "db_url": url}
    with pytest.raises(RunFailedError) as info:
        report_run(submitted, "finished:completed", as_json)  # Flower says "completed"
    assert info.value.exit_code == ExitCode.RUN_FAILED
    message = str(info.value)
    assert "trained 2 of 3 planned rounds; round 3 trained nobody (" in message
    assert "dev-b refused: dev-b: the next round would take ε from 7.1 to 8.3" in message
    out = capsys.readouterr().out
    if as_json:
        result = json.loads(out)["result"]
        assert (result["complete"], result["rounds_trained"]) == (False, 2)
        assert result["rounds"][-1]["refusals"]["dev-a"].endswith("past its cap 8")
    else:
        assert "trained nobody: dev-a refused:" in out  # the table row of round 3


def test_registry_password_is_never_printed(tmp_path: Path) -> None:
    from edgefl.netutil import free_port

    url = f"postgresql+psycopg2://edgefl:hunter2@127.0.0.1:{free_port()}/fleet"
    result = invoke("server", "devices", "--db-url", url)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert "hunter2" not in result.output
    assert "postgresql+psycopg2://edgefl:***@127.0.0.1" in flat(result.output)
