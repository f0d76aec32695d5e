"""What the ``edgefl server`` admin commands open from the server config file.

The commands that act on a deployment (``admit``, ``revoke``, ``enrollments``, ``train``,
``operator-cert``, ``app-key``) and the ones that read its registry (``ingest``,
``devices``) all start from the same ``server.yaml``: its fleet CA, its registry, its
SuperLink (found through the running server's ``server.json`` when it picked a port) and
its broker. That job lives here, apart from the typer wiring in :mod:`edgefl.server.cli`,
so that it has a type (:class:`AdminContext` instead of an untyped record) and can be used
and tested without a command line. Heavy modules (cryptography, SQLAlchemy, the Flower
wrapper) are imported when a function runs, so ``edgefl --help`` stays quick.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from edgefl.errors import ConfigError
from edgefl.netutil import dial_host

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from edgefl.server.config import ServerConfig
    from edgefl.server.fl.superlink import FlowerAdmin
    from edgefl.server.fleet_ca import FleetCA
    from edgefl.server.ingest import IngestConfig

__all__ = [
    "AdminContext",
    "connect",
    "device_rows",
    "ingest_settings",
    "open_ca",
    "registry_url",
]


@dataclass
class AdminContext:
    """A server's CA, registry and SuperLink, opened for one admin command.

    Use it as a context manager (or call :meth:`close`): the registry engine is disposed.

    Attributes:
        config: The server config.
        ca: The fleet CA.
        engine: The registry, migrated to head.
        admin: The ``flwr`` wrapper for the SuperLink (its own Flower home).
        superlink_address: The address devices dial (what a bundle names).
    """

    config: ServerConfig
    ca: FleetCA
    engine: Engine
    admin: FlowerAdmin
    superlink_address: str

    def close(self) -> None:
        """Dispose of the registry engine."""
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_ca(cfg: ServerConfig, config_path: Path | None, *, name_config: bool = True) -> FleetCA:
    """The server's fleet CA.

    Raises:
        ConfigError: There is none yet (the server never started with this config).
    """
    from edgefl.server.fleet_ca import FleetCA

    ca_dir = cfg.resolved_ca_dir
    if not (ca_dir / "ca.pem").exists():
        if not name_config:
            raise ConfigError(
                f"no fleet CA in {ca_dir}", hint="start the server once with `edgefl server start`"
            )
        where = f"--config {config_path}" if config_path is not None else "the default config"
        raise ConfigError(
            f"no fleet CA in {ca_dir} ({where})",
            hint="start the server once with `edgefl server start"
            + (f" --config {config_path}`" if config_path is not None else "`")
            + ", or pass the --config it runs with",
        )
    return FleetCA.load(ca_dir)


def connect(config_path: Path | None, *, need_superlink: bool = True) -> AdminContext:
    """Open the CA, the registry and a ``flwr`` wrapper from the server config file.

    Args:
        config_path: ``server.yaml`` (``None``: the built-in defaults).
        need_superlink: Fail when the SuperLink cannot be found (a stopped server whose
            ``superlink.port`` is 0); ``enrollments`` works without it.

    Raises:
        ConfigError: The config is invalid, there is no CA, or no SuperLink to talk to.
    """
    from edgefl.server.config import read_server_config
    from edgefl.server.fl.superlink import FlowerAdmin
    from edgefl.server.registry import make_engine, upgrade
    from edgefl.server.runtime import read_runtime
    from edgefl.server.serve import ADMIN_FLWR_HOME

    cfg = read_server_config(config_path)
    where = f"--config {config_path}" if config_path is not None else "the default config"
    ca = open_ca(cfg, config_path)
    upgrade(cfg.resolved_db_url)
    engine = make_engine(cfg.resolved_db_url)
    runtime = read_runtime(cfg.resolved_state_dir) or {}
    sl = cfg.superlink
    admin_address = runtime.get("superlink_admin")
    public = runtime.get("superlink")
    if admin_address is None:
        if sl.port == 0 and need_superlink:
            engine.dispose()
            raise ConfigError(
                f"the server of {where} is not running (no {cfg.resolved_state_dir}/server.json) "
                "and superlink.port is 0, so its SuperLink cannot be found",
                hint="start it with `edgefl server start`",
            )
        admin_address = f"{dial_host(sl.host)}:{sl.port}"
        public = sl.public_address or f"{sl.host}:{sl.port}"
    admin = FlowerAdmin(
        str(admin_address),
        cfg.resolved_state_dir / ADMIN_FLWR_HOME,
        root_certificates=None if sl.insecure else ca.cert_path,
        insecure=sl.insecure,
    )
    return AdminContext(cfg, ca, engine, admin, str(public))


def _broker_of(cfg: ServerConfig) -> tuple[str, int]:
    """Where the server's broker is reached: the running server's port, else the config's."""
    from edgefl.server.runtime import read_runtime

    running = (read_runtime(cfg.resolved_state_dir) or {}).get("broker") or {}
    host = running.get("host") or dial_host(cfg.broker.host)
    port = running.get("port") or cfg.broker.port
    if not port:
        raise ConfigError(
            f"broker.port is 0 and the server of state_dir {cfg.resolved_state_dir} is not "
            "running, so the broker's port is unknown",
            hint="start the server, or set broker.port (or ingest.broker.port)",
        )
    return str(host), int(port)


