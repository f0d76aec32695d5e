"""A small certificate authority for the fleet: per-device client certificates and a CRL.

The CA lives in one directory (keep it off the broker and back it up)::

    ca.pem, ca.key            the self-signed CA (ECDSA P-256), key mode 0600
    crl.pem                   the current CRL, signed by the CA (always present, maybe empty)
    state.json                issued and revoked serials, CRL number
    devices/<device_id>/      cert.pem (+ key.pem, 0600, when the CA generated the key)
    server/                   cert.pem, key.pem: the broker's TLS server certificate
    services/<name>/          cert.pem, key.pem: client certificates of cloud services

Every file is written atomically (temporary file in the same folder, ``fsync``,
``os.replace``), so a crash never leaves a half-written key or CRL behind. Private keys are
created with mode 0600 before a single byte is written.

The broker identifies a client by the certificate's common name (mosquitto
``use_identity_as_username``), so the CN of a device certificate is its device id and the
ACL (``deploy/mosquitto/acl``) confines it to ``edgefl/+/<device_id>/#``. The name
``edgefl-server`` is reserved for the cloud ingest identity and cannot be a device id.

Several processes may write to one CA directory (the server refreshes the CRL while
``edgefl server admit`` or ``revoke`` issue and revoke): every change to ``state.json`` and
``crl.pem`` happens under an exclusive ``flock`` on ``<dir>/.lock``, with ``state.json``
read again under it, so no writer overwrites another's change.

The CRL is valid for :data:`CRL_VALIDITY_DAYS`. OpenSSL, and so mosquitto, refuses *every*
client once a CRL's nextUpdate has passed, so whoever runs the broker must re-sign it in
time: :meth:`FleetCA.refresh_crl` does when it is due (the server calls it on start-up
and while it runs).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefl.errors import BadInputError, ConfigError
from edgefl.files import write_bytes_atomic

__all__ = [
    "CRL_VALIDITY_DAYS",
    "DEVICE_ID_PATTERN",
    "SERVER_IDENTITY",
    "FleetCA",
    "IssuedCert",
    "validate_device_id",
]

logger = logging.getLogger(__name__)

DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a device id (and so a certificate CN and an MQTT username) may look like."""

CRL_VALIDITY_DAYS = 30
"""Days a CRL signed here is valid (its nextUpdate)."""

SERVER_IDENTITY = "edgefl-server"
"""CN of the cloud ingest's client certificate; the ACL grants it the whole tree."""

_RESERVED_IDS = frozenset({SERVER_IDENTITY})
_CLOCK_SKEW = dt.timedelta(minutes=5)
_STATE_VERSION = 1


def validate_device_id(device_id: str) -> str:
    """Check that ``device_id`` is ``[A-Za-z0-9_-]{1,64}``.

    Args:
        device_id: The id to check.

    Returns:
        The id, unchanged.

    Raises:
        BadInputError: The id has other characters, is empty or longer than 64.
    """
    if not isinstance(device_id, str) or DEVICE_ID_PATTERN.fullmatch(device_id) is None:
        raise BadInputError(
            f"invalid device id {device_id!r}",
            hint="use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'",
        )
    return device_id


