"""Retention of records, dead letters and checkpoints: the policy, dry run, batches, the
server's periodic pass, and bad input."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.errors import ExitCode
from edgefl.server.registry import DEFAULT_DB_FILENAME, make_engine, upgrade
from edgefl.server.registry.models import (
    AuditEntry,
    DeadLetter,
    Device,
    FlCheckpoint,
    FlRun,
    Record,
    Release,
)
from edgefl.server.retention import RetentionConfig, RetentionLoop, apply_retention

NOW = datetime.now(UTC)


def _fill(engine: sa.Engine) -> None:
    """10 records (4 older than a year), 6 dead letters (2 older than 90 days), 2 runs of
    checkpoints (run-a: rounds 1-6, round 2 released; run-b: round 1 only)."""
    with Session(engine) as session, session.begin():
        session.add(Device(device_id="d1", fleet="lab", first_seen=NOW, last_seen=NOW))
        session.flush()
        for seq in range(1, 11):
            age = timedelta(days=400 if seq <= 4 else 1)
            session.add(
                Record(
                    device_id="d1",
                    incarnation="",
                    seq=seq,
                    kind="telemetry",
                    topic="edgefl/lab/d1/telemetry/x",
                    ts_ms=1,
                    content_type="",
                    body=b"x",
                    received_at=NOW - age,
                )
            )
        for i in range(6):
            session.add(
                DeadLetter(
                    topic="edgefl/lab/d1/telemetry/x",
                    payload=b"",
                    payload_size=0,
                    reason="malformed_envelope",
                    detail="",
                    received_at=NOW - timedelta(days=100 if i < 2 else 1),
                )
            )
        for run, rounds in (("run-a", 6), ("run-b", 1)):
            session.add(
                FlRun(
                    run_id=run,
                    plan_json="{}",
                    plan_key="k",
                    status="completed",
                    created_at=NOW,
                    updated_at=NOW,
                )
            )
            session.flush()
            for rnd in range(1, rounds + 1):
                session.add(
                    FlCheckpoint(
                        run_id=run,
                        round=rnd,
                        model=b"m",
                        strategy_state=b"s",
                        accountants_json="{}",
                        at=NOW - timedelta(days=30),
                    )
                )
        session.add(
            Release(
                model="m",
                version=1,
                run_id="run-a",
                round=2,
                plan_hash="h",
                dp_mode="local",
                calibration="none",
                device_class="cpu",
                created_by="t",
                created_at=NOW,
                expires_at=NOW,
                status="published",
            )
        )


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[Path, sa.Engine]]:
    state = tmp_path / "srv"
    state.mkdir()
    url = f"sqlite:///{state / DEFAULT_DB_FILENAME}"
    upgrade(url)
    engine = make_engine(url)
    _fill(engine)
    config = tmp_path / "server.yaml"
    config.write_text(
        f"state_dir: {state}\nretention:\n  batch_rows: 2\n  pause_s: 0\n"
        "  records: {max_age_days: 365, max_rows: 5}\n",
        encoding="utf-8",
    )
    yield config, engine
    engine.dispose()


def _left(engine: sa.Engine) -> dict[str, object]:
    with engine.connect() as conn:
        return {
            "records": sorted(conn.execute(sa.select(Record.seq)).scalars()),
            "dead_letters": conn.execute(
                sa.select(sa.func.count()).select_from(DeadLetter)
            ).scalar_one(),
            "checkpoints": sorted(
                (r, n) for r, n in conn.execute(sa.select(FlCheckpoint.run_id, FlCheckpoint.round))
            ),
        }


def test_dry_run_counts_and_apply_deletes_by_the_stated_policy(
    registry: tuple[Path, sa.Engine],
) -> None:
    config, engine = registry
    before = _left(engine)
    dry = CliRunner().invoke(app, ["server", "retention", "--dry-run", "-c", str(config), "--json"])
    assert dry.exit_code == 0, dry.output
    counted = json.loads(dry.stdout)
    # records: 4 older than 365 days, then 6 left > max_rows 5: 1 more (the oldest).
    # dead letters: 2 older than 90 days. checkpoints of run-a: newest 3 (6, 5, 4) kept,
    # round 2 released: rounds 1 and 3 go; run-b's only one stays.
    assert counted["deleted"] == {
        "records": {"age": 4, "rows": 1},
        "dead_letters": {"age": 2, "rows": 0},
        "fl_checkpoints": {"keep_last": 2, "age": 0},
    }
    assert counted["dry_run"] is True
    assert _left(engine) == before

    res = CliRunner().invoke(app, ["server", "retention", "--apply", "-c", str(config), "--json"])
    assert res.exit_code == 0, res.output
    done = json.loads(res.stdout)
    assert done["totals"] == {"records": 5, "dead_letters": 2, "fl_checkpoints": 2}
    assert done["batches"] >= 4  # batch_rows 2: the deletes went in several transactions
    assert _left(engine) == {
        "records": [6, 7, 8, 9, 10],
        "dead_letters": 4,
        "checkpoints": [
            ("run-a", 2),
            ("run-a", 4),
            ("run-a", 5),
            ("run-a", 6),
            ("run-b", 1),
        ],
    }
    with engine.connect() as conn:
        actions = conn.execute(sa.select(AuditEntry.target)).scalars().all()
    assert actions == ["dry-run", "apply"]
    again = CliRunner().invoke(app, ["server", "retention", "--apply", "-c", str(config), "--json"])
    assert json.loads(again.stdout)["totals"] == {
        "records": 0,
        "dead_letters": 0,
        "fl_checkpoints": 0,
    }


def test_checkpoint_age_never_takes_a_runs_newest(registry: tuple[Path, sa.Engine]) -> None:
    _config, engine = registry
    policy = RetentionConfig.model_validate(
        {"checkpoints": {"keep_last": None, "max_age_days": 7}, "pause_s": 0}
    )
    report = apply_retention(engine, policy)
    assert report.deleted["fl_checkpoints"] == {"keep_last": 0, "age": 4}
    assert _left(engine)["checkpoints"] == [("run-a", 2), ("run-a", 6), ("run-b", 1)]


def test_the_servers_loop_applies_it(registry: tuple[Path, sa.Engine]) -> None:
    _config, engine = registry
    policy = RetentionConfig.model_validate({"first_after_s": 0, "interval_s": 3600})
    loop = RetentionLoop(lambda: make_engine(str(engine.url)), policy)
    loop.start()
    try:
        deadline = time.monotonic() + 20
        while loop.passes == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        loop.stop()
    assert loop.passes == 1
    assert _left(engine)["records"] == [5, 6, 7, 8, 9, 10]  # max_rows 10M: age only


def test_a_bad_policy_is_refused_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(
        f"state_dir: {tmp_path}\nretention:\n  records: {{max_age_days: -1}}\n", encoding="utf-8"
    )
    res = CliRunner().invoke(app, ["server", "retention", "--apply", "-c", str(config)])
    assert res.exit_code == ExitCode.CONFIG
    assert "retention.records.max_age_days" in res.output
