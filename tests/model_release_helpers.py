"""Signed releases of a real tiny model for the device model manager's tests.

Two real ``.tflite`` variants of ``digits-mlp`` (fp32 and fp16, with the toolkit's golden
vectors), built once per test session; releases signed with real Ed25519 keys through
:mod:`edgefl.releasesign` and laid out as the server publishes them. The fleet itself
(keys, clock, releases folder, desired states) and the tampering cases are
:mod:`edgefl.release_tamper`, which the release benchmark uses too; :class:`Fleet` adds
the device's real model manager.
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

import pytest

from edgefl.edge_agent.models.manager import FolderSource, ModelManager, ModelsConfig
from edgefl.manifest import read_manifest
from edgefl.release_tamper import (
    DAY,
    DEVICE,
    DEVICE_CLASS,
    FLEET,
    MODEL,
    RUNTIME,
    Built,
    ReleaseFleet,
)
from edgefl.releasesign import TrustStore

__all__ = [
    "DAY",
    "DEVICE",
    "DEVICE_CLASS",
    "FLEET",
    "MODEL",
    "RUNTIME",
    "Built",
    "Fleet",
    "build_tiny_models",
    "child_apply",
]


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


class Fleet(ReleaseFleet):
    """A device's view of a fleet, with the device's real model manager."""

    def manager(self, **config: object) -> ModelManager:
        """A manager reading releases from the folder, with a short health window."""
        return ModelManager(
            ModelsConfig.model_validate(self.manager_settings(**config)),
            state_dir=self.state_dir,
            trust=self.trust_store(),
            source=FolderSource(self.releases),
            device_id=DEVICE,
            fleet=FLEET,
            publish=self.reports.append,
            clock=lambda: self.clock,
        )


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
