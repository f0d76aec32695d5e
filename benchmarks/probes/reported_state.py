"""Probes of the registry's reported model state (``state/reported`` -> ``device_states``).

The registry keeps, per device, the model it reports it runs; an operator (and a rollout)
reads it to learn whether an update landed. Attacks, each from the position of an enrolled
device that holds only its own certificate and key:

- ``reported_state_forgery``: the attacker writes another device's model state, twice:
  on the victim's own ``state/reported`` topic (retained), and on its own topic with a
  document that names the victim. Held when the broker answers the first with PUBACK
  0x87 (nothing reaches the ingest), the ingest dead-letters the second as
  ``device_mismatch``, the victim's row stays exactly the victim's own report (also after
  an ingest restart, when the broker sends every retained report again), and the attacker
  gets no row.
- ``reported_state_flood``: while honest devices send records at a steady rate and
  report their model state, the attacker publishes :data:`FLOOD_MESSAGES` bad reported
  states of seven kinds (not JSON, a missing field, an unknown field, a 30-digit version,
  a NUL in a name, another device's id, one over ``MAX_STATE_BYTES``) as fast as the broker
  takes them. Held when every one is dead-lettered with its reason (counted exactly),
  every honest record is stored once with a p99 lag (ingest write time minus the device's
  stamp) within :data:`~probes.ingest.P99_LAG_LIMIT_S`, every honest report is stored, the
  attacker has no row, and a restarted ingest is redelivered nothing.

Everything runs on loopback with :class:`probes.ingest.IngestRig`: the shipped mosquitto
configuration (mutual TLS, ACL), the real ingest in a child process, SQLite.
``tests/security/test_reported_state_ingest.py`` runs these same functions.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa

from edgefl.proto.desired import MAX_STATE_BYTES, LastFailure, ReportedState
from edgefl.server.registry import DeviceState
from probes.ingest import (
    NOT_AUTHORIZED,
    P99_LAG_LIMIT_S,
    FleetDevice,
    IngestRig,
    ProbeResult,
    _honest_stream,
    _settle,
    ingest_rig,
    wait,
)

__all__ = [
    "FLOOD_MESSAGES",
    "HONEST_DEVICES",
    "HONEST_RECORDS",
    "probe_reported_state_flood",
    "probe_reported_state_forgery",
    "reported",
    "run_probes",
]

TIMEOUT: Final = 30.0
FLOOD_MESSAGES: Final = 1050
"""Bad reported states the attacker sends during the flood."""
HONEST_DEVICES: Final = 2
HONEST_RECORDS: Final = 300
"""Records each honest device sends during the flood."""
HONEST_RATE_HZ: Final = 100.0


def reported(device: str, version: int = 3, **changes: Any) -> bytes:
    """A valid reported-state payload, as the agent publishes it."""
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


def _row(rig: IngestRig, device: str) -> Any:
    """``(document, reported_at)`` of the device's ``device_states`` row, or None."""
    with rig.engine.connect() as conn:
        return conn.execute(
            sa.select(DeviceState.document, DeviceState.reported_at).where(
                DeviceState.device_id == device
            )
        ).first()


def _document(rig: IngestRig, device: str) -> str | None:
    row = _row(rig, device)
    return None if row is None else str(row.document)


