"""``edgefl quantize`` through typer's runner and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.errors import ExitCode

pytestmark = pytest.mark.slow

EDGEFL = Path(sys.executable).parent / "edgefl"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "mlp"
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            "build",
            "--model",
            "cancer-mlp",
            "--recipes",
            "fp32,int8",
            "--out",
            str(out),
            "--bench-iters",
            "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["variants"]) == {"fp32", "int8"}
    assert all(v["accepted"] for v in report["variants"].values())
    return out


def test_build_writes_artifacts_and_reports(built: Path) -> None:
    names = {p.name for p in built.iterdir()}
    assert {
        "cancer-mlp.fp32.tflite",
        "cancer-mlp.fp32.manifest.json",
        "cancer-mlp.int8.tflite",
        "cancer-mlp.int8.manifest.json",
        "report.json",
        "report.md",
        "size_latency_accuracy.png",
        "model.pt",
    } <= names
    assert "| int8 | accepted |" in (built / "report.md").read_text()


def test_verify_ok_as_subprocess(built: Path) -> None:
    proc = subprocess.run(
        [str(EDGEFL), "quantize", "verify", str(built / "cancer-mlp.int8.tflite"), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["passed"] is True
    assert "ai-edge-litert" in payload["runtimes"]


def test_verify_corrupted_artifact_exits_5(built: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "cancer-mlp.int8.tflite"
    data = bytearray((built / artifact.name).read_bytes())
    data[100] ^= 0x55
    artifact.write_bytes(bytes(data))
    manifest = built / "cancer-mlp.int8.manifest.json"
    result = CliRunner().invoke(
        app, ["quantize", "verify", str(artifact), "--manifest", str(manifest)]
    )
    assert result.exit_code == ExitCode.ARTIFACT
    assert "does not match the manifest" in result.output


def test_verify_without_manifest_exits_5(built: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone.tflite"
    lone.write_bytes((built / "cancer-mlp.fp32.tflite").read_bytes())
    result = CliRunner().invoke(app, ["quantize", "verify", str(lone)])
    assert result.exit_code == ExitCode.ARTIFACT
    assert "manifest" in result.output


def test_verify_wrong_model_exits_6(built: Path, tmp_path: Path) -> None:
    """The int8 file under the fp32 manifest (hash fixed up) fails on specs or outputs."""
    from edgefl.quantize.manifest import read_manifest, sha256_file

    artifact = tmp_path / "swapped.tflite"
    artifact.write_bytes((built / "cancer-mlp.int8.tflite").read_bytes())
    manifest = read_manifest(built / "cancer-mlp.fp32.manifest.json")
    forged = manifest.model_copy(
        update={
            "sha256": sha256_file(artifact),
            "size_bytes": artifact.stat().st_size,
            "thresholds": {**manifest.thresholds, "max_abs_error": 1e-6},
        }
    )
    path = tmp_path / "forged.manifest.json"
    path.write_text(forged.to_json())
    result = CliRunner().invoke(app, ["quantize", "verify", str(artifact), "--manifest", str(path)])
    assert result.exit_code in (ExitCode.VERIFICATION_FAILED, ExitCode.ARTIFACT)
    assert "error:" in result.output


def test_build_with_missing_calibration_exits_4_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            "build",
            "--model",
            "cancer-mlp",
            "--recipes",
            "int8",
            "--calibration",
            str(tmp_path / "missing.npy"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "calibration" in result.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_as_subprocess(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(EDGEFL), "quantize", "build", "--model", "resnet", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == ExitCode.BAD_INPUT
    assert "unknown model 'resnet'" in proc.stderr
    assert "digits-cnn" in proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr


def test_refused_variant_exits_6_but_publishes_the_rest(tmp_path: Path) -> None:
    from edgefl.edge_agent.runtimes import find_tflite_python

    if find_tflite_python() is None:
        pytest.skip("needs .venv-tflite (scripts/setup)")
    out = tmp_path / "o"
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            "build",
            "--model",
            "digits-cnn",
            "--recipes",
            "fp32,int8-dynamic",
            "--out",
            str(out),
            "--bench-iters",
            "0",
            "--epochs",
            "5",
        ],
    )
    assert result.exit_code == ExitCode.VERIFICATION_FAILED, result.output
    assert "int8-dynamic" in result.output
    assert (out / "digits-cnn.fp32.tflite").is_file()
    assert not (out / "digits-cnn.int8-dynamic.tflite").exists()
    assert "**refused**" in (out / "report.md").read_text()


def test_build_json_stdout_is_pure_json_as_subprocess(tmp_path: Path) -> None:
    """Converters print on stdout and C++ logs on the fds; --json must still parse."""
    proc = subprocess.run(
        [
            str(EDGEFL),
            "quantize",
            "build",
            "--model",
            "cancer-mlp",
            "--recipes",
            "fp32",
            "--out",
            str(tmp_path / "o"),
            "--bench-iters",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["variants"]["fp32"]["accepted"] is True
