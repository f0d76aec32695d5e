"""The artifact manifest: everything a device needs to trust and check one ``.tflite``.

One JSON file sits beside each artifact (``NAME.tflite`` → ``NAME.manifest.json``). It
records the file's sha256 and size, its tensor specs with quantization parameters, how
it was made (recipe, pruning, source model hash), golden input vectors with the torch
reference's outputs, the tolerances the artifact was held to, and each runtime it was
verified on. ``signature`` is reserved for the signing step (Ed25519 over the manifest
without the signature field) and is ``null`` until then.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefl.errors import ArtifactError, ManifestMismatchError

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "GoldenSet",
    "Manifest",
    "RuntimeVerification",
    "SourceModel",
    "TensorSpecModel",
    "check_file_against_manifest",
    "manifest_path_for",
    "read_manifest",
    "sha256_file",
]

MANIFEST_SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpecModel(_Strict):
    """One input or output tensor; ``scale``/``zero_point`` are 0 when not quantized."""

    name: str
    index: int
    shape: list[int]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0


class SourceModel(_Strict):
    """The torch model the artifact was made from."""

    name: str
    dataset: str
    sha256: str = Field(description="hash of the reference state dict (after pruning)")
    base_sha256: str = Field(description="hash of the unpruned trained model")
    parameters: int


class GoldenSet(_Strict):
    """A few inputs with the torch reference's outputs, for checks on the device."""

    inputs: list[list[float]]
    input_shape: list[int]
    reference_outputs: list[list[float]]
    labels: list[int]


class RuntimeVerification(_Strict):
    """The outcome of running the artifact on one device runtime."""

    runtime: str
    version: str
    samples: int
    max_abs_error: float
    top1_agreement: float
    accuracy: float
    reference_accuracy: float
    p50_us: float | None = None
    passed: bool
    reasons: list[str] = Field(default_factory=list)


class Manifest(_Strict):
    """The manifest of one artifact (see the module docstring)."""

    schema_version: int = MANIFEST_SCHEMA_VERSION
    artifact: str
    variant: str
    recipe: str
    prune_ratio: float | None
    sha256: str
    size_bytes: int
    created_at: str
    inputs: list[TensorSpecModel]
    outputs: list[TensorSpecModel]
    source_model: SourceModel
    thresholds: dict[str, float]
    golden: GoldenSet
    verified_on: dict[str, RuntimeVerification]
    signature: str | None = None

    def to_json(self) -> str:
        """Stable, human-diffable JSON."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path_for(artifact: Path) -> Path:
    """``x/model.int8.tflite`` → ``x/model.int8.manifest.json``."""
    return artifact.with_suffix(".manifest.json")


def read_manifest(path: Path) -> Manifest:
    """Load and validate a manifest.

    Raises:
        ArtifactError: Missing, not JSON, or not a valid manifest.
    """
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"manifest {path} not found", hint="pass --manifest or keep it beside the artifact"
        ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"manifest {path} is unreadable: {exc}") from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ArtifactError(f"manifest {path} is invalid at {where}: {first['msg']}") from exc


def check_file_against_manifest(artifact: Path, manifest: Manifest) -> None:
    """Check the artifact's size and sha256 against its manifest.

    Raises:
        ArtifactError: The artifact is missing.
        ManifestMismatchError: Size or hash differ (a truncated, corrupted or swapped file).
    """
    if not artifact.is_file():
        raise ArtifactError(f"artifact {artifact} not found")
    size = artifact.stat().st_size
    if size != manifest.size_bytes:
        raise ManifestMismatchError(
            f"{artifact.name} is {size} bytes but its manifest says {manifest.size_bytes}",
            hint="the file is truncated or replaced; rebuild or re-download it",
        )
    digest = sha256_file(artifact)
    if digest != manifest.sha256:
        raise ManifestMismatchError(
            f"{artifact.name} sha256 {digest[:16]}… does not match the manifest's "
            f"{manifest.sha256[:16]}…",
            hint="the file is corrupted or replaced; rebuild or re-download it",
        )
