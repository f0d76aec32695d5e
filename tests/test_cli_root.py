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
