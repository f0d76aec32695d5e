"""Signed Flower app bundles (FABs): the format the server signs and the device checks.

A device runs a bundle's own ClientApp code only when the bundle is signed by a fleet
app-signing key it trusts (see below) and is no rollback; edgefl's own ClientApp is
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

Which keys a device trusts: the fleet's app-signing public keys that came in its
enrollment bundle (``edgefl server admit`` adds them while the server has a key;
``edgefl agent enroll --install`` pins them in ``<state_dir>/identity/app-signing.pub``),
plus any its config adds in ``training.app_signing_keys``. The config can add keys but
never remove a pinned one, as it cannot replace the fleet CA certificate either.

Rollback and replay (:func:`check_rollback`). A valid signature only says the fleet signed
the code once; an old signed bundle (superseded because it had a bug, or because it
reported more than today's code does) stays valid forever, and every device holds copies
of it. Whoever can start a run without holding the key could send it again. So the device
remembers, per signing key, the newest ``signed_at`` it has accepted and which bundle
(manifest digest) each recent run was admitted with, and applies this rule, after the
signature verified and before any bundle code runs:

1. a run it already admitted, with the same bundle (Flower sends the run's bundle again
   with every message, so each round of a run is checked again) is admitted;
2. otherwise the bundle is admitted only if it was signed no earlier than the newest
   accepted ``signed_at`` minus :data:`ROLLBACK_TOLERANCE_S`, and the newest moves
   forward to it; older ones are refused as a rollback ("signed at T, older than the
   newest accepted T2").

Only timestamps from the same clock, the signing server's, are ever compared: the device's
own clock is never used (a Raspberry Pi has no real-time clock and may boot in the past).
Like TUF's rollback check, which compares new metadata only with the version the client
last trusted, the rule needs no trusted time on the device; so a bundle signed far in the
future is not refused either. Limits, on purpose:

- The tolerance lets runs that were signed close together (two ``edgefl server train``
  started within minutes, whose first messages reach the device in either order) all
  run; within it an older bundle is not seen as a rollback. A device that first sees a
  run signed more than the tolerance after another, still running one that it has not
  seen yet, refuses the older run (with the reason), as it would a replay.
- A bundle equal to an accepted one but arriving in a new run is judged by its
  timestamp: once a newer bundle ran, the old one is not run again under a new run id.
  Run ids are the SuperLink's; one that controls the SuperLink and sends an old bundle
  under the id of a run the device admitted it with gets it run again (that SuperLink's
  host holds the signing key in the default layout anyway).
- Each key has its own memory (signers' clocks are not compared): after a rotation, the
  old key's bundles stay judged only against that key's newest, so stop trusting a
  retired key (drop it from the config, or readmit with a bundle without it).
- The state (``<state_dir>/app-trust-seen.json``) is the device's memory: deleting it,
  or a new device, accepts any validly signed bundle once. A server clock that once
  signed far in the future makes the device refuse everything older until the state
  file is removed or the fleet signs with a new key (state is kept per key).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = [
    "MAX_REMEMBERED_RUNS",
    "PINNED_KEYS_FILE",
    "ROLLBACK_TOLERANCE_S",
    "SIGNATURE_FILE",
    "UNSIGNED_ENTRIES",
    "BundleError",
    "RollbackError",
    "SignedBundle",
    "check_rollback",
    "key_id",
    "load_public_key",
    "load_public_keys",
    "manifest",
    "public_key_line",
    "read_bundle",
    "sign_entries",
    "signed_message",
    "verify_bundle",
    "verify_entries",
]

SIGNATURE_FILE: Final = "edgefl-app-signature.json"
"""The signature's file in the bundle (``.json`` so Flower's build includes it)."""
UNSIGNED_ENTRIES: Final = frozenset({SIGNATURE_FILE, ".info/CONTENT"})
MAX_BUNDLE_BYTES: Final = 64 * 1024 * 1024
"""Uncompressed size limit when reading a bundle (Flower's FAB limit is 10 MB packed)."""
PINNED_KEYS_FILE: Final = "app-signing.pub"
"""In the device's identity folder: the keys its enrollment bundle brought, one a line."""
ROLLBACK_TOLERANCE_S: Final = 300
"""How much earlier than the newest accepted bundle a new one may be signed (seconds)."""
MAX_REMEMBERED_RUNS: Final = 256
"""Runs remembered per key for rule 1 of :func:`check_rollback` (the oldest are dropped)."""
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-][A-Za-z0-9_.\-/]*$")