def probe_reported_state_forgery(rig: IngestRig) -> ProbeResult:
    """See the module docstring."""
    victim = rig.enroll(f"victim-{uuid.uuid4().hex[:6]}")
    attacker = rig.enroll(f"mallory-{uuid.uuid4().hex[:6]}")
    own = reported(victim.name, 3)
    honest = rig.connect(victim)
    own_rc = honest.publish(victim.topic("state/reported"), own, retain=True)
    wait(lambda: _document(rig, victim.name) == own.decode(), TIMEOUT, "the victim's own report")
    before = _row(rig, victim.name)
    # What the forger wants the registry to say: the victim runs a version it refused.
    forged = reported(
        victim.name,
        4,
        last_failure=LastFailure(version=3, reason="downgrade", detail="forged", at=1).model_dump(),
    )
    bad = rig.connect(attacker)
    on_victim_topic = bad.publish(victim.topic("state/reported"), forged, retain=True)
    on_own_topic = bad.publish(attacker.topic("state/reported"), forged, retain=True)
    delivered = 0 if on_own_topic.is_failure else 1
    expected = Counter({"device_mismatch": delivered}) if delivered else Counter()
    settled = _settle(lambda: rig.dead_letters(attacker.name) == expected)
    after = _row(rig, victim.name)
    victim_letters = rig.dead_letters(victim.name)
    # Every retained report comes again when the ingest subscribes anew: still the victim's.
    rig.restart_ingest()
    replayed = Counter({"device_mismatch": 2 * delivered}) if delivered else Counter()
    replay_settled = _settle(lambda: rig.dead_letters(attacker.name) == replayed)
    after_restart = _row(rig, victim.name)
    attacker_row = _row(rig, attacker.name)
    for client, device in ((bad, attacker), (honest, victim)):
        client.publish(device.topic("state/reported"), b"", retain=True)  # clear them
        rig.disconnect(client)
    held = (
        not own_rc.is_failure
        and on_victim_topic.value == NOT_AUTHORIZED
        and delivered == 1
        and settled
        and replay_settled
        and before is not None
        and after == before
        and after_restart == before
        and not victim_letters
        and attacker_row is None
    )
    return ProbeResult(
        held,
        f"forged report on the victim's topic: PUBACK 0x{on_victim_topic.value:02x}; on the "
        f"attacker's own topic naming the victim: PUBACK 0x{on_own_topic.value:02x}, dead "
        f"letters {dict(rig.dead_letters(attacker.name))} (after an ingest restart); the "
        f"victim's row {'unchanged' if after == after_restart == before else 'CHANGED'}, "
        f"the attacker's row {'none' if attacker_row is None else 'STORED'}",
        {
            "victim_topic_rc": on_victim_topic.value,
            "own_topic_rc": on_own_topic.value,
            "dead_letters": dict(rig.dead_letters(attacker.name)),
            "victim_dead_letters": dict(victim_letters),
            "victim_row_unchanged": after == before and after_restart == before,
            "attacker_row": attacker_row is not None,
        },
    )


def _flood_messages(attacker: FleetDevice) -> list[tuple[bytes, str]]:
    """``(payload, reason it must be dead-lettered with)`` of the flood."""
    me = attacker.name
    valid = json.loads(reported(me))
    padding = "x" * (MAX_STATE_BYTES + 1)
    kinds: list[tuple[Callable[[int], bytes], str]] = [
        (lambda i: b"not json %d" % i, "malformed_state"),
        (lambda i: json.dumps({"device": me, "version": i}).encode(), "malformed_state"),
        (lambda i: json.dumps(valid | {"admin": True, "n": i}).encode(), "malformed_state"),
        (lambda i: json.dumps(valid | {"version": 10**30 + i}).encode(), "malformed_state"),
        (lambda i: json.dumps(valid | {"model": f"a\x00{i}"}).encode(), "malformed_state"),
        (lambda i: reported("someone-else", i + 1), "device_mismatch"),
        (lambda i: json.dumps(valid | {"detail": padding, "n": i}).encode(), "oversized"),
    ]
    messages = []
    for i in range(FLOOD_MESSAGES):
        build, reason = kinds[i % len(kinds)]
        messages.append((build(i), reason))
    return messages


