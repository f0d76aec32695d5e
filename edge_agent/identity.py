"""The device's identity: its TLS key and CSR, its Flower node key, and the installed bundle.

``edgefl agent enroll`` calls :func:`prepare_enrollment` (keys are made once and kept;
only ``force`` replaces them) and ``edgefl agent enroll --install`` calls
:func:`install_bundle`, which refuses a bundle that does not belong to this device's
keys. The running agent renews its certificate with :class:`CertRenewer`. File layout
and the contract with the server: :mod:`edgefl.enrollment`.

Private keys are written with mode 0600 set on the file before a byte of the key is in
it, through a temporary file in the same folder and ``os.replace``, so a crash never
leaves a half-written or world-readable key.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefl.enrollment import (
    EnrollmentBundle,
    EnrollmentRequest,
    IdentityPaths,
    RenewalRequest,
    read_bundle,
    refuse_service_id,
    renewal_request_topic,
    write_json_document,
)
from edgefl.errors import BadInputError
from edgefl.files import write_bytes_atomic

__all__ = [
    "CertRenewer",
    "EnrollmentResult",
    "InstallResult",
    "install_bundle",
    "prepare_enrollment",
]


@dataclass(frozen=True)
class EnrollmentResult:
    """What :func:`prepare_enrollment` did.

    Attributes:
        request: The enrollment request (public material only).
        request_path: Where it was written.
        created_tls_key: A new TLS key was generated (else the existing one was kept).
        created_node_key: A new Flower node key was generated.
        paths: The identity files.
    """

    request: EnrollmentRequest
    request_path: Path
    created_tls_key: bool
    created_node_key: bool
    paths: IdentityPaths


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install_bundle` installed.

    Attributes:
        bundle: The bundle that was installed.
        serial: Certificate serial (hexadecimal).
        not_after: End of the certificate's validity (UTC, ISO 8601).
        paths: The identity files.
    """

    bundle: EnrollmentBundle
    serial: str
    not_after: str
    paths: IdentityPaths


