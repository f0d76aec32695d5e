"""Attacks on the model a device runs: forged, edited, replayed and stale releases.

The attacker holds a device's certificate and TLS key (copied off a stolen device), or
only the public fleet CA certificate, and can put any bytes where the device reads its
manifests and desired states (a broker it controls, a proxy on the path). It holds no
release-signing key. The device is a real enrollment: the fleet CA issues its certificate,
the server's release keys (``<ca_dir>/release-signing``) travel in its bundle and the
device pins them; what it trusts is :class:`edgefl.releasesign.TrustStore` on its
identity folder, the same object the model manager loads. Each refusal must carry its
machine reason and change nothing the device trusts.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from edgefl.edge_agent.identity import install_bundle, prepare_enrollment
from edgefl.enrollment import EnrollmentBundle, IdentityPaths, read_request, write_json_document
from edgefl.manifest import (
    GoldenSet,
    Manifest,
    PrivacyGuarantee,
    ReleaseInfo,
    Signature,
    SourceModel,
    TensorSpecModel,
)
from edgefl.proto.desired import DesiredModel, DesiredState, parse_desired
from edgefl.releasesign import (
    ReleaseTrustError,
    TrustStore,
    key_id,
    public_key_pem,
    sign,
    verify,
)
from edgefl.server.fleet_ca import FleetCA
from edgefl.server.release_keys import (
    create_release_key,
    current_signing_key,
    revoke_release_key,
    revoked_key_ids,
    rotate_release_key,
    trusted_public_keys,
)

NOW = 1_800_000_000
DAY = 86_400
YEAR = 365 * DAY
FLEET = "lab"
DEVICE = "pi-07"


@dataclass
class Fleet:
    ca: FleetCA
    ca_dir: Path
    identity: Path

    def trust(self, clock: int = NOW) -> TrustStore:
        """The device's trust as its model manager loads it (after a restart, too)."""
        store = TrustStore.load(self.identity)
        store.clock = lambda: clock
        return store

    def server_key(self) -> Ed25519PrivateKey:
        return current_signing_key(self.ca_dir)[1]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    ca_dir = tmp_path / "ca"
    ca = FleetCA.create(ca_dir)
    create_release_key(ca_dir)
    state = tmp_path / "device"
    req = read_request(prepare_enrollment(DEVICE, FLEET, state).request_path)
    issued = ca.issue_device_cert(DEVICE, csr=x509.load_pem_x509_csr(req.csr_pem.encode()))
    bundle = EnrollmentBundle(
        device_id=DEVICE,
        fleet=FLEET,
        cert_pem=issued.cert_pem.decode(),
        ca_pem=ca.cert_pem.decode(),
        cert_serial=f"{issued.serial:x}",
        node_id="7",
        release_signing_keys=trusted_public_keys(ca_dir),
    )
    path = tmp_path / "bundle.json"
    write_json_document(path, bundle)
    install_bundle(path, DEVICE, FLEET, state)
    return Fleet(ca, ca_dir, IdentityPaths(state).directory)


def release(version: int = 2, **changes: Any) -> Manifest:
    info: dict[str, Any] = {
        "model": "digits-cnn",
        "version": version,
        "variant": "pruned50-int8",
        "device_class": "rpi4",
        "runtime": "ai-edge-litert",
        "created_at": NOW,
        "expires_at": NOW + 30 * DAY,
        "run_id": "run-9",
        "round": 10,
        "privacy": PrivacyGuarantee(epsilon_max=None, delta=None, mode="none"),
    }
    info.update(changes)
    spec = TensorSpecModel(name="x", index=0, shape=[1, 1, 8, 8], dtype="int8", scale=0.02)
    return Manifest(
        artifact="digits-cnn.pruned50-int8.tflite",
        variant="pruned50-int8",
        recipe="int8",
        prune_ratio=0.5,
        sha256="11" * 32,
        size_bytes=21_000,
        created_at="2027-01-15T08:00:00+00:00",
        inputs=[spec],
        outputs=[spec.model_copy(update={"name": "y", "shape": [1, 10]})],
        source_model=SourceModel(
            name="digits-cnn",
            dataset="digits",
            sha256="22" * 32,
            base_sha256="33" * 32,
            parameters=25_000,
        ),
        thresholds={"min_top1_agreement": 0.98},
        golden=GoldenSet(
            inputs=[[0.0] * 64],
            input_shape=[1, 1, 8, 8],
            reference_outputs=[[0.1] * 10],
            labels=[0],
        ),
        verified_on={},
        release=ReleaseInfo(**info),
    )