class BundleError(ValueError):
    """A bundle that cannot be read unambiguously, or whose signature does not verify."""


class RollbackError(BundleError):
    """A validly signed bundle older than one the device already accepted."""


@dataclass(frozen=True)
class SignedBundle:
    """What a verified signature vouches for.

    Attributes:
        key_id: The signing key's id (:func:`key_id`).
        signed_at: When it was signed (seconds since the epoch, the signer's clock).
        digest: SHA-256 (hex) of the bundle's manifest: the signed files, not the signature.
    """

    key_id: str
    signed_at: int
    digest: str


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


def load_public_keys(text: str) -> list[ed25519.Ed25519PublicKey]:
    """The keys of a :data:`PINNED_KEYS_FILE`: one OpenSSH line each, ``#`` comments.

    Raises:
        ValueError: A line that is not an Ed25519 public key.
    """
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                keys.append(load_public_key(line))
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from exc
    return keys


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
        BundleError: See :func:`verify_bundle`.
    """
    return verify_bundle(entries, trusted).key_id


def verify_bundle(
    entries: Mapping[str, bytes], trusted: Mapping[str, ed25519.Ed25519PublicKey]
) -> SignedBundle:
    """Check the bundle's signature against the trusted keys; what it vouches for.

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
    return SignedBundle(kid, signed_at, hashlib.sha256(manifest(entries)).hexdigest())


def _utc(stamp: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)) if stamp < 1 << 40 else "?"


def check_rollback(
    state: Mapping[str, Any],
    bundle: SignedBundle,
    run_id: str,
    *,
    tolerance_s: int = ROLLBACK_TOLERANCE_S,
) -> dict[str, Any]:
    """Apply the rollback rule (module doc) to a verified bundle; the state to keep.

    Args:
        state: What the device kept (``{}`` at first): per key id, ``newest`` (the newest
            ``signed_at`` accepted) and ``runs`` (run id -> manifest digest, oldest first).
        bundle: The bundle, its signature already verified.
        run_id: The run that sent it (``""`` when unknown: judged by its timestamp).
        tolerance_s: See :data:`ROLLBACK_TOLERANCE_S`.

    Returns:
        The new state (``state`` itself is not changed).

    Raises:
        RollbackError: A new run of a bundle signed before the newest accepted one
            minus the tolerance.
        ValueError: ``state`` is not a state this function wrote.
    """
    try:
        keys = dict(state.get("keys", {}))
        seen = keys.get(bundle.key_id) or {"newest": 0, "runs": {}}
        newest = seen["newest"]
        runs = dict(seen["runs"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed rollback state: {exc!r}") from exc
    if not isinstance(newest, int) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in runs.items()
    ):
        raise ValueError(f"malformed rollback state of key {bundle.key_id}")
    if run_id and runs.get(run_id) == bundle.digest:
        return {"version": 1, "keys": keys}  # a later message of an admitted run
    if bundle.signed_at < newest - tolerance_s:
        raise RollbackError(
            f"its signature by key {bundle.key_id} is a rollback: signed at "
            f"{_utc(bundle.signed_at)}, older than the newest accepted {_utc(newest)}"
        )
    if run_id:
        runs.pop(run_id, None)  # re-inserted last: the newest run is dropped last
        runs[run_id] = bundle.digest
        while len(runs) > MAX_REMEMBERED_RUNS:
            del runs[next(iter(runs))]
    keys[bundle.key_id] = {"newest": max(newest, bundle.signed_at), "runs": runs}
    return {"version": 1, "keys": keys}