def ingest_settings(config_path: Path | None, overrides: dict[str, Any]) -> IngestConfig:
    """The ingest's settings for ``edgefl server ingest``: file, then flags.

    With server.yaml, the ``ingest:`` section, filled in like ``server start`` does
    (the server's broker, registry and ``edgefl-ingest`` certificate); a bare ingest
    config file is still read as it is (see :func:`~edgefl.server.config.read_ingest_file`);
    without a file, the :class:`~edgefl.server.ingest.IngestConfig` defaults (a local
    plaintext broker and SQLite).

    Args:
        config_path: The config file, or ``None``.
        overrides: ``broker_port`` and ``db_url`` from the flags (``None``: not given).

    Raises:
        ConfigError: An invalid file or value, naming the key.
    """
    from edgefl.config import validate_config
    from edgefl.server.config import ServerConfig, read_ingest_file
    from edgefl.server.ingest import IngestConfig

    base: dict[str, Any] = {}
    source = "command line"
    if config_path is not None:
        source = str(config_path)
        read = read_ingest_file(config_path)
        if isinstance(read, ServerConfig):
            source = f"{config_path} (ingest)"
            try:
                read = read.ingest_settings(*_broker_of(read))
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from exc
        base = read.model_dump(exclude_unset=True)
    if overrides.get("broker_port") is not None:
        base["broker"] = {**base.get("broker", {}), "port": overrides["broker_port"]}
    if overrides.get("db_url") is not None:
        base["db_url"] = overrides["db_url"]
    return validate_config(IngestConfig, base, source=source)


def registry_url(config_path: Path | None, override: str | None) -> str:
    """The registry ``edgefl server devices`` reads: ``--db-url``, else the file's.

    Without either, the ingest's default (``sqlite:///<state dir>/edgefl.db``), as before.
    """
    if override is not None:
        return override
    if config_path is None:
        from edgefl.server.registry.db import default_database_url

        return default_database_url()
    from edgefl.server.config import ServerConfig, read_ingest_file

    read = read_ingest_file(config_path)
    return read.resolved_db_url if isinstance(read, ServerConfig) else read.db_url


def device_rows(db_url: str) -> list[dict[str, Any]]:
    """The registry's devices for ``edgefl server devices``, oldest id first.

    The rows of the ``devices`` operation (:func:`edgefl.server.ops.fleet.device_list`):
    ``device_id``, ``fleet``, ``online``, ``presence``, ``last_seen`` (ISO 8601 with its UTC
    offset, or ``None``), ``records`` (how many it stored), the agent and envelope
    versions, ``epsilon`` and ``outbox``, and what the device last reported on
    ``state/reported`` (:func:`~edgefl.server.device_states.read_model_states`):
    ``model``, ``version``, ``variant``, ``sha256``, ``state``, ``since``, ``rollbacks``,
    ``last_failure`` (``{version, reason, detail, at}`` or ``None``) and ``reported_at``,
    all ``None`` for a device that never reported.

    Raises:
        BadInputError: The registry cannot be read (its URL shown without a password).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from edgefl.errors import BadInputError
    from edgefl.server.ops.fleet import device_list
    from edgefl.server.registry import make_engine
    from edgefl.server.registry.db import display_url

    engine = make_engine(db_url)
    try:
        return device_list(engine)
    except SQLAlchemyError as exc:
        raise BadInputError(
            f"cannot read the registry at {display_url(db_url)}: {str(exc).splitlines()[0]}",
            hint="start `edgefl server ingest` once to create it, or pass --db-url",
        ) from exc
    finally:
        engine.dispose()
