"""Reported model state: ``state/reported`` into ``device_states``, and ``server devices``.

A real mosquitto on a free loopback port, the real ingest, SQLite and PostgreSQL (the
``db_url`` fixture runs each test on both).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.proto.desired import MAX_STATE_BYTES, LastFailure, ReportedState
from edgefl.proto.topics import record_topic, state_reported_topic
from edgefl.server.admin import device_rows
from edgefl.server.ingest import DEAD_LETTER_REASONS, Ingest, IngestConfig
from edgefl.server.registry import DeviceState, make_engine, upgrade
from edgefl.server.registry.db import alembic_config
from edgefl.testing import Mosquitto, wait_for

try:
    from tests.test_ingest import (
        TIMEOUT,
        Publisher,
        _config,
        _enroll,
        dead_letters,
        device_row,
        envelope,
        record_count,
    )
except ImportError:  # run from inside tests/
    from test_ingest import (  # type: ignore[import-not-found,no-redef]
        TIMEOUT,
        Publisher,
        _config,
        _enroll,
        dead_letters,
        device_row,
        envelope,
        record_count,
    )


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def registry(db_url: str) -> Iterator[sa.Engine]:
    """An engine for the test's own queries (the ingest has its own)."""
    upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    pub = Publisher(broker)
    yield pub
    pub.close()


@contextlib.contextmanager
def running(config: IngestConfig) -> Iterator[Ingest]:
    """The ingest, subscribed; stopped after."""
    service = Ingest(config)
    service.start()
    try:
        assert service.wait_ready(TIMEOUT), "ingest did not subscribe"
        yield service
    finally:
        service.stop()


@pytest.fixture
def ingest(broker: Mosquitto, db_url: str, fleet: str) -> Iterator[Ingest]:
    """The ingest of one fleet with the default payload limit (256 KiB)."""
    with running(_config(broker, db_url, fleet)) as service:
        yield service


def reported(device: str, version: int | None = 3, **changes: Any) -> bytes:
    """A reported state as the agent publishes it (compact JSON, keys sorted)."""
    fields: dict[str, Any] = {
        "device": device,
        "model": "digits-mlp",
        "version": version,
        "variant": "pruned50-int8",
        "sha256": "5" * 64,
        "since": 1_764_979_262,
        "state": "running",
        "rollbacks": 0,
    }
    fields.update(changes)
    return ReportedState.model_validate(fields).to_json()


FAILED_UPDATE = LastFailure(
    version=4, reason="golden_mismatch", detail="3 of 8 golden outputs off", at=1_764_980_000
).model_dump()


def state_row(engine: sa.Engine, device: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(DeviceState).where(DeviceState.device_id == device)).first()


