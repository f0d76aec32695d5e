"""Poison messages against the ingest, from an enrolled device holding only its own key.

Each test is one attack of ``benchmarks/probes/ingest.py`` (the security probe runs the
same functions) against the shipped broker (mutual TLS, ACL), the real ingest in a child
process and SQLite; every count is exact. Before per-message isolation, a 5,000-digit
``seq`` or a lone surrogate left its batch unacknowledged (and, past the broker's
Receive Maximum, stalled the whole fleet), a retained record was stored and came back on
every re-subscription, and a device could publish under another fleet.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from probes.ingest import (
    FLOOD_MESSAGES,
    HONEST_DEVICES,
    HONEST_RECORDS,
    IngestRig,
    probe_fleet_spoof,
    probe_flood,
    probe_poison_seq_digits,
    probe_poison_surrogate,
    probe_retained_poison,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestRig]:
    started = IngestRig(tmp_path_factory.mktemp("ingest-poison"))
    try:
        started.start()
        yield started
    finally:
        started.close()


def test_poison_seq_digits_is_dead_lettered_and_acknowledged(rig: IngestRig) -> None:
    result = probe_poison_seq_digits(rig)
    assert result.held, result.detail
    assert result.counts == {
        "sent": 60,
        "stored": 60,
        "dead_letters": {"malformed_envelope": 1},  # once: not redelivered after a restart
        "poison_rows": 0,
    }


def test_poison_surrogate_is_refused_at_decode(rig: IngestRig) -> None:
    result = probe_poison_surrogate(rig)
    assert result.held, result.detail
    # malformed_envelope, not store_failed: refused by the decoder, not by SQLite
    assert result.counts["dead_letters"] == {"malformed_envelope": 1}
    assert result.counts["stored"] == result.counts["sent"] == 60


def test_retained_poison_is_dead_lettered_not_stored(rig: IngestRig) -> None:
    result = probe_retained_poison(rig)
    assert result.held, result.detail
    assert result.counts == {
        "delivered": 2,
        "dead_letters": {"retained": 2},  # the restart's re-subscription did not resend them
        "poison_rows": 0,
        "sent": 30,
        "stored": 30,
    }


def test_fleet_spoof_is_refused(rig: IngestRig) -> None:
    result = probe_fleet_spoof(rig)
    assert result.held, result.detail
    assert result.counts["rows_under_other_fleet"] == 0
    # Either the broker refuses it, or the ingest dead-letters it; never stored.
    assert result.counts["dead_letters"] == (
        {"fleet_mismatch": result.counts["delivered"]} if result.counts["delivered"] else {}
    )


def test_poison_flood_beside_honest_devices_loses_nothing(rig: IngestRig) -> None:
    result, honest = probe_flood(rig)
    counts = result.counts
    sent = HONEST_DEVICES * HONEST_RECORDS
    assert honest["sent"] == sent
    assert honest["stored"] == sent  # 0 lost
    assert honest["duplicate_rows"] == 0
    assert counts["attacker_rows"] == 1  # its one honest record, none of the flood
    assert counts["redelivered"] == 0  # everything was acknowledged
    assert sum(counts["expected"].values()) == FLOOD_MESSAGES  # the broker took them all
    assert counts["dead_letters"] == counts["expected"]  # each bad one, with its reason
    assert set(counts["dead_letters"]) == {
        "malformed_envelope",
        "device_mismatch",
        "conflicting_duplicate",
        "retained",
        "bad_status",
    }
    # Timing is the probe's figure (p99 lag); a loaded machine must not fail this test.
    print(result.detail)
