"""The demo's figures and report, read from a real registry (SQLite and PostgreSQL).

The registry is filled through the code paths a demo run goes through: the privacy
ledger through :class:`~edgefl.server.fl.ledger.FlStore` (one committed round at a
time), device records through the real ingest from a real mosquitto. The release (and
its rollout) are rows as ``edgefl server release`` records them: building one takes a
trained checkpoint and the quantization toolkit, which a report test does not need.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.demo.figures import NOT_MEASURED, DemoFigures, read_figures, stored_records
from edgefl.demo.report import PLOTS, REPORT_MD, StageOutcome, write_report
from edgefl.federation import FederationPlan, RoundReport, load_plan
from edgefl.privacy import epsilon_of, merge_history
from edgefl.proto.serde import ENVELOPE_VERSION, Envelope, encode_envelope, new_incarnation
from edgefl.server.fl.ledger import Checkpoint, FlStore, LedgerRow
from edgefl.server.ingest import Ingest, IngestConfig
from edgefl.server.registry import make_engine, session_factory, upgrade
from edgefl.server.registry.models import Record, Release, ReleaseVariant, Rollout
from edgefl.simulations.accounting import recompute_epsilon
from edgefl.testing import Mosquitto, wait_for

MODEL = "digits-mlp"
RUN_ID = "run-demo-report"
DELTA = 1e-5
TIMEOUT = 30.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (σ, q, steps) each device trained with, per round; "d-liar" records a total that is
# lower than what its entries add up to, so the recomputation must tell it apart.
LEDGER: dict[str, dict[int, tuple[float, float, int]]] = {
    "d-one": {1: (1.1, 0.05, 40), 2: (1.1, 0.05, 40), 3: (1.3, 0.04, 50)},
    "d-two": {1: (0.9, 0.1, 20), 3: (0.9, 0.1, 20)},  # missed round 2
    "d-liar": {1: (1.0, 0.05, 40), 2: (1.0, 0.05, 40), 3: (1.0, 0.05, 40)},
}
ACCURACY = {1: 0.52, 2: 0.71, 3: 0.83}


def _plan() -> FederationPlan:
    return load_plan(
        {
            "dataset": "digits",
            "model": MODEL,
            "num_devices": 3,
            "rounds": 3,
            "batch_size": 32,
            "lr": 0.1,
            "min_available_nodes": 3,
            "min_train_nodes": 2,
            "node_wait_s": 60,
            "dp": {"target_epsilon": 8.0, "delta": DELTA},
        }
    )


def _commit_ledger(url: str) -> dict[str, float]:
    """Three rounds through the ledger's own commit; returns the totals recorded."""
    store = FlStore(url)
    recorded: dict[str, float] = {}
    try:
        store.start_run(RUN_ID, _plan(), resume=False)
        history: dict[str, list[list[float]]] = {d: [] for d in LEDGER}
        for rnd in (1, 2, 3):
            rows: list[LedgerRow] = []
            for device, rounds in LEDGER.items():
                if rnd not in rounds:
                    continue
                sigma, q, steps = rounds[rnd]
                history[device] = merge_history(history[device], sigma, q, steps)
                total = epsilon_of(history[device], DELTA)
                if device == "d-liar":
                    total /= 2
                rows.append(
                    LedgerRow(
                        device_id=device,
                        round=rnd,
                        epsilon_spent=total - recorded.get(device, 0.0),
                        epsilon_total=total,
                        delta=DELTA,
                        sigma=sigma,
                        sample_rate=q,
                        steps=steps,
                        history=history[device],
                        num_examples=600,
                        train_time_s=1.0,
                        compute_speed=1.0,
                    )
                )
                recorded[device] = total
            store.commit_round(
                RUN_ID,
                RoundReport(
                    round=rnd,
                    accuracy=ACCURACY[rnd],
                    loss=1.0 - ACCURACY[rnd],
                    num_selected=len(rows),
                    num_replies=len(rows),
                    epsilon_max=max(recorded.values()),
                ),
                rows,
                Checkpoint(round=rnd, model=b"", strategy_state=b"", accountants={}),
            )
        store.finish(RUN_ID, "completed")
    finally:
        store.close()
    return recorded


