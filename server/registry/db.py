"""Engines, sessions and schema migrations for the registry.

SQLite is the default (``sqlite:///<state dir>/edgefl.db``), opened in WAL mode with
foreign keys on; PostgreSQL works through ``postgresql+psycopg2://`` URLs. The schema is
created and changed only by alembic: :func:`upgrade` runs the migrations shipped in this
package to head, with a configuration built in code (no ``alembic.ini`` needed).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from edgefl.errors import ConfigError
from edgefl.resources import package_path

__all__ = [
    "DEFAULT_DB_FILENAME",
    "alembic_config",
    "default_database_url",
    "default_state_dir",
    "display_url",
    "make_engine",
    "session_factory",
    "split_password",
    "upgrade",
    "with_password",
]

DEFAULT_DB_FILENAME: Final = "edgefl.db"
_SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
# user:password@ in a URL SQLAlchemy cannot parse (display_url must never fail).
_PASSWORD_IN_URL: Final = re.compile(r"(://[^:/@]*:)[^@]*@")


def display_url(url: str) -> str:
    """``url`` with its password shown as ``***``: for output, logs and files.

    Only :func:`make_engine` (and what the ServerApp rebuilds with
    :func:`with_password`) ever needs the password; everything shown goes through this.
    """
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return _PASSWORD_IN_URL.sub(r"\1***@", url)


def split_password(url: str) -> tuple[str, str | None]:
    """``(url without its password, the password or None)``; see :func:`with_password`."""
    parsed = make_url(url)
    if parsed.password is None:
        return url, None
    # URL.set() ignores None; the URL is a NamedTuple, so _replace clears the field.
    bare = parsed._replace(password=None).render_as_string(hide_password=False)
    return bare, str(parsed.password)


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` put back (the inverse of :func:`split_password`)."""
    return make_url(url).set(password=password).render_as_string(hide_password=False)


def default_state_dir() -> Path:
    """Where the server keeps its state.

    Returns:
        ``$EDGEFL_STATE_DIR`` if set, else ``$XDG_STATE_HOME/edgefl``, else
        ``~/.local/state/edgefl``.
    """
    explicit = os.environ.get("EDGEFL_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "edgefl"


def default_database_url() -> str:
    """The default registry URL: ``sqlite:///<state dir>/edgefl.db``."""
    return f"sqlite:///{default_state_dir() / DEFAULT_DB_FILENAME}"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for the registry.

    SQLite connections get ``journal_mode=WAL``, ``foreign_keys=ON``,
    ``synchronous=NORMAL`` (survives a process crash; a power loss may lose the last
    commits) and a busy timeout; the database file's folder is created if missing.

    Args:
        url: An SQLAlchemy URL, e.g. ``sqlite:///state/edgefl.db`` or
            ``postgresql+psycopg2://user@host:5432/db``.
        **kwargs: Passed on to :func:`sqlalchemy.create_engine`.

    Returns:
        The engine.

    Raises:
        ConfigError: The URL cannot be parsed or names an unknown driver.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"invalid database URL {display_url(url)!r}: {exc}") from exc
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    if parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError, SQLAlchemyError) as exc:
        raise ConfigError(f"cannot use database URL {parsed!r}: {exc}") from exc
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine`` that keeps objects usable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """An alembic configuration for the migrations shipped in this package.

    The URL travels in ``Config.attributes`` (not the ini options), so URLs containing
    ``%`` need no escaping.
    """
    config = Config()
    migrations = package_path("edgefl.server.registry.migrations")
    config.set_main_option("script_location", str(migrations))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision`` (default: the newest).

    Args:
        url: The database URL.
        revision: An alembic revision id, or ``"head"``.

    Raises:
        ConfigError: The database cannot be reached or migrated.
    """
    try:
        command.upgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot migrate the registry database: {exc}") from exc
