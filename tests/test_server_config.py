"""One server config file: every `edgefl server` command with -c reads server.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.config import TlsFiles
from edgefl.server.config import InferenceServerConfig


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
