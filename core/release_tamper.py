"""Tampered releases, from the attacker's position: the cases a device must refuse.

The attacker controls what the device downloads (the server's releases folder, or the
path to it) and can replay anything the fleet ever signed, but holds no trusted
release-signing key. The device runs a signed v1; each attack in :data:`ATTACKS` offers
it a v2 (or an older one), and it must refuse it with the machine reason named beside
the attack while v1 keeps serving, its files untouched (:func:`run_tamper_case`).

Shared by the security test (``tests/security/test_tampered_release.py``) and the
release benchmark (``benchmarks/release_bench.py``), so both run the same cases. It
holds the server's side of a fleet (keys, a device clock, a releases folder laid out as
the server publishes it, signed desired states): :class:`ReleaseFleet`. The device's
model manager lives in the device role, which this shared layer does not import; a
subclass provides it (:meth:`ReleaseFleet.manager`), and here it is only the
:class:`DeviceManager` protocol.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.manifest import GoldenSet, Manifest, PrivacyGuarantee, ReleaseInfo
from edgefl.proto.desired import DesiredModel, DesiredState, ReportedState
from edgefl.releasesign import PINNED_KEYS_FILE, TrustStore, key_id, public_key_pem, sign

__all__ = [
    "ATTACKS",
    "DAY",
    "DEVICE",
    "DEVICE_CLASS",
    "FLEET",
    "MODEL",
    "RUNTIME",
    "Attack",
    "Built",
    "DeviceManager",
    "ReleaseFleet",
    "TamperTrial",
    "run_tamper_case",
]

MODEL: Final = "digits-mlp"
DEVICE: Final = "pi-01"
FLEET: Final = "f1"
DEVICE_CLASS: Final = "rpi4"
RUNTIME: Final = "ai-edge-litert"
DAY: Final = 86_400


class InstalledView(Protocol):
    """What :class:`DeviceManager` says is installed (the store's slot record)."""

    @property
    def version(self) -> int:
        """Release version."""
        ...

    @property
    def sha256(self) -> str:
        """Hex sha256 of the artifact."""
        ...


class ServingView(Protocol):
    """The serving model: its file and its slot record."""

    @property
    def path(self) -> Path:
        """The ``.tflite`` file."""
        ...

    @property
    def installed(self) -> InstalledView:
        """The slot record."""
        ...


class DeviceManager(Protocol):
    """The device's model manager, as far as the attacks need it."""

    def handle(self, payload: bytes | DesiredState) -> None:
        """Verify a desired state and act on it."""
        ...

    def current(self) -> ServingView | None:
        """The serving model, or ``None``."""
        ...


@dataclass(frozen=True)
class Built:
    """The toolkit's variants ``fp32`` and ``fp16``: (artifact, its manifest) by name."""

    variants: dict[str, tuple[Path, Manifest]]


@dataclass
class ReleaseFleet:
    """A device's view of a fleet: its keys, the server's releases folder, its clock.

    Subclasses provide :meth:`manager`, the device's model manager reading releases from
    :attr:`releases` and publishing its reports to :attr:`reports`.
    """

    root: Path
    built: Built
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    clock: float = field(default_factory=time.time)
    reports: list[ReportedState] = field(default_factory=list)
    extra_key: Ed25519PrivateKey | None = None
    replayable: DesiredState | None = None

    @property
    def releases(self) -> Path:
        """The server's releases folder."""
        return self.root / "releases"

    @property
    def state_dir(self) -> Path:
        """The device's state folder."""
        return self.root / "device"

    def now(self) -> int:
        """The device clock, in unix seconds."""
        return int(self.clock)

    def manager(self, **config: object) -> DeviceManager:
        """The device's model manager (``config``: its ``models:`` settings changed)."""
        raise NotImplementedError("a subclass provides the device's model manager")

    def manager_settings(self, **config: object) -> dict[str, object]:
        """A ``models:`` section reading this fleet's releases, with a short health window."""
        settings: dict[str, object] = {
            "enabled": True,
            "server": {"host": "127.0.0.1", "port": 1},
            "device_class": DEVICE_CLASS,
            "runtime": RUNTIME,
            "health_window_s": 0,
            "retry_min_s": 0.05,
            "retry_max_s": 0.2,
        }
        settings.update(config)
        return settings

    def trust_store(self) -> TrustStore:
        """The device's trusted keys (pinned at enrollment) on the fleet's clock."""
        if not (self.state_dir / "identity" / PINNED_KEYS_FILE).exists():
            self.pin()
        trust = TrustStore.load(self.state_dir / "identity")
        trust.clock = lambda: self.clock
        return trust

    def pin(self, *keys: Ed25519PrivateKey) -> None:
        """Pin release keys in the device's identity folder, as enrollment does."""
        identity = self.state_dir / "identity"
        identity.mkdir(parents=True, exist_ok=True)
        text = "".join(public_key_pem(k.public_key()) for k in keys or (self.key,))
        (identity / PINNED_KEYS_FILE).write_text(text)

    def release_manifest(
        self,
        version: int,
        variant: str = "fp32",
        *,
        key: Ed25519PrivateKey | None = None,
        device_class: str = DEVICE_CLASS,
        runtime: str = RUNTIME,
        created_at: int | None = None,
        expires_at: int | None = None,
        **update: object,
    ) -> Manifest:
        """The toolkit's manifest of ``variant`` as release ``version``, signed."""
        _, base = self.built.variants[variant]
        created = self.now() if created_at is None else created_at
        manifest = base.model_copy(
            update={
                "schema_version": 2,
                "release": ReleaseInfo(
                    model=MODEL,
                    version=version,
                    variant=variant,
                    device_class=device_class,
                    runtime=runtime,
                    created_at=created,
                    expires_at=created + 30 * DAY if expires_at is None else expires_at,
                    privacy=PrivacyGuarantee(epsilon_max=2.0, delta=1e-5, mode="local"),
                ),
                "signature": None,
                **update,
            }
        )
        return sign(manifest, key or self.key)

    def publish(
        self,
        version: int,
        variant: str = "fp32",
        *,
        manifest: Manifest | None = None,
        artifact: bytes | None = None,
        **release: object,
    ) -> DesiredModel:
        """Write a release in the server's layout; the desired model naming it."""
        path, _ = self.built.variants[variant]
        folder = self.releases / MODEL / str(version)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = manifest or self.release_manifest(version, variant, **release)  # type: ignore[arg-type]
        if artifact is None:
            shutil.copyfile(path, folder / f"{variant}.tflite")
        else:
            (folder / f"{variant}.tflite").write_bytes(artifact)
        (folder / f"{variant}.manifest.json").write_text(manifest.to_json())
        return DesiredModel(
            model=MODEL,
            version=version,
            variant=variant,
            artifact_sha256=manifest.sha256,
            size_bytes=manifest.size_bytes,
        )

    def desired(
        self,
        model: DesiredModel | None,
        *,
        key: Ed25519PrivateKey | None = None,
        issued_at: int | None = None,
        revoked_keys: list[str] | None = None,
        signed: bool = True,
    ) -> DesiredState:
        """A desired state for the device (signed with the fleet key unless told)."""
        issued = self.now() if issued_at is None else issued_at
        state = DesiredState(
            fleet=FLEET,
            device=DEVICE,
            issued_at=issued,
            expires_at=issued + DAY,
            model=model,
            revoked_keys=revoked_keys or [],
        )
        return sign(state, key or self.key) if signed else state

    def tick(self, seconds: float = 1.0) -> None:
        """Let the device clock move on (desired states must be newer)."""
        self.clock += seconds


# --- the attacks ---------------------------------------------------------------------------


def _flipped_bit(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
    good = fleet.built.variants["fp16"][0].read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x10
    # The attacker swaps the file but cannot re-sign: the desired state and manifest
    # still name the real one.
    return fleet.desired(fleet.publish(2, "fp16", artifact=bytes(bad)))


def _edited_manifest_field(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
    desired = fleet.desired(fleet.publish(2, "fp16"))
    path = fleet.releases / MODEL / "2" / "fp16.manifest.json"
    doc = json.loads(path.read_text())
    doc["release"]["expires_at"] += 365 * DAY  # stretch the validity, keep the signature
    path.write_text(json.dumps(doc))
    return desired


def _untrusted_key(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
    stranger = Ed25519PrivateKey.generate()
    return fleet.desired(fleet.publish(2, "fp16", key=stranger))


def _revoked_key(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
    old = fleet.extra_key
    if old is None:
        raise ValueError("the revoked-key case needs fleet.extra_key pinned beside fleet.key")
    manager.handle(fleet.desired(None, revoked_keys=[key_id(old.public_key())]))
    fleet.tick()
    return fleet.desired(fleet.publish(2, "fp16", key=old))


def _expired_manifest(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
    signed = fleet.now() - 10 * DAY
    return fleet.desired(fleet.publish(2, "fp16", created_at=signed, expires_at=signed + DAY))


def _replayed_older_manifest(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
    # v3 is published and named; the attacker serves the genuine signed v1 instead.
    desired = fleet.desired(fleet.publish(3, "fp16"))
    v3 = fleet.releases / MODEL / "3"
    v1 = fleet.releases / MODEL / "1"
    (v3 / "fp16.tflite").write_bytes((v1 / "fp32.tflite").read_bytes())
    (v3 / "fp16.manifest.json").write_text((v1 / "fp32.manifest.json").read_text())
    return desired


def _wrong_device_class(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
    return fleet.desired(fleet.publish(2, "fp16", device_class="jetson-nano"))


def _golden_mismatch(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
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


def _unsigned_desired_state(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
    return fleet.desired(fleet.publish(2, "fp16"), signed=False)


def _forged_desired_signature(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
    desired = fleet.desired(fleet.publish(2, "fp16"))
    if desired.signature is None:
        raise AssertionError("sign() left the desired state unsigned")
    raw = bytearray(base64.b64decode(desired.signature.value))
    raw[0] ^= 1
    forged = desired.signature.model_copy(update={"value": base64.b64encode(raw).decode()})
    return desired.model_copy(update={"signature": forged})


def _replayed_desired_state(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
    # An older signed desired state (naming the old v1), replayed after the current one.
    if fleet.replayable is None:
        raise ValueError("the replay case needs fleet.replayable, the desired state of v1")
    return fleet.replayable


Attack = Callable[[ReleaseFleet, DeviceManager], DesiredState]

ATTACKS: Final[dict[str, tuple[Attack, str]]] = {
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
"""Case -> (the attack, the reason the device must refuse it with)."""


@dataclass(frozen=True)
class TamperTrial:
    """What the device did with one attack (:func:`run_tamper_case`).

    Attributes:
        case: The attack's name in :data:`ATTACKS`.
        expected: The reason it must be refused with.
        reason: The reason the device reported (None: no failure reported).
        detail: The report's detail text.
        state: The device's reported state after the attack.
        reported: (version, sha256) the device reported running after the attack.
        v1: (version, sha256) of the genuine v1 installed before it.
        kept_installed: The serving slot record is the one before the attack.
        kept_bytes: The serving file is byte for byte the one before the attack.
        restarted_version: The version a manager started afresh serves (None: nothing).
    """

    case: str
    expected: str
    reason: str | None
    detail: str | None
    state: str
    reported: tuple[int | None, str | None]
    v1: tuple[int, str]
    kept_installed: bool
    kept_bytes: bool
    restarted_version: int | None

    @property
    def refused(self) -> bool:
        """Refused with a reason while v1 keeps serving, also after a restart."""
        return (
            self.reason is not None
            and self.state == "failed"
            and self.kept_installed
            and self.kept_bytes
            and self.reported == self.v1
            and self.restarted_version == self.v1[0]
        )


def run_tamper_case(
    fleet: ReleaseFleet, case: str, attacks: Mapping[str, tuple[Attack, str]] = ATTACKS
) -> TamperTrial:
    """Install a genuine signed v1 through ``fleet.manager()``, then offer the attack.

    ``fleet`` must be fresh; its ``extra_key`` (a second trusted key, the one the
    revoked-key case revokes) is made and pinned beside its key here. ``attacks``: where
    ``case`` is looked up (:data:`ATTACKS`).

    Raises:
        KeyError: No such case.
        RuntimeError: The genuine v1 was not installed (the attack was not tried).
    """
    make, expected = attacks[case]
    fleet.extra_key = Ed25519PrivateKey.generate()
    fleet.pin(fleet.key, fleet.extra_key)
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    fleet.replayable = fleet.desired(v1)
    fleet.tick()
    manager.handle(fleet.desired(v1))
    before = manager.current()
    if before is None:
        last = fleet.reports[-1] if fleet.reports else None
        raise RuntimeError(f"{case}: the genuine v1 was not installed: {last}")
    serving = before.path.read_bytes()
    installed = before.installed
    fleet.tick()

    manager.handle(make(fleet, manager))

    report = fleet.reports[-1]
    after = manager.current()
    restarted = fleet.manager().current()  # as a restarted device sees it
    failure = report.last_failure
    return TamperTrial(
        case=case,
        expected=expected,
        reason=failure.reason if failure else None,
        detail=failure.detail if failure else None,
        state=report.state,
        reported=(report.version, report.sha256),
        v1=(v1.version, v1.artifact_sha256),
        kept_installed=after is not None and after.installed == installed,
        kept_bytes=after is not None and after.path.read_bytes() == serving,
        restarted_version=restarted.installed.version if restarted is not None else None,
    )
