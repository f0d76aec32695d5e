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


def test_device_cannot_forge_another_devices_reported_model_state(lab: BrokerLab) -> None:
    """dev-a's certificate writes dev-b's retained ``state/reported``: 0x87, never stored.

    The reported state is what an operator (and a rollout) reads to learn which model a
    device runs; a forged one would hide a failed or rolled-back update. The control: dev-b
    itself writes its own report, and a watcher receives that one only.
    """
    lab.close_clients()
    reported = lab.topic("dev-b", "state/reported")
    watcher = lab.client("op").connect()
    watcher.subscribe(reported)
    forged = lab.client("dev-a").connect().publish(reported, b'{"forged": true}', retain=True)
    assert forged.value == 0x87, forged
    own = lab.client("dev-b").connect().publish(reported, b'{"own": true}', retain=True)
    assert not own.is_failure, own
    received = [p for t, p, _ in watcher.drain(reported) if t == reported]
    assert received == [b'{"own": true}'], received
    # A subscriber that comes later gets the retained report: the device's own.
    later = lab.client("op", client_id="op-later").connect()
    later.subscribe(reported)
    assert [p for _, p, _ in later.drain(reported)] == [b'{"own": true}']
    # Clear the retained report so the lab's other probes start clean.
    lab.client("dev-b").connect().publish(reported, b"", retain=True)


def test_oversized_payload(lab: BrokerLab) -> None:
    """One byte over message_size_limit never reaches a subscriber; the limit itself does."""
    result = probe_oversized_payload(lab)
    assert result["held"], result["detail"]


def test_readmit_old_tls_key(tmp_path: Path) -> None:
    """A revoked device's old CSR with a new node key: refused, nothing issued."""
    result = probe_readmit_old_tls_key(tmp_path)
    assert result["held"], result["detail"]
    assert "TLS key" in str(result["detail"])
