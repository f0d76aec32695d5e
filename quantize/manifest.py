"""The artifact manifest format moved to :mod:`edgefl.manifest`; the names stay importable here.

The manifest is a contract between the toolkit (writes it), the server and the device
(check artifacts against it), so it lives in the shared layer below all three.
"""

from __future__ import annotations

from edgefl.manifest import (
    MANIFEST_SCHEMA_VERSION,
    GoldenSet,
    Manifest,
    RuntimeVerification,
    SourceModel,
    TensorSpecModel,
    check_file_against_manifest,
    manifest_path_for,
    read_manifest,
    sha256_file,
)

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
