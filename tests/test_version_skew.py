"""Version skew while a fleet upgrades: the ingest records each agent's version and envelope
version, and keeps accepting the previous envelope version and reported-state shape."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

import edgefl
from edgefl.proto.desired import ReportedState, parse_reported
from edgefl.proto.serde import Envelope, encode_envelope, new_incarnation
from edgefl.server.ingest import Ingest, IngestConfig
from edgefl.server.registry import DeadLetter, Device, Record, make_engine
from edgefl.testing import Mosquitto, wait_for

OLD_REPORT = (
    b'{"device":"old-1","model":"digits-mlp","rollbacks":0,"sha256":null,"since":null,'
    b'"state":"running","v":1,"variant":"int8","version":3,"last_failure":null}'
)
"""A reported state as an agent that predates ``agent`` publishes it."""


def test_reported_state_without_agent_keeps_its_bytes() -> None:
    old = parse_reported(OLD_REPORT)
    assert old.agent is None
    assert b"agent" not in old.to_json()  # an older server reads a report without it
    new = ReportedState(device="new-1", state="none", agent=edgefl.__version__)
    assert json.loads(new.to_json())["agent"] == edgefl.__version__
    assert parse_reported(new.to_json()) == new


def test_reported_state_refuses_a_bad_agent_version() -> None:
    from edgefl.errors import BadInputError

    with pytest.raises(BadInputError, match="agent"):
        parse_reported(b'{"device":"d","state":"none","v":1,"agent":"1.0; DROP"}')


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[str, sa.Engine]]:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    engine = make_engine(url)
    yield url, engine
    engine.dispose()


@pytest.mark.slow
def test_ingest_records_agent_and_envelope_versions(
    broker: Mosquitto, db: tuple[str, sa.Engine], tmp_path: Path
) -> None:
    url, engine = db
    ingest = Ingest(
        IngestConfig.model_validate(
            {
                "broker": {"host": broker.host, "port": broker.port},
                "client_id": "ingest-skew",
                "db_url": url,
                "fleet": "skew",
            }
        )
    )
    ingest.start()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    client.connect(broker.host, broker.port)
    client.loop_start()

    def publish(topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)

    try:
        assert ingest.wait_ready(30.0)
        now = int(time.time() * 1000)
        # An agent mid-upgrade: its outbox still holds a version-1 envelope, then a
        # version-2 one from the new code; an old agent sends version 1 only.
        v1 = Envelope(1, "new-1", 1, now, "telemetry", "application/json", b'{"a":1}')
        v2 = Envelope(
            2, "new-1", 1, now, "telemetry", "application/json", b'{"a":2}', new_incarnation()
        )
        old = Envelope(1, "old-1", 7, now, "telemetry", "application/json", b'{"a":3}')
        publish("edgefl/skew/new-1/telemetry/x", encode_envelope(v1, "json"))
        publish("edgefl/skew/old-1/telemetry/x", encode_envelope(old, "protobuf"))
        publish(
            "edgefl/skew/new-1/state/reported",
            ReportedState(device="new-1", state="none", agent="0.2.0").to_json(),
            retain=True,
        )
        publish("edgefl/skew/old-1/state/reported", OLD_REPORT, retain=True)
        publish("edgefl/skew/new-1/telemetry/x", encode_envelope(v2, "protobuf"))

        def stored() -> bool:
            with engine.connect() as conn:
                return conn.execute(sa.select(sa.func.count()).select_from(Record)).scalar() == 3

        wait_for(stored, 30.0, "3 records stored")

        def versions() -> dict[str, tuple[str | None, int | None]]:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.select(Device.device_id, Device.agent_version, Device.envelope_version)
                )
                return {d: (a, e) for d, a, e in rows}

        wait_for(lambda: versions().get("old-1", (0, 0))[1] == 1, 30.0, "old-1 stored")
        wait_for(lambda: versions().get("new-1") == ("0.2.0", 2), 30.0, "new-1's versions")
        assert versions()["old-1"] == (None, 1)  # no agent version reported: unknown
        # A report without a version keeps what is known: saying nothing is not a downgrade.
        publish(
            "edgefl/skew/new-1/state/reported",
            ReportedState(device="new-1", state="running", model="m", version=1).to_json(),
            retain=True,
        )
        time.sleep(1.0)
        assert versions()["new-1"][0] == "0.2.0"
        with engine.connect() as conn:
            kinds = conn.execute(sa.select(Record.device_id, Record.incarnation)).all()
            assert sorted((d, bool(i)) for d, i in kinds) == [
                ("new-1", False),
                ("new-1", True),
                ("old-1", False),
            ]
            assert conn.execute(sa.select(sa.func.count()).select_from(DeadLetter)).scalar() == 0
    finally:
        client.disconnect()
        client.loop_stop()
        ingest.stop()
