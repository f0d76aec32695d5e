"""Fleet and run operations on a real SQLite registry: what a viewer reads.

The rows are written the way the ingest and the federated run write them (ORM rows of a
migrated registry); the operations are run through :func:`edgefl.server.ops.invoke`, as
both the CLI and the admin API run them, so the role check and the validation are in the
path too.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgefl.proto.serde import JSON_CONTENT_TYPE
from edgefl.server.audit import Principal
from edgefl.server.ops import (
    ConflictError,
    ForbiddenError,
    InvalidError,
    NotFoundError,
    OpContext,
    invoke,
)
from edgefl.server.registry import (
    DeadLetter,
    Device,
    Enrollment,
    Record,
    make_engine,
    session_factory,
    upgrade,
)
from edgefl.server.registry.models import FlRound, FlRun, PrivacyLedgerEntry

# Seconds: run-show composes ε with the privacy accountant (its first import is slow).
pytestmark = pytest.mark.slow

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
VIEWER = Principal("alice", "viewer", "api")
OPERATOR = Principal("bob", "operator", "api")
HISTORY = [[1.1, 0.02, 50.0]]


def _status_answer(cid: str, depth: int) -> dict[str, Any]:
    return {
        "correlation_id": cid,
        "command": "status",
        "ok": True,
        "result": {"outbox": {"depth": depth, "bytes": depth * 100, "oldest_age_s": 12.5}},
    }


def fill_registry(db_url: str) -> None:
    """Three devices (two online), a finished run of 2 rounds on two of them, records."""
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as s, s.begin():
            for n, (device, online, version) in enumerate(
                [("pi-01", True, "1.4.0"), ("pi-02", False, "1.3.2"), ("pi-03", True, None)]
            ):
                s.add(
                    Device(
                        device_id=device,
                        fleet="f1",
                        first_seen=NOW - timedelta(days=1),
                        last_seen=NOW - timedelta(minutes=n),
                        online=online,
                        status_changed_at=NOW,
                        agent_version=version,
                        envelope_version=2,
                    )
                )
                s.add(
                    Enrollment(
                        device_id=device,
                        fleet="f1",
                        status="admitted",
                        cert_serial=f"{n + 10:x}",
                        cert_pem="",
                        node_public_key="",
                        node_id=str(n + 1),
                        admitted_at=NOW - timedelta(days=1),
                    )
                )
            s.flush()
            seq = 0

            def record(device: str, kind: str, topic: str, body: dict[str, Any]) -> None:
                nonlocal seq
                seq += 1
                s.add(
                    Record(
                        device_id=device,
                        seq=seq,
                        kind=kind,
                        topic=f"edgefl/f1/{device}/{topic}",
                        ts_ms=seq,
                        content_type=JSON_CONTENT_TYPE,
                        body=json.dumps(body).encode(),
                        received_at=NOW + timedelta(seconds=seq),
                    )
                )

            record("pi-01", "telemetry", "telemetry/inference", {"samples": 7})
            agent_report = {"outbox": {"depth": 1, "bytes": 10, "oldest_age_s": 0.5}}
            record("pi-01", "telemetry", "telemetry/agent", agent_report)  # older than status-bb
            record("pi-01", "result", "result/digits", {"label": 3})
            record("pi-01", "response", "cmd-resp/status-aa", _status_answer("status-aa", 4))
            record("pi-01", "response", "cmd-resp/status-bb", _status_answer("status-bb", 9))
            record(
                "pi-02", "response", "cmd-resp/ping-cc", {"correlation_id": "ping-cc", "ok": True}
            )
            agent_report = {"outbox": {"depth": 2, "bytes": 20, "oldest_age_s": 0.1}}
            record("pi-03", "telemetry", "telemetry/agent", agent_report)
            # Newer telemetry of another kind does not hide the agent's report.
            record("pi-03", "telemetry", "telemetry/inference", {"samples": 2})
            s.add(
                FlRun(
                    run_id="run-a",
                    plan_json=json.dumps({"rounds": 3}),
                    plan_key="k",
                    status="completed",
                    stop_reason="",
                    rounds_done=2,
                    created_at=NOW - timedelta(hours=1),
                    updated_at=NOW,
                )
            )
            s.add(
                FlRun(
                    run_id="run-b",
                    plan_json=json.dumps({"rounds": 5}),
                    plan_key="k",
                    status="running",
                    stop_reason="",
                    rounds_done=0,
                    created_at=NOW,
                    updated_at=NOW,
                )
            )
            s.flush()
            for rnd, acc in ((1, 0.71), (2, 0.84)):
                s.add(
                    FlRound(
                        run_id="run-a",
                        round=rnd,
                        accuracy=acc,
                        loss=1.0 / rnd,
                        num_selected=2,
                        num_replies=2,
                        num_failures=0,
                        num_rejected=0,
                        num_refused=0,
                        num_flagged=0,
                        epsilon_max=0.5 * rnd,
                        wall_s=3.0,
                        detail_json="{}",
                        at=NOW + timedelta(minutes=rnd),
                    )
                )
                for device, scale in (("pi-01", 1.0), ("pi-02", 0.8)):
                    s.add(
                        PrivacyLedgerEntry(
                            run_id="run-a",
                            device_id=device,
                            round=rnd,
                            epsilon_spent=0.5 * scale,
                            epsilon_total=0.5 * rnd * scale,
                            delta=1e-5,
                            sigma=1.1,
                            sample_rate=0.02,
                            steps=50,
                            history_json=json.dumps([[1.1, 0.02, 50.0 * rnd]]),
                            num_examples=100,
                            train_time_s=1.0,
                            compute_speed=1.0,
                            flagged=False,
                            at=NOW + timedelta(minutes=rnd),
                        )
                    )
            for n, reason in enumerate(["bad_envelope", "bad_envelope", "unknown_device"]):
                s.add(
                    DeadLetter(
                        topic=f"edgefl/f1/x/telemetry/{n}",
                        payload=b"junk",
                        payload_size=4,
                        reason=reason,
                        detail=f"detail {n}",
                        received_at=NOW + timedelta(seconds=n),
                    )
                )
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def server_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ops")
    state = folder / "state"
    config = folder / "server.yaml"
    config.write_text(f"state_dir: {state}\n", encoding="utf-8")
    fill_registry(f"sqlite:///{state / 'edgefl.db'}")
    return config


def run(config: Path, name: str, args: dict[str, Any], who: Principal = VIEWER) -> Any:
    with OpContext(who, config_path=config) as ctx:
        return invoke(name, args, ctx)


def test_devices_show_presence_versions_epsilon_and_the_latest_outbox(server_yaml: Path) -> None:
    rows = {r["device_id"]: r for r in run(server_yaml, "devices", {})["devices"]}
    assert list(rows) == ["pi-01", "pi-02", "pi-03"]
    one, two, three = rows["pi-01"], rows["pi-02"], rows["pi-03"]
    assert (one["presence"], two["presence"], three["presence"]) == ("online", "offline", "online")
    assert one["last_seen"] == NOW.isoformat()
    assert (one["agent_version"], two["agent_version"], three["agent_version"]) == (
        "1.4.0",
        "1.3.2",
        None,
    )
    # The newest report gives the backlog (the status answer, newer than its
    # telemetry/agent); a `ping` answer has none.
    assert one["outbox"] == {
        "depth": 9,
        "bytes": 900,
        "oldest_age_s": 12.5,
        "at": (NOW + timedelta(seconds=5)).isoformat(),
    }
    assert two["outbox"] is None
    # pi-03 reported its outbox in telemetry/agent, and never answered `status`.
    assert three["outbox"] == {
        "depth": 2,
        "bytes": 20,
        "oldest_age_s": 0.1,
        "at": (NOW + timedelta(seconds=7)).isoformat(),
    }
    # ε spent: each run's last ledger total, summed over runs (one run here).
    assert one["epsilon"] == pytest.approx(1.0)
    assert two["epsilon"] == pytest.approx(0.8)
    assert three["epsilon"] is None  # never trained
    assert one["records"] == 5
    assert three["records"] == 2
    assert run(server_yaml, "devices", {"fleet": "nope"}) == {"devices": []}


def test_device_show_lists_telemetry_results_and_answers(server_yaml: Path) -> None:
    doc = run(server_yaml, "device-show", {"device": "pi-01"})
    assert doc["device"]["device_id"] == "pi-01"
    assert doc["enrollment"]["status"] == "admitted"
    assert [t["topic"].rsplit("/", 1)[1] for t in doc["telemetry"]] == ["agent", "inference"]
    assert [r["body"] for r in doc["results"]] == [{"label": 3}]
    assert {r["correlation_id"] for r in doc["other_responses"]} == {"status-aa", "status-bb"}


def test_unknown_device_or_run_is_not_found(server_yaml: Path) -> None:
    with pytest.raises(NotFoundError, match="no device 'ghost'") as exc:
        run(server_yaml, "device-show", {"device": "ghost"})
    assert exc.value.status == 404
    with pytest.raises(NotFoundError, match="no federated run 'run-zzz'"):
        run(server_yaml, "run-show", {"run": "run-zzz"})
    with pytest.raises(NotFoundError):
        run(server_yaml, "rollout-status", {"rollout": "r-none"})
    with pytest.raises(InvalidError, match="limit"):
        run(server_yaml, "devices", {"limit": 3})  # unknown key: refused, not ignored


def test_runs_and_run_show_give_rounds_accuracy_and_each_devices_epsilon(
    server_yaml: Path,
) -> None:
    runs = {r["run_id"]: r for r in run(server_yaml, "runs", {})["runs"]}
    assert list(runs) == ["run-b", "run-a"]  # newest first
    assert runs["run-a"]["rounds_done"] == 2
    assert runs["run-a"]["rounds_planned"] == 3
    assert runs["run-a"]["accuracy"] == pytest.approx(0.84)
    assert runs["run-a"]["epsilon_max"] == pytest.approx(1.0)
    assert runs["run-b"]["accuracy"] is None

    doc = run(server_yaml, "run-show", {"run": "run-a"})
    assert [r["accuracy"] for r in doc["rounds"]] == pytest.approx([0.71, 0.84])
    assert doc["epsilon_per_device"] == pytest.approx({"pi-01": 1.0, "pi-02": 0.8})
    assert doc["epsilon_curves"] == {"pi-01": [[1, 0.5], [2, 1.0]], "pi-02": [[1, 0.4], [2, 0.8]]}
    assert len(doc["ledger"]) == 4


def test_dead_letters_filter_and_count(server_yaml: Path) -> None:
    doc = run(server_yaml, "dead-letters", {})
    assert doc["counts"] == {"bad_envelope": 2, "unknown_device": 1}
    assert [d["detail"] for d in doc["dead_letters"]] == ["detail 2", "detail 1", "detail 0"]
    only = run(server_yaml, "dead-letters", {"reason": "bad_envelope", "limit": 1})
    assert [d["detail"] for d in only["dead_letters"]] == ["detail 1"]


def test_a_viewer_cannot_stop_a_run_and_the_refusal_is_audited(server_yaml: Path) -> None:
    with pytest.raises(ForbiddenError):
        run(server_yaml, "stop", {"run": "run-b"})
    with pytest.raises(ForbiddenError):
        run(server_yaml, "command", {"device": "pi-01", "name": "ping"})
    # Stopping a run that is not running changes nothing (and is audited as an error).
    with pytest.raises(ConflictError, match="completed"):
        run(server_yaml, "stop", {"run": "run-a"}, OPERATOR)
    with pytest.raises(NotFoundError):
        run(server_yaml, "stop", {"run": "run-nope"}, OPERATOR)
    entries = run(server_yaml, "audit", {"action": "stop"})["entries"]
    assert [(e["actor"], e["outcome"], e["target"]) for e in entries] == [
        ("bob", "error", "run-nope"),
        ("bob", "error", "run-a"),
        ("alice", "denied", ""),
    ]
    assert run(server_yaml, "runs", {"status": "completed"})["runs"][0]["status"] == "completed"


def test_malformed_command_arguments_change_nothing(server_yaml: Path) -> None:
    before = len(run(server_yaml, "audit", {})["entries"])
    with pytest.raises(InvalidError):
        run(server_yaml, "command", {"device": "pi-01", "name": "ping", "args": "[1"}, OPERATOR)
    with pytest.raises(NotFoundError, match="ghost"):
        run(server_yaml, "command", {"device": "ghost", "name": "ping"}, OPERATOR)
    entries = run(server_yaml, "audit", {})["entries"]
    # The unknown device is audited as an error; invalid arguments never reach the handler.
    assert len(entries) == before + 1
    assert entries[0]["outcome"] == "error"
