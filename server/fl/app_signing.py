"""The fleet's app-signing key: signs the app bundles the server submits.

Devices run a bundle's own ClientApp code only when it is signed by a key they trust:
the one their enrollment bundle brought, or one in their ``training.app_signing_keys``
(see :mod:`edgefl.appsign` for the format and :mod:`edgefl.edge_agent.fl.apptrust` for
the device's gate); edgefl's own ClientApp, installed on the device, needs no signature.

The key is an Ed25519 key of its own, kept apart from the fleet CA's key: it lives in
``<state_dir>/app-signing/`` (folder 0700, private key 0600), never in ``ca/``, so code
signing and device certificates can be rotated, revoked or held offline separately.
``edgefl server app-key --create`` makes it; ``edgefl server train`` signs every app it
submits while the key exists; ``edgefl server admit`` puts its public key
(:func:`app_signing_public_keys`) in every enrollment bundle it writes, and the device
pins it when it installs the bundle.

To rotate, put the next key's public line in another ``*.pub`` file in that folder
first: devices admitted from then on pin both keys.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgefl.appsign import (
    SIGNATURE_FILE,
    key_id,
    load_public_keys,
    public_key_line,
    read_bundle,
    sign_entries,
    verify_entries,
)
from edgefl.errors import ConfigError
from edgefl.files import write_bytes_atomic

__all__ = [
    "KEY_DIR",
    "app_signing_key_path",
    "app_signing_public_keys",
    "create_app_signing_key",
    "load_app_signing_key",
    "sign_app_dir",
]

KEY_DIR: Final = "app-signing"
_KEY_FILE: Final = "app-signing.key"
_PUB_FILE: Final = "app-signing.pub"


def app_signing_key_path(state_dir: Path) -> Path:
    """Where the server on ``state_dir`` keeps its app-signing private key."""
    return Path(state_dir) / KEY_DIR / _KEY_FILE


def create_app_signing_key(state_dir: Path) -> str:
    """Create the app-signing key pair; the public key's OpenSSH line, for device configs.

    Raises:
        ConfigError: A key already exists (replacing it would strand every device that
            trusts it; remove it by hand to rotate).
    """
    path = app_signing_key_path(state_dir)
    if path.exists():
        raise ConfigError(
            f"an app-signing key already exists at {path}",
            hint="`edgefl server app-key` prints its public key",
        )
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_bytes_atomic(path, pem, mode=0o600)
    line = public_key_line(key.public_key(), "edgefl-app-signing")
    write_bytes_atomic(path.with_name(_PUB_FILE), (line + "\n").encode("ascii"), mode=0o644)
    return line


def load_app_signing_key(state_dir: Path) -> ed25519.Ed25519PrivateKey | None:
    """The server's app-signing key, or ``None`` when it has none.

    Raises:
        ConfigError: The key file exists but is not an unencrypted Ed25519 PEM key.
    """
    path = app_signing_key_path(state_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the app-signing key {path}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a readable PEM private key: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


def app_signing_public_keys(state_dir: Path) -> list[str]:
    """The fleet's app-signing public keys for enrollment bundles (OpenSSH lines).

    The key of ``app-signing.key`` first, then the keys of every other ``*.pub`` file in
    its folder (a next key, or one held offline), each once; empty when there is none.

    Raises:
        ConfigError: The private key or a ``*.pub`` file is unreadable or not Ed25519.
    """
    keys: dict[str, str] = {}
    private = load_app_signing_key(state_dir)
    if private is not None:
        public = private.public_key()
        keys[key_id(public)] = public_key_line(public, "edgefl-app-signing")
    folder = app_signing_key_path(state_dir).parent
    for path in sorted(folder.glob("*.pub")) if folder.is_dir() else []:
        try:
            found = load_public_keys(path.read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(
                f"app-signing public key file {path}: {exc}",
                hint="each line an 'ssh-ed25519 AAAA...' key; remove the file if unused",
            ) from exc
        for public in found:
            keys.setdefault(key_id(public), public_key_line(public, "edgefl-app-signing"))
    return list(keys.values())


def sign_app_dir(
    app_dir: Path, key: ed25519.Ed25519PrivateKey, *, signed_at: int | None = None
) -> str:
    """Sign the bundle Flower builds from ``app_dir``: writes its signature file there.

    Flower's build is deterministic (fixed dates, sorted paths), so the files signed here
    are the files ``flwr run`` sends; the signed bundle is rebuilt and checked before this
    returns.

    Returns:
        The signing key's id.

    Raises:
        ConfigError: The rebuilt bundle does not verify (Flower left the signature file
            out, or changed what it packs).
    """
    from flwr.cli.build import build_fab_from_disk

    signature = Path(app_dir) / SIGNATURE_FILE
    signature.unlink(missing_ok=True)
    entries = read_bundle(build_fab_from_disk(Path(app_dir)))
    stamp = int(time.time()) if signed_at is None else signed_at
    signature.write_bytes(sign_entries(entries, key, stamp))
    public = key.public_key()
    try:
        rebuilt = read_bundle(build_fab_from_disk(Path(app_dir)))
        return verify_entries(rebuilt, {key_id(public): public})
    except ValueError as exc:
        signature.unlink(missing_ok=True)
        raise ConfigError(f"the signed app in {app_dir} does not verify: {exc}") from exc
