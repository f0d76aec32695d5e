"""The artifact manifest: everything a device needs to trust and check one ``.tflite``.

One JSON file sits beside each artifact (``NAME.tflite`` → ``NAME.manifest.json``). It
records the file's sha256 and size, its tensor specs with quantization parameters, how
it was made (recipe, pruning, source model hash), golden input vectors with the torch
reference's outputs, the tolerances the artifact was held to, and each runtime it was
verified on.

Schema 2 (a release) adds :class:`ReleaseInfo` in ``release``: the model name and its
ever-growing version, the device class and runtime the variant is for, when it was signed
and when the signature stops being valid, the run and round it came from and the privacy
guarantee the model carries (:class:`PrivacyGuarantee`). ``signature`` then holds a
:class:`Signature`: Ed25519 by a release-signing key over the canonical manifest without
the signature field (:mod:`edgefl.releasesign`). The toolkit's own builds stay unsigned
(``release`` and ``signature`` are ``null``). Schema 1 files, where ``signature`` was a
reserved string slot, still load; a device refuses them as unsigned.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefl.errors import ArtifactError, ManifestMismatchError
from edgefl.files import SAFE_NAME_PATTERN

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "GoldenSet",
    "Manifest",
    "PrivacyGuarantee",
    "ReleaseInfo",
    "RuntimeVerification",
    "Signature",
    "SourceModel",
    "TensorSpecModel",
    "check_file_against_manifest",
    "manifest_path_for",
    "read_manifest",
    "sha256_file",
]

MANIFEST_SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
"""Schema versions :func:`read_manifest` loads (1: before releases and signatures)."""
_SAFE_SEGMENT = SAFE_NAME_PATTERN


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


class PrivacyGuarantee(_Strict):
    """The differential-privacy guarantee a released model carries from its training run."""

    epsilon_max: float | None = Field(
        description="the largest per-device epsilon the run spent (None: no DP accounting)"
    )
    delta: float | None = Field(description="the delta the epsilon holds at")
    mode: Literal["local", "central", "none"] = Field(
        description="local: each device clips and adds noise; central: the server does"
    )


class ReleaseInfo(_Strict):
    """What a release says about one variant; signed with the rest of the manifest.

    ``model``, ``variant``, ``device_class`` and ``runtime`` become folder names on the
    server and the device, so each is one safe path segment.
    """

    model: str = Field(pattern=_SAFE_SEGMENT)
    version: int = Field(ge=1, description="grows with every release of the model")
    variant: str = Field(pattern=_SAFE_SEGMENT)
    device_class: str = Field(pattern=_SAFE_SEGMENT)
    runtime: str = Field(pattern=_SAFE_SEGMENT)
    created_at: int = Field(ge=0, description="signing time, unix seconds (the server's clock)")
    expires_at: int = Field(ge=0, description="the signature is refused from then on")
    run_id: str | None = None
    round: int | None = None
    privacy: PrivacyGuarantee


class Signature(_Strict):
    """An Ed25519 signature by a release-signing key (:mod:`edgefl.releasesign`)."""

    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="edgefl.releasesign.key_id")
    alg: Literal["ed25519"] = "ed25519"
    value: str = Field(description="standard base64 of the 64 signature bytes")

    @field_validator("value")
    @classmethod
    def _sixty_four_bytes(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"not base64: {exc}") from exc
        if len(raw) != 64:
            raise ValueError(f"an Ed25519 signature is 64 bytes, not {len(raw)}")
        return value


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
    release: ReleaseInfo | None = None
    signature: Signature | str | None = Field(
        None, description="a Signature once signed; a string only in schema 1 files"
    )

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(
                f"schema version {value} is not one of {SUPPORTED_SCHEMA_VERSIONS}: "
                "a newer edgefl wrote it"
            )
        return value

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
