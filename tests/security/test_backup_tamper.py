"""Attacks on a server backup before it is restored: an attacker who can write the backup
folder swaps in their own CA, slips in an extra key, or rewrites the manifest to match.

Every one is refused by ``edgefl server restore`` before it writes anything; a rewritten
manifest is caught when the manifest's sha256 printed by ``backup`` is given
(``--manifest-sha256``)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.errors import ExitCode
from edgefl.manifest import sha256_file
from edgefl.server.backup import MANIFEST, backup
from edgefl.server.config import ServerConfig
from edgefl.server.fleet_ca import FleetCA
from edgefl.server.registry import upgrade


def _config(path: Path, state_dir: Path) -> Path:
    path.write_text(json.dumps({"state_dir": str(state_dir)}), encoding="utf-8")
    return path


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, str, Path]:
    """A backup of a server's state (CA, registry, SuperLink database), its manifest's
    sha256, and a fresh host's config."""
    state = tmp_path / "host"
    cfg = ServerConfig.model_validate({"state_dir": str(state)})
    FleetCA.create(cfg.resolved_ca_dir)
    upgrade(cfg.resolved_db_url)
    with sqlite3.connect(state / "superlink.db") as db:
        db.execute("CREATE TABLE node (node_id INTEGER, public_key BLOB)")
    out = backup(cfg, tmp_path / "backup")
    return (
        tmp_path / "backup",
        out["manifest_sha256"],
        _config(tmp_path / "new.json", tmp_path / "new"),
    )


def _restore(src: Path, config: Path, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["server", "restore", str(src), "-c", str(config), *extra])
    return res.exit_code, res.output


def _nothing_written(config: Path) -> bool:
    folder = json.loads(config.read_text())["state_dir"]
    return not Path(folder).exists() or not any(Path(folder).iterdir())


def test_an_attackers_ca_swapped_in_is_refused(
    made: tuple[Path, str, Path], tmp_path: Path
) -> None:
    src, _pin, config = made
    evil = FleetCA.create(tmp_path / "evil-ca")
    shutil.copyfile(evil.cert_path, src / "ca" / "ca.pem")
    shutil.copyfile(tmp_path / "evil-ca" / "ca.key", src / "ca" / "ca.key")
    code, output = _restore(src, config)
    assert code == ExitCode.BAD_INPUT
    assert "ca/ca.pem: sha256 differs" in output
    assert _nothing_written(config)


def test_an_extra_key_slipped_in_is_refused(made: tuple[Path, str, Path]) -> None:
    src, _pin, config = made
    extra = src / "ca" / "services" / "edgefl-evil"
    extra.mkdir(parents=True)
    (extra / "key.pem").write_text("attacker's key")
    code, output = _restore(src, config)
    assert code == ExitCode.BAD_INPUT
    assert "not in the manifest" in output
    assert _nothing_written(config)


def test_a_rewritten_manifest_is_refused_when_pinned(made: tuple[Path, str, Path]) -> None:
    src, pin, config = made
    # The attacker adds a device to the registry and rewrites the manifest to match.
    db = sqlite3.connect(src / "registry.db")
    db.execute("PRAGMA journal_mode=DELETE")  # the change lands in registry.db itself
    db.execute(
        "INSERT INTO devices (device_id, fleet, first_seen, last_seen, online) "
        "VALUES ('intruder', 'lab', '2026-01-01', '2026-01-01', 0)"
    )
    db.commit()
    db.close()
    manifest = json.loads((src / MANIFEST).read_text())
    entry = manifest["files"]["registry.db"]
    entry["sha256"] = sha256_file(src / "registry.db")
    entry["size"] = (src / "registry.db").stat().st_size
    (src / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    code, output = _restore(src, config, "--manifest-sha256", pin)
    assert code == ExitCode.BAD_INPUT
    assert "not the pinned" in output
    assert _nothing_written(config)


def test_a_manifest_naming_files_outside_the_backup_is_refused(
    made: tuple[Path, str, Path],
) -> None:
    src, _pin, config = made
    manifest = json.loads((src / MANIFEST).read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    (src / MANIFEST).write_text(json.dumps(manifest))
    code, output = _restore(src, config)
    assert code == ExitCode.BAD_INPUT
    assert "../../etc/passwd: missing" in output
    assert _nothing_written(config)
    ok, _ = _restore(src, config, "--manifest-sha256", "f" * 64)
    assert ok == ExitCode.BAD_INPUT
