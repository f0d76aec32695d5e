"""Attack: answering a command for another device through the registry.

``command --wait`` falls back on the answer the ingest stored when its own subscription
missed it (``edgefl.server.ops.fleet._stored_answer``). The attacker is an enrolled
device holding only its own certificate: the broker's ACL lets it publish on its own
``cmd-resp/...`` topics alone, so what it can get stored is a record under its own
device id, on a topic under its own id, with any body it likes. It learned (or guessed)
the correlation id of a command sent to another device. None of that may be taken as the
other device's answer; the real answer is. Real SQLite registry, migrated as the server
migrates it; the rows are what the ingest stores for those publishes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from edgefl.server.ops import fleet as fleet_ops
from edgefl.server.registry import Device, Record, make_engine
from edgefl.server.registry.db import upgrade

CID = "ping-0123456789abcdef"


def _store(engine: Any, device: str, topic: str, body: dict[str, Any], seq: int) -> None:
    with Session(engine) as session, session.begin():
        session.add(
            Record(
                device_id=device,
                incarnation="0" * 32,
                seq=seq,
                kind="response",
                topic=topic,
                ts_ms=0,
                content_type="application/json",
                body=json.dumps(body).encode(),
                received_at=datetime.now(UTC),
            )
        )


def test_another_devices_answer_never_stands_for_the_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_ops, "_STORED_ANSWER_WAIT_S", 0.0)
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        for device in ("pi-01", "pi-02"):
            session.add(Device(device_id=device, fleet="lab", first_seen=now, last_seen=now))
    forged = {"correlation_id": CID, "command": "ping", "ok": True, "result": {"forged": 1}}
    # pi-02 answers pi-01's command on its own topic (all the ACL lets it write).
    _store(engine, "pi-02", f"edgefl/lab/pi-02/cmd-resp/{CID}", forged, 1)
    assert fleet_ops._stored_answer(engine, "lab", "pi-01", CID) is None
    # A record stored under pi-01 on a topic of another fleet is not its answer either.
    _store(engine, "pi-01", f"edgefl/other/pi-01/cmd-resp/{CID}", forged, 2)
    assert fleet_ops._stored_answer(engine, "lab", "pi-01", CID) is None
    # pi-01's own record whose body names another command is not taken.
    other = {**forged, "correlation_id": "ping-ffffffffffffffff"}
    _store(engine, "pi-01", f"edgefl/lab/pi-01/cmd-resp/{CID}", other, 3)
    assert fleet_ops._stored_answer(engine, "lab", "pi-01", CID) is None
    # Nor a body that is not a JSON object.
    with Session(engine) as session, session.begin():
        session.add(
            Record(
                device_id="pi-01",
                incarnation="0" * 32,
                seq=4,
                kind="response",
                topic=f"edgefl/lab/pi-01/cmd-resp/{CID}",
                ts_ms=0,
                content_type="application/json",
                body=b"[1, 2",
                received_at=datetime.now(UTC),
            )
        )
    assert fleet_ops._stored_answer(engine, "lab", "pi-01", CID) is None
    # The target's own answer is taken.
    real = {"correlation_id": CID, "command": "ping", "ok": True, "result": {"n": 1}}
    _store(engine, "pi-01", f"edgefl/lab/pi-01/cmd-resp/{CID}", real, 5)
    assert fleet_ops._stored_answer(engine, "lab", "pi-01", CID) == real
    engine.dispose()
