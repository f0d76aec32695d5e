"""A deleted outbox: its agent starts again at seq 1, and every new record is stored.

The attack of ``benchmarks/probes/ingest.py`` (``outbox_reset``) with a real agent
(``edgefl agent run``) holding only its device certificate, the shipped broker and the
real ingest. Before outbox incarnations, the ingest keyed records on ``(device_id, seq)``
and silently dropped every record of the new outbox as a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from probes.ingest import IngestRig, probe_outbox_reset

pytestmark = pytest.mark.slow


@pytest.fixture
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestRig]:
    started = IngestRig(tmp_path_factory.mktemp("outbox-reset"))
    try:
        started.start()
        yield started
    finally:
        started.close()


def test_deleted_outbox_stores_every_new_record(rig: IngestRig) -> None:
    result = probe_outbox_reset(rig, records=120)
    assert result.held, result.detail
    assert result.counts == {
        "rows": 240,
        "keys": 240,
        "per_incarnation": [120, 120],  # two outbox lives, each from seq 1
        "dead_letters": {},
        "expected": 240,
    }
