"""``edgefl server backup DEST`` and ``edgefl server restore SRC``: a server's state, whole.

A backup is a folder holding what a server cannot rebuild:

- ``ca/``: the fleet CA folder (``ca_dir``: the CA key and certificate, ``state.json`` with
  every issued serial and key fingerprint, the CRL, the server and service certificates,
  the operators, the admin CA in ``ca/admin/`` and the release-signing keys in
  ``ca/release-signing/`` when present), copied under the CA's own write lock, so no
  ``admit`` or ``revoke`` is half in it;
- ``app-signing/``: the key the server signs its Flower apps with (``<state_dir>/app-signing``);
- ``releases/``: the published release artifacts devices download;
- the registry: ``registry.db`` (SQLite, copied with SQLite's online backup API while the
  ingest writes) or ``registry.pgdump`` (PostgreSQL, ``pg_dump --format=custom``, one
  consistent snapshot);
- ``superlink.db``: the SuperLink's database (registered nodes, runs), online backup too;
- ``config/<name>``: the server config file, when the command was given one;
- ``broker/mosquitto.db``: the managed broker's last saved persistence (retained desired
  states, sessions, queued messages), when it has saved one (every 60 s, and when it stops);
  devices also hold what was not acknowledged in their outbox and send it again;
- ``manifest.json``: every file's size and sha256, what the backup came from.

:func:`restore` checks every file against the manifest before it writes anything, refuses
to overwrite a CA, registry or SuperLink database already at the target unless ``force``,
and refuses while a server runs on the target ``state_dir``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import edgefl
from edgefl.errors import ConfigError, EdgeflError, ExitCode
from edgefl.manifest import sha256_file
from edgefl.mqtt_client import SESSION_LOCK
from edgefl.procs import pid_alive
from edgefl.server.config import ServerConfig
from edgefl.server.fl.app_signing import KEY_DIR as APP_KEY_DIR
from edgefl.server.runtime import read_runtime

__all__ = [
    "BACKUP_FORMAT",
    "MANIFEST",
    "BackupError",
    "backup",
    "broker_persistence",
    "releases_dir",
    "restore",
    "superlink_database",
    "verify",
]

MANIFEST: Final = "manifest.json"
BACKUP_FORMAT: Final = 1
"""The layout version in ``manifest.json`` (``format``)."""

_PG_DUMP: Final = "registry.pgdump"
_SQLITE_DB: Final = "registry.db"
_SUPERLINK_DB: Final = "superlink.db"
_BROKER_FILE: Final = "mosquitto.db"


class BackupError(EdgeflError):
    """A backup or restore cannot be made (the target is in use, a file does not match)."""

    exit_code = ExitCode.BAD_INPUT


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, ``None`` for another database."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise ConfigError(f"registry {url!r} is an in-memory database: nothing to back up")
    return Path(parsed.database)


def _libpq(url: str) -> tuple[str, dict[str, str], list[str]]:
    """``pg_dump``/``pg_restore`` arguments: libpq URL, environment, ``--schema``.

    The password goes into the environment (``PGPASSWORD``), not the command line; a URL
    that confines the registry to a schema (``options=-csearch_path=NAME``) dumps that
    schema only.
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    plain = parsed.set(drivername="postgresql", password=None)
    schema: list[str] = []
    options = parsed.query.get("options")
    for option in [options] if isinstance(options, str) else list(options or ()):
        for word in option.split():
            if word.startswith("-csearch_path="):
                first = word.removeprefix("-csearch_path=").split(",")[0].strip()
                if first:
                    schema = [f"--schema={first}"]
    return plain.render_as_string(hide_password=False), env, schema


def superlink_database(config: ServerConfig) -> Path:
    """Where the server keeps its SuperLink database (as :mod:`edgefl.server.serve` sets it)."""
    return (config.superlink.database or config.resolved_state_dir / "superlink.db").resolve()


def releases_dir(config: ServerConfig) -> Path:
    """The published releases folder (``models.releases_dir`` or ``<state_dir>/releases``)."""
    return (config.models.releases_dir or config.resolved_state_dir / "releases").resolve()


