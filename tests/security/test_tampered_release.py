"""Tampered releases, from the attacker's position: each refused with its reason.

The attacker controls what the device downloads (the server's releases folder, or the
path to it) and can replay anything the fleet ever signed, but holds no trusted
release-signing key. The device runs a signed v1; for each attack it is offered a v2 (or
an older one) and must refuse it with the machine reason while v1 keeps serving, its
files untouched.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.edge_agent.models.manager import ModelManager
from edgefl.manifest import GoldenSet
from edgefl.proto.desired import DesiredState
from edgefl.releasesign import key_id

try:
    from tests.model_release_helpers import DAY, MODEL, Built, Fleet, build_tiny_models
except ImportError:  # pragma: no cover - run from inside tests/
    from model_release_helpers import (  # type: ignore[import-not-found,no-redef]
        DAY,
        MODEL,
        Built,
        Fleet,
        build_tiny_models,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_tiny_models(tmp_path_factory)


def _flipped_bit(fleet: Fleet, manager: ModelManager) -> DesiredState:
    good = fleet.built.variants["fp16"][0].read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x10
    # The attacker swaps the file but cannot re-sign: the desired state and manifest
    # still name the real one.
    return fleet.desired(fleet.publish(2, "fp16", artifact=bytes(bad)))


def _edited_manifest_field(fleet: Fleet, manager: ModelManager) -> DesiredState:
    desired = fleet.desired(fleet.publish(2, "fp16"))
    path = fleet.releases / MODEL / "2" / "fp16.manifest.json"
    doc = json.loads(path.read_text())
    doc["release"]["expires_at"] += 365 * DAY  # stretch the validity, keep the signature
    path.write_text(json.dumps(doc))
    return desired


def _untrusted_key(fleet: Fleet, manager: ModelManager) -> DesiredState:
    stranger = Ed25519PrivateKey.generate()
    return fleet.desired(fleet.publish(2, "fp16", key=stranger))


def _revoked_key(fleet: Fleet, manager: ModelManager) -> DesiredState:
    old = fleet.extra_key
    assert old is not None
    manager.handle(fleet.desired(None, revoked_keys=[key_id(old.public_key())]))
    fleet.tick()
    return fleet.desired(fleet.publish(2, "fp16", key=old))


def _expired_manifest(fleet: Fleet, manager: ModelManager) -> DesiredState:
    signed = fleet.now() - 10 * DAY
    return fleet.desired(fleet.publish(2, "fp16", created_at=signed, expires_at=signed + DAY))


def _replayed_older_manifest(fleet: Fleet, manager: ModelManager) -> DesiredState:
    # v3 is published and named; the attacker serves the genuine signed v1 instead.
    desired = fleet.desired(fleet.publish(3, "fp16"))
    v3 = fleet.releases / MODEL / "3"
    v1 = fleet.releases / MODEL / "1"
    (v3 / "fp16.tflite").write_bytes((v1 / "fp32.tflite").read_bytes())
    (v3 / "fp16.manifest.json").write_text((v1 / "fp32.manifest.json").read_text())
    return desired


def _wrong_device_class(fleet: Fleet, manager: ModelManager) -> DesiredState:
    return fleet.desired(fleet.publish(2, "fp16", device_class="jetson-nano"))


def _golden_mismatch(fleet: Fleet, manager: ModelManager) -> DesiredState:
    # Verified on the server, but on this device's runtime its outputs are not the
    # reference's: the golden outputs are altered and re-signed by the trusted key.
    _, base = fleet.built.variants["fp16"]
    golden = base.golden
    shifted = [row[1:] + row[:1] for row in golden.reference_outputs]
    manifest = fleet.release_manifest(
        2,
        "fp16",
        golden=GoldenSet(
            inputs=golden.inputs,
            input_shape=golden.input_shape,
            reference_outputs=shifted,
            labels=[(label + 1) % 10 for label in golden.labels],
        ),
    )
    return fleet.desired(fleet.publish(2, "fp16", manifest=manifest))


def _unsigned_desired_state(fleet: Fleet, manager: ModelManager) -> DesiredState:
    return fleet.desired(fleet.publish(2, "fp16"), signed=False)


def _forged_desired_signature(fleet: Fleet, manager: ModelManager) -> DesiredState:
    desired = fleet.desired(fleet.publish(2, "fp16"))
    assert desired.signature is not None
    raw = bytearray(base64.b64decode(desired.signature.value))
    raw[0] ^= 1
    forged = desired.signature.model_copy(update={"value": base64.b64encode(raw).decode()})
    return desired.model_copy(update={"signature": forged})


def _replayed_desired_state(fleet: Fleet, manager: ModelManager) -> DesiredState:
    # An older signed desired state (naming the old v1), replayed after the current one.
    assert fleet.replayable is not None
    return fleet.replayable


ATTACKS: dict[str, tuple[Callable[[Fleet, ModelManager], DesiredState], str]] = {
    "flipped_bit": (_flipped_bit, "sha256_mismatch"),
    "edited_manifest_field": (_edited_manifest_field, "bad_signature"),
    "untrusted_key": (_untrusted_key, "untrusted_key"),
    "revoked_key": (_revoked_key, "revoked_key"),
    "expired_manifest": (_expired_manifest, "expired"),
    "replayed_older_manifest": (_replayed_older_manifest, "downgrade"),
    "wrong_device_class": (_wrong_device_class, "wrong_device_class"),
    "golden_mismatch": (_golden_mismatch, "golden_mismatch"),
    "unsigned_desired_state": (_unsigned_desired_state, "unsigned"),
    "forged_desired_signature": (_forged_desired_signature, "bad_signature"),
    "replayed_desired_state": (_replayed_desired_state, "stale_desired_state"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tampered_release_is_refused_and_the_old_model_keeps_serving(
    tmp_path: Path, built: Built, attack: str
) -> None:
    fleet = Fleet(tmp_path, built)
    fleet.extra_key = Ed25519PrivateKey.generate()
    fleet.pin(fleet.key, fleet.extra_key)
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    fleet.replayable = fleet.desired(v1)
    fleet.tick()
    manager.handle(fleet.desired(v1))
    before = manager.current()
    assert before is not None
    serving = before.path.read_bytes()
    fleet.tick()

    make, reason = ATTACKS[attack]
    manager.handle(make(fleet, manager))

    report = fleet.reports[-1]
    assert report.last_failure is not None, attack
    assert report.last_failure.reason == reason, report.last_failure.detail
    assert report.state == "failed"
    after = manager.current()
    assert after is not None
    assert after.installed == before.installed
    assert after.path.read_bytes() == serving
    assert (report.version, report.sha256) == (1, v1.artifact_sha256)
    # A restarted device still serves v1.
    restarted = fleet.manager()
    current = restarted.current()
    assert current is not None
    assert current.installed.version == 1


def test_an_older_version_named_without_rollback_is_a_downgrade(
    tmp_path: Path, built: Built
) -> None:
    fleet = Fleet(tmp_path, built)
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    fleet.tick()
    manager.handle(fleet.desired(fleet.publish(2, "fp16")))
    fleet.tick()
    # A new, genuinely signed desired state naming v1, but not as a rollback.
    manager.handle(fleet.desired(v1))
    report = fleet.reports[-1]
    assert report.last_failure is not None
    assert report.last_failure.reason == "downgrade"
    assert report.version == 2
