from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from edgefl.process import read_tail
from edgefl.server import fleet_ca
from edgefl.testing import EdgeflProcesses, Mosquitto

PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mosquitto]:
    """A plain mosquitto on a free loopback port, in memory.

    ``persistent`` (indirect param) saves sessions to ``tmp_path/mosquitto-data`` every
    second. Brokers with TLS, an ACL or users stay in the files that need them.
    """
    # mosquitto drops past max_queued_messages (1000 by default) for an offline session;
    # the ingest and fault tests queue more than that for a device that is away.
    lines = ["max_queued_messages 100000"]
    if getattr(request, "param", "memory") == "persistent":
        store = tmp_path / "mosquitto-data"
        store.mkdir()
        # Later lines win over the helper's "persistence false". The shipped config
        # (deploy/mosquitto) uses autosave_interval 60; 1 s keeps the test short.
        lines += ["persistence true", f"persistence_location {store}/", "autosave_interval 1"]
    with Mosquitto(tmp_path, extra_lines=lines) as running:
        yield running


@pytest.fixture
def edgefl_procs(tmp_path: Path) -> Iterator[EdgeflProcesses]:
    """Start ``edgefl`` commands as processes (``edgefl_procs.start(*args, log=...)``).

    Each runs in its own process group with its output in ``tmp_path``; every one is
    stopped after the test, and the end of each log is printed (pytest shows it when the
    test fails).
    """
    with EdgeflProcesses(tmp_path) as procs:
        yield procs
    for log in dict.fromkeys(proc.log_path for proc in procs.started):
        print(f"--- end of {log}:\n{read_tail(log, 4000)}")


@pytest.fixture
def fleet() -> str:
    """A fleet name no other test (or a broker another test left running) uses."""
    return f"f{os.getpid()}{uuid.uuid4().hex[:8]}"


def _postgres_problem() -> str | None:
    """``None`` if the test server answers, else why not."""
    engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return None
    except sa.exc.OperationalError as exc:
        return str(exc).splitlines()[0]
    finally:
        engine.dispose()


@pytest.fixture
def sign_expired_crl(monkeypatch: pytest.MonkeyPatch) -> Callable[[fleet_ca.FleetCA], dt.datetime]:
    """Sign a CA's CRL as if 40 days ago (expired 10 days ago); return its nextUpdate."""

    def sign(ca: fleet_ca.FleetCA) -> dt.datetime:
        real_now = fleet_ca._now
        with monkeypatch.context() as patch:
            patch.setattr(fleet_ca, "_now", lambda: real_now() - dt.timedelta(days=40))
            ca.crl_pem()
        expired = ca.crl_next_update()
        assert expired is not None
        assert expired < dt.datetime.now(dt.UTC)
        return expired

    return sign


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL whose connections live in a fresh schema of the test database; dropped after."""
    problem = _postgres_problem()
    if problem is not None:
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {problem}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The registry URL, once on SQLite in tmp_path and once on its own PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'edgefl.db'}"
    return str(request.getfixturevalue("pg_url"))