def broker_persistence(config: ServerConfig) -> Path:
    """The managed broker's persistence file (``broker.data_dir``, or its default)."""
    data_dir = config.broker.data_dir or config.resolved_state_dir / "broker" / "data"
    return data_dir.expanduser().resolve() / _BROKER_FILE


def _sqlite_copy(src: Path, dst: Path) -> None:
    """SQLite's online backup: a consistent copy while other connections write."""
    if not src.is_file():
        raise BackupError(f"database {src} does not exist", hint="is this the server's config?")
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30.0)
    try:
        target = sqlite3.connect(dst)
        try:
            source.backup(target, pages=1024)  # in steps: writers get the lock between them
        finally:
            target.close()
    finally:
        source.close()


@contextlib.contextmanager
def _ca_locked(ca_dir: Path) -> Iterator[None]:
    """Hold the fleet CA's write lock (the one ``admit``/``revoke`` take)."""
    with (ca_dir / ".lock").open("a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


def _copy_tree(src: Path, dst: Path) -> None:
    # Lock files are no state: the CA's write lock, the service identities' session locks.
    shutil.copytree(src, dst, symlinks=False, ignore=shutil.ignore_patterns(".lock", SESSION_LOCK))


def _files(root: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(root).as_posix()
            out[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return out


def backup(
    config: ServerConfig,
    dest: Path,
    *,
    config_path: Path | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Write a backup of the server ``config`` describes into the new folder ``dest``.

    Safe while the server runs (see the module docstring).

    Returns:
        The manifest (also written as ``dest/manifest.json``).

    Raises:
        BackupError: ``dest`` is not empty, a database is missing, ``pg_dump`` failed.
        ConfigError: The CA folder is missing (nothing to back up).
    """
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} exists and is not an empty folder", hint="name a new folder")
    ca_dir = config.resolved_ca_dir
    if not (ca_dir / "ca.pem").is_file():
        raise ConfigError(
            f"no fleet CA in {ca_dir}", hint="back up the host a server has run on (-c server.yaml)"
        )
    partial = dest.with_name(f".{dest.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, mode=0o700)
    try:
        progress(f"[1/5] fleet CA {ca_dir} (under its lock)")
        with _ca_locked(ca_dir):
            _copy_tree(ca_dir, partial / "ca")
        state_dir = config.resolved_state_dir
        app_keys = state_dir / APP_KEY_DIR
        if app_keys.is_dir():
            _copy_tree(app_keys, partial / APP_KEY_DIR)
        progress("[2/5] registry")
        url = config.resolved_db_url
        db_file = _sqlite_path(url)
        if db_file is not None:
            _sqlite_copy(db_file, partial / _SQLITE_DB)
            registry = {"dialect": "sqlite", "file": _SQLITE_DB}
        else:
            _pg_dump(url, partial / _PG_DUMP)
            registry = {"dialect": "postgresql", "file": _PG_DUMP}
        progress("[3/5] SuperLink database")
        superlink = superlink_database(config)
        has_superlink = superlink.is_file()
        if has_superlink:
            _sqlite_copy(superlink, partial / _SUPERLINK_DB)
        progress("[4/5] releases and config")
        releases = releases_dir(config)
        if releases.is_dir():
            _copy_tree(releases, partial / "releases")
        persistence = broker_persistence(config)
        has_broker = config.broker.enabled and persistence.is_file()
        if has_broker:
            # mosquitto replaces the file whole when it saves (a new file, then a rename):
            # this is its last save, with the retained desired states and queued messages.
            (partial / "broker").mkdir()
            shutil.copy2(persistence, partial / "broker" / _BROKER_FILE)
        config_name = None
        if config_path is not None:
            (partial / "config").mkdir()
            config_name = Path(config_path).name
            shutil.copy2(config_path, partial / "config" / config_name)
        progress("[5/5] manifest (sha256 of every file)")
        manifest = {
            "format": BACKUP_FORMAT,
            "created_at": datetime.now(UTC).isoformat(),
            "edgefl_version": edgefl.__version__,
            "source": {"state_dir": str(state_dir), "ca_dir": str(ca_dir)},
            "registry": registry,
            "superlink": _SUPERLINK_DB if has_superlink else None,
            "broker": f"broker/{_BROKER_FILE}" if has_broker else None,
            "config": f"config/{config_name}" if config_name else None,
            "files": _files(partial),
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        manifest_sha256 = sha256_file(partial / MANIFEST)
        if dest.exists():
            dest.rmdir()
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    manifest["path"] = str(dest)
    manifest["manifest_sha256"] = manifest_sha256
    return manifest


def _pg_dump(url: str, out: Path) -> None:
    exe = shutil.which("pg_dump")
    if exe is None:
        raise BackupError(
            "pg_dump is not installed: a PostgreSQL registry is backed up with it",
            hint="apt-get install postgresql-client (scripts/setup installs it)",
        )
    dsn, env, schema = _libpq(url)
    done = subprocess.run(  # fixed argv, no shell
        [exe, "--format=custom", "--no-owner", *schema, f"--file={out}", f"--dbname={dsn}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BackupError(f"pg_dump failed: {done.stderr.strip()[-500:]}")


def verify(src: Path, *, manifest_sha256: str | None = None) -> dict[str, Any]:
    """The manifest of the backup in ``src``, after checking every file against it.

    The manifest is not signed: whoever can write the backup can rewrite it too. With
    ``manifest_sha256`` (what :func:`backup` returned, kept apart from the backup), the
    manifest itself is pinned, so nothing in the backup can change unnoticed.

    Raises:
        BackupError: No manifest, an unknown format, a file missing, added, or changed,
            or a manifest whose sha256 is not ``manifest_sha256``.
    """
    src = Path(src).expanduser().resolve()
    if manifest_sha256 is not None and (src / MANIFEST).is_file():
        actual = sha256_file(src / MANIFEST)
        if actual != manifest_sha256.strip().lower():
            raise BackupError(
                f"{src / MANIFEST} has sha256 {actual}, not the pinned {manifest_sha256}",
                hint="nothing was restored; the backup was changed after it was made",
            )
    try:
        manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(
            f"{src} holds no {MANIFEST}: not an edgefl backup",
            hint="name the folder `edgefl server backup` wrote",
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BackupError(f"{src / MANIFEST} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BACKUP_FORMAT:
        raise BackupError(f"{src}: backup format {manifest.get('format')!r} is not {BACKUP_FORMAT}")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise BackupError(f"{src / MANIFEST} lists no files")
    found = _files(src)
    problems = []
    for rel in sorted(set(listed) | set(found)):
        if rel not in found:
            problems.append(f"{rel}: missing")
        elif rel not in listed:
            problems.append(f"{rel}: not in the manifest")
        elif found[rel]["sha256"] != listed[rel].get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest")
    if problems:
        shown = "; ".join(problems[:5]) + (
            f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        )
        raise BackupError(
            f"backup {src} does not match its manifest: {shown}",
            hint="nothing was restored; use an intact copy of the backup",
        )
    return manifest


def _refuse_running(state_dir: Path) -> None:
    info = read_runtime(state_dir)
    pids = info.get("pids") if info else None
    pid = pids.get("server") if isinstance(pids, dict) else None
    if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
        raise BackupError(
            f"a server (pid {pid}) runs on {state_dir}",
            hint="stop it (SIGTERM) before restoring over its state",
        )


def _pg_has_tables(url: str) -> bool:
    from sqlalchemy import inspect

    from edgefl.server.registry.db import make_engine

    engine = make_engine(url)
    try:
        return bool(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def restore(
    src: Path,
    config: ServerConfig,
    *,
    force: bool = False,
    manifest_sha256: str | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Put the backup in ``src`` where ``config`` keeps a server's state.

    Every file is checked against the manifest first; nothing is written before that
    passes, nor over an existing CA, registry or SuperLink database without ``force``.

    Returns:
        What was restored where, and the next step.

    Raises:
        BackupError: Tampered or incomplete backup, a non-empty target without ``force``,
            a server running on the target, ``pg_restore`` failed.
    """
    src = Path(src).expanduser().resolve()
    progress("[1/4] checking every file against the manifest")
    manifest = verify(src, manifest_sha256=manifest_sha256)
    state_dir = config.resolved_state_dir
    ca_dir = config.resolved_ca_dir
    url = config.resolved_db_url
    db_file = _sqlite_path(url)
    registry = manifest.get("registry") or {}
    dialect = registry.get("dialect")
    if dialect not in ("sqlite", "postgresql"):
        raise BackupError(f"backup {src}: unknown registry dialect {dialect!r}")
    target_dialect = "sqlite" if db_file is not None else "postgresql"
    if dialect != target_dialect:
        raise BackupError(
            f"the backup's registry is {dialect}, the target's db_url is {target_dialect}",
            hint="restore with a server config whose db_url is of the same kind",
        )
    superlink = superlink_database(config)
    releases = releases_dir(config)
    _refuse_running(state_dir)
    occupied = []
    if ca_dir.exists() and any(ca_dir.iterdir()):
        occupied.append(f"CA folder {ca_dir}")
    if db_file is not None and db_file.exists():
        occupied.append(f"registry {db_file}")
    if db_file is None and _pg_has_tables(url):
        occupied.append("PostgreSQL registry (it has tables)")
    if superlink.exists():
        occupied.append(f"SuperLink database {superlink}")
    if manifest.get("broker") and broker_persistence(config).exists():
        occupied.append(f"broker persistence {broker_persistence(config)}")
    if occupied and not force:
        raise BackupError(
            "the target already holds a server's state: " + "; ".join(occupied),
            hint="restore onto a fresh state_dir (-c a config naming one), or add --force "
            "to replace it",
        )
    progress(f"[2/4] fleet CA into {ca_dir}")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if ca_dir.exists():
        shutil.rmtree(ca_dir)
    ca_dir.parent.mkdir(parents=True, exist_ok=True)
    _copy_tree(src / "ca", ca_dir)
    os.chmod(ca_dir, 0o700)
    app_keys = state_dir / APP_KEY_DIR
    if (src / APP_KEY_DIR).is_dir():
        if app_keys.exists():
            shutil.rmtree(app_keys)
        _copy_tree(src / APP_KEY_DIR, app_keys)
        os.chmod(app_keys, 0o700)
    progress("[3/4] registry and SuperLink database")
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{db_file}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(src / registry["file"], db_file)
        os.chmod(db_file, 0o600)
    else:
        _pg_restore(url, src / registry["file"])
    if manifest.get("superlink"):
        superlink.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{superlink}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(src / manifest["superlink"], superlink)
        os.chmod(superlink, 0o600)
    progress("[4/4] releases and the broker's persistence")
    if manifest.get("broker") and config.broker.enabled:
        persistence = broker_persistence(config)
        persistence.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / manifest["broker"], persistence)
        os.chmod(persistence, 0o600)
    if (src / "releases").is_dir():
        if releases.exists():
            shutil.rmtree(releases)
        _copy_tree(src / "releases", releases)
    config_copy = None
    if manifest.get("config"):
        config_copy = state_dir / f"restored-{Path(manifest['config']).name}"
        shutil.copy2(src / manifest["config"], config_copy)
    return {
        "restored_from": str(src),
        "backup_created_at": manifest.get("created_at"),
        "state_dir": str(state_dir),
        "ca_dir": str(ca_dir),
        "registry": "postgresql" if db_file is None else str(db_file),
        "superlink_db": str(superlink) if manifest.get("superlink") else None,
        "config_copy": str(config_copy) if config_copy else None,
        "files": len(manifest["files"]),
        "next": (
            "start the server on it (edgefl server start -c SERVER_CONFIG); its host names "
            "and IPs must be the ones in the restored server certificate (hostnames/ips of "
            "the backed-up config) for devices to reconnect"
        ),
    }


def _pg_restore(url: str, dump: Path) -> None:
    exe = shutil.which("pg_restore")
    if exe is None:
        raise BackupError("pg_restore is not installed", hint="apt-get install postgresql-client")
    dsn, env, _schema = _libpq(url)
    done = subprocess.run(  # fixed argv, no shell
        [
            exe,
            "--clean",
            "--if-exists",
            "--no-owner",
            "--single-transaction",
            f"--dbname={dsn}",
            str(dump),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BackupError(f"pg_restore failed: {done.stderr.strip()[-500:]}")
