"""``edgefl server forget DEVICE``: a device's stored data erased, its privacy ledger kept."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.errors import ExitCode
from edgefl.server.fl.ledger import FlStore
from edgefl.server.registry import DEFAULT_DB_FILENAME, make_engine, upgrade
from edgefl.server.registry.models import (
    AuditEntry,
    DeadLetter,
    Device,
    DeviceState,
    Enrollment,
    FlRun,
    PrivacyLedgerEntry,
    Record,
    Rollout,
    RolloutDevice,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _device(session: Session, device_id: str, *, enrolled: str | None, node: str) -> None:
    session.add(Device(device_id=device_id, fleet="lab", first_seen=NOW, last_seen=NOW))
    session.flush()
    for seq, kind in enumerate(("telemetry", "result", "data"), start=1):
        session.add(
            Record(
                device_id=device_id,
                incarnation="",
                seq=seq,
                kind=kind,
                topic=f"edgefl/lab/{device_id}/{kind}/x",
                ts_ms=1,
                content_type="application/json",
                body=b"{}",
                received_at=NOW,
            )
        )
    session.add(
        DeadLetter(
            topic=f"edgefl/lab/{device_id}/telemetry/x",
            payload=b"bad",
            payload_size=3,
            reason="malformed_envelope",
            detail="",
            received_at=NOW,
        )
    )
    session.add(
        DeviceState(
            device_id=device_id,
            fleet="lab",
            state="none",
            rollbacks=0,
            reported_at=NOW,
            document="{}",
        )
    )
    if enrolled is not None:
        session.add(
            Enrollment(
                device_id=device_id,
                fleet="lab",
                status=enrolled,
                cert_serial=f"serial-{node}",
                cert_pem="PEM",
                node_public_key="KEY",
                node_id=node,
                admitted_at=NOW,
            )
        )
    session.add(
        RolloutDevice(
            rollout_id="r1",
            device_id=device_id,
            fleet="lab",
            cohort="canary",
            state="installed",
            online_at_start=True,
            updated_at=NOW,
        )
    )
    for rnd in (1, 2):
        session.add(
            PrivacyLedgerEntry(
                run_id="run-1",
                device_id=device_id,
                round=rnd,
                epsilon_spent=0.5,
                epsilon_total=0.5 * rnd,
                delta=1e-5,
                sigma=1.1,
                sample_rate=0.1,
                steps=10,
                history_json=json.dumps([[1.1, 0.1, 10 * rnd]]),
                num_examples=100,
                train_time_s=1.0,
                compute_speed=1.0,
                at=NOW,
            )
        )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, sa.Engine]]:
    state = tmp_path / "server"
    config = tmp_path / "server.yaml"
    config.write_text(f"state_dir: {state}\n", encoding="utf-8")
    url = f"sqlite:///{state / DEFAULT_DB_FILENAME}"
    state.mkdir()
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        session.add(
            FlRun(
                run_id="run-1",
                plan_json="{}",
                plan_key="k",
                status="completed",
                created_at=NOW,
                updated_at=NOW,
            )
        )
        session.add(
            Rollout(
                id="r1",
                model="m",
                version=1,
                variant="int8",
                sha256="0" * 64,
                canary_fraction=0.1,
                canaries=1,
                soak_s=1,
                max_failures=0,
                min_evaluated=0,
                install_timeout_s=1,
                state="completed",
                phase="done",
                created_by="t",
                created_at=NOW,
                updated_at=NOW,
            )
        )
        session.flush()
        _device(session, "gone-1", enrolled="revoked", node="1")
        _device(session, "stays-1", enrolled="admitted", node="2")
        _device(session, "stays_2", enrolled=None, node="3")
    yield config, engine
    engine.dispose()


def _run(*args: str) -> Any:
    return CliRunner().invoke(app, ["server", *args])


def _counts(engine: sa.Engine, device_id: str) -> dict[str, int]:
    with engine.connect() as conn:

        def count(model: Any, column: Any) -> int:
            query = sa.select(sa.func.count()).select_from(model).where(column == device_id)
            return int(conn.execute(query).scalar_one())

        dead = conn.execute(sa.select(DeadLetter.topic)).scalars().all()
        return {
            "records": count(Record, Record.device_id),
            "device_states": count(DeviceState, DeviceState.device_id),
            "rollout_devices": count(RolloutDevice, RolloutDevice.device_id),
            "enrollments": count(Enrollment, Enrollment.device_id),
            "devices": count(Device, Device.device_id),
            "dead_letters": sum(1 for t in dead if t.split("/")[2] == device_id),
            "privacy_ledger": count(PrivacyLedgerEntry, PrivacyLedgerEntry.device_id),
        }


def test_forget_erases_the_device_and_keeps_its_ledger(server: tuple[Path, sa.Engine]) -> None:
    config, engine = server
    before_other = _counts(engine, "stays_2")
    lifetime_before = FlStore.on_engine(engine).lifetime(["gone-1"])["gone-1"].epsilon

    dry = _run("forget", "gone-1", "--dry-run", "-c", str(config), "--json")
    assert dry.exit_code == 0, dry.output
    shown = json.loads(dry.stdout)
    assert shown["erased"] == {
        "records": 3,
        "dead_letters": 1,
        "device_states": 1,
        "rollout_devices": 1,
        "enrollments": 1,
        "devices": 1,
    }
    assert shown["kept"] == {"privacy_ledger": 2}
    assert _counts(engine, "gone-1")["records"] == 3  # a dry run erases nothing

    res = _run("forget", "gone-1", "-c", str(config), "--json")
    assert res.exit_code == 0, res.output
    after = _counts(engine, "gone-1")
    assert after == {
        "records": 0,
        "device_states": 0,
        "rollout_devices": 0,
        "enrollments": 0,
        "devices": 0,
        "dead_letters": 0,
        "privacy_ledger": 2,
    }
    # The lifetime accounting still knows what the device spent, if it ever rejoins.
    assert FlStore.on_engine(engine).lifetime(["gone-1"])["gone-1"].epsilon == lifetime_before
    assert _counts(engine, "stays_2") == before_other  # "_" is no LIKE wildcard here
    with engine.connect() as conn:
        audit = conn.execute(
            sa.select(AuditEntry.action, AuditEntry.target, AuditEntry.outcome).order_by(
                AuditEntry.id
            )
        ).all()
    assert [tuple(a) for a in audit] == [("forget", "gone-1", "ok"), ("forget", "gone-1", "ok")]


def test_forget_refuses_unknown_and_admitted_devices(server: tuple[Path, sa.Engine]) -> None:
    config, engine = server
    before = _counts(engine, "stays-1")
    unknown = _run("forget", "nobody", "-c", str(config))
    assert unknown.exit_code == ExitCode.BAD_INPUT
    assert "no device 'nobody'" in unknown.output
    admitted = _run("forget", "stays-1", "-c", str(config))
    assert admitted.exit_code == ExitCode.BAD_INPUT
    assert "revoke it first" in admitted.output
    bad = _run("forget", "../etc", "-c", str(config))
    assert bad.exit_code == ExitCode.BAD_INPUT
    assert _counts(engine, "stays-1") == before
    with engine.connect() as conn:
        outcomes = conn.execute(sa.select(AuditEntry.outcome)).scalars().all()
    assert sorted(outcomes) == ["error", "error"]  # invalid arguments never ran
