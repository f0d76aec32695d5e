"""The ``inference:`` section as a supervised child of ``edgefl server start``: its parsing,
the settings it fills in from the server, and the config its child reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.config import validate_config
from edgefl.errors import ConfigError
from edgefl.server.config import InferenceServerConfig, ServerConfig
from edgefl.server.inference.supervised import InferenceChild, resolve_inference


def _server(tmp_path: Path, **inference: Any) -> ServerConfig:
    return validate_config(
        ServerConfig, {"state_dir": str(tmp_path / "srv"), "inference": inference}, "server.yaml"
    )


def test_inference_is_off_by_default_and_its_section_is_strict(tmp_path: Path) -> None:
    assert ServerConfig().inference.enabled is False
    cfg = _server(tmp_path, enabled=True, max_batch=8, train_epochs=2)
    assert (cfg.inference.enabled, cfg.inference.max_batch, cfg.inference.train_epochs) == (
        True,
        8,
        2,
    )
    with pytest.raises(ConfigError, match=r"inference\.max_batchs"):
        _server(tmp_path, enabled=True, max_batchs=8)
    with pytest.raises(ConfigError, match=r"inference\.max_batch"):
        _server(tmp_path, enabled=True, max_batch=0)


def test_unset_tls_is_the_servers_mutual_tls_and_the_port_is_fixed(tmp_path: Path) -> None:
    cfg = _server(tmp_path, enabled=True)
    got = resolve_inference(cfg)
    ca = cfg.resolved_ca_dir
    assert got.tls.cert_file == ca / "server" / "cert.pem"
    assert got.tls.ca_file == ca / "ca.pem"
    assert got.crl == ca / "crl.pem"
    assert got.registry_url == cfg.resolved_db_url
    assert got.port > 0
    own = _server(
        tmp_path, enabled=True, port=7100, tls={"cert_file": "s.pem", "key_file": "s.key"}
    )
    kept = resolve_inference(own)
    assert (kept.port, kept.tls.ca_file, kept.crl, kept.registry_url) == (7100, None, None, None)


def test_the_child_runs_server_inference_on_the_same_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgefl.server.inference.service as service

    cfg = _server(tmp_path, enabled=True, max_batch=4, max_wait_ms=1.5, torch_threads=2)
    child = InferenceChild(cfg, tmp_path / "srv" / "inference")
    argv = child.command()
    assert argv[-5:] == ["server", "inference", "-c", str(child.config_file), "--json"]
    assert child.config_file.stat().st_mode & 0o077 == 0
    served: list[InferenceServerConfig] = []
    monkeypatch.setattr(service, "serve", lambda config, **_kw: served.append(config))
    res = CliRunner().invoke(app, argv[-5:-1])
    assert res.exit_code == 0, res.output
    (got,) = served
    assert got.model_dump(exclude={"enabled"}) == child.settings.model_dump(exclude={"enabled"})
    assert child.address == f"127.0.0.1:{child.port}"
    assert not child.running()