@dataclass(frozen=True)
class IssuedCert:
    """A certificate the CA issued, and where it was written.

    Attributes:
        cert_pem: The certificate, PEM.
        key_pem: Its private key (PKCS#8 PEM, unencrypted), or ``None`` when the
            certificate was issued from a CSR and the key never left the device.
        serial: The certificate's serial number (what :meth:`FleetCA.revoke` takes).
        cert_path: Where the certificate was written.
        key_path: Where the key was written, or ``None`` (CSR).
    """

    cert_pem: bytes
    key_pem: bytes | None
    serial: int
    cert_path: Path
    key_path: Path | None

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate, parsed."""
        return x509.load_pem_x509_certificate(self.cert_pem)


@dataclass
class _State:
    crl_number: int = 0
    issued: dict[int, dict[str, Any]] = field(default_factory=dict)
    revoked: dict[int, str] = field(default_factory=dict)  # serial -> ISO revocation time

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _STATE_VERSION,
                "crl_number": self.crl_number,
                "issued": {str(k): v for k, v in sorted(self.issued.items())},
                "revoked": {str(k): v for k, v in sorted(self.revoked.items())},
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, source: Path) -> _State:
        try:
            raw = json.loads(text)
            if raw.get("version") != _STATE_VERSION:
                raise ValueError(f"unsupported version {raw.get('version')!r}")
            return cls(
                crl_number=int(raw["crl_number"]),
                issued={int(k): dict(v) for k, v in raw["issued"].items()},
                revoked={int(k): str(v) for k, v in raw["revoked"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{source}: corrupt CA state file: {exc}") from exc


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class FleetCA:
    """The fleet's certificate authority, backed by one directory.

    Use :meth:`create` once, then :meth:`load`. See the module docstring for the layout.
    """

    def __init__(
        self,
        directory: Path,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        state: _State,
    ) -> None:
        """Use :meth:`create` or :meth:`load` instead."""
        self.directory = directory
        self.cert = cert
        self._key = key
        self._state = state

    # -- paths -----------------------------------------------------------------------

    @property
    def cert_path(self) -> Path:
        """The CA certificate (give it to every client and to the broker as ``cafile``)."""
        return self.directory / "ca.pem"

    @property
    def crl_path(self) -> Path:
        """The current CRL (the broker's ``crlfile``)."""
        return self.directory / "crl.pem"

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    # -- construction ----------------------------------------------------------------

    @classmethod
    def create(
        cls, directory: Path, *, common_name: str = "edgefl fleet CA", days: int = 3650
    ) -> FleetCA:
        """Create a new CA (key, self-signed certificate, empty CRL) in ``directory``.

        Args:
            directory: Folder to hold the CA; created with mode 0700 if missing.
            common_name: Subject CN of the CA certificate.
            days: Validity of the CA certificate.

        Returns:
            The new CA.

        Raises:
            BadInputError: ``directory`` already holds a CA, or ``days`` is not positive.
        """
        if days <= 0:
            raise BadInputError(f"CA validity must be positive, got {days} days")
        directory = Path(directory)
        if (directory / "ca.key").exists() or (directory / "ca.pem").exists():
            raise BadInputError(
                f"{directory} already holds a CA",
                hint="use FleetCA.load, or choose an empty directory",
            )
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a CA certificate without its key would be unusable.
        write_bytes_atomic(directory / "ca.key", _key_pem(key), mode=0o600)
        write_bytes_atomic(
            directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), mode=0o644
        )
        ca = cls(directory, cert, key, _State())
        ca._save_state()
        ca.crl_pem()
        logger.info("created fleet CA %r in %s", common_name, directory)
        return ca

    @classmethod
    def load(cls, directory: Path) -> FleetCA:
        """Load a CA created by :meth:`create`.

        Args:
            directory: The CA folder.

        Returns:
            The CA.

        Raises:
            ConfigError: A file is missing, unreadable or corrupt, or the key does not
                match the certificate.
        """
        directory = Path(directory)
        try:
            cert_bytes = (directory / "ca.pem").read_bytes()
            key_bytes = (directory / "ca.key").read_bytes()
            state_text = (directory / "state.json").read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read fleet CA in {directory}: {exc.strerror}: {exc.filename}",
                hint="create one with FleetCA.create",
            ) from exc
        try:
            cert = x509.load_pem_x509_certificate(cert_bytes)
            key = serialization.load_pem_private_key(key_bytes, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{directory}: unreadable CA certificate or key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{directory / 'ca.key'}: not an EC private key")
        if key.public_key() != cert.public_key():
            raise ConfigError(f"{directory}: ca.key does not match ca.pem")
        return cls(directory, cert, key, _State.from_json(state_text, directory / "state.json"))

    # -- issuing ---------------------------------------------------------------------

    def issue_device_cert(
        self,
        device_id: str,
        *,
        days: int = 365,
        csr: x509.CertificateSigningRequest | None = None,
    ) -> IssuedCert:
        """Issue a TLS client certificate for one device.

        The certificate has CN = ``device_id``, a DNS subjectAltName ``device_id`` and the
        extended key usage clientAuth. Issuing again for the same device writes a new
        certificate over the old files; the old certificate stays valid until revoked.

        Args:
            device_id: ``[A-Za-z0-9_-]{1,64}``; also the device's MQTT username.
            days: Validity of the certificate.
            csr: A request made on the device, so the key never leaves it. Its subject CN
                must be ``device_id`` and its signature must verify. Without one, the CA
                generates a P-256 key and writes it next to the certificate (mode 0600).

        Returns:
            The certificate, its key (``None`` with a CSR), serial and paths, written to
            ``directory/devices/<device_id>/``.

        Raises:
            BadInputError: Invalid or reserved device id, bad ``days``, or a CSR whose
                CN differs or whose signature does not verify.
        """
        validate_device_id(device_id)
        if device_id in _RESERVED_IDS:
            raise BadInputError(
                f"device id {device_id!r} is reserved for the cloud service identity",
                hint="choose another device id",
            )
        folder = self.directory / "devices" / device_id
        return self._issue_client_cert(device_id, folder, days=days, csr=csr, kind="device")

    def issue_service_cert(self, name: str = SERVER_IDENTITY, *, days: int = 365) -> IssuedCert:
        """Issue a clientAuth certificate for a cloud service (by default the ingest).

        The broker's ACL grants ``edgefl-server`` read access to ``edgefl/#`` and write
        access to the command and desired-state topics.

        Args:
            name: The service identity (certificate CN and MQTT username).
            days: Validity of the certificate.

        Returns:
            The certificate and key, written to ``directory/services/<name>/``.

        Raises:
            BadInputError: ``name`` is not ``[A-Za-z0-9_-]{1,64}``.
        """
        validate_device_id(name)
        folder = self.directory / "services" / name
        return self._issue_client_cert(name, folder, days=days, csr=None, kind="service")

    def issue_server_cert(
        self, hostnames: list[str], ips: list[str], *, days: int = 825
    ) -> IssuedCert:
        """Issue the broker's TLS server certificate.

        Args:
            hostnames: DNS names clients connect to (subjectAltName DNS entries).
            ips: IP addresses clients connect to, e.g. ``"127.0.0.1"`` (SAN IP entries).
            days: Validity of the certificate.

        Returns:
            The certificate and key, written to ``directory/server/``.

        Raises:
            BadInputError: No names at all, or an IP address that does not parse.
        """
        if not hostnames and not ips:
            raise BadInputError("a server certificate needs at least one hostname or IP")
        try:
            addresses = [ipaddress.ip_address(ip) for ip in ips]
        except ValueError as exc:
            raise BadInputError(f"invalid IP address for the server certificate: {exc}") from exc
        for host in hostnames:
            if not host or any(c.isspace() for c in host) or "/" in host:
                raise BadInputError(f"invalid hostname {host!r} for the server certificate")
        san: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        san += [x509.IPAddress(a) for a in addresses]
        cn = hostnames[0] if hostnames else str(addresses[0])
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(
            subject_cn=cn,
            public_key=key.public_key(),
            san=san,
            eku=ExtendedKeyUsageOID.SERVER_AUTH,
            days=days,
        )
        return self._store(cert, key, self.directory / "server", kind="server")

    def _issue_client_cert(
        self,
        cn: str,
        folder: Path,
        *,
        days: int,
        csr: x509.CertificateSigningRequest | None,
        kind: str,
    ) -> IssuedCert:
        key: ec.EllipticCurvePrivateKey | None = None
        if csr is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public_key = key.public_key()
        else:
            public_key = self._check_csr(csr, cn)
        cert = self._sign(
            subject_cn=cn,
            public_key=public_key,
            san=[x509.DNSName(cn)],
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            days=days,
        )
        return self._store(cert, key, folder, kind=kind)

    @staticmethod
    def _check_csr(
        csr: x509.CertificateSigningRequest, device_id: str
    ) -> ec.EllipticCurvePublicKey:
        if not csr.is_signature_valid:
            raise BadInputError(f"CSR for {device_id!r}: signature does not verify")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or cns[0].value != device_id:
            got = [c.value for c in cns]
            raise BadInputError(
                f"CSR subject CN {got!r} does not match device id {device_id!r}",
                hint="make the CSR on the device with CN equal to its device id",
            )
        try:
            public_key = csr.public_key()
        except (ValueError, InvalidSignature) as exc:  # pragma: no cover - unusual keys
            raise BadInputError(f"CSR for {device_id!r}: unusable public key: {exc}") from exc
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise BadInputError(
                f"CSR for {device_id!r}: key type {type(public_key).__name__} not accepted",
                hint="use an EC P-256 key",
            )
        return public_key

    def _sign(
        self,
        *,
        subject_cn: str,
        public_key: ec.EllipticCurvePublicKey,
        san: list[x509.GeneralName],
        eku: x509.ObjectIdentifier,
        days: int,
    ) -> x509.Certificate:
        if days <= 0:
            raise BadInputError(f"certificate validity must be positive, got {days} days")
        now = _now()
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=eku == ExtendedKeyUsageOID.SERVER_AUTH,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )

    def _store(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey | None,
        folder: Path,
        *,
        kind: str,
    ) -> IssuedCert:
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = _key_pem(key) if key is not None else None
        cert_path = folder / "cert.pem"
        key_path = folder / "key.pem"
        if key_pem is not None:
            write_bytes_atomic(key_path, key_pem, mode=0o600)
        else:
            # A key left over from an earlier CA-generated certificate would not match.
            key_path.unlink(missing_ok=True)
        write_bytes_atomic(cert_path, cert_pem, mode=0o644)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        with self._writing() as state:
            state.issued[cert.serial_number] = {
                "kind": kind,
                "cn": str(cn),
                "not_after": cert.not_valid_after_utc.isoformat(),
            }
        logger.info("issued %s certificate for %r, serial %x", kind, cn, cert.serial_number)
        return IssuedCert(
            cert_pem=cert_pem,
            key_pem=key_pem,
            serial=cert.serial_number,
            cert_path=cert_path,
            key_path=key_path if key_pem is not None else None,
        )

    # -- revocation ------------------------------------------------------------------

    @property
    def revoked_serials(self) -> frozenset[int]:
        """Serials revoked so far."""
        return frozenset(self._state.revoked)

    def revoke(self, serial: int) -> None:
        """Revoke a certificate this CA issued and rewrite ``crl.pem``.

        Revoking twice is harmless. The broker reads its ``crlfile`` at start-up, so
        restart it (``systemctl restart mosquitto``) after copying the new CRL over.

        Args:
            serial: The certificate's serial number (:attr:`IssuedCert.serial`).

        Raises:
            BadInputError: This CA never issued that serial.
        """
        with self._writing() as state:
            if serial not in state.issued:
                raise BadInputError(
                    f"serial {serial:x} was not issued by this CA", hint="check the serial number"
                )
            if serial in state.revoked:
                logger.info("serial %x is already revoked", serial)
                return
            state.revoked[serial] = _now().isoformat()
            self._sign_crl(CRL_VALIDITY_DAYS)
        logger.warning("revoked serial %x (%s)", serial, state.issued[serial].get("cn", "?"))

    def crl_pem(self, *, days: int = CRL_VALIDITY_DAYS) -> bytes:
        """Sign a fresh CRL listing every revoked serial, write it to ``crl.pem``, return it.

        OpenSSL (and so mosquitto) refuses *every* client once the CRL's nextUpdate has
        passed: see :meth:`refresh_crl`, and reload the broker after either.

        Args:
            days: How long the CRL is valid (its nextUpdate).

        Returns:
            The CRL, PEM.
        """
        if days <= 0:
            raise BadInputError(f"CRL validity must be positive, got {days} days")
        with self._writing():
            return self._sign_crl(days)

    def crl_next_update(self) -> dt.datetime | None:
        """When ``crl.pem`` stops being valid (UTC), or ``None`` if it is missing or unreadable."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return None
        return crl.next_update_utc

    def refresh_crl(
        self, *, before: dt.timedelta, days: int = CRL_VALIDITY_DAYS
    ) -> dt.datetime | None:
        """Re-sign ``crl.pem`` if it is missing, unreadable or valid for less than ``before``.

        Args:
            before: Re-sign when less than this is left of the CRL's validity.
            days: Validity of the new CRL; more than ``before``.

        Returns:
            The new CRL's nextUpdate, or ``None`` when the current one was kept.

        Raises:
            BadInputError: ``days`` is not more than ``before``.
        """
        if dt.timedelta(days=days) <= before:
            raise BadInputError(
                f"a CRL valid for {days} days would be due for refresh at once (before={before})"
            )
        with self._writing():
            next_update = self.crl_next_update()
            if next_update is not None and next_update - _now() >= before:
                return None
            self._sign_crl(days)
            fresh = self.crl_next_update()
        logger.warning(
            "re-signed the CRL (it %s); valid until %s",
            "was missing or unreadable"
            if next_update is None
            else f"was valid until {next_update.isoformat(timespec='seconds')}",
            fresh.isoformat(timespec="seconds") if fresh else "?",
        )
        return fresh

    def _sign_crl(self, days: int) -> bytes:
        """Sign and write the CRL; the caller holds :meth:`_writing`."""
        now = _now()
        self._state.crl_number += 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - _CLOCK_SKEW)
            .next_update(now + dt.timedelta(days=days))
            .add_extension(x509.CRLNumber(self._state.crl_number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        for serial, when in sorted(self._state.revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(dt.datetime.fromisoformat(when))
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        pem = crl.public_bytes(serialization.Encoding.PEM)
        # State first: a CRL number is never signed twice, even if the CRL write fails.
        self._save_state()
        write_bytes_atomic(self.crl_path, pem, mode=0o644)
        return pem

    @contextlib.contextmanager
    def _writing(self) -> Iterator[_State]:
        """Hold the folder's write lock, with the state read again from disk; save it after.

        Not re-entrant (a second ``flock`` from this process would wait for the first):
        inside it, sign with :meth:`_sign_crl`, never :meth:`crl_pem`. Closing the lock
        file releases the lock.
        """
        with (self.directory / ".lock").open("a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            state_file = self.directory / "state.json"
            if state_file.exists():
                self._state = _State.from_json(state_file.read_text(encoding="utf-8"), state_file)
            yield self._state
            self._save_state()

    def _save_state(self) -> None:
        write_bytes_atomic(
            self.directory / "state.json", self._state.to_json().encode("utf-8"), mode=0o600
        )
