"""Release signing: who may say which model a device runs, and how the device checks it.

Two documents are signed with a release-signing key (Ed25519): the manifest of each
released artifact (:class:`edgefl.manifest.Manifest` with its ``release`` section) and the
desired state the server publishes for a device (:class:`edgefl.proto.desired.DesiredState`).
The signature covers :func:`canonical_bytes`, the document's JSON without its
``signature`` field, with sorted keys and no spaces, so both sides build the same bytes
whatever order the fields were written in. For a manifest that covers the artifact's
sha256 and size, model name and version, device class and runtime, and the created and
expiry times: tamper, downgrade and freeze protection without a TUF repository, much as
Flower signs its app bundles (Ed25519 over a timestamp and the bundle's hash). The bytes
signed are :data:`SIGNING_CONTEXT`, the document type and the canonical bytes, so a
signature over one kind of document can never be passed off as one over another.

Which keys a device trusts: pinned at enrollment, not certified by the fleet CA.

- The device already pins the fleet's app-signing keys this way (:mod:`edgefl.appsign`):
  ``edgefl server admit`` puts the server's release-signing public keys in the enrollment
  bundle and ``edgefl agent enroll --install`` writes them to
  ``<state_dir>/identity/release-signing.pub`` (:data:`PINNED_KEYS_FILE`). The agent
  config (``models.release_signing_keys``) may add keys but never remove a pinned one.
- A key certified by the fleet CA would let whoever holds the CA key sign models too. The
  CA key is the busiest secret of the fleet: the server uses it every day to sign device
  certificates (admissions, renewals), so it sits on the online server. Pinning keeps
  the duties apart: the CA key says who is in the fleet, the release key (kept in
  ``<ca_dir>/release-signing/``, its own files, and movable offline) says what they
  run, and stealing one does not give the other.
- Rotation: a device trusts several pinned keys at once, so a new key is created and
  pinned (new enrollments carry every trusted key; devices already enrolled get it in
  their config) before the old one stops signing. A key is revoked by its id, through a
  signed desired state (``revoked_keys``, applied only when the state verified with a key
  that is itself not revoked) or by the agent config; a revoked key is never trusted
  again, even if it is still pinned (:meth:`TrustStore.revoke`, persisted).

Clock policy (:meth:`TrustStore.now`). A Raspberry Pi has no real-time clock and may boot
years in the past, where every expired signature would look valid again. As TUF does,
the device never accepts a time earlier than the newest signed timestamp it has seen:
``now() = max(time.time(), floor)``, where the floor is raised by every signed time that
verified with a trusted key (:func:`verify` observes it) and is persisted with fsync and
``os.replace`` before it is relied on. The floor never goes back, across restarts too. A
device clock that is behind is therefore harmless once the device has seen one signed
document; one that is ahead only makes signatures expire early. Limit, on purpose: a
server clock that once signed far in the future freezes the device (everything looks
expired) until it is re-enrolled, as in TUF.

Every refusal is a :class:`ReleaseTrustError` whose ``reason`` is one of :data:`REASONS`
(the agent reports it on ``state/reported``).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel

from edgefl.appsign import key_id as _appsign_key_id
from edgefl.appsign import load_public_key
from edgefl.errors import ArtifactError
from edgefl.files import write_bytes_atomic
from edgefl.manifest import Signature

__all__ = [
    "PINNED_KEYS_FILE",
    "REASONS",
    "SIGNING_CONTEXT",
    "TRUST_STATE_FILE",
    "ReleaseTrustError",
    "TrustStore",
    "canonical_bytes",
    "key_id",
    "parse_public_keys",
    "public_key_pem",
    "sign",
    "signed_time",
    "verify",
]

PINNED_KEYS_FILE: Final = "release-signing.pub"
"""In the device's identity folder: the release keys its enrollment pinned (PEM blocks)."""
TRUST_STATE_FILE: Final = "release-trust.json"
"""In the same folder: revoked key ids, the clock floor and the newest desired state."""
SIGNING_CONTEXT: Final = b"edgefl-release-signature-v1\n"
"""Prefix of every signed message (then the document type, a newline, the canonical bytes)."""

