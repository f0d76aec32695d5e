"""Signed Flower app bundles (FABs): the format the server signs and the device checks.

A device runs a bundle's own ClientApp code only when the bundle is signed by a fleet
app-signing key it trusts (``training.app_signing_keys``); edgefl's own ClientApp is
loaded from the installed package instead (:mod:`edgefl.edge_agent.fl.apptrust`).

The signature is modelled on Flower's own FAB verification (Ed25519 over an 8-byte
big-endian timestamp followed by a SHA-256 digest, ``flwr.supercore.primitives``), but
Flower carries its verifications only for Flower Hub apps: a ``flwr run`` bundle reaches
the SuperNode with none, and its run config can be overridden by whoever starts the run.
So the signature travels inside the bundle, in :data:`SIGNATURE_FILE`, and signs the
bundle's *other* files: the digest is SHA-256 of a canonical manifest (one
``<sha256-hex>  <path>`` line per file, sorted by path) of every entry except the
signature file itself and Flower's own ``.info/CONTENT`` listing (which Flower rewrites
when it builds the bundle, and which is data Flower checks, never code). The device
builds that manifest from the bundle it received, never from anything the bundle says
about itself, and refuses a bundle whose entry names are ambiguous (duplicates, absolute
paths, ``..``, backslashes), so every file that is extracted is a file that was signed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Mapping
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = [
    "SIGNATURE_FILE",
    "UNSIGNED_ENTRIES",
    "BundleError",
    "key_id",
    "load_public_key",
    "manifest",
    "public_key_line",
    "read_bundle",
    "sign_entries",
    "signed_message",
    "verify_entries",
]

SIGNATURE_FILE: Final = "edgefl-app-signature.json"
"""The signature's file in the bundle (``.json`` so Flower's build includes it)."""
UNSIGNED_ENTRIES: Final = frozenset({SIGNATURE_FILE, ".info/CONTENT"})
MAX_BUNDLE_BYTES: Final = 64 * 1024 * 1024
"""Uncompressed size limit when reading a bundle (Flower's FAB limit is 10 MB packed)."""
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-][A-Za-z0-9_.\-/]*$")


class BundleError(ValueError):
    """A bundle that cannot be read unambiguously, or whose signature does not verify."""


def read_bundle(content: bytes) -> dict[str, bytes]:
    """The bundle's files by path, refusing anything ambiguous.

    Raises:
        BundleError: Not a zip, a duplicate or unsafe entry name, or too large.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"not a readable app bundle: {exc}") from exc
    entries: dict[str, bytes] = {}
    total = 0
    with archive:
        for info in archive.infolist():
            name = info.filename
            parts = name.split("/")
            if (
                info.is_dir()
                or not _SAFE_NAME.match(name)
                or any(p in ("", ".", "..") for p in parts)
            ):
                raise BundleError(f"app bundle entry {name!r} is not a plain relative path")
            if name in entries:
                raise BundleError(f"app bundle holds {name!r} twice")
            total += info.file_size
            if total > MAX_BUNDLE_BYTES:
                raise BundleError(f"app bundle larger than {MAX_BUNDLE_BYTES} bytes unpacked")
            try:
                entries[name] = archive.read(info)
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                raise BundleError(f"app bundle entry {name!r} unreadable: {exc}") from exc
    return entries


def manifest(entries: Mapping[str, bytes]) -> bytes:
    """The canonical listing that is signed: ``<sha256-hex>  <path>`` lines, sorted."""
    lines = [
        f"{hashlib.sha256(entries[name]).hexdigest()}  {name}"
        for name in sorted(entries)
        if name not in UNSIGNED_ENTRIES
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def signed_message(entries: Mapping[str, bytes], signed_at: int) -> bytes:
    """What is signed: ``signed_at`` (8 bytes, big-endian) + SHA-256 of the manifest."""
    return signed_at.to_bytes(8, "big") + hashlib.sha256(manifest(entries)).digest()


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """A short, stable name of a public key: the first 16 hex digits of SHA-256 of it."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_line(public_key: ed25519.Ed25519PublicKey, comment: str = "") -> str:
    """The OpenSSH form (``ssh-ed25519 AAAA... comment``) devices put in their config."""
    line = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")
    return f"{line} {comment}".strip()


def load_public_key(text: str | bytes) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key from its OpenSSH line or PEM text.

    Raises:
        ValueError: Neither form, or not an Ed25519 key.
    """
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    data = data.strip()
    key: Any
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a public key in OpenSSH or PEM form: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def sign_entries(
    entries: Mapping[str, bytes], private_key: ed25519.Ed25519PrivateKey, signed_at: int
) -> bytes:
    """The signature file's content for a bundle holding ``entries``."""
    signature = private_key.sign(signed_message(entries, signed_at))
    doc = {
        "version": 1,
        "algorithm": "ed25519",
        "key_id": key_id(private_key.public_key()),
        "signed_at": signed_at,
        "signature": base64.urlsafe_b64encode(signature).decode("ascii").rstrip("="),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def verify_entries(
    entries: Mapping[str, bytes], trusted: Mapping[str, ed25519.Ed25519PublicKey]
) -> str:
    """Check the bundle's signature against the trusted keys; the signing key's id.

    Raises:
        BundleError: No signature file, a malformed one, an unknown key or a signature
            that does not match the bundle's files.
    """
    raw = entries.get(SIGNATURE_FILE)
    if raw is None:
        raise BundleError("the bundle is not signed")
    try:
        doc = json.loads(raw)
        kid = str(doc["key_id"])
        signed_at = int(doc["signed_at"])
        sig_text = str(doc["signature"])
        signature = base64.urlsafe_b64decode(sig_text + "=" * (-len(sig_text) % 4))
        if doc.get("version") != 1 or not 0 <= signed_at < 1 << 63:
            raise ValueError("unsupported version or timestamp")
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"malformed {SIGNATURE_FILE}: {exc}") from exc
    key = trusted.get(kid)
    if key is None:
        raise BundleError(f"signed by key {kid}, which this device does not trust")
    try:
        key.verify(signature, signed_message(entries, signed_at))
    except InvalidSignature:
        raise BundleError(f"signature by key {kid} does not match the bundle's files") from None
    return kid
