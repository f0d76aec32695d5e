"""Registry schema: alembic migrations on an empty SQLite file and on PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import IntegrityError

from edgefl.errors import ConfigError
from edgefl.server.registry import (
    Base,
    DeadLetter,
    Device,
    Record,
    default_database_url,
    make_engine,
    session_factory,
    upgrade,
)
from edgefl.server.registry.db import alembic_config

TABLES = {"alembic_version", "dead_letters", "devices", "records"}


def _schema_drift(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


def test_upgrade_creates_the_schema_and_matches_the_models(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)  # idempotent
    engine = make_engine(db_url)
    try:
        assert set(sa.inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as conn:
            head = ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == head
        assert _schema_drift(engine) == []
    finally:
        engine.dispose()


def test_upgrade_downgrade_round_trip(db_url: str) -> None:
    upgrade(db_url)
    command.downgrade(alembic_config(db_url), "base")
    engine = make_engine(db_url)
    try:
        assert not {"devices", "records", "dead_letters"} & set(
            sa.inspect(engine).get_table_names()
        )
        upgrade(db_url)
        assert _schema_drift(engine) == []
    finally:
        engine.dispose()


def test_unique_key_and_foreign_key_are_enforced(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    factory = session_factory(engine)
    now = datetime.now(UTC)

    def record(device_id: str, seq: int) -> Record:
        return Record(
            device_id=device_id,
            seq=seq,
            kind="telemetry",
            topic=f"edgefl/f/{device_id}/telemetry/t",
            ts_ms=1,
            content_type="application/json",
            body=b"{}",
            received_at=now,
        )

    try:
        with factory() as session, session.begin():
            session.add(Device(device_id="d1", fleet="f", first_seen=now, last_seen=now))
            session.flush()
            session.add(record("d1", 1))
            session.add(
                DeadLetter(
                    topic="t", payload=b"x", payload_size=1, reason="r", detail="", received_at=now
                )
            )
        with pytest.raises(IntegrityError), factory() as session, session.begin():
            session.add(record("d1", 1))
        with pytest.raises(IntegrityError), factory() as session, session.begin():
            session.add(record("unknown-device", 1))
        with factory() as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(Record)) == 1
            device = session.get(Device, "d1")
            assert device is not None
            assert device.online is False
            assert device.status_changed_at is None
            assert session.scalar(sa.select(Record.seq)) == 1
            big = record("d1", 2**63 - 1)
            session.add(big)
            session.commit()
            assert session.get(Record, big.id) is not None
    finally:
        engine.dispose()


def test_sqlite_is_opened_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'dir' / 'edgefl.db'}"
    upgrade(url)
    assert (tmp_path / "nested" / "dir" / "edgefl.db").is_file()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_default_url_lives_in_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFL_STATE_DIR", str(tmp_path / "state"))
    assert default_database_url() == f"sqlite:///{tmp_path / 'state' / 'edgefl.db'}"
    monkeypatch.delenv("EDGEFL_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_database_url() == f"sqlite:///{tmp_path / 'xdg' / 'edgefl' / 'edgefl.db'}"


def test_bad_urls_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="invalid database URL"):
        make_engine("not a url")
    with pytest.raises(ConfigError, match="cannot use database URL"):
        make_engine("nosuchdb://x/y")


def test_unreachable_database_migration_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot migrate"):
        upgrade("postgresql+psycopg2://postgres@127.0.0.1:1/none?connect_timeout=2")