def probe_reported_state_flood(rig: IngestRig) -> tuple[ProbeResult, dict[str, Any]]:
    """The flood of bad reported states beside honest devices; see the module docstring.

    Returns:
        The attack's result and the honest devices' figures (``sent``, ``stored``,
        ``duplicate_rows``, ``p99_lag_s``).
    """
    attacker = rig.enroll(f"mallory-{uuid.uuid4().hex[:6]}")
    honest = [rig.enroll(f"honest-{uuid.uuid4().hex[:6]}") for _ in range(HONEST_DEVICES)]
    bad = rig.connect(attacker)
    clients = [rig.connect(device) for device in honest]
    reports = {device.name: reported(device.name, 7, rollbacks=1) for device in honest}
    messages = _flood_messages(attacker)
    acked: dict[str, int] = {}
    streams = [
        threading.Thread(
            target=_honest_stream,
            args=(device, client, HONEST_RECORDS, HONEST_RATE_HZ, acked),
            daemon=True,
        )
        for device, client in zip(honest, clients, strict=True)
    ]
    for stream in streams:
        stream.start()
    time.sleep(0.3)  # the flood starts while the honest devices are sending
    flood_start = time.monotonic()
    topic = attacker.topic("state/reported")
    mids = [bad.send(topic, payload) for payload, _ in messages]
    # Halfway through, each honest device reports its model state, retained.
    report_codes = [
        client.publish(device.topic("state/reported"), reports[device.name], retain=True)
        for device, client in zip(honest, clients, strict=True)
    ]
    codes = bad.wait(mids, timeout=120.0)
    flood_s = time.monotonic() - flood_start
    for stream in streams:
        stream.join(timeout=120.0)
    expected = Counter(
        reason for mid, (_, reason) in zip(mids, messages, strict=True) if not codes[mid].is_failure
    )
    sent = sum(acked.values())

    def honest_rows() -> int:
        return sum(len(rig.records(device.name)) for device in honest)

    def reports_stored() -> bool:
        return all(
            _document(rig, device.name) == reports[device.name].decode() for device in honest
        )

    settled = _settle(
        lambda: (
            honest_rows() == sent
            and reports_stored()
            and rig.dead_letters(attacker.name) == expected
        ),
        60.0,
    )
    lags: list[float] = []
    keys: set[tuple[str, str, int]] = set()
    rows = 0
    for device in honest:
        for row in rig.records(device.name):
            rows += 1
            keys.add((device.name, row.incarnation, row.seq))
            received = row.received_at.replace(tzinfo=UTC).timestamp()
            lags.append(received - row.ts_ms / 1000.0)
    p99 = statistics.quantiles(lags, n=100)[98] if len(lags) >= 2 else float("nan")
    letters = rig.dead_letters(attacker.name)
    attacker_row = _row(rig, attacker.name)
    # Every message was acknowledged: a restarted ingest is redelivered none of them (the
    # honest devices' retained reports come again and change nothing).
    rig.restart_ingest()
    time.sleep(1.5)
    redelivered = sum(rig.dead_letters(attacker.name).values()) - sum(letters.values())
    redelivered += honest_rows() - rows
    for device, client in zip(honest, clients, strict=True):
        client.publish(device.topic("state/reported"), b"", retain=True)  # clear them
    for client in [bad, *clients]:
        rig.disconnect(client)
    figures: dict[str, Any] = {
        "sent": sent,
        "stored": len(keys),
        "duplicate_rows": rows - len(keys),
        "p99_lag_s": round(p99, 4),
    }
    held = (
        settled
        and sent == HONEST_DEVICES * HONEST_RECORDS
        and figures["stored"] == sent
        and figures["duplicate_rows"] == 0
        and p99 <= P99_LAG_LIMIT_S
        and not any(rc.is_failure for rc in report_codes)
        and reports_stored()
        and letters == expected
        and sum(expected.values()) >= 1000
        and attacker_row is None
        and redelivered == 0
    )
    return (
        ProbeResult(
            held,
            f"{sum(expected.values())} bad reported states in {flood_s:.1f} s (dead letters "
            f"{dict(letters)}, expected {dict(expected)}) beside {HONEST_DEVICES} honest "
            f"devices x {HONEST_RECORDS} records: stored {figures['stored']}/{sent}, "
            f"duplicate rows {figures['duplicate_rows']}, p99 lag {p99:.3f} s (limit "
            f"{P99_LAG_LIMIT_S} s), honest reports stored {reports_stored()}; redelivered "
            f"after an ingest restart: {redelivered}",
            {
                "expected": dict(expected),
                "dead_letters": dict(letters),
                "attacker_row": attacker_row is not None,
                "redelivered": redelivered,
                "flood_s": flood_s,
                **figures,
            },
        ),
        figures,
    )


def run_probes(workdir: Path) -> dict[str, Any]:
    """Run both attacks against real processes; see the module docstring.

    Returns:
        ``{"attacks": {NAME: {"held", "detail"}}}``.
    """
    with ingest_rig(workdir / "reported-state") as rig:
        forgery = probe_reported_state_forgery(rig)
        flood, _figures = probe_reported_state_flood(rig)
    return {
        "attacks": {
            "reported_state_forgery": forgery.report(),
            "reported_state_flood": flood.report(),
        }
    }