def _load_key(path: Path, *, ssh: bool, what: str) -> ec.EllipticCurvePrivateKey:
    load = serialization.load_ssh_private_key if ssh else serialization.load_pem_private_key
    try:
        key = load(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BadInputError(
            f"cannot load the {what} {path}: {exc}",
            hint="run `edgefl agent enroll --force` to make new keys (then enroll again)",
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BadInputError(
            f"{path} is a {type(key).__name__}, not an EC key",
            hint="run `edgefl agent enroll --force` to make new keys",
        )
    return key


def _load_tls_key(path: Path) -> ec.EllipticCurvePrivateKey:
    return _load_key(path, ssh=False, what="device TLS key")


def _load_node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    return _load_key(path, ssh=True, what="Flower node key")


def _public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _csr_matches(path: Path, key: ec.EllipticCurvePrivateKey, device_id: str) -> bool:
    try:
        csr = x509.load_pem_x509_csr(path.read_bytes())
    except (OSError, ValueError):
        return False
    cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    pub = csr.public_key()
    return (
        cns == [device_id]
        and isinstance(pub, ec.EllipticCurvePublicKey)
        and _public_der(pub) == _public_der(key.public_key())
        and csr.is_signature_valid
    )


def prepare_enrollment(
    device_id: str,
    fleet: str,
    state_dir: Path,
    *,
    out: Path | None = None,
    force: bool = False,
) -> EnrollmentResult:
    """Make (or reuse) the device's keys and write its enrollment request.

    Idempotent: existing keys are kept unless ``force``; the CSR and the public node key
    are re-derived from the kept keys when missing or stale (another device id).

    Args:
        device_id: The device id (CN of the CSR).
        fleet: The device's fleet.
        state_dir: The agent's state directory (keys go to ``<state_dir>/identity/``).
        out: Where to write the request; default ``IdentityPaths(state_dir).request``.
        force: Replace existing keys with new ones (the device must be admitted again).

    Returns:
        The request and what was created.

    Raises:
        BadInputError: An existing key file cannot be loaded, or the device id is in the
            service namespace (``edgefl-...``).
    """
    refuse_service_id(device_id)
    paths = IdentityPaths(state_dir)
    paths.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    created_tls = force or not paths.tls_key.exists()
    if created_tls:
        tls_key = ec.generate_private_key(ec.SECP256R1())
        write_bytes_atomic(
            paths.tls_key,
            tls_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            mode=0o600,
        )
    else:
        tls_key = _load_tls_key(paths.tls_key)

    if created_tls or not _csr_matches(paths.csr, tls_key, device_id):
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(tls_key, hashes.SHA256())
        )
        write_bytes_atomic(paths.csr, csr.public_bytes(serialization.Encoding.PEM), mode=0o644)

    created_node = force or not paths.node_key.exists()
    if created_node:
        node_key = ec.generate_private_key(ec.SECP384R1())
        write_bytes_atomic(
            paths.node_key,
            node_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            mode=0o600,
        )
    else:
        node_key = _load_node_key(paths.node_key)
    node_pub = node_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if (
        created_node
        or not paths.node_public_key.is_file()
        or (paths.node_public_key.read_bytes().strip() != node_pub)
    ):
        write_bytes_atomic(paths.node_public_key, node_pub + b"\n", mode=0o644)

    request = EnrollmentRequest(
        device_id=device_id,
        fleet=fleet,
        csr_pem=paths.csr.read_text(encoding="ascii"),
        node_public_key=node_pub.decode("ascii"),
    )
    request_path = out if out is not None else paths.request
    write_json_document(request_path, request)
    return EnrollmentResult(request, request_path, created_tls, created_node, paths)


def _refuse(message: str, hint: str) -> BadInputError:
    return BadInputError(message, hint=hint)


def install_bundle(bundle_path: Path, device_id: str, fleet: str, state_dir: Path) -> InstallResult:
    """Check a bundle against this device's keys and install its certificates.

    Writes ``device.pem``, ``ca.pem``, the fleet's app-signing keys (``app-signing.pub``,
    when the bundle has any), its release-signing keys (``release-signing.pub``, likewise)
    and ``enrollment.json`` (the bundle) atomically, only once
    every check passed.

    Args:
        bundle_path: The bundle ``edgefl server admit`` wrote.
        device_id: This device's id (from its config).
        fleet: This device's fleet (from its config).
        state_dir: The agent's state directory.

    Returns:
        What was installed.

    Raises:
        BadInputError: The bundle is unreadable or belongs to another device, fleet or key,
            its certificate's CN is not the device id, or it does not verify against the
            bundle's CA; or the device has no TLS key yet.
    """
    bundle = read_bundle(bundle_path)
    paths = IdentityPaths(state_dir)
    readmit = "admit this device's current request (`edgefl server admit REQUEST`)"
    if bundle.device_id != device_id:
        raise _refuse(
            f"{bundle_path} is for device {bundle.device_id!r}, this device is {device_id!r}",
            "install the bundle made for this device, or check device_id in the config",
        )
    if bundle.fleet != fleet:
        raise _refuse(
            f"{bundle_path} is for fleet {bundle.fleet!r}, this device is in fleet {fleet!r}",
            "install the bundle made for this fleet, or check fleet in the config",
        )
    if not paths.tls_key.is_file():
        raise _refuse(
            f"this device has no TLS key ({paths.tls_key})",
            "run `edgefl agent enroll` first, then have the request admitted",
        )
    key = _load_tls_key(paths.tls_key)
    try:
        cert = x509.load_pem_x509_certificate(bundle.cert_pem.encode())
    except ValueError as exc:
        raise _refuse(f"{bundle_path}: cert_pem is not a PEM certificate: {exc}", readmit) from exc
    try:
        ca = x509.load_pem_x509_certificate(bundle.ca_pem.encode())
    except ValueError as exc:
        raise _refuse(f"{bundle_path}: ca_pem is not a PEM certificate: {exc}", readmit) from exc
    cert_pub = cert.public_key()
    if not isinstance(cert_pub, ec.EllipticCurvePublicKey) or _public_der(cert_pub) != _public_der(
        key.public_key()
    ):
        raise _refuse(
            f"the certificate in {bundle_path} is not for this device's TLS key "
            f"({paths.tls_key}); it was issued for another request or the keys were "
            "replaced since",
            readmit,
        )
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [device_id]:
        raise _refuse(
            f"the certificate in {bundle_path} has CN {cns!r}, not the device id {device_id!r}",
            readmit,
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise _refuse(
            f"the certificate in {bundle_path} does not verify against its CA "
            f"({ca.subject.rfc4514_string()}): {exc or 'bad signature'}",
            "ask the fleet administrator for a bundle signed by the fleet CA",
        ) from exc
    write_bytes_atomic(paths.cert, bundle.cert_pem.encode(), mode=0o644)
    write_bytes_atomic(paths.ca, bundle.ca_pem.encode(), mode=0o644)
    if bundle.app_signing_keys:
        # Pinned like ca.pem: the app gate reads them besides training.app_signing_keys,
        # so a config can add keys but never drop the fleet's.
        keys = "".join(f"{line}\n" for line in bundle.app_signing_keys)
        write_bytes_atomic(paths.app_signing_keys, keys.encode("ascii"), mode=0o644)
    else:
        # The installed bundle is the truth: one without keys leaves none pinned.
        paths.app_signing_keys.unlink(missing_ok=True)
    if bundle.release_signing_keys:
        # Pinned the same way: the model manager's trust store reads them besides
        # models.release_signing_keys (edgefl.releasesign.TrustStore).
        pems = "".join(bundle.release_signing_keys)
        write_bytes_atomic(paths.release_signing_keys, pems.encode("ascii"), mode=0o644)
    else:
        paths.release_signing_keys.unlink(missing_ok=True)
    write_json_document(paths.bundle, bundle)
    not_after = cert.not_valid_after_utc.astimezone(dt.UTC).isoformat()
    return InstallResult(bundle, f"{cert.serial_number:x}", not_after, paths)


class CertRenewer:
    """Renews the device's TLS certificate over MQTT before it expires.

    The agent asks (:meth:`request`, published over its current mutual-TLS connection on
    :func:`~edgefl.enrollment.renewal_request_topic`) with a CSR for the key it already
    has, so no private key is ever made or moved; the server answers with the
    ``install-cert`` command, whose handler is :meth:`install`. A certificate is installed
    only if it is for this device's id and key, verifies against the installed fleet CA and
    lasts longer than the current one; it is written atomically, and
    :attr:`reload_needed` tells the agent to reconnect with it.

    Args:
        device_id: This device's id.
        fleet: Its fleet.
        cert_path: The installed certificate (``mqtt.tls.cert_file``).
        key_path: Its key (``mqtt.tls.key_file``).
        ca_path: The fleet CA certificate (``mqtt.tls.ca_file``).
        renew_before: Ask when less than this is left of the certificate.
    """

    def __init__(
        self,
        device_id: str,
        fleet: str,
        *,
        cert_path: Path,
        key_path: Path,
        ca_path: Path,
        renew_before: dt.timedelta,
    ) -> None:
        self.device_id = device_id
        self.fleet = fleet
        self.cert_path = cert_path
        self.key_path = key_path
        self.ca_path = ca_path
        self.renew_before = renew_before
        self.reload_needed = False
        self.requests = 0
        self.installed = 0

    def not_after(self) -> dt.datetime | None:
        """When the installed certificate expires (UTC), or ``None`` if it is unreadable."""
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError):
            return None
        return cert.not_valid_after_utc

    def due(self, now: dt.datetime | None = None) -> bool:
        """Whether the certificate expires within ``renew_before`` (or cannot be read)."""
        end = self.not_after()
        now = now or dt.datetime.now(dt.UTC)
        return end is None or end - now < self.renew_before

    def request(self) -> tuple[str, bytes]:
        """The renewal request: ``(topic, payload)`` to publish with QoS 1.

        Raises:
            BadInputError: The TLS key cannot be loaded.
        """
        key = _load_tls_key(self.key_path)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)]))
            .sign(key, hashes.SHA256())
        )
        self.requests += 1
        document = RenewalRequest(
            request_id=uuid.uuid4().hex,
            csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        )
        payload = json.dumps(document.model_dump(mode="json")).encode()
        return renewal_request_topic(self.fleet, self.device_id), payload

    def install(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``install-cert`` command handler: check, install, ask for a reconnect.

        Safe to repeat: the certificate already installed is accepted again unchanged.

        Raises:
            BadInputError: Not a certificate for this device's id and key, not from the
                fleet CA, or not newer than the installed one (nothing is written).
        """
        pem = args.get("cert_pem")
        if not isinstance(pem, str):
            raise BadInputError("install-cert: args.cert_pem must be a PEM string")
        try:
            cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
            ca = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
        except (OSError, ValueError, UnicodeEncodeError) as exc:
            raise BadInputError(f"install-cert: unreadable certificate: {exc}") from exc
        key = _load_tls_key(self.key_path)
        pub = cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or _public_der(pub) != _public_der(
            key.public_key()
        ):
            raise BadInputError("install-cert: the certificate is not for this device's key")
        cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [self.device_id]:
            raise BadInputError(f"install-cert: the certificate's CN is {cns!r}")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise BadInputError("install-cert: not signed by the fleet CA") from exc
        current = self.not_after()
        result = {
            "serial": f"{cert.serial_number:x}",
            "not_after": cert.not_valid_after_utc.isoformat(),
        }
        if current is not None and cert.not_valid_after_utc <= current:
            try:
                same = self.cert_path.read_bytes().strip() == pem.encode("ascii").strip()
            except OSError:
                same = False
            if same:
                return {**result, "installed": False}  # a repeat: already in place
            raise BadInputError("install-cert: the certificate does not outlast the current one")
        write_bytes_atomic(self.cert_path, pem.encode("ascii"), mode=0o644)
        self.installed += 1
        self.reload_needed = True
        return {**result, "installed": True}
