"""Broker identities and readmission, attacked from an enrolled device's position.

The attacker holds one device's certificate and key (``dev-b``, or ``dev-a`` for its own
topics). Every attack runs against mosquitto on the shipped configuration, started the way
``edgefl server start`` starts it, and is the function ``benchmarks/security_probe.py``
reports (``benchmarks/probes/broker.py``). Before this fix each one broke: the broker let
any client take any client id, the ACL let a device write its own ``cmd/#`` and
``state/desired``, it had no ``message_size_limit``, and ``admit --readmit`` signed a
revoked TLS key again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from probes.broker import (
    BrokerLab,
    broker_lab,
    probe_clientid_takeover_device,
    probe_clientid_takeover_ingest,
    probe_device_writes_own_desired_state,
    probe_oversized_payload,
    probe_readmit_old_tls_key,
)

from edgefl.server.registry import upgrade
from edgefl.testing import mosquitto_executable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_executable() is None, reason="mosquitto is not installed"),
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerLab]:
    with broker_lab(tmp_path_factory.mktemp("broker-lab")) as running:
        yield running


def test_clientid_takeover_ingest(lab: BrokerLab, tmp_path: Path) -> None:
    """A device connecting as ``edgefl-ingest`` does not end the ingest's session."""
    db_url = f"sqlite:///{tmp_path / 'ingest.db'}"
    upgrade(db_url)
    result = probe_clientid_takeover_ingest(lab, db_url)
    assert result["held"], result["detail"]


def test_clientid_takeover_device(lab: BrokerLab) -> None:
    """A device connecting with another device's client id does not disconnect it."""
    result = probe_clientid_takeover_device(lab)
    assert result["held"], result["detail"]


def test_device_writes_own_desired_state(lab: BrokerLab) -> None:
    """Retained publishes on its own cmd/# and state/desired: 0x87, nobody receives them."""
    result = probe_device_writes_own_desired_state(lab)
    assert result["held"], result["detail"]
    assert "state/desired: 0x87" in str(result["detail"])


def test_oversized_payload(lab: BrokerLab) -> None:
    """One byte over message_size_limit never reaches a subscriber; the limit itself does."""
    result = probe_oversized_payload(lab)
    assert result["held"], result["detail"]


def test_readmit_old_tls_key(tmp_path: Path) -> None:
    """A revoked device's old CSR with a new node key: refused, nothing issued."""
    result = probe_readmit_old_tls_key(tmp_path)
    assert result["held"], result["detail"]
    assert "TLS key" in str(result["detail"])