def utc(value: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; they mean UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def settled(ingest: Ingest, acked: int) -> None:
    wait_for(lambda: ingest.metrics()["acked"] == acked, TIMEOUT, f"{acked} acknowledgements")


# -- the schema --------------------------------------------------------------------------


def test_migration_0006_adds_and_drops_device_states(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        columns = {c["name"] for c in sa.inspect(engine).get_columns("device_states")}
        assert columns == {
            "device_id",
            "fleet",
            "model",
            "version",
            "variant",
            "sha256",
            "state",
            "since",
            "rollbacks",
            "last_failure_version",
            "last_failure_reason",
            "last_failure_detail",
            "last_failure_at",
            "reported_at",
            "document",
        }
        engine.dispose()
        command.downgrade(alembic_config(db_url), "0005")
        assert "device_states" not in sa.inspect(engine).get_table_names()
        assert "devices" in sa.inspect(engine).get_table_names()
        upgrade(db_url)
        assert "device_states" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


# -- the ingest ----------------------------------------------------------------------------


@pytest.mark.slow
def test_reports_are_stored_the_newest_wins_and_a_redelivery_changes_nothing(
    broker: Mosquitto, db_url: str, fleet: str, publisher: Publisher, registry: sa.Engine
) -> None:
    device = f"d{uuid.uuid4().hex[:8]}"
    topic = state_reported_topic(fleet, device)
    config = _config(broker, db_url, fleet)
    first = reported(device, 3)
    rolled_back = reported(device, 3, state="rolled_back", rollbacks=1, last_failure=FAILED_UPDATE)
    with running(config) as ingest:
        publisher.publish(topic, first, retain=True)
        settled(ingest, 1)
        row = state_row(registry, device)
        assert (row.fleet, row.model, row.version, row.variant) == (
            fleet,
            "digits-mlp",
            3,
            "pruned50-int8",
        )
        assert (row.sha256, row.state, row.rollbacks) == ("5" * 64, "running", 0)
        assert utc(row.since) == datetime.fromtimestamp(1_764_979_262, UTC)
        assert row.last_failure_reason is row.last_failure_version is row.last_failure_at is None
        assert row.document == first.decode()
        seen = device_row(registry, device)  # the device is known, and seen
        assert seen.fleet == fleet
        assert seen.online is False

        publisher.publish(topic, rolled_back, retain=True)
        settled(ingest, 2)
        row = state_row(registry, device)
        assert (row.state, row.rollbacks, row.version) == ("rolled_back", 1, 3)
        assert (row.last_failure_version, row.last_failure_reason) == (4, "golden_mismatch")
        assert row.last_failure_detail == "3 of 8 golden outputs off"
        assert utc(row.last_failure_at) == datetime.fromtimestamp(1_764_980_000, UTC)
        assert json.loads(row.document) == json.loads(rolled_back)

        # The same document again (a republish, a redelivery): nothing changes.
        publisher.publish(topic, rolled_back, retain=True)
        settled(ingest, 3)
        assert state_row(registry, device) == row

        # Three reports in a row, maybe one batch: the last one is what the device runs.
        infos = [
            publisher.client.publish(topic, reported(device, 5, state=state), qos=1, retain=True)
            for state in ("downloading", "verifying", "running")
        ]
        for info in infos:
            info.wait_for_publish(10)
        settled(ingest, 6)
        newest = state_row(registry, device)
        assert (newest.version, newest.state) == (5, "running")
        metrics = ingest.metrics()
        assert (metrics["state_updates"], metrics["state_unchanged"]) == (5, 1)
        assert metrics["dead_lettered"] == 0
        last_seen = device_row(registry, device).last_seen

    # A restarted ingest subscribes again and the broker sends the retained report again:
    # the same document, so the row stays, and the device is not "seen" by it.
    with running(config) as ingest:
        wait_for(lambda: ingest.metrics()["state_unchanged"] == 1, TIMEOUT, "the retained copy")
        assert state_row(registry, device) == newest
        assert device_row(registry, device).last_seen == last_seen
        assert ingest.metrics()["state_updates"] == 0

        # The device clears its retained report: nothing is cleared, nothing is refused.
        publisher.publish(topic, b"", retain=True)
        settled(ingest, 2)
        assert state_row(registry, device) == newest
        assert ingest.metrics()["dead_lettered"] == 0
    assert dead_letters(registry) == []


@pytest.mark.slow
def test_malformed_reports_are_dead_lettered_and_honest_messages_go_on(
    ingest: Ingest, publisher: Publisher, registry: sa.Engine, fleet: str
) -> None:
    device = f"d{uuid.uuid4().hex[:8]}"
    topic = state_reported_topic(fleet, device)
    valid = json.loads(reported(device))
    bad: list[tuple[bytes, str, str]] = [
        (b"running", "malformed_state", "Invalid JSON"),
        (envelope(device, 1), "malformed_state", "malformed reported state"),  # an envelope
        (json.dumps({"device": device}).encode(), "malformed_state", "at state"),
        (json.dumps(valid | {"state": "hacked"}).encode(), "malformed_state", "at state"),
        (json.dumps(valid | {"extra": 1}).encode(), "malformed_state", "at extra"),
        (json.dumps(valid | {"version": 2**64}).encode(), "malformed_state", "version"),
        (json.dumps(valid | {"model": "m\x00"}).encode(), "malformed_state", "NUL"),
        (json.dumps(valid | {"variant": "v" * 65}).encode(), "malformed_state", "65 characters"),
        (json.dumps(valid | {"since": 10**15}).encode(), "malformed_state", "since"),
        (json.dumps(valid | {"pad": "x" * MAX_STATE_BYTES}).encode(), "oversized", "65536"),
    ]
    for payload, _reason, _detail in bad:
        publisher.publish(topic, payload, retain=True)
    publisher.publish(record_topic(fleet, device, "telemetry", "t"), envelope(device, 1))
    good = reported(device, 2)
    publisher.publish(topic, good, retain=True)
    settled(ingest, len(bad) + 2)
    letters = dead_letters(registry)
    assert [(t, r) for t, r, *_ in letters] == [(topic, reason) for _p, reason, _d in bad]
    for (_t, _r, detail, size, _n), (payload, _reason, expected) in zip(letters, bad, strict=True):
        assert expected in detail, detail
        assert size == len(payload)
    metrics = ingest.metrics()
    assert metrics["dead_lettered.malformed_state"] == len(bad) - 1
    assert metrics["dead_lettered.oversized"] == 1
    assert (metrics["stored"], metrics["state_updates"]) == (1, 1)
    assert record_count(registry, device) == 1
    assert state_row(registry, device).document == good.decode()
    assert "malformed_state" in DEAD_LETTER_REASONS
    publisher.publish(topic, b"", retain=True)


@pytest.mark.slow
def test_a_report_naming_another_device_is_device_mismatch(
    ingest: Ingest, publisher: Publisher, registry: sa.Engine, fleet: str
) -> None:
    victim, other = f"v{uuid.uuid4().hex[:8]}", f"o{uuid.uuid4().hex[:8]}"
    own = reported(victim, 3)
    publisher.publish(state_reported_topic(fleet, victim), own)
    settled(ingest, 1)
    before = state_row(registry, victim)
    forged = reported(victim, 9, state="failed", last_failure=FAILED_UPDATE)
    publisher.publish(state_reported_topic(fleet, other), forged)
    settled(ingest, 2)
    ((topic, reason, detail, _s, _n),) = dead_letters(registry)
    assert (topic, reason) == (state_reported_topic(fleet, other), "device_mismatch")
    assert f"names device {victim!r}, not the topic's device {other!r}" in detail
    assert state_row(registry, victim) == before
    assert state_row(registry, other) is None
    assert device_row(registry, other) is None  # a refused message makes no device


@pytest.mark.slow
def test_a_report_under_another_fleet_is_fleet_mismatch(
    broker: Mosquitto, publisher: Publisher, db_url: str, registry: sa.Engine
) -> None:
    enrolled, unenrolled = f"e{uuid.uuid4().hex[:8]}", f"u{uuid.uuid4().hex[:8]}"
    home, other = f"h{uuid.uuid4().hex[:6]}", f"o{uuid.uuid4().hex[:6]}"
    _enroll(registry, enrolled, home)
    config = _config(broker, db_url, "+", client_id=f"ing-{uuid.uuid4().hex[:8]}")
    with running(config) as ingest:
        publisher.publish(state_reported_topic(other, enrolled), reported(enrolled, 1))
        publisher.publish(state_reported_topic(home, enrolled), reported(enrolled, 2))
        # A device without enrollment keeps the fleet it was first seen in.
        publisher.publish(state_reported_topic(home, unenrolled), reported(unenrolled, 1))
        publisher.publish(state_reported_topic(other, unenrolled), reported(unenrolled, 2))
        settled(ingest, 4)
        metrics = ingest.metrics()
    assert metrics["dead_lettered.fleet_mismatch"] == 2
    assert metrics["state_updates"] == 2
    assert (state_row(registry, enrolled).version, state_row(registry, enrolled).fleet) == (2, home)
    assert (state_row(registry, unenrolled).version, state_row(registry, unenrolled).fleet) == (
        1,
        home,
    )


# -- the listing -----------------------------------------------------------------------------


@pytest.mark.slow
def test_server_devices_shows_the_reported_model_state(
    ingest: Ingest, publisher: Publisher, registry: sa.Engine, fleet: str, db_url: str
) -> None:
    ok, failed, silent = (f"{name}-{uuid.uuid4().hex[:6]}" for name in ("a", "b", "c"))
    publisher.publish(state_reported_topic(fleet, ok), reported(ok, 3))
    publisher.publish(
        state_reported_topic(fleet, failed),
        reported(failed, 3, state="rolled_back", rollbacks=2, last_failure=FAILED_UPDATE),
    )
    publisher.publish(record_topic(fleet, silent, "telemetry", "t"), envelope(silent, 1))
    settled(ingest, 3)

    result = CliRunner().invoke(app, ["server", "devices", "--db-url", db_url, "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["device_id"]: row for row in json.loads(result.stdout)["devices"]}
    assert set(rows) == {ok, failed, silent}
    assert len({tuple(row) for row in rows.values()}) == 1  # the same keys on every row
    assert rows[ok]["model"] == "digits-mlp"
    assert (rows[ok]["version"], rows[ok]["state"], rows[ok]["rollbacks"]) == (3, "running", 0)
    assert rows[ok]["last_failure"] is None
    assert rows[ok]["since"] == "2025-12-06T00:01:02+00:00"
    assert rows[failed]["last_failure"] == {
        "version": 4,
        "reason": "golden_mismatch",
        "detail": "3 of 8 golden outputs off",
        "at": "2025-12-06T00:13:20+00:00",
    }
    assert (rows[failed]["state"], rows[failed]["rollbacks"]) == ("rolled_back", 2)
    assert rows[silent]["model"] is rows[silent]["state"] is rows[silent]["rollbacks"] is None
    assert rows[silent]["records"] == 1
    assert device_rows(db_url) == sorted(rows.values(), key=lambda row: row["device_id"])

    table = CliRunner().invoke(app, ["server", "devices", "--db-url", db_url])
    assert table.exit_code == 0, table.output
    header, _rule, *lines = table.stdout.splitlines()
    assert header.split() == [
        "device",
        "fleet",
        "presence",
        "last",
        "seen",
        "records",
        "model",
        "version",
        "state",
        "rollbacks",
        "last",
        "failure",
        "agent",
        "ε",
        "outbox",
    ]
    # The model columns (the agent, ε and outbox columns after them are "-" here).
    cells = {line.split()[0]: line.split()[5:-3] for line in lines}
    assert cells[ok] == ["digits-mlp", "3", "running", "0", "-"]
    assert cells[failed] == [
        "digits-mlp",
        "3",
        "rolled_back",
        "2",
        "v4",
        "golden_mismatch",
        "at",
        "2025-12-06T00:13:20+00:00",
    ]
    assert cells[silent] == ["-"] * 5