def desired(issued_at: int = NOW, **changes: Any) -> DesiredState:
    fields: dict[str, Any] = {
        "fleet": FLEET,
        "device": DEVICE,
        "issued_at": issued_at,
        "expires_at": issued_at + 7 * DAY,
        "model": DesiredModel(
            model="digits-cnn",
            version=2,
            variant="pruned50-int8",
            artifact_sha256="11" * 32,
            size_bytes=21_000,
        ),
    }
    fields.update(changes)
    return DesiredState(**fields)


def refused(reason: str, call: Any) -> ReleaseTrustError:
    with pytest.raises(ReleaseTrustError) as info:
        call()
    assert info.value.reason == reason, str(info.value)
    return info.value


def unchanged(fleet: Fleet, floor: int = 0, newest: int = 0) -> None:
    """Nothing the device trusts moved: same keys, nothing revoked, same floor."""
    after = fleet.trust()
    assert after.trusted_ids == [key_id(fleet.server_key().public_key())]
    assert after.revoked == set()
    assert after.floor == floor
    assert after.newest_desired == newest


def test_manifest_signed_by_a_key_the_attacker_made(fleet: Fleet) -> None:
    trust = fleet.trust()
    attacker = Ed25519PrivateKey.generate()
    refused("untrusted_key", lambda: verify(sign(release(), attacker), trust))
    # Claiming the fleet key's id over the attacker's signature changes nothing.
    forged = sign(release(), attacker)
    assert isinstance(forged.signature, Signature)
    claimed = forged.model_copy(
        update={
            "signature": forged.signature.model_copy(
                update={"key_id": key_id(fleet.server_key().public_key())}
            )
        }
    )
    refused("bad_signature", lambda: verify(claimed, trust))
    unchanged(fleet)


def test_a_key_certified_by_the_fleet_ca_signs_nothing(fleet: Fleet) -> None:
    """Even the fleet CA key (on the online server) cannot make a key devices trust."""
    attacker = Ed25519PrivateKey.generate()
    ca_key = serialization.load_pem_private_key(
        (fleet.ca_dir / "ca.key").read_bytes(), password=None
    )
    ca_cert = x509.load_pem_x509_certificate(fleet.ca.cert_pem)
    start = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefl-release")]))
        .issuer_name(ca_cert.subject)
        .public_key(attacker.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert.verify_directly_issued_by(ca_cert)  # a perfectly good CA-issued certificate
    refused("untrusted_key", lambda: verify(sign(release(), attacker), fleet.trust()))
    unchanged(fleet)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sha256", "66" * 32),  # the attacker's own .tflite
        ("size_bytes", 20_999),
        ("release.version", 99),  # jump ahead so no real release can replace it
        ("release.device_class", "jetson"),
        ("release.expires_at", NOW + 50 * YEAR),  # never expires: a freeze
        ("release.privacy.mode", "central"),
    ],
)
def test_manifest_edited_then_resigned(fleet: Fleet, field: str, value: Any) -> None:
    trust = fleet.trust()
    doc = json.loads(sign(release(), fleet.server_key()).to_json())
    node = doc
    *path, last = field.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    edited = Manifest.model_validate(doc)
    refused("bad_signature", lambda: verify(edited, trust))  # the fleet's signature kept
    attacker = Ed25519PrivateKey.generate()
    refused("untrusted_key", lambda: verify(sign(edited, attacker), trust))  # re-signed
    refused("unsigned", lambda: verify(edited.model_copy(update={"signature": None}), trust))
    unchanged(fleet)


def test_desired_state_replayed_from_the_past(fleet: Fleet) -> None:
    key = fleet.server_key()
    old = sign(desired(NOW - 10 * DAY, expires_at=NOW + 20 * DAY), key)  # still unexpired
    current = sign(desired(NOW), key)
    trust = fleet.trust()
    trust.accept_desired(old, fleet=FLEET, device=DEVICE)
    trust.accept_desired(current, fleet=FLEET, device=DEVICE)
    # The attacker republishes the older one (retained, on a broker it controls).
    payload = old.to_json()
    refused(
        "stale_desired_state",
        lambda: trust.accept_desired(parse_desired(payload), fleet=FLEET, device=DEVICE),
    )
    # After a restart the device still remembers.
    restarted = fleet.trust()
    refused(
        "stale_desired_state",
        lambda: restarted.accept_desired(parse_desired(payload), fleet=FLEET, device=DEVICE),
    )
    # Another device's genuine state is not this device's.
    other = sign(desired(NOW + 5, device="pi-08"), key)
    refused(
        "stale_desired_state", lambda: restarted.accept_desired(other, fleet=FLEET, device=DEVICE)
    )


