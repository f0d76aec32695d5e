"""Forged agent versions and outbox figures, from an enrolled device holding only its own key.

The registry keeps each device's agent version (the ``agent`` field of its
``state/reported`` document, ``devices.agent_version``, 32 characters) and the envelope
version of its records (``devices.envelope_version``); the ``devices`` operation shows the
outbox figures of each device's newest ``telemetry/agent`` record. An attacker with one
device's certificate can put anything in those on its own topics. Each test sends the
attacks through the shipped broker (mutual TLS, ACL) to the real ingest in a child process
on SQLite, interleaved with honest devices' messages so that they share the ingest's
batches, and checks what was stored, refused and shown; every count is exact.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from probes.ingest import IngestRig, envelope, ingest_rig, wait
from probes.reported_state import reported

from edgefl.proto.serde import ENVELOPE_VERSION, Envelope, encode_envelope, new_incarnation
from edgefl.server.ops.fleet import device_list
from edgefl.server.registry import Device, make_engine, upgrade
from edgefl.testing import mosquitto_executable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_executable() is None, reason="mosquitto is not installed"),
]

TIMEOUT = 30.0
HONEST_RECORDS = 40

# Values of ``agent`` the schema refuses: too long, not a string, outside the pattern.
BAD_AGENTS: list[Any] = [
    "1" * 33,
    "9" * 5000,
    123,
    1.5,
    True,
    ["1.0"],
    {"v": "1.0"},
    "",
    "1.0 beta",
    "1.0\u0000",
    "\u00e9" * 10,
    "1.0\n",
]
# Envelope versions the decoder refuses.
BAD_ENVELOPE_VERSIONS: list[Any] = [0, 3, -1, 2**70, "2", True, 2.0, None]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestRig]:
    with ingest_rig(tmp_path_factory.mktemp("agent-report")) as running:
        yield running


@pytest.fixture
def pg_rig(tmp_path: Path, pg_url: str) -> Iterator[IngestRig]:
    """The same rig with the registry on PostgreSQL (where a String(32) overflow raises)."""
    running = IngestRig(tmp_path / "agent-report-pg")
    try:
        running.db_url = pg_url
        upgrade(pg_url)
        running.engine.dispose()
        running.engine = make_engine(pg_url)
        running.start()
        yield running
    finally:
        running.close()


def _versions(rig: IngestRig, device: str) -> tuple[str | None, int | None] | None:
    with rig.engine.connect() as conn:
        row = conn.execute(
            sa.select(Device.agent_version, Device.envelope_version).where(
                Device.device_id == device
            )
        ).first()
    return None if row is None else (row.agent_version, row.envelope_version)


def _with(payload: bytes, **changes: Any) -> bytes:
    document = json.loads(payload)
    document.update(changes)
    return json.dumps(document).encode()


def test_bad_agent_and_envelope_versions_are_dead_lettered_without_costing_the_batch(
    rig: IngestRig,
) -> None:
    _bad_versions_attack(rig)


def test_bad_agent_versions_on_postgresql(pg_rig: IngestRig) -> None:
    _bad_versions_attack(pg_rig)


def _bad_versions_attack(rig: IngestRig) -> None:
    attacker = rig.enroll(f"mallory-{uuid.uuid4().hex[:6]}")
    honest = [rig.enroll(f"honest-{uuid.uuid4().hex[:6]}") for _ in range(2)]
    bad = rig.connect(attacker)
    # The attacker first reports like an honest agent: what it had must survive.
    own = reported(attacker.name, agent="1.2.3")
    assert not bad.publish(attacker.topic("state/reported"), own).is_failure
    inc = new_incarnation()
    bad.publish(attacker.topic("data/x"), envelope(attacker.name, 1, incarnation=inc))
    wait(lambda: _versions(rig, attacker.name) == ("1.2.3", 2), TIMEOUT, "attacker's own report")
    clients = [rig.connect(d) for d in honest]
    incs = [new_incarnation() for _ in honest]
    mids: list[list[int]] = [[] for _ in honest]
    attack: list[int] = []
    expected = Counter[str]()
    base = reported(attacker.name)
    attacks: list[tuple[str, bytes, str]] = [
        ("state/reported", _with(base, agent=a), "malformed_state") for a in BAD_AGENTS
    ]
    good = json.loads(envelope(attacker.name, 2, incarnation=inc))
    attacks += [
        ("data/x", json.dumps(good | {"v": v}).encode(), "malformed_envelope")
        for v in BAD_ENVELOPE_VERSIONS
    ]
    for i in range(HONEST_RECORDS):
        for k, (device, client) in enumerate(zip(honest, clients, strict=True)):
            record = envelope(device.name, i + 1, incarnation=incs[k])
            mids[k].append(client.send(device.topic("data/x"), record))
        if i < len(attacks):
            rest, payload, reason = attacks[i]
            attack.append(bad.send(attacker.topic(rest), payload))
            expected[reason] += 1
    for k, (device, client) in enumerate(zip(honest, clients, strict=True)):
        mids[k].append(
            client.send(device.topic("state/reported"), reported(device.name, agent="2.0.0rc1"))
        )
        assert not any(rc.is_failure for rc in client.wait(mids[k]).values())
    assert not any(rc.is_failure for rc in bad.wait(attack).values())  # the broker let all in

    def settled() -> bool:
        return rig.dead_letters(attacker.name) == expected and all(
            len(rig.records(d.name)) == HONEST_RECORDS and _versions(rig, d.name) == ("2.0.0rc1", 2)
            for d in honest
        )

    wait(settled, TIMEOUT, "every honest message stored and every attack dead-lettered")
    assert expected == {"malformed_state": len(BAD_AGENTS), "malformed_envelope": 8}
    for device in honest:
        assert sorted(r.seq for r in rig.records(device.name)) == list(range(1, HONEST_RECORDS + 1))
        assert rig.dead_letters(device.name) == Counter()
    # Nothing the attacker sent reached its row: neither truncated nor replaced.
    assert _versions(rig, attacker.name) == ("1.2.3", 2)
    assert [r.seq for r in rig.records(attacker.name)] == [1]
    assert rig.ingest_alive()
    bad.publish(attacker.topic("state/reported"), b"", retain=True)
    for client in (bad, *clients):
        rig.disconnect(client)


def _agent_record(device: str, seq: int, inc: str, body: bytes) -> bytes:
    env = Envelope(
        version=ENVELOPE_VERSION,
        device_id=device,
        incarnation=inc,
        seq=seq,
        ts_ms=int(time.time() * 1000),
        kind="telemetry",
        content_type="application/json",
        body=body,
    )
    return encode_envelope(env, "protobuf")


# What an attacker puts in its newest telemetry/agent record (a protobuf envelope carries
# the body as bytes the ingest does not parse).
ABSURD_BODIES: dict[str, bytes] = {
    "negative": b'{"outbox":{"depth":-5,"bytes":-1,"oldest_age_s":-3.5}}',
    "huge": b'{"outbox":{"depth":1e308,"bytes":' + b"9" * 4000 + b',"oldest_age_s":1e300}}',
    "not_numbers": b'{"outbox":{"depth":"lots","bytes":[1,2],"oldest_age_s":{"a":1}}}',
    "nan": b'{"outbox":{"depth":NaN,"bytes":Infinity,"oldest_age_s":-Infinity}}',
    "long_text": b'{"outbox":{"depth":"' + b"x" * 200_000 + b'"}}',
    "not_json": b"\xff\xfe{outbox",
    "outbox_not_object": b'{"outbox":[1,2,3]}',
    "deep": b'{"outbox":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


def _sane(box: dict[str, Any] | None) -> bool:
    if box is None:
        return True
    for key in ("depth", "bytes", "oldest_age_s"):
        value = box.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not math.isfinite(value) or value < 0 or value > 2**63:
            return False
    return True


@pytest.fixture(scope="module")
def outbox_devices(rig: IngestRig) -> dict[str, Any]:
    """An honest device's real figures, then each absurd body as one attacker's newest."""
    honest = rig.enroll(f"honest-{uuid.uuid4().hex[:6]}")
    client = rig.connect(honest)
    inc = new_incarnation()
    good = b'{"outbox":{"depth":7,"bytes":4096,"oldest_age_s":12.5},"agent":"1.2.3"}'
    client.publish(honest.topic("telemetry/agent"), _agent_record(honest.name, 1, inc, good))
    devices = {
        name: rig.enroll(f"mallory-{uuid.uuid4().hex[:6]}", reload=False) for name in ABSURD_BODIES
    }
    rig.reload_broker_acl()
    attackers = {name: device.name for name, device in devices.items()}
    for name, body in ABSURD_BODIES.items():
        device = devices[name]
        bad = rig.connect(device)
        record = _agent_record(device.name, 1, new_incarnation(), body)
        assert not bad.publish(device.topic("telemetry/agent"), record).is_failure
        rig.disconnect(bad)
    everyone = [honest.name, *attackers.values()]
    wait(
        lambda: all(len(rig.records(d)) == 1 for d in everyone),
        TIMEOUT,
        "every telemetry/agent record stored",
    )
    rig.disconnect(client)
    return {"honest": honest.name, "attackers": attackers}


def test_devices_answers_for_everyone_despite_absurd_outbox_figures(
    rig: IngestRig, outbox_devices: dict[str, Any]
) -> None:
    listing = {d["device_id"]: d for d in device_list(rig.engine)}
    honest = listing[outbox_devices["honest"]]
    assert honest["outbox"] == {
        "depth": 7,
        "bytes": 4096,
        "oldest_age_s": 12.5,
        "at": honest["outbox"]["at"],
    }
    for name in outbox_devices["attackers"].values():
        assert name in listing


@pytest.mark.parametrize("attack", sorted(ABSURD_BODIES))
def test_absurd_outbox_figures_show_as_unknown_or_sane(
    rig: IngestRig, outbox_devices: dict[str, Any], attack: str
) -> None:
    device = outbox_devices["attackers"][attack]
    (row,) = device_list(rig.engine, device_ids=[device])
    assert _sane(row["outbox"]), str(row["outbox"])[:200]
