"""The process configs speak the config language; their old keys still load, with a warning."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edgefl.config import RenamedKeyWarning, TlsFiles, config_renames, validate_config
from edgefl.edge_agent.fl.supernode import SuperNodeSupervisor, TrainingConfig
from edgefl.server.config import ServerConfig
from edgefl.server.fl.superlink import SuperLink, SuperLinkConfig


def test_superlink_tls_files_are_a_tls_section_and_the_old_keys_still_load() -> None:
    new = SuperLinkConfig.model_validate(
        {"tls": {"ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem"}}
    )
    with pytest.warns(RenamedKeyWarning, match="key certfile is renamed tls.cert_file"):
        old = SuperLinkConfig.model_validate(
            {"certfile": "/c.pem", "keyfile": "/k.pem", "ca_file": "/ca.pem"}
        )
    assert old.tls == new.tls == TlsFiles(ca_file="/ca.pem", cert_file="/c.pem", key_file="/k.pem")
    with pytest.raises(ValidationError, match="go together"):
        SuperLinkConfig.model_validate({"tls": {"cert_file": "/c.pem"}})


def test_the_server_config_reports_the_superlink_renames_with_full_paths(tmp_path: Path) -> None:
    superlink = {"certfile": "/c", "keyfile": "/k", "ca_file": "/ca"}
    data = {"state_dir": str(tmp_path), "superlink": superlink}
    with pytest.warns(RenamedKeyWarning):
        cfg = validate_config(ServerConfig, data, "server.yaml")
    assert {(r.old, r.new) for r in config_renames(cfg)} == {
        ("superlink.certfile", "superlink.tls.cert_file"),
        ("superlink.keyfile", "superlink.tls.key_file"),
        ("superlink.ca_file", "superlink.tls.ca_file"),
    }


def test_the_superlink_command_uses_the_tls_section(tmp_path: Path) -> None:
    tls = TlsFiles(ca_file=Path("/ca.pem"), cert_file=Path("/c.pem"), key_file=Path("/k.pem"))
    cmd = SuperLink(SuperLinkConfig(port=1, tls=tls), tmp_path).command()
    assert cmd[cmd.index("--ssl-certfile") + 1] == "/c.pem"
    assert cmd[cmd.index("--ssl-keyfile") + 1] == "/k.pem"
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == "/ca.pem"


def test_training_superlink_is_an_address_and_the_old_keys_still_load(tmp_path: Path) -> None:
    new = TrainingConfig.model_validate(
        {
            "superlink": {"host": "fl.example.org", "port": 9092},
            "tls": {"ca_file": "/ca.pem"},
            "auth_key_file": "/node.key",
        }
    )
    with pytest.warns(RenamedKeyWarning) as caught:
        old = TrainingConfig.model_validate(
            {
                "superlink": "fl.example.org:9092",
                "root_certificates": "/ca.pem",
                "node_key": "/node.key",
            }
        )
    texts = " | ".join(str(w.message) for w in caught)
    assert "root_certificates is renamed tls.ca_file" in texts
    assert "node_key is renamed auth_key_file" in texts
    assert "superlink: {host: fl.example.org, port: 9092}" in texts
    assert old == new
    assert str(new.superlink) == "fl.example.org:9092"
    cmd = SuperNodeSupervisor(
        new, device_id="d", state_dir=tmp_path, data_store=tmp_path / "s.db"
    ).command()
    assert cmd[cmd.index("--superlink") + 1] == "fl.example.org:9092"
    assert cmd[cmd.index("--root-certificates") + 1] == "/ca.pem"
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == "/node.key"


def test_training_tls_takes_no_client_certificate() -> None:
    with pytest.raises(ValidationError, match="presents no client certificate"):
        TrainingConfig.model_validate(
            {"superlink": {"host": "h", "port": 1}, "tls": {"key_file": "/node.key"}}
        )
    with pytest.raises(ValidationError, match="is not host:port"):
        TrainingConfig.model_validate({"superlink": "no-port"})
