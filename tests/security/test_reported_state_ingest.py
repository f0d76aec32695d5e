"""Forged and flooded reported model states, from an enrolled device holding only its own key.

The registry's ``device_states`` tells an operator (and a rollout) which model each
device runs and how its last update went; a forged row would hide a failed or
rolled-back update, or blame a device for one. Each test is one attack of
``benchmarks/probes/reported_state.py`` (the security probe runs the same functions)
against the shipped broker (mutual TLS, ACL), the real ingest in a child process and
SQLite; every count is exact. Before the ingest read ``state/reported`` as a
:class:`~edgefl.proto.desired.ReportedState`, it dead-lettered every report as
``malformed_envelope`` and the registry knew no device's model at all.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from probes.ingest import IngestRig, ingest_rig
from probes.reported_state import (
    FLOOD_MESSAGES,
    HONEST_DEVICES,
    HONEST_RECORDS,
    probe_reported_state_flood,
    probe_reported_state_forgery,
)

from edgefl.testing import mosquitto_executable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_executable() is None, reason="mosquitto is not installed"),
]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestRig]:
    with ingest_rig(tmp_path_factory.mktemp("reported-state")) as running:
        yield running


def test_a_device_cannot_make_the_registry_record_another_devices_model(rig: IngestRig) -> None:
    result = probe_reported_state_forgery(rig)
    assert result.held, result.detail
    counts = result.counts
    assert counts["victim_topic_rc"] == 0x87  # the broker's ACL: not the attacker's topic
    assert counts["own_topic_rc"] == 0  # its own topic is its to write...
    # ...but a document naming the victim is refused there, and again when the retained
    # copy comes back on the restarted ingest's subscription.
    assert counts["dead_letters"] == {"device_mismatch": 2}
    assert counts["victim_dead_letters"] == {}
    assert counts["victim_row_unchanged"] is True
    assert counts["attacker_row"] is False


def test_a_flood_of_bad_reports_does_not_delay_honest_records(rig: IngestRig) -> None:
    result, figures = probe_reported_state_flood(rig)
    assert result.held, result.detail
    counts = result.counts
    sent = HONEST_DEVICES * HONEST_RECORDS
    assert (figures["sent"], figures["stored"], figures["duplicate_rows"]) == (sent, sent, 0)
    assert counts["dead_letters"] == counts["expected"]
    assert sum(counts["expected"].values()) == FLOOD_MESSAGES  # the broker let them all in
    assert set(counts["expected"]) == {"malformed_state", "device_mismatch", "oversized"}
    assert counts["attacker_row"] is False
    assert counts["redelivered"] == 0