REASONS: Final = (
    "unsigned",
    "bad_signature",
    "untrusted_key",
    "revoked_key",
    "expired",
    "not_yet_valid",
    "sha256_mismatch",
    "size_mismatch",
    "wrong_device_class",
    "wrong_runtime",
    "downgrade",
    "stale_desired_state",
    "golden_mismatch",
    "load_failed",
    "download_failed",
)
"""The machine reasons a release or desired state is refused (``ReleaseTrustError.reason``)."""


class ReleaseTrustError(ArtifactError):
    """A release or desired state the device must not act on (exit code 5, ARTIFACT).

    Attributes:
        reason: One of :data:`REASONS`, for machines (reported state, benchmarks, tests).
    """

    def __init__(self, reason: str, message: str, *, hint: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown release trust reason {reason!r}")
        super().__init__(f"{reason}: {message}", hint=hint)
        self.reason = reason


_SignedT = TypeVar("_SignedT", bound=BaseModel)


def canonical_bytes(obj: BaseModel) -> bytes:
    """The document as signed: JSON of its fields without ``signature``, keys sorted.

    ``model_dump(mode="json")``, ``sort_keys``, no whitespace (``separators=(",", ":")``),
    UTF-8. Stable whatever order the fields were given or written in.
    """
    data = obj.model_dump(mode="json")
    data.pop("signature", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def _message(obj: BaseModel) -> bytes:
    return SIGNING_CONTEXT + type(obj).__name__.encode("ascii") + b"\n" + canonical_bytes(obj)


def key_id(public_key: Ed25519PublicKey) -> str:
    """A key's short name: the first 16 hex digits of SHA-256 of its raw 32 bytes."""
    return _appsign_key_id(public_key)


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    """The PEM text (SubjectPublicKeyInfo) of a public key, as pinned and sent in bundles."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def parse_public_keys(text: str) -> list[Ed25519PublicKey]:
    """Every Ed25519 public key in ``text``: PEM blocks and/or OpenSSH lines, ``#`` comments.

    Raises:
        ValueError: A block or line that is not an Ed25519 public key.
    """
    keys: list[Ed25519PublicKey] = []
    block: list[str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if block is not None:
            block.append(stripped)
            if stripped.startswith("-----END"):
                keys.append(load_public_key("\n".join(block) + "\n"))
                block = None
        elif stripped.startswith("-----BEGIN"):
            block = [stripped]
        elif stripped and not stripped.startswith("#"):
            try:
                keys.append(load_public_key(stripped))
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from exc
    if block is not None:
        raise ValueError("a PEM block without its END line")
    return keys


def signed_time(obj: BaseModel) -> int | None:
    """The signer's timestamp a document carries, or ``None``.

    A manifest's ``release.created_at``; a desired state's ``issued_at``.
    """
    release = getattr(obj, "release", None)
    if release is not None and isinstance(getattr(release, "created_at", None), int):
        return int(release.created_at)
    issued = getattr(obj, "issued_at", None)
    return int(issued) if isinstance(issued, int) else None


def sign(obj: _SignedT, key: Ed25519PrivateKey) -> _SignedT:
    """A copy of ``obj`` (a Manifest or DesiredState) with its ``signature`` set."""
    value = key.sign(_message(obj))
    signature = Signature(
        key_id=key_id(key.public_key()), value=base64.b64encode(value).decode("ascii")
    )
    return obj.model_copy(update={"signature": signature})


def verify(obj: BaseModel, trust: TrustStore, *, observe: bool = True) -> str:
    """Check ``obj``'s signature against the device's trusted keys; the signing key's id.

    Only the signature: the artifact's hash, its device class, expiry and version are the
    caller's next checks (:meth:`TrustStore.check_fresh`). With ``observe`` (the default),
    the document's signed time (:func:`signed_time`) then raises the clock floor: it is
    authentic, so real time is at least that.

    Raises:
        ReleaseTrustError: ``unsigned`` (no signature, or a schema 1 string),
            ``revoked_key``, ``untrusted_key`` or ``bad_signature``.
    """
    signature = getattr(obj, "signature", None)
    if not isinstance(signature, Signature):
        raise ReleaseTrustError(
            "unsigned", f"the {type(obj).__name__} carries no release signature"
        )
    kid = signature.key_id
    if kid in trust.revoked:
        raise ReleaseTrustError("revoked_key", f"signed by key {kid}, which is revoked")
    public = trust.keys.get(kid)
    if public is None:
        raise ReleaseTrustError(
            "untrusted_key",
            f"signed by key {kid}, which this device does not trust",
            hint="pin the fleet's release-signing key at enrollment "
            "or add it in models.release_signing_keys",
        )
    try:
        public.verify(base64.b64decode(signature.value, validate=True), _message(obj))
    except (InvalidSignature, ValueError, binascii.Error):
        raise ReleaseTrustError(
            "bad_signature", f"the signature by key {kid} does not match the document"
        ) from None
    stamp = signed_time(obj)
    if observe and stamp is not None:
        trust.observe(stamp)
    return kid


def _utc(stamp: int) -> str:
    if not 0 <= stamp < 1 << 40:
        return str(stamp)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


@dataclass
class TrustStore:
    """The device's trusted release keys, revoked key ids and clock floor.

    Load it with :meth:`load`; ``keys`` are the trusted keys by id (a revoked one may stay
    listed: :func:`verify` checks ``revoked`` first). The state (``revoked``, the floor,
    the newest desired state accepted) lives in ``folder/``:data:`TRUST_STATE_FILE` and
    every change is written with fsync and ``os.replace`` before the method returns.

    Attributes:
        folder: Where the pinned keys and the state live (``<state_dir>/identity``).
        keys: Trusted public keys by :func:`key_id`.
        revoked: Key ids never to trust again.
        floor: The newest signed time seen (unix seconds); 0 before the first.
        newest_desired: ``issued_at`` of the newest desired state accepted; 0 before.
        clock: The device clock (injectable for tests).
    """

    folder: Path
    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    floor: int = 0
    newest_desired: int = 0
    clock: Any = field(default=time.time, repr=False)

    @classmethod
    def load(cls, folder: Path, extra_keys: Sequence[str] = ()) -> TrustStore:
        """The trust of the device whose identity folder is ``folder``.

        Args:
            folder: Holds :data:`PINNED_KEYS_FILE` (written at enrollment; may be missing)
                and :data:`TRUST_STATE_FILE` (created on the first change).
            extra_keys: Keys the config adds: PEM text, an OpenSSH line, or the path of a
                file holding either. They add to the pinned keys, never remove one.

        Raises:
            ReleaseTrustError: ``untrusted_key`` if a pinned or extra key cannot be read
                (a device must not run with a trust it cannot read).
        """
        store = cls(folder=Path(folder))
        texts: list[tuple[str, str]] = []
        pinned = store.folder / PINNED_KEYS_FILE
        if pinned.is_file():
            texts.append((str(pinned), pinned.read_text(encoding="utf-8")))
        for extra in extra_keys:
            stripped = extra.strip()
            if stripped.startswith("-----BEGIN") or stripped.startswith("ssh-ed25519"):
                texts.append(("models.release_signing_keys", stripped))
            else:
                try:
                    texts.append((stripped, Path(stripped).read_text(encoding="utf-8")))
                except OSError as exc:
                    raise ReleaseTrustError(
                        "untrusted_key", f"release-signing key file {stripped}: {exc}"
                    ) from exc
        for where, text in texts:
            try:
                for public in parse_public_keys(text):
                    store.keys[key_id(public)] = public
            except ValueError as exc:
                raise ReleaseTrustError(
                    "untrusted_key", f"release-signing keys in {where}: {exc}"
                ) from exc
        store._read_state()
        return store

    @property
    def state_path(self) -> Path:
        """The persisted state's file."""
        return self.folder / TRUST_STATE_FILE

    def _read_state(self) -> None:
        try:
            raw = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        try:
            doc = json.loads(raw)
            revoked = {str(k) for k in doc.get("revoked", [])}
            floor = int(doc.get("floor", 0))
            newest = int(doc.get("newest_desired", 0))
        except (ValueError, TypeError, AttributeError) as exc:
            # Never fall back to an empty state: that would forget revocations and rewind
            # the clock floor, which is what an attacker who corrupts the file wants.
            raise ReleaseTrustError(
                "untrusted_key",
                f"release trust state {self.state_path} is unreadable: {exc}",
                hint="restore it, or re-enroll the device",
            ) from exc
        self.revoked |= revoked
        self.floor = max(self.floor, floor)
        self.newest_desired = max(self.newest_desired, newest)

    def _save(self) -> None:
        doc = {
            "version": 1,
            "revoked": sorted(self.revoked),
            "floor": self.floor,
            "floor_utc": _utc(self.floor),
            "newest_desired": self.newest_desired,
        }
        write_bytes_atomic(
            self.state_path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"), mode=0o600
        )

    @property
    def trusted_ids(self) -> list[str]:
        """The ids of the keys trusted now (pinned or added, not revoked), sorted."""
        return sorted(k for k in self.keys if k not in self.revoked)

    def revoke(self, key_ids: Iterable[str]) -> None:
        """Never trust these keys again (persisted before returning)."""
        new = {str(k) for k in key_ids} - self.revoked
        if new:
            self.revoked |= new
            self._save()

    def now(self) -> int:
        """The time the device goes by: never earlier than the newest signed time seen."""
        return max(int(self.clock()), self.floor)

    def observe(self, signed_at: int) -> None:
        """Raise the clock floor to ``signed_at`` (persisted first); never lowers it."""
        if signed_at > self.floor:
            self.floor = int(signed_at)
            self._save()

    def check_fresh(
        self, created_at: int, expires_at: int, *, max_future_s: int | None = None
    ) -> None:
        """Refuse a signature outside its validity window, under the clock policy.

        Args:
            created_at: The signed creation time.
            expires_at: The signed expiry.
            max_future_s: Refuse as ``not_yet_valid`` a document created more than this
                after :meth:`now`; ``None`` (the default) never does, since a device
                without a real-time clock is often behind a correct signer.

        Raises:
            ReleaseTrustError: ``expired`` when ``expires_at <= now()`` (or the window is
                empty), ``not_yet_valid`` as above.
        """
        now = self.now()
        if expires_at <= now or expires_at <= created_at:
            raise ReleaseTrustError(
                "expired",
                f"valid until {_utc(expires_at)}, and the device's time is {_utc(now)} "
                f"(never earlier than the newest signed time seen, {_utc(self.floor)})",
                hint="publish a new signed release or desired state",
            )
        if max_future_s is not None and created_at > now + max_future_s:
            raise ReleaseTrustError(
                "not_yet_valid",
                f"created {_utc(created_at)}, after the device's time {_utc(now)}",
            )

    def accept_desired(self, state: Any, *, fleet: str, device: str) -> str:
        """Check a desired state and apply what it revokes; the signing key's id.

        The device rules: act on no unsigned desired state; only one addressed to this
        device (or ``"*"``) in its fleet (another device's state is refused as
        ``stale_desired_state``: it is not this device's current one); not expired; not
        issued before the newest one already accepted (a replay); its ``revoked_keys``
        apply only when it verified with a key that is not revoked (which :func:`verify`
        already requires). ``issued_at``
        equal to the newest accepted is accepted again (the retained message after a
        reconnect). On success the newest issued time is persisted.

        Raises:
            ReleaseTrustError: ``unsigned``, ``untrusted_key``, ``revoked_key``,
                ``bad_signature``, ``expired``, ``stale_desired_state``.
        """
        kid = verify(state, self)
        if state.fleet != fleet or state.device not in (device, "*"):
            raise ReleaseTrustError(
                "stale_desired_state",
                f"addressed to {state.fleet}/{state.device}, not {fleet}/{device}",
            )
        self.check_fresh(state.issued_at, state.expires_at)
        if state.issued_at < self.newest_desired:
            raise ReleaseTrustError(
                "stale_desired_state",
                f"issued {_utc(state.issued_at)}, before the newest accepted "
                f"{_utc(self.newest_desired)}: a replay",
            )
        revoked = set(state.revoked_keys) - self.revoked
        self.newest_desired = state.issued_at
        self.revoked |= revoked
        self._save()
        return kid