VARIANTS = {  # name -> (size, accuracy, published, passed)
    "int8": (12_000, 0.81, True, True),
    "fp32": (44_000, 0.83, True, True),
    "pruned50-int8": (7_000, 0.55, False, False),
}


def _record_release(url: str) -> None:
    """Release 1 of MODEL (two published variants, one failed) and a rollout of int8."""
    engine = make_engine(url)
    now = datetime.now(UTC)
    try:
        with session_factory(engine).begin() as session:
            release = Release(
                model=MODEL,
                version=1,
                run_id=RUN_ID,
                round=3,
                plan_hash="0" * 16,
                epsilon_max=None,
                delta=DELTA,
                dp_mode="local",
                calibration="held-out",
                float_accuracy=0.83,
                device_class="generic",
                key_id="k1",
                created_by="tests",
                created_at=now,
                expires_at=now + timedelta(days=30),
                status="published",
                reasons_json="[]",
            )
            session.add(release)
            session.flush()
            for name, (size, accuracy, published, passed) in VARIANTS.items():
                session.add(
                    ReleaseVariant(
                        release_id=release.id,
                        variant=name,
                        recipe=name,
                        prune_ratio=0.5 if name.startswith("pruned") else None,
                        sha256="ab" * 32,
                        size_bytes=size,
                        accuracy=accuracy,
                        float_accuracy=0.83,
                        latency_json="{}",
                        device_class="generic",
                        runtime="ai-edge-litert",
                        path=f"{MODEL}/1/{name}.tflite" if published else None,
                        passed=passed,
                        reasons_json="[]" if passed else json.dumps(["verification failed"]),
                    )
                )
            session.add(
                Rollout(
                    id="r-0123456789",
                    model=MODEL,
                    version=1,
                    variant="int8",
                    sha256="ab" * 32,
                    fleet=None,
                    canary_fraction=0.25,
                    canaries=1,
                    soak_s=5.0,
                    max_failures=0.0,
                    min_accuracy=None,
                    max_accuracy_drop=None,
                    min_evaluated=0,
                    install_timeout_s=60.0,
                    state="completed",
                    phase="done",
                    created_by="tests",
                    created_at=now,
                    updated_at=now,
                    finished_at=now,
                )
            )
    finally:
        engine.dispose()


class _Device:
    """One device's publisher: its envelopes numbered like an outbox (one incarnation)."""

    def __init__(self, client: mqtt.Client, fleet: str, device_id: str) -> None:
        self.client = client
        self.fleet = fleet
        self.device_id = device_id
        self.incarnation = new_incarnation()
        self.seq = 0
        self.sent: list[tuple[str, bytes]] = []

    def send(self, kind: str, stream: str, body: dict[str, Any]) -> bytes:
        self.seq += 1
        seq = self.seq
        payload = encode_envelope(
            Envelope(
                ENVELOPE_VERSION,
                self.device_id,
                seq,
                1_700_000_000_000 + seq,
                kind,
                "application/json",
                json.dumps(body, sort_keys=True).encode(),
                self.incarnation,
            ),
            "json",
        )
        topic = f"edgefl/{self.fleet}/{self.device_id}/{kind}/{stream}"
        self.publish(topic, payload)
        self.sent.append((topic, payload))
        return payload

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"no PUBACK for {topic}"


def _result(
    version: int,
    request_id: str,
    *,
    where: str,
    local_ms: float,
    label: int | None,
    prediction: int,
    evaluation: bool,
) -> dict[str, Any]:
    """A result body with the fields the agent's inference loop writes."""
    body: dict[str, Any] = {
        "source": "camera",
        "index": 0,
        "stream": "classifier",
        "model": MODEL,
        "version": version,
        "variant": "int8",
        "where": where,
        "prediction": prediction,
        "confidence": 0.9,
        "latency_ms": local_ms + (20.0 if where == "cloud" else 0.0),
        "local_ms": local_ms,
        "cloud_ms": 20.0 if where == "cloud" else None,
        "budget_ms": 50.0,
        "deadline_met": True,
        "reason": "test",
        "request_id": request_id,
        "evaluation": evaluation,
    }
    if label is not None:
        body["label"] = label
    return body


