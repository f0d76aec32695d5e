"""Signed releases of a real tiny model for the device model manager's tests.

Two real ``.tflite`` variants of ``digits-mlp`` (fp32 and fp16, with the toolkit's golden
vectors), built once per test session; releases signed with real Ed25519 keys through
:mod:`edgefl.releasesign` and laid out as the server publishes them.
"""

from __future__ import annotations

import fcntl
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.edge_agent.models.manager import FolderSource, ModelManager, ModelsConfig
from edgefl.manifest import Manifest, PrivacyGuarantee, ReleaseInfo, read_manifest
from edgefl.proto.desired import DesiredModel, DesiredState, ReportedState
from edgefl.releasesign import PINNED_KEYS_FILE, TrustStore, public_key_pem, sign

MODEL = "digits-mlp"
DEVICE = "pi-01"
FLEET = "f1"
DEVICE_CLASS = "rpi4"
RUNTIME = "ai-edge-litert"
DAY = 86_400


@dataclass(frozen=True)
class Built:
    """The toolkit's two variants: (artifact, its unsigned manifest) by variant name."""

    variants: dict[str, tuple[Path, Manifest]]


def build_tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Build digits-mlp fp32 + fp16 once per session (a lock guards parallel modules)."""
    base = tmp_path_factory.getbasetemp() / "tiny-models"
    base.mkdir(exist_ok=True)
    out = base / MODEL
    with (base / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "done").exists():
            from edgefl.quantize.build import BuildOptions, build_artifacts
            from edgefl.quantize.recipes import parse_variants

            build_artifacts(
                BuildOptions(
                    model=MODEL,
                    variants=parse_variants("fp32,fp16"),
                    out=out,
                    runtimes=[RUNTIME],
                    epochs=1,
                    bench_iters=2,
                )
            )
            (base / "done").touch()
    variants = {}
    for variant in ("fp32", "fp16"):
        artifact = out / f"{MODEL}.{variant}.tflite"
        variants[variant] = (artifact, read_manifest(artifact.with_suffix(".manifest.json")))
    return Built(variants)


@dataclass
class Fleet:
    """A device's view of a fleet: its keys, the server's releases folder, a manager."""

    root: Path
    built: Built
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    clock: float = field(default_factory=time.time)
    reports: list[ReportedState] = field(default_factory=list)
    extra_key: Ed25519PrivateKey | None = None
    replayable: DesiredState | None = None

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def state_dir(self) -> Path:
        return self.root / "device"

    def now(self) -> int:
        return int(self.clock)

    def pin(self, *keys: Ed25519PrivateKey) -> None:
        """Pin release keys in the device's identity folder, as enrollment does."""
        identity = self.state_dir / "identity"
        identity.mkdir(parents=True, exist_ok=True)
        text = "".join(public_key_pem(k.public_key()) for k in keys or (self.key,))
        (identity / PINNED_KEYS_FILE).write_text(text)

    def manager(self, **config: object) -> ModelManager:
        """A manager reading releases from the folder, with a short health window."""
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
        if not (self.state_dir / "identity" / PINNED_KEYS_FILE).exists():
            self.pin()
        trust = TrustStore.load(self.state_dir / "identity")
        trust.clock = lambda: self.clock
        return ModelManager(
            ModelsConfig.model_validate(settings),
            state_dir=self.state_dir,
            trust=trust,
            source=FolderSource(self.releases),
            device_id=DEVICE,
            fleet=FLEET,
            publish=self.reports.append,
            clock=lambda: self.clock,
        )

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


def child_apply(state_dir: Path, releases: Path, desired_file: Path) -> None:
    """Apply one desired state in this process (killed with -9 by the test)."""
    manager = ModelManager(
        ModelsConfig.model_validate(
            {
                "enabled": True,
                "server": {"host": "127.0.0.1", "port": 1},
                "device_class": DEVICE_CLASS,
                "runtime": RUNTIME,
                "health_window_s": 0,
            }
        ),
        state_dir=state_dir,
        trust=TrustStore.load(state_dir / "identity"),
        source=FolderSource(releases),
        device_id=DEVICE,
        fleet=FLEET,
    )
    print("start", flush=True)
    manager.handle(desired_file.read_bytes())
    print("done", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    import sys

    child_apply(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
