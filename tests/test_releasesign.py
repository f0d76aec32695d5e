"""Release signing: canonical bytes, Ed25519 sign/verify, the trust store and its clock floor."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.manifest import (
    MANIFEST_SCHEMA_VERSION,
    GoldenSet,
    Manifest,
    PrivacyGuarantee,
    ReleaseInfo,
    Signature,
    SourceModel,
    TensorSpecModel,
    read_manifest,
)
from edgefl.proto.desired import (
    DesiredModel,
    DesiredState,
    ReportedState,
    parse_desired,
    parse_reported,
)
from edgefl.releasesign import (
    PINNED_KEYS_FILE,
    REASONS,
    TRUST_STATE_FILE,
    ReleaseTrustError,
    TrustStore,
    canonical_bytes,
    key_id,
    public_key_pem,
    sign,
    verify,
)

NOW = 1_800_000_000  # 2027-01-15, the signer's clock
DAY = 86_400
YEAR = 365 * DAY


def make_manifest(**release: Any) -> Manifest:
    info: dict[str, Any] = {
        "model": "digits-mlp",
        "version": 3,
        "variant": "int8",
        "device_class": "rpi4",
        "runtime": "ai-edge-litert",
        "created_at": NOW,
        "expires_at": NOW + 30 * DAY,
        "run_id": "run-1",
        "round": 5,
        "privacy": PrivacyGuarantee(epsilon_max=2.5, delta=1e-5, mode="local"),
    }
    info.update(release)
    spec = TensorSpecModel(name="x", index=0, shape=[1, 64], dtype="int8", scale=0.1)
    return Manifest(
        artifact="digits-mlp.int8.tflite",
        variant="int8",
        recipe="int8",
        prune_ratio=None,
        sha256="ab" * 32,
        size_bytes=3400,
        created_at="2027-01-15T08:00:00+00:00",
        inputs=[spec],
        outputs=[spec.model_copy(update={"name": "y", "shape": [1, 10]})],
        source_model=SourceModel(
            name="digits-mlp",
            dataset="digits",
            sha256="cd" * 32,
            base_sha256="ef" * 32,
            parameters=1200,
        ),
        thresholds={"max_abs_error": 0.5},
        golden=GoldenSet(
            inputs=[[0.5] * 64], input_shape=[1, 64], reference_outputs=[[0.1] * 10], labels=[3]
        ),
        verified_on={},
        release=ReleaseInfo(**info),
    )


def make_desired(**fields: Any) -> DesiredState:
    values: dict[str, Any] = {
        "fleet": "fleet1",
        "device": "dev-1",
        "issued_at": NOW,
        "expires_at": NOW + 7 * DAY,
        "model": DesiredModel(
            model="digits-mlp",
            version=3,
            variant="int8",
            artifact_sha256="ab" * 32,
            size_bytes=3400,
        ),
    }
    values.update(fields)
    return DesiredState(**values)


def store_for(folder: Path, *keys: Ed25519PrivateKey, clock: int = NOW) -> TrustStore:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PINNED_KEYS_FILE).write_text("".join(public_key_pem(k.public_key()) for k in keys))
    store = TrustStore.load(folder)
    store.clock = lambda: clock
    return store


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def trust(tmp_path: Path, key: Ed25519PrivateKey) -> TrustStore:
    return store_for(tmp_path / "identity", key)


def refused(reason: str, obj: Any, trust: TrustStore) -> ReleaseTrustError:
    with pytest.raises(ReleaseTrustError) as info:
        verify(obj, trust)
    assert info.value.reason == reason, info.value
    return info.value


def test_manifest_roundtrip_and_schema_version(
    key: Ed25519PrivateKey, trust: TrustStore, tmp_path: Path
) -> None:
    signed = sign(make_manifest(), key)
    assert isinstance(signed.signature, Signature)
    assert signed.signature.key_id == key_id(key.public_key())
    assert len(base64.b64decode(signed.signature.value)) == 64
    assert signed.schema_version == MANIFEST_SCHEMA_VERSION == 2
    path = tmp_path / "m.manifest.json"
    path.write_text(signed.to_json())
    loaded = read_manifest(path)
    assert verify(loaded, trust) == key_id(key.public_key())


def test_desired_state_roundtrip_through_its_payload(
    key: Ed25519PrivateKey, trust: TrustStore
) -> None:
    signed = sign(make_desired(revoked_keys=["0123456789abcdef"]), key)
    parsed = parse_desired(signed.to_json())
    assert parsed == signed
    assert verify(parsed, trust) == key_id(key.public_key())
    reported = ReportedState(device="dev-1", state="none")
    assert parse_reported(reported.to_json()) == reported


def test_schema_1_manifest_still_loads_and_is_refused_as_unsigned(
    trust: TrustStore, tmp_path: Path
) -> None:
    doc = json.loads(make_manifest().to_json())
    doc["schema_version"] = 1
    del doc["release"]
    doc["signature"] = None
    path = tmp_path / "old.manifest.json"
    path.write_text(json.dumps(doc))
    old = read_manifest(path)
    assert old.schema_version == 1
    assert old.release is None
    refused("unsigned", old, trust)
    doc["signature"] = "reserved"
    path.write_text(json.dumps(doc))
    refused("unsigned", read_manifest(path), trust)


def _flip(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        last = value[-1]
        return value[:-1] + ("0" if last != "0" else "1")
    raise AssertionError(value)


SIGNED_FIELDS = [
    "sha256",
    "size_bytes",
    "variant",
    "release.model",
    "release.version",
    "release.variant",
    "release.device_class",
    "release.runtime",
    "release.created_at",
    "release.expires_at",
    "release.run_id",
    "release.round",
    "release.privacy.epsilon_max",
    "release.privacy.delta",
    "golden.labels.0",
    "thresholds.max_abs_error",
]


@pytest.mark.parametrize("where", SIGNED_FIELDS)
def test_one_edited_signed_field_is_refused(
    where: str, key: Ed25519PrivateKey, trust: TrustStore
) -> None:
    doc = json.loads(sign(make_manifest(), key).to_json())
    node: Any = doc
    *path, last = where.split(".")
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    index: Any = int(last) if isinstance(node, list) else last
    node[index] = _flip(node[index])
    refused("bad_signature", Manifest.model_validate(doc), trust)


def test_one_flipped_byte_of_the_signature_is_refused(
    key: Ed25519PrivateKey, trust: TrustStore
) -> None:
    signed = sign(make_desired(), key)
    assert isinstance(signed.signature, Signature)
    raw = bytearray(base64.b64decode(signed.signature.value))
    raw[10] ^= 0x01
    forged = signed.model_copy(
        update={
            "signature": signed.signature.model_copy(
                update={"value": base64.b64encode(bytes(raw)).decode()}
            )
        }
    )
    refused("bad_signature", forged, trust)


def test_signature_of_one_document_type_does_not_verify_another(
    key: Ed25519PrivateKey, trust: TrustStore
) -> None:
    manifest = sign(make_manifest(), key)
    desired = make_desired().model_copy(update={"signature": manifest.signature})
    refused("bad_signature", desired, trust)


def test_untrusted_and_revoked_keys(key: Ed25519PrivateKey, trust: TrustStore) -> None:
    stranger = Ed25519PrivateKey.generate()
    refused("untrusted_key", sign(make_manifest(), stranger), trust)
    refused("unsigned", make_manifest(), trust)
    trust.revoke([key_id(key.public_key())])
    err = refused("revoked_key", sign(make_manifest(), key), trust)
    assert key_id(key.public_key()) in str(err)
    # persisted: a fresh load of the same folder still refuses it
    refused("revoked_key", sign(make_manifest(), key), TrustStore.load(trust.folder))


def test_rotation_trusts_several_keys_and_config_keys_only_add(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    newer = Ed25519PrivateKey.generate()
    added = Ed25519PrivateKey.generate()
    store = store_for(tmp_path / "id", key, newer)
    assert verify(sign(make_manifest(), key), store)
    assert verify(sign(make_manifest(), newer), store)
    key_file = tmp_path / "added.pub"
    key_file.write_text(public_key_pem(added.public_key()))
    loaded = TrustStore.load(tmp_path / "id", [str(key_file)])
    loaded.clock = lambda: NOW
    assert set(loaded.trusted_ids) == {key_id(k.public_key()) for k in (key, newer, added)}
    inline = TrustStore.load(tmp_path / "id", [public_key_pem(added.public_key())])
    assert len(inline.keys) == 3


def test_unreadable_state_is_an_error_not_a_reset(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    store = store_for(tmp_path / "id", key)
    store.revoke(["0123456789abcdef"])
    (tmp_path / "id" / TRUST_STATE_FILE).write_text("{not json")
    with pytest.raises(ReleaseTrustError):
        TrustStore.load(tmp_path / "id")


def test_expired_and_fresh(trust: TrustStore) -> None:
    trust.check_fresh(NOW - DAY, NOW + DAY)
    with pytest.raises(ReleaseTrustError) as info:
        trust.check_fresh(NOW - 2 * DAY, NOW)
    assert info.value.reason == "expired"
    with pytest.raises(ReleaseTrustError) as info:
        trust.check_fresh(NOW + 2 * DAY, NOW + DAY)  # empty window
    assert info.value.reason == "expired"
    trust.check_fresh(NOW + YEAR, NOW + 2 * YEAR)  # a device clock behind the signer: fine
    with pytest.raises(ReleaseTrustError) as info:
        trust.check_fresh(NOW + YEAR, NOW + 2 * YEAR, max_future_s=DAY)
    assert info.value.reason == "not_yet_valid"


def test_clock_floor_never_goes_back_and_survives_reloads(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    folder = tmp_path / "id"
    past = NOW - 5 * YEAR  # a Raspberry Pi that booted without a real-time clock
    store = store_for(folder, key, clock=past)
    old = sign(make_manifest(created_at=NOW - 60 * DAY, expires_at=NOW - 30 * DAY), key)
    # Before any signed time: the device's own clock is all it has, and the old one passes.
    verify(old, store, observe=False)
    store.check_fresh(NOW - 60 * DAY, NOW - 30 * DAY)
    # It sees a newer signed manifest: the floor rises to its signed time.
    assert verify(sign(make_manifest(), key), store)
    assert store.now() == NOW
    store.observe(NOW - YEAR)  # never lowers it
    assert store.floor == NOW
    # After a restart, with the clock still years behind, the expired one is refused.
    reloaded = TrustStore.load(folder)
    reloaded.clock = lambda: past
    assert reloaded.floor == NOW
    assert reloaded.now() == NOW
    with pytest.raises(ReleaseTrustError) as info:
        reloaded.check_fresh(NOW - 60 * DAY, NOW - 30 * DAY)
    assert info.value.reason == "expired"
    state = json.loads((folder / TRUST_STATE_FILE).read_text())
    assert state["floor"] == NOW
    assert oct(os.stat(folder / TRUST_STATE_FILE).st_mode & 0o777) == "0o600"


def test_canonical_bytes_are_stable_across_key_order(key: Ed25519PrivateKey) -> None:
    manifest = make_manifest()
    doc = json.loads(manifest.to_json())

    def reverse(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: reverse(node[k]) for k in reversed(list(node))}
        if isinstance(node, list):
            return [reverse(v) for v in node]
        return node

    again = Manifest.model_validate(reverse(doc))
    assert canonical_bytes(again) == canonical_bytes(manifest)
    text = canonical_bytes(manifest).decode()
    assert " " not in text.replace("digits-mlp.int8", "")  # no whitespace separators
    assert '"signature"' not in text
    assert canonical_bytes(sign(manifest, key)) == canonical_bytes(manifest)
    desired = make_desired()
    shuffled = DesiredState.model_validate_json(json.dumps(reverse(json.loads(desired.to_json()))))
    assert canonical_bytes(shuffled) == canonical_bytes(desired)


def test_accept_desired_rules(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    store = store_for(tmp_path / "id", key, other)
    first = sign(make_desired(), key)
    assert store.accept_desired(first, fleet="fleet1", device="dev-1")
    assert store.accept_desired(first, fleet="fleet1", device="dev-1")  # the retained again
    newer = sign(make_desired(issued_at=NOW + 10, revoked_keys=[key_id(other.public_key())]), key)
    store.accept_desired(newer, fleet="fleet1", device="dev-1")
    assert key_id(other.public_key()) in store.revoked
    for state, reason in [
        (first, "stale_desired_state"),
        (make_desired(issued_at=NOW + 20), "unsigned"),
        (sign(make_desired(issued_at=NOW + 20), other), "revoked_key"),
        (sign(make_desired(issued_at=NOW + 20, device="dev-2"), key), "stale_desired_state"),
        (sign(make_desired(issued_at=NOW + 20, fleet="fleet2"), key), "stale_desired_state"),
        (sign(make_desired(issued_at=NOW + 20, expires_at=NOW + 15), key), "expired"),
    ]:
        with pytest.raises(ReleaseTrustError) as info:
            store.accept_desired(state, fleet="fleet1", device="dev-1")
        assert info.value.reason == reason, (state, info.value)
    fleetwide = sign(make_desired(issued_at=NOW + 30, device="*"), key)
    store.accept_desired(fleetwide, fleet="fleet1", device="dev-1")
    assert TrustStore.load(tmp_path / "id").newest_desired == NOW + 30


def test_reasons_are_the_documented_set() -> None:
    assert len(set(REASONS)) == len(REASONS) == 15
    with pytest.raises(ValueError, match="unknown release trust reason"):
        ReleaseTrustError("nope", "x")