# Per device: (where, local_ms, label, prediction, evaluation) of each answer of release 1.
ANSWERS: dict[str, list[tuple[str, float, int | None, int, bool]]] = {
    "d-one": [
        ("local", 1.0, 3, 3, True),
        ("local", 2.0, 4, 4, True),
        ("cloud", 3.0, 5, 5, True),
        ("local", 4.0, 6, 1, True),
        ("cloud", 5.0, 7, 7, False),  # labelled, not an evaluation sample
        ("local", 6.0, None, 2, False),
    ],
    "d-two": [
        ("local", 10.0, 1, 1, True),
        ("cloud", 12.0, 2, 0, True),
        ("local", 14.0, None, 9, False),
    ],
}


@pytest.fixture
def filled(db_url: str, tmp_path: Path, fleet: str) -> dict[str, Any]:
    """A registry with a DP run's ledger, a release and records from the real ingest."""
    upgrade(db_url)
    recorded = _commit_ledger(db_url)
    _record_release(db_url)
    with Mosquitto(tmp_path / "broker") as broker:
        config = IngestConfig.model_validate(
            {
                "broker": {"host": broker.host, "port": broker.port},
                "client_id": f"ingest-{fleet}",
                "db_url": db_url,
                "fleet": fleet,
            }
        )
        ingest = Ingest(config)
        ingest.start()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        try:
            assert ingest.wait_ready(TIMEOUT), "ingest did not subscribe"
            client.connect(broker.host, broker.port)
            client.loop_start()
            devices = {d: _Device(client, fleet, d) for d in ("d-one", "d-two", "d-other")}
            messages = 0
            for device_id, answers in ANSWERS.items():
                device = devices[device_id]
                for i, (where, local_ms, label, prediction, evaluation) in enumerate(answers):
                    body = _result(
                        1,
                        f"{device_id}-{i}",
                        where=where,
                        local_ms=local_ms,
                        label=label,
                        prediction=prediction,
                        evaluation=evaluation,
                    )
                    device.send("result", "classifier", body)
                    messages += 1
                # the model before the release answered too: not the release's figures
                device.send(
                    "result",
                    "classifier",
                    _result(
                        0,
                        f"{device_id}-old",
                        where="local",
                        local_ms=99.0,
                        label=1,
                        prediction=2,
                        evaluation=True,
                    ),
                )
                device.send("data", "samples", {"x": [0.0] * 4, "y": 1})
                messages += 2
            # an inference report for version 2 only (no result of it is stored)
            devices["d-two"].send(
                "telemetry",
                "inference",
                {
                    "at": 1.0,
                    "versions": [
                        {
                            "model": MODEL,
                            "version": 2,
                            "variant": "int8",
                            "answered": 8,
                            "evaluated": 4,
                            "correct": 3,
                            "where": {"local": 6, "cloud": 2, "local_fallback": 0},
                            "local_p50_ms": 2.5,
                            "local_p99_ms": 7.5,
                        },
                        {  # the device's own data, not trusted: more correct than evaluated
                            "model": MODEL,
                            "version": 2,
                            "variant": "fp32",
                            "answered": 5,
                            "evaluated": 3,
                            "correct": 9,
                            "where": {"local": 5, "cloud": 0, "local_fallback": 0},
                        },
                    ],
                },
            )
            messages += 1
            # a wire duplicate (the same message identity again): stored once
            devices["d-one"].publish(*devices["d-one"].sent[0])
            messages += 1
            # the same answer again under a new message identity: a stored duplicate
            answers_two = ANSWERS["d-two"][0]
            devices["d-two"].send(
                "result",
                "classifier",
                _result(
                    1,
                    "d-two-0",
                    where=answers_two[0],
                    local_ms=answers_two[1],
                    label=answers_two[2],
                    prediction=answers_two[3],
                    evaluation=answers_two[4],
                ),
            )
            messages += 1
            # a device not in the demo, and a payload the ingest refuses
            devices["d-other"].send("data", "samples", {"x": [1.0], "y": 0})
            devices["d-one"].publish(f"edgefl/{fleet}/d-one/telemetry/t", b"not an envelope")
            messages += 2
            wait_for(
                lambda: ingest.metrics()["acked"] >= messages,
                TIMEOUT,
                f"{messages} messages acknowledged",
            )
            metrics = ingest.metrics()
        finally:
            client.disconnect()
            client.loop_stop()
            ingest.stop()
    return {"url": db_url, "recorded": recorded, "metrics": metrics}


