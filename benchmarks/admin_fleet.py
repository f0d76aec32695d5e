"""A registry with a fleet's history, and the admin API serving it over HTTPS.

Shared by ``tests/test_dashboard.py`` and ``benchmarks/admin_bench.py``:

- :func:`seed_registry` writes what a server that ran for a while holds: devices with
  presence, last seen and agent version, their reported model, telemetry, results and an
  answer to ``status`` with the outbox figures; a finished federated run with its rounds
  and each device's privacy-ledger rows; a published release with a variant; a completed
  rollout with each device's cohort and state; audit entries. Rows are written as the
  ingest, the run, ``server release`` and ``server rollout`` write them (the same tables
  and columns), so the pages read them through the same operations as in production.
- :class:`LiveAdminServer`: a fleet CA with a server certificate for 127.0.0.1, the admin
  CA, the registry, and the real admin API app (:func:`edgefl.server.admin_api.app.
  create_app`) on uvicorn over HTTPS on a free port, with API tokens per role.

Needs no test framework: nothing here imports ``tests/``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

RUN_ID = "run-seeded"
MODEL = "digits-mlp"
ROLLOUT_ID = "r-0123456789"


def device_name(i: int) -> str:
    return f"dev-{i:03d}"


@dataclass
class Seeded:
    """What :func:`seed_registry` wrote (for tests to compare the pages with)."""

    devices: list[str]
    online: set[str]
    run_id: str
    rounds: int
    epsilon: dict[str, list[float]]  # device -> epsilon_total per round
    accuracy: list[float]
    backlog: dict[str, int]
    release: tuple[str, int]
    rollout_id: str
    rollout_states: dict[str, str]
    audit_actions: list[str] = field(default_factory=list)


def seed_registry(
    engine: Any,
    devices: int,
    *,
    rounds: int = 5,
    fleet: str = "lab",
    records_per_device: int = 3,
    running: bool = False,
) -> Seeded:
    """Write a fleet's history into a migrated registry (see the module docstring)."""
    from sqlalchemy.orm import Session

    from edgefl.server import audit
    from edgefl.server.registry.models import (
        Device,
        DeviceState,
        FlRound,
        FlRun,
        PrivacyLedgerEntry,
        Record,
        Release,
        ReleaseVariant,
        Rollout,
        RolloutDevice,
    )

    now = datetime.now(UTC)
    names = [device_name(i) for i in range(devices)]
    online = {d for i, d in enumerate(names) if i % 4 != 3}
    epsilon: dict[str, list[float]] = {}
    accuracy = [round(0.55 + 0.08 * r - 0.004 * r * r, 4) for r in range(1, rounds + 1)]
    backlog = {d: (i * 7) % 23 for i, d in enumerate(names)}
    states: dict[str, str] = {}
    plan = {"rounds": rounds, "model": MODEL, "dataset": "digits"}
    with Session(engine) as session, session.begin():
        for i, d in enumerate(names):
            session.add(
                Device(
                    device_id=d,
                    fleet=fleet,
                    first_seen=now - timedelta(days=3),
                    last_seen=now - timedelta(seconds=5 + i),
                    online=d in online,
                    status_changed_at=now - timedelta(hours=1),
                    agent_version="0.1.0" if i % 5 else "0.0.9",
                    envelope_version=2,
                )
            )
        session.flush()
        for i, d in enumerate(names):
            session.add(
                DeviceState(
                    device_id=d,
                    fleet=fleet,
                    model=MODEL,
                    version=2 if i % 3 else 1,
                    variant="int8",
                    sha256="ab" * 32,
                    state="running",
                    since=now - timedelta(hours=2),
                    rollbacks=0,
                    reported_at=now - timedelta(minutes=30),
                    document="{}",
                )
            )
            seq = 0
            for k in range(records_per_device):
                seq += 1
                session.add(
                    Record(
                        device_id=d,
                        incarnation="0" * 32,
                        seq=seq,
                        kind="telemetry",
                        topic=f"edgefl/{fleet}/{d}/telemetry/inference",
                        ts_ms=int((now - timedelta(seconds=60 - k)).timestamp() * 1000),
                        content_type="application/json",
                        body=json.dumps(
                            {"cpu": round(0.2 + 0.01 * k, 2), "temp_c": 41 + k}
                        ).encode(),
                        received_at=now - timedelta(seconds=60 - k),
                    )
                )
                seq += 1
                session.add(
                    Record(
                        device_id=d,
                        incarnation="0" * 32,
                        seq=seq,
                        kind="result",
                        topic=f"edgefl/{fleet}/{d}/result/digits",
                        ts_ms=int((now - timedelta(seconds=59 - k)).timestamp() * 1000),
                        content_type="application/json",
                        body=json.dumps(
                            {"label": k % 10, "model": MODEL, "version": 2, "variant": "int8"}
                        ).encode(),
                        received_at=now - timedelta(seconds=59 - k),
                        model=MODEL,
                        model_version=2,
                        model_variant="int8",
                    )
                )
            seq += 1
            session.add(
                Record(
                    device_id=d,
                    incarnation="0" * 32,
                    seq=seq,
                    kind="response",
                    topic=f"edgefl/{fleet}/{d}/cmd-resp/status-{i:08x}",
                    ts_ms=int((now - timedelta(seconds=30)).timestamp() * 1000),
                    content_type="application/json",
                    body=json.dumps(
                        {
                            "ok": True,
                            "result": {
                                "outbox": {
                                    "depth": backlog[d],
                                    "bytes": backlog[d] * 512,
                                    "oldest_age_s": float(backlog[d]),
                                }
                            },
                        }
                    ).encode(),
                    received_at=now - timedelta(seconds=30),
                )
            )
        session.add(
            FlRun(
                run_id=RUN_ID,
                plan_json=json.dumps(plan),
                plan_key="k" * 32,
                status="running" if running else "completed",
                stop_reason="",
                rounds_done=rounds,
                created_at=now - timedelta(hours=1),
                updated_at=now - timedelta(minutes=5),
            )
        )
        session.flush()
        for r in range(1, rounds + 1):
            eps_max = 0.0
            for i, d in enumerate(names):
                total = round((0.9 + 0.01 * (i % 10)) * r, 6)
                previous = epsilon.setdefault(d, [])
                spent = total - (previous[-1] if previous else 0.0)
                previous.append(total)
                eps_max = max(eps_max, total)
                session.add(
                    PrivacyLedgerEntry(
                        run_id=RUN_ID,
                        device_id=d,
                        round=r,
                        epsilon_spent=spent,
                        epsilon_total=total,
                        delta=1e-5,
                        sigma=1.1,
                        sample_rate=0.02,
                        steps=50,
                        history_json=json.dumps([[1.1, 0.02, 50 * r]]),
                        num_examples=300,
                        train_time_s=1.5,
                        compute_speed=1.0,
                        flagged=False,
                        at=now - timedelta(minutes=60 - 10 * r),
                    )
                )
            session.add(
                FlRound(
                    run_id=RUN_ID,
                    round=r,
                    accuracy=accuracy[r - 1],
                    loss=round(1.5 - 0.2 * r, 4),
                    federated_accuracy=None,
                    federated_loss=None,
                    train_loss=round(1.4 - 0.2 * r, 4),
                    num_selected=devices,
                    num_replies=devices,
                    num_failures=0,
                    num_rejected=0,
                    num_refused=0,
                    num_flagged=0,
                    epsilon_max=eps_max,
                    central_epsilon=None,
                    wall_s=12.5,
                    detail_json="{}",
                    at=now - timedelta(minutes=60 - 10 * r),
                )
            )
        release = Release(
            model=MODEL,
            version=2,
            run_id=RUN_ID,
            round=rounds,
            plan_hash="k" * 32,
            epsilon_max=max(e[-1] for e in epsilon.values()) if epsilon else None,
            delta=1e-5,
            dp_mode="local",
            calibration="held-out",
            float_accuracy=accuracy[-1],
            device_class="pi4",
            key_id="k1",
            created_by="local:root",
            created_at=now - timedelta(minutes=20),
            expires_at=now + timedelta(days=90),
            status="published",
            reasons_json="[]",
        )
        session.add(release)
        session.flush()
        session.add(
            ReleaseVariant(
                release_id=release.id,
                variant="int8",
                recipe="static_int8",
                prune_ratio=None,
                sha256="ab" * 32,
                size_bytes=12_345,
                accuracy=accuracy[-1] - 0.01,
                float_accuracy=accuracy[-1],
                latency_json="{}",
                device_class="pi4",
                runtime="litert",
                path=f"{MODEL}/2/int8.tflite",
                passed=True,
                reasons_json="[]",
            )
        )
        session.add(
            Rollout(
                id=ROLLOUT_ID,
                model=MODEL,
                version=2,
                variant="int8",
                sha256="ab" * 32,
                fleet=fleet,
                canary_fraction=0.1,
                canaries=max(1, devices // 10),
                soak_s=60.0,
                max_failures=0.1,
                min_accuracy=None,
                max_accuracy_drop=None,
                min_evaluated=20,
                install_timeout_s=300.0,
                state="completed",
                phase="done",
                reason="every device runs the release",
                evidence_json="{}",
                created_by="local:root",
                created_at=now - timedelta(minutes=15),
                updated_at=now - timedelta(minutes=5),
                finished_at=now - timedelta(minutes=5),
            )
        )
        session.flush()
        for i, d in enumerate(names):
            state = "installed" if i % 3 else "rolled_back"
            states[d] = state
            session.add(
                RolloutDevice(
                    rollout_id=ROLLOUT_ID,
                    device_id=d,
                    fleet=fleet,
                    cohort="canary" if i < max(1, devices // 10) else "rest",
                    state=state,
                    reason="" if i % 3 else "verification failed on the device",
                    online_at_start=True,
                    previous_model=MODEL,
                    previous_version=1,
                    previous_variant="int8",
                    previous_sha256="cd" * 32,
                    published_at=now - timedelta(minutes=14),
                    evaluated=40,
                    accuracy=accuracy[-1],
                    previous_evaluated=40,
                    previous_accuracy=accuracy[-2] if rounds > 1 else None,
                    updated_at=now - timedelta(minutes=6),
                )
            )
    seeded = Seeded(
        devices=names,
        online=online,
        run_id=RUN_ID,
        rounds=rounds,
        epsilon=epsilon,
        accuracy=accuracy,
        backlog=backlog,
        release=(MODEL, 2),
        rollout_id=ROLLOUT_ID,
        rollout_states=states,
    )
    root = audit.Principal("local:root", "admin", "cli")
    for action, target, args in (
        ("admit", names[0], {"device": names[0], "fleet": fleet}),
        ("train", RUN_ID, {"plan": "plan.toml", "run_id": RUN_ID}),
        ("release", f"{MODEL}@2", {"model": MODEL, "run": RUN_ID}),
        ("rollout", f"{MODEL}@2", {"model": MODEL, "version": 2, "canary": 0.1}),
    ):
        audit.append(engine, root, action, target=target, arguments=args)
        seeded.audit_actions.append(action)
    return seeded


@dataclass
class LiveAdminServer:
    """The admin API over HTTPS on a free loopback port (see the module docstring).

    Attributes:
        url: ``https://127.0.0.1:PORT``.
        ca_file: The fleet CA certificate clients verify the server with.
        tokens: An API token per role (``viewer``, ``operator``, ``admin``).
        engine: The registry.
        state_dir: The server's folder.
    """

    url: str
    ca_file: Path
    tokens: dict[str, str]
    engine: Any
    state_dir: Path
    server: Any
    state: Any

    def client_cert(self, name: str, role: str) -> tuple[Path, Path]:
        """An admin certificate (file, key file) for ``name`` with ``role``."""
        from edgefl.server.admin_ca import open_admin_ca, record_issued

        issued = open_admin_ca(self.state_dir / "ca").issue_admin_cert(name, role)
        record_issued(self.engine, issued)
        cert = self.state_dir / f"{name}.pem"
        key = self.state_dir / f"{name}.key"
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        return cert, key


@contextlib.contextmanager
def live_admin_server(
    state_dir: Path, *, metrics_auth: bool = True, engine_url: str | None = None
) -> Iterator[LiveAdminServer]:
    """Start the admin API on a free port over ``state_dir`` (its registry migrated)."""
    from edgefl.server import admin_tokens
    from edgefl.server.admin_api.app import create_app
    from edgefl.server.admin_api.server import AdminServer, TlsSettings
    from edgefl.server.admin_api.state import AdminState
    from edgefl.server.admin_ca import open_admin_ca
    from edgefl.server.config import ServerConfig
    from edgefl.server.fleet_ca import FleetCA
    from edgefl.server.registry import make_engine, upgrade

    state_dir.mkdir(parents=True, exist_ok=True)
    ca_dir = state_dir / "ca"
    fleet = FleetCA.create(ca_dir)
    server_cert = fleet.issue_server_cert(["localhost"], ["127.0.0.1"])
    admin_ca = open_admin_ca(ca_dir)
    db_url = engine_url or f"sqlite:///{state_dir / 'edgefl.db'}"
    config = ServerConfig(state_dir=state_dir, ca_dir=ca_dir, db_url=db_url)
    upgrade(db_url)
    engine = make_engine(db_url)
    state = AdminState(
        config=config,
        config_path=None,
        engine=engine,
        admin_ca_cert=admin_ca.cert,
        metrics_auth=metrics_auth,
    )
    assert server_cert.key_path is not None
    tls = TlsSettings(
        server_cert.cert_path, server_cert.key_path, [admin_ca.cert_path, fleet.cert_path]
    )
    server = AdminServer(create_app(state), "127.0.0.1", 0, tls)
    tokens = {
        role: admin_tokens.create(engine, f"{role}-1", role, expires_in=timedelta(hours=2)).token
        for role in ("viewer", "operator", "admin")
    }
    server.start()
    try:
        yield LiveAdminServer(
            url=server.url,
            ca_file=fleet.cert_path,
            tokens=tokens,
            engine=engine,
            state_dir=state_dir,
            server=server,
            state=state,
        )
    finally:
        server.stop()
        engine.dispose()