def test_desired_state_revoking_the_good_key_signed_by_an_untrusted_key(fleet: Fleet) -> None:
    good = key_id(fleet.server_key().public_key())
    attacker = Ed25519PrivateKey.generate()
    trust = fleet.trust()
    evil = sign(desired(NOW + DAY, model=None, revoked_keys=[good]), attacker)
    refused("untrusted_key", lambda: trust.accept_desired(evil, fleet=FLEET, device=DEVICE))
    # Unsigned, or under the good key's id with a forged signature: refused the same.
    unsigned = evil.model_copy(update={"signature": None})
    refused("unsigned", lambda: trust.accept_desired(unsigned, fleet=FLEET, device=DEVICE))
    assert isinstance(evil.signature, Signature)
    posing = evil.model_copy(
        update={"signature": evil.signature.model_copy(update={"key_id": good})}
    )
    refused("bad_signature", lambda: trust.accept_desired(posing, fleet=FLEET, device=DEVICE))
    unchanged(fleet)  # nothing revoked, and its far-future time did not move the floor
    assert verify(sign(release(), fleet.server_key()), fleet.trust(), observe=False) == good


def test_a_stolen_retired_key_cannot_revoke_the_current_one(fleet: Fleet) -> None:
    """After a rotation the old key is revoked; a thief who later copies it gets nowhere."""
    old_id, old_key = current_signing_key(fleet.ca_dir)
    new_id, _ = rotate_release_key(fleet.ca_dir)
    # The device learns the new key from its config (models.release_signing_keys).
    trust = TrustStore.load(fleet.identity, [public_key_pem(fleet.server_key().public_key())])
    trust.clock = lambda: NOW
    assert trust.trusted_ids == sorted([old_id, new_id])
    revoke_release_key(fleet.ca_dir, old_id)
    notice = sign(desired(NOW, revoked_keys=revoked_key_ids(fleet.ca_dir)), fleet.server_key())
    trust.accept_desired(notice, fleet=FLEET, device=DEVICE)
    assert trust.revoked == {old_id}
    evil = sign(desired(NOW + DAY, revoked_keys=[new_id]), old_key)
    refused("revoked_key", lambda: trust.accept_desired(evil, fleet=FLEET, device=DEVICE))
    refused("revoked_key", lambda: verify(sign(release(3), old_key), trust))
    assert new_id not in fleet.trust().revoked


def test_rollback_desired_state_unsigned_or_untrusted(fleet: Fleet) -> None:
    trust = fleet.trust()
    trust.accept_desired(sign(desired(NOW), fleet.server_key()), fleet=FLEET, device=DEVICE)
    older = DesiredModel(
        model="digits-cnn",
        version=1,
        variant="pruned50-int8",
        artifact_sha256="44" * 32,
        size_bytes=20_000,
        rollback=True,
    )
    rollback = desired(NOW + 60, model=older)
    refused("unsigned", lambda: trust.accept_desired(rollback, fleet=FLEET, device=DEVICE))
    attacker = Ed25519PrivateKey.generate()
    refused(
        "untrusted_key",
        lambda: trust.accept_desired(sign(rollback, attacker), fleet=FLEET, device=DEVICE),
    )
    # Flipping rollback on in the server's own signed state breaks its signature.
    genuine = sign(
        desired(NOW + 60, model=older.model_copy(update={"rollback": False})), fleet.server_key()
    )
    flipped = genuine.model_copy(update={"model": older})
    refused("bad_signature", lambda: trust.accept_desired(flipped, fleet=FLEET, device=DEVICE))
    assert fleet.trust().newest_desired == NOW  # none of them was accepted
    # The fleet's own signed rollback is accepted.
    trust.accept_desired(sign(rollback, fleet.server_key()), fleet=FLEET, device=DEVICE)


def test_device_clock_set_back_five_years(fleet: Fleet) -> None:
    key = fleet.server_key()
    expired = sign(release(1, created_at=NOW - 90 * DAY, expires_at=NOW - 60 * DAY), key)
    trust = fleet.trust(clock=NOW)
    verify(sign(release(2), key), trust)  # the device saw a signed time: NOW
    # The attacker resets the device's clock (no RTC; a forged NTP answer) and reboots it.
    rebooted = fleet.trust(clock=NOW - 5 * YEAR)
    assert rebooted.now() == NOW
    verify(expired, rebooted)  # the signature itself is genuine ...
    assert expired.release is not None
    refused(
        "expired",
        lambda: rebooted.check_fresh(expired.release.created_at, expired.release.expires_at),
    )  # ... but it is refused as expired
    stale = sign(desired(NOW - 90 * DAY, expires_at=NOW - 60 * DAY), key)
    refused("expired", lambda: rebooted.accept_desired(stale, fleet=FLEET, device=DEVICE))
    # An untrusted document with a time far ahead cannot freeze the device either.
    frozen = sign(
        release(3, created_at=NOW + 50 * YEAR, expires_at=NOW + 51 * YEAR),
        Ed25519PrivateKey.generate(),
    )
    refused("untrusted_key", lambda: verify(frozen, rebooted))
    assert fleet.trust().floor == NOW
