"""The fleet's release-signing keys: sign every released manifest and desired state.

Devices pin these keys at enrollment (:mod:`edgefl.releasesign` says why they are pinned
rather than certified by the fleet CA). They are Ed25519 keys of their own, never the CA
key, in a folder beside the CA (``<ca_dir>/release-signing/``, mode 0700) so the two are
backed up together but can be held, rotated and revoked apart:

- ``<key_id>.key``: a private key (PKCS#8 PEM, mode 0600 from the first byte);
- ``<key_id>.pub``: its public key (PEM), kept after a revocation for the record;
- ``current``: the id of the key that signs;
- ``revoked.json``: the revoked ids, with when (their private keys are deleted).

``edgefl server release-key --create`` makes the first key. Rotation is two steps, so
devices never meet a signature by a key they do not know: ``--rotate`` makes a new key
and signs with it from then on while the old one stays trusted (both go into every
enrollment bundle, :func:`trusted_public_keys`); once every device has the new key,
``--revoke OLD_ID`` revokes the old one, and the server's signed desired states carry the
revoked ids (:func:`revoked_key_ids`) so devices stop trusting it. The current key, the
only one, cannot be revoked: rotate first.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edgefl.errors import BadInputError, ConfigError
from edgefl.files import write_bytes_atomic
from edgefl.releasesign import key_id, public_key_pem

__all__ = [
    "KEY_DIR",
    "ReleaseKey",
    "create_release_key",
    "current_signing_key",
    "list_release_keys",
    "release_key_dir",
    "revoke_release_key",
    "revoked_key_ids",
    "rotate_release_key",
    "trusted_public_keys",
]

KEY_DIR: Final = "release-signing"
_CURRENT: Final = "current"
_REVOKED: Final = "revoked.json"
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_CREATE_HINT: Final = "create one with `edgefl server release-key --create`"


@dataclass(frozen=True)
class ReleaseKey:
    """One release-signing key of the server.

    Attributes:
        key_id: :func:`edgefl.releasesign.key_id` of the public key.
        public_pem: The public key (PEM).
        current: It is the key that signs.
        revoked: It is revoked (devices are told never to trust it again).
        revoked_at: When (unix seconds), if revoked.
    """

    key_id: str
    public_pem: str
    current: bool
    revoked: bool
    revoked_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {
            "key_id": self.key_id,
            "public_key": self.public_pem,
            "current": self.current,
            "revoked": self.revoked,
            "revoked_at": self.revoked_at,
        }


def release_key_dir(ca_dir: Path) -> Path:
    """The folder of the release-signing keys of the fleet CA in ``ca_dir``."""
    return Path(ca_dir) / KEY_DIR


def _read_current(folder: Path) -> str | None:
    try:
        text = (folder / _CURRENT).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {folder / _CURRENT}: {exc}") from exc
    if not _KEY_ID.match(text):
        raise ConfigError(
            f"{folder / _CURRENT} does not name a key id: {text[:40]!r}",
            hint="write the id of one of the folder's <key_id>.key files into it",
        )
    return text


def _read_revoked(folder: Path) -> dict[str, int]:
    path = folder / _REVOKED
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        revoked = {str(k): int(v) for k, v in doc["revoked"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"release key revocations {path} are unreadable: {exc}") from exc
    return revoked


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a readable PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


def _load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a readable PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey) or key_id(key) != path.stem:
        raise ConfigError(f"{path} is not the Ed25519 public key {path.stem}")
    return key


def _new_key(folder: Path) -> str:
    key = Ed25519PrivateKey.generate()
    kid = key_id(key.public_key())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_bytes_atomic(folder / f"{kid}.key", pem, mode=0o600)
    write_bytes_atomic(
        folder / f"{kid}.pub", public_key_pem(key.public_key()).encode("ascii"), mode=0o644
    )
    return kid


def _set_current(folder: Path, kid: str) -> None:
    write_bytes_atomic(folder / _CURRENT, f"{kid}\n".encode("ascii"), mode=0o644)


def list_release_keys(ca_dir: Path) -> list[ReleaseKey]:
    """Every key of the folder: the current one first, then by id.

    Raises:
        ConfigError: A key file, ``current`` or ``revoked.json`` is unreadable.
    """
    folder = release_key_dir(ca_dir)
    if not folder.is_dir():
        return []
    current = _read_current(folder)
    revoked = _read_revoked(folder)
    keys = [
        ReleaseKey(
            key_id=path.stem,
            public_pem=public_key_pem(_load_public(path)),
            current=path.stem == current,
            revoked=path.stem in revoked,
            revoked_at=revoked.get(path.stem),
        )
        for path in sorted(folder.glob("*.pub"))
    ]
    return sorted(keys, key=lambda k: (not k.current, k.key_id))


def create_release_key(ca_dir: Path) -> str:
    """Create the first release-signing key and make it current; its key id.

    Raises:
        ConfigError: The server already has a current key (rotate instead).
    """
    folder = release_key_dir(ca_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    current = _read_current(folder)
    if current is not None:
        raise ConfigError(
            f"a release-signing key already signs ({current}, in {folder})",
            hint="to replace it, `edgefl server release-key --rotate`",
        )
    kid = _new_key(folder)
    _set_current(folder, kid)
    return kid


def rotate_release_key(ca_dir: Path) -> tuple[str, str]:
    """Make a new key current; the old one stays trusted until revoked. ``(new, old)``.

    Raises:
        ConfigError: No current key yet (create one).
    """
    folder = release_key_dir(ca_dir)
    old = _read_current(folder) if folder.is_dir() else None
    if old is None:
        raise ConfigError(f"no release-signing key in {folder} to rotate", hint=_CREATE_HINT)
    new = _new_key(folder)
    _set_current(folder, new)
    return new, old


def revoke_release_key(ca_dir: Path, kid: str) -> None:
    """Revoke a key: record it in ``revoked.json`` and delete its private key.

    Raises:
        BadInputError: Not a key of this server, or the current key (rotate first).
        ConfigError: The folder's files are unreadable.
    """
    folder = release_key_dir(ca_dir)
    known = {k.key_id: k for k in list_release_keys(ca_dir)}
    key = known.get(kid)
    if key is None:
        raise BadInputError(
            f"{kid!r} is not a release-signing key of this server (in {folder})",
            hint="`edgefl server release-key` lists them",
        )
    if key.current:
        only = sum(1 for k in known.values() if not k.revoked) == 1
        raise BadInputError(
            f"{kid} is the current release-signing key"
            + (" and the only one devices trust" if only else "")
            + ": revoking it would leave nothing to sign releases that devices accept",
            hint="first `edgefl server release-key --rotate`, deliver the new key to the "
            f"devices, then `--revoke {kid}`",
        )
    if key.revoked:
        return
    revoked = _read_revoked(folder)
    revoked[kid] = int(time.time())
    doc = {"version": 1, "revoked": dict(sorted(revoked.items()))}
    write_bytes_atomic(
        folder / _REVOKED, (json.dumps(doc, indent=2) + "\n").encode("utf-8"), mode=0o644
    )
    (folder / f"{kid}.key").unlink(missing_ok=True)


def current_signing_key(ca_dir: Path) -> tuple[str, Ed25519PrivateKey]:
    """The key that signs releases and desired states: ``(key_id, private key)``.

    Raises:
        ConfigError: The server has none, or its file is missing or unreadable.
    """
    folder = release_key_dir(ca_dir)
    kid = _read_current(folder) if folder.is_dir() else None
    if kid is None:
        raise ConfigError(f"no release-signing key in {folder}", hint=_CREATE_HINT)
    path = folder / f"{kid}.key"
    if not path.is_file():
        raise ConfigError(f"the current release-signing key {path} is missing")
    key = _load_private(path)
    if key_id(key.public_key()) != kid:
        raise ConfigError(f"{path} does not hold the key {kid}")
    return kid, key


def trusted_public_keys(ca_dir: Path) -> list[str]:
    """The public keys devices should trust (PEM, not revoked; the current one first).

    Raises:
        ConfigError: The folder's files are unreadable.
    """
    return [k.public_pem for k in list_release_keys(ca_dir) if not k.revoked]


def revoked_key_ids(ca_dir: Path) -> list[str]:
    """The ids of revoked keys, sorted (what signed desired states tell devices).

    Raises:
        ConfigError: ``revoked.json`` is unreadable.
    """
    folder = release_key_dir(ca_dir)
    return sorted(_read_revoked(folder)) if folder.is_dir() else []
