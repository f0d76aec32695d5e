"""Alembic environment for the registry; driven by ``edgefl.server.registry.db.upgrade``."""

from __future__ import annotations

from alembic import context

from edgefl.server.registry.db import default_database_url, make_engine
from edgefl.server.registry.models import Base

target_metadata = Base.metadata


def _url() -> str:
    config = context.config
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    return str(url) if url else default_database_url()


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of connecting (``alembic upgrade --sql``)."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Connect and migrate; SQLite gets batch mode so ALTERs work there."""
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