def _rows(url: str, device: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.scalar(
                    sa.select(sa.func.count()).select_from(Record).where(Record.device_id == device)
                )
                or 0
            )
    finally:
        engine.dispose()


@pytest.mark.slow
def test_figures_match_what_the_registry_stored(filled: dict[str, Any], tmp_path: Path) -> None:
    url = filled["url"]
    metrics = filled["metrics"]
    assert metrics["duplicates"] == 1  # the wire duplicate was not stored again
    assert metrics["dead_lettered"] == 1

    figures = read_figures(
        url, run_id=RUN_ID, model=MODEL, release_version=1, devices=["d-one", "d-two", "d-silent"]
    )

    # training and privacy
    assert figures.rounds == sorted(ACCURACY.items())  # stored and read back exactly
    assert figures.epsilon_per_device == pytest.approx(filled["recorded"])
    truth = {
        device: recompute_epsilon([rounds[r] for r in sorted(rounds)], DELTA)
        for device, rounds in LEDGER.items()
    }
    assert figures.epsilon_recomputed == pytest.approx(truth, rel=1e-9)
    for device in ("d-one", "d-two"):  # honest devices: the ledger and the entries agree
        assert figures.epsilon_recomputed[device] == pytest.approx(
            figures.epsilon_per_device[device], rel=1e-9
        )
    liar = figures.epsilon_recomputed["d-liar"] / figures.epsilon_per_device["d-liar"]
    assert liar == pytest.approx(2.0)
    assert figures.delta == DELTA
    assert figures.epsilon_target == 8.0
    assert [r for r, _ in figures.epsilon_by_round["d-two"]] == [1, 3]

    # the release
    by_name = {v["name"]: v for v in figures.variants}
    assert set(by_name) == set(VARIANTS)
    for name, (size, accuracy, published, _) in VARIANTS.items():
        assert by_name[name]["size_bytes"] == size
        assert by_name[name]["accuracy"] == pytest.approx(accuracy)
        assert by_name[name]["status"] == ("published" if published else "failed")
        assert by_name[name]["rolled_out"] is (name == "int8")

    # serving: evaluation samples only, the re-sent answer counted again like any row
    answers = {d: list(a) for d, a in ANSWERS.items()}
    answers["d-two"].append(ANSWERS["d-two"][0])
    flat = [a for device in sorted(answers) for a in answers[device]]
    evaluated = [a for a in flat if a[4]]
    assert figures.on_device_source == "results (evaluation samples)"
    assert figures.answered == len(flat)
    assert figures.evaluated == len(evaluated)
    assert figures.on_device_accuracy == pytest.approx(
        sum(a[2] == a[3] for a in evaluated) / len(evaluated)
    )
    assert figures.offload_fraction == pytest.approx(sum(a[0] == "cloud" for a in flat) / len(flat))
    local = sorted(a[1] for a in flat)
    assert figures.on_device_latency_ms["p50"] == pytest.approx(
        (local[len(local) // 2 - 1] + local[len(local) // 2]) / 2
        if len(local) % 2 == 0
        else local[len(local) // 2]
    )
    assert min(local) <= figures.on_device_latency_ms["p99"] <= max(local)
    one = figures.on_device_by_device["d-one"]
    assert (one["answered"], one["evaluated"], one["accuracy"]) == (6, 4, pytest.approx(0.75))

    # records: what the ingest stored, per device, and the duplicate it could not catch
    stored = {d: _rows(url, d) for d in ("d-one", "d-two", "d-silent")}
    assert stored == {"d-one": 8, "d-two": 7, "d-silent": 0}
    assert figures.stored_by_device == stored
    assert stored_records(url, ["d-one", "d-two", "d-silent"]) == stored
    assert figures.records_stored == sum(stored.values())
    assert figures.duplicate_keys == 0  # the unique key held
    assert figures.duplicate_answers == 1
    assert figures.duplicate_rows == 1
    assert figures.dead_letters == {"malformed_envelope": 1}

    # a version only telemetry reported: its counters stand in
    reported = read_figures(url, run_id=RUN_ID, model=MODEL, release_version=2, devices=["d-two"])
    assert reported.on_device_source == "telemetry"
    assert reported.variants == []  # no such release
    assert (reported.answered, reported.evaluated) == (8, 4)
    assert reported.on_device_accuracy == pytest.approx(0.75)
    assert reported.offload_fraction == pytest.approx(0.25)
    assert reported.on_device_latency_ms == {"p50": 2.5, "p99": 7.5}

    # the report
    stages = [
        StageOutcome("server", True, 3.2),
        StageOutcome("train", True, 41.0, "3 rounds"),
        StageOutcome("serve", False, 9.9, "agent d-one: exited | see /x/agent.log"),
    ]
    summary = {
        "devices": 2,
        "rounds": 3,
        "release_version": 1,
        "agents_on_release": 2,
        "records": {"sent": 16, "stored": figures.records_stored, "duplicate_rows": 1},
        "wall_s": 123.4,
        "leftover_processes": 0,
        "dashboard": "https://127.0.0.1:8443/dashboard/",
        "chaos": {"killed": ["d-one", "broker"], "lost": 0},
    }
    path = write_report(tmp_path / "out", figures=figures, stages=stages, summary=summary)
    assert path == tmp_path / "out" / REPORT_MD
    text = path.read_text(encoding="utf-8")
    assert "| serve | **failed** | 9.9 s | agent d-one: exited \\| see /x/agent.log |" in text
    assert "| 3 | 83.0% |" in text
    assert f"| d-liar | {figures.epsilon_per_device['d-liar']:.3f} | " in text
    assert "| 50.00% |" in text  # the liar's recorded ε is half the recomputed one
    assert "recomputation by more than 1% for: d-liar.**" in text
    assert f"({max(truth.values()):.3f}, 1e-05)-DP at worst" in text
    assert "| int8 | 11.7 KiB | 81.0% | published | yes |" in text
    assert "| pruned50-int8 | 6.8 KiB | 55.0% | failed | no |" in text
    assert f"On-device accuracy: {figures.on_device_accuracy:.1%}" in text
    assert "Sent (committed to the agents' outboxes): 16" in text
    assert "Stored in the registry: 15 (1 fewer than sent)" in text
    assert "none is left behind" in text
    assert "- Dashboard (while the demo ran): https://127.0.0.1:8443/dashboard/" in text
    assert '- killed: ["d-one", "broker"]' in text
    assert "| d-silent | not measured | 0 |" in text
    for name in PLOTS:
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG_MAGIC), name
        assert f"]({name})" in text


def test_nothing_measured_is_reported_as_such(tmp_path: Path) -> None:
    """A registry with no run, release or record: every figure "not measured", no error."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    figures = read_figures(
        url, run_id="run-none", model=MODEL, release_version=None, devices=["d1"]
    )
    assert figures == DemoFigures(
        rounds=[],
        epsilon_per_device={},
        epsilon_recomputed={},
        variants=[],
        on_device_accuracy=None,
        on_device_latency_ms={},
        offload_fraction=None,
        records_stored=0,
        duplicate_rows=0,
        stored_by_device={"d1": 0},
    )
    assert (
        read_figures(url, run_id="run-none", model=MODEL, release_version=3, devices=["d1"])
        == figures
    )
    path = write_report(tmp_path / "out", figures=figures, stages=[], summary={})
    text = path.read_text(encoding="utf-8")
    assert text.count(NOT_MEASURED) >= 10
    assert f"Outcome: {NOT_MEASURED}" in text  # no stage ran
    for name in PLOTS:
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG_MAGIC), name
