"""A small certificate authority for the fleet: per-device client certificates and a CRL.

The CA lives in one directory (keep it off the broker and back it up)::

    ca.pem, ca.key            the self-signed CA (ECDSA P-256), key mode 0600
    crl.pem                   the current CRL, signed by the CA (always present, maybe empty)
    state.json                issued and revoked serials, CRL number
    devices/<device_id>/      cert.pem (+ key.pem, 0600, when the CA generated the key)
    server/                   cert.pem, key.pem: the broker's TLS server certificate
    services/<name>/          cert.pem, key.pem: client certificates of cloud services
    operators/<name>/         cert.pem, key.pem: read-only operator certificates

Every file is written atomically (temporary file in the same folder, ``fsync``,
``os.replace``), so a crash never leaves a half-written key or CRL behind. Private keys are
created with mode 0600 before a single byte is written.

The broker identifies a client by the certificate's common name (mosquitto
``use_identity_as_username`` and ``use_username_as_clientid``), so the CN of a device
certificate is its device id and the ACL (``deploy/mosquitto/acl``) confines it to its own
topics below ``edgefl/+/<device_id>/``. Every cloud service has its own CN
(:data:`SERVICE_IDENTITIES`, e.g. ``edgefl-ingest``) and ACL entry, operators have
``edgefl-op-<name>``; names starting with :data:`RESERVED_PREFIX` are never device ids, so
no device can be enrolled under a service's name.

``state.json`` keeps, for every certificate issued, the SHA-256 of its public key (and,
for a device enrolled by ``edgefl server admit``, of its Flower node key), so a
readmission can refuse keys that were used before (:meth:`FleetCA.key_history`).

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefl.enrollment import SERVICE_ID_PREFIX, refuse_service_id
from edgefl.errors import BadInputError, ConfigError
from edgefl.files import write_bytes_atomic
from edgefl.proto.ids import ID_RE, ID_SYNTAX

__all__ = [
    "CERTS_IDENTITY",
    "COMMANDS_IDENTITY",
    "CRL_VALIDITY_DAYS",
    "DEVICE_ID_PATTERN",
    "INGEST_IDENTITY",
    "OPERATOR_PREFIX",
    "RESERVED_PREFIX",
    "ROLLOUT_IDENTITY",
    "SERVER_IDENTITY",
    "SERVICE_IDENTITIES",
    "FleetCA",
    "IssuedCert",
    "KeyUse",
    "check_not_reserved",
    "node_key_fingerprint",
    "public_key_fingerprint",
    "validate_device_id",
]

logger = logging.getLogger(__name__)

DEVICE_ID_PATTERN = ID_RE
"""What a device id (and so a certificate CN and an MQTT username) may look like: an id of
the fleet contract (:mod:`edgefl.proto.ids`)."""

CRL_VALIDITY_DAYS = 30
"""Days a CRL signed here is valid (its nextUpdate)."""

RESERVED_PREFIX = SERVICE_ID_PREFIX
"""CNs starting with this (any case) belong to services and operators, never to devices."""

INGEST_IDENTITY = "edgefl-ingest"
"""CN of the MQTT ingest: reads the device-to-cloud topics, writes nothing."""

COMMANDS_IDENTITY = "edgefl-commands"
"""CN of the command and desired-state publisher."""

ROLLOUT_IDENTITY = "edgefl-rollout"
"""CN of the model rollout publisher (desired state)."""

CERTS_IDENTITY = "edgefl-certs"
"""CN of the certificate renewal service (reads cert/request, answers on cert/issued)."""

SERVICE_IDENTITIES = frozenset(
    {INGEST_IDENTITY, COMMANDS_IDENTITY, ROLLOUT_IDENTITY, CERTS_IDENTITY}
)
"""Every service CN the shipped ACL has an entry for."""

SERVER_IDENTITY = INGEST_IDENTITY
"""The ingest's CN (the name older code imports; it was ``edgefl-server``)."""

OPERATOR_PREFIX = "edgefl-op-"
"""CN prefix of read-only operator certificates (``edgefl-op-<name>``)."""

_CLOCK_SKEW = dt.timedelta(minutes=5)
_STATE_VERSION = 1


def validate_device_id(device_id: str) -> str:
    """Check that ``device_id`` is an id of the fleet contract (:mod:`edgefl.proto.ids`).

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
            hint=f"use {ID_SYNTAX}",
        )
    return device_id


def check_not_reserved(device_id: str) -> str:
    """Refuse a device id in the service namespace (:data:`RESERVED_PREFIX`).

    The broker takes a certificate's CN as username and client id and grants the
    service CNs their own topics; a device enrolled as ``edgefl-ingest`` would be the
    ingest.

    Raises:
        BadInputError: The id starts with ``edgefl-`` (any case).
    """
    return refuse_service_id(device_id)


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) of the key's DER SubjectPublicKeyInfo: how ``state.json`` names keys."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


def node_key_fingerprint(node_key: str) -> str:
    """SHA-256 (hex) of a Flower node public key, an OpenSSH line (its comment ignored)."""
    fields = node_key.split()
    digest = hashes.Hash(hashes.SHA256())
    digest.update(" ".join(fields[:2]).encode("ascii", "replace"))
    return digest.finalize().hex()


@dataclass(frozen=True)
class KeyUse:
    """A certificate of this CA that carried a given key (:meth:`FleetCA.key_history`).

    Attributes:
        serial: The certificate's serial.
        cn: Its subject CN.
        kind: ``device``, ``service``, ``operator`` or ``server``.
        revoked: Whether it is revoked.
    """

    serial: int
    cn: str
    kind: str
    revoked: bool


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
        days: float = 365,
        csr: x509.CertificateSigningRequest | None = None,
        node_key: str | None = None,
    ) -> IssuedCert:
        """Issue a TLS client certificate for one device.

        The certificate has CN = ``device_id``, a DNS subjectAltName ``device_id`` and the
        extended key usage clientAuth. Issuing again for the same device writes a new
        certificate over the old files; the old certificate stays valid until revoked.

        Args:
            device_id: An id (:mod:`edgefl.proto.ids`); also the device's MQTT username.
            days: Validity of the certificate.
            csr: A request made on the device, so the key never leaves it. Its subject CN
                must be ``device_id`` and its signature must verify. Without one, the CA
                generates a P-256 key and writes it next to the certificate (mode 0600).
            node_key: The Flower node public key (OpenSSH line) enrolled with this
                certificate; its fingerprint is kept for :meth:`key_history`.

        Returns:
            The certificate, its key (``None`` with a CSR), serial and paths, written to
            ``directory/devices/<device_id>/``.

        Raises:
            BadInputError: Invalid or reserved (``edgefl-...``) device id, bad ``days``,
                or a CSR whose CN differs or whose signature does not verify.
        """
        validate_device_id(device_id)
        check_not_reserved(device_id)
        folder = self.directory / "devices" / device_id
        extra = {"node_key_sha256": node_key_fingerprint(node_key)} if node_key else {}
        return self._issue_client_cert(
            device_id, folder, days=days, csr=csr, kind="device", extra=extra
        )

    def issue_service_cert(self, name: str = INGEST_IDENTITY, *, days: float = 365) -> IssuedCert:
        """Issue a clientAuth certificate for a cloud service (by default the ingest).

        Each service has its own entry in the broker's ACL (``deploy/mosquitto/acl``):
        the ingest reads the device-to-cloud topics, ``edgefl-commands`` writes commands
        and desired state, ``edgefl-certs`` answers certificate renewals.

        Args:
            name: The service identity (certificate CN, MQTT username and client id),
                one of :data:`SERVICE_IDENTITIES`.
            days: Validity of the certificate.

        Returns:
            The certificate and key, written to ``directory/services/<name>/``.

        Raises:
            BadInputError: ``name`` is not a known service identity.
        """
        if name not in SERVICE_IDENTITIES:
            raise BadInputError(
                f"{name!r} is not a service identity the broker's ACL knows",
                hint=f"use one of {', '.join(sorted(SERVICE_IDENTITIES))}",
            )
        folder = self.directory / "services" / name
        return self._issue_client_cert(name, folder, days=days, csr=None, kind="service")

    def issue_operator_cert(self, name: str, *, days: float = 365) -> IssuedCert:
        """Issue a read-only operator certificate (CN ``edgefl-op-<name>``).

        For people watching the fleet with ``mosquitto_sub``: the broker's rendered ACL
        (:func:`edgefl.server.broker_config.render_acl`) gives each operator CN read
        access to ``edgefl/#`` and nothing else, so nobody needs a service's key.

        Args:
            name: The operator's name: an id of at most 54 characters, so that the CN
                ``edgefl-op-<name>`` is an id too.
            days: Validity of the certificate.

        Returns:
            The certificate and key, written to ``directory/operators/<name>/``.

        Raises:
            BadInputError: ``name`` is invalid or too long.
        """
        validate_device_id(name)
        cn = OPERATOR_PREFIX + name
        validate_device_id(cn)  # at most 64 characters in all
        folder = self.directory / "operators" / name
        return self._issue_client_cert(cn, folder, days=days, csr=None, kind="operator")

    def operator_names(self) -> list[str]:
        """CNs of the operator certificates that are neither revoked nor expired, sorted."""
        state = self._read_state()
        now = _now()
        names = {
            str(entry["cn"])
            for serial, entry in state.issued.items()
            if entry.get("kind") == "operator"
            and serial not in state.revoked
            and dt.datetime.fromisoformat(str(entry["not_after"])) > now
        }
        return sorted(names)

    def device_serials(self, device_id: str) -> list[int]:
        """Serials of ``device_id``'s certificates that are neither revoked nor expired."""
        return self.live_serials(device_id, kind="device")

    def live_serials(self, cn: str, *, kind: str) -> list[int]:
        """Serials of the ``kind`` certificates with CN ``cn``, neither revoked nor expired.

        Args:
            cn: The subject CN (a device id, a service or ``edgefl-op-<name>``).
            kind: ``device``, ``service``, ``operator`` or ``server``.
        """
        state = self._read_state()
        now = _now()
        return sorted(
            serial
            for serial, entry in state.issued.items()
            if entry.get("kind") == kind
            and entry.get("cn") == cn
            and serial not in state.revoked
            and dt.datetime.fromisoformat(str(entry["not_after"])) > now
        )

    def key_history(
        self,
        *,
        public_key: ec.EllipticCurvePublicKey | None = None,
        node_key: str | None = None,
    ) -> list[KeyUse]:
        """Certificates of this CA that carried ``public_key``, or were enrolled with ``node_key``.

        Certificates voided by a failed admission (``revoke(serial, void=True)``) do not
        count: their keys never served.

        Args:
            public_key: A TLS public key.
            node_key: A Flower node public key (OpenSSH line).

        Returns:
            Every such certificate, by serial.
        """
        wanted_tls = public_key_fingerprint(public_key) if public_key is not None else None
        wanted_node = node_key_fingerprint(node_key) if node_key else None
        state = self._read_state()
        found = []
        for serial, entry in sorted(state.issued.items()):
            if entry.get("voided"):
                continue
            if (wanted_tls is not None and entry.get("public_key_sha256") == wanted_tls) or (
                wanted_node is not None and entry.get("node_key_sha256") == wanted_node
            ):
                found.append(
                    KeyUse(
                        serial=serial,
                        cn=str(entry.get("cn", "?")),
                        kind=str(entry.get("kind", "?")),
                        revoked=serial in state.revoked,
                    )
                )
        return found

    def _read_state(self) -> _State:
        """``state.json`` as it is on disk now (other processes write it too)."""
        state_file = self.directory / "state.json"
        try:
            return _State.from_json(state_file.read_text(encoding="utf-8"), state_file)
        except OSError:
            return self._state

    def issue_server_cert(
        self, hostnames: list[str], ips: list[str], *, days: float = 825
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
        days: float,
        csr: x509.CertificateSigningRequest | None,
        kind: str,
        extra: dict[str, str] | None = None,
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
        return self._store(cert, key, folder, kind=kind, extra=extra)

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
        san: list[x509.GeneralName] | None,
        eku: x509.ObjectIdentifier,
        days: float,
        subject_ou: str | None = None,
    ) -> x509.Certificate:
        """A leaf certificate ``CN=subject_cn`` (and ``OU=subject_ou``) signed by this CA.

        Valid ``days`` (at most as long as the CA); no SubjectAlternativeName extension
        when ``san`` is None.
        """
        if days <= 0:
            raise BadInputError(f"certificate validity must be positive, got {days} days")
        now = _now()
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]
        if subject_ou is not None:
            subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, subject_ou))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
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
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return (
            builder.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
            )
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
        extra: dict[str, str] | None = None,
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
            public_key = cert.public_key()
            assert isinstance(public_key, ec.EllipticCurvePublicKey)  # only EC keys signed
            state.issued[cert.serial_number] = {
                "kind": kind,
                "cn": str(cn),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "public_key_sha256": public_key_fingerprint(public_key),
                **(extra or {}),
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

    def revoke(self, serial: int, *, void: bool = False) -> None:
        """Revoke a certificate this CA issued and rewrite ``crl.pem``.

        Revoking twice is harmless. The broker reads its ``crlfile`` at start-up, so
        restart it (``systemctl restart mosquitto``) after copying the new CRL over.

        Args:
            serial: The certificate's serial number (:attr:`IssuedCert.serial`).
            void: The certificate was issued by an admission that failed and never
                served: :meth:`key_history` forgets its keys, so the same request may
                be admitted again.

        Raises:
            BadInputError: This CA never issued that serial.
        """
        with self._writing() as state:
            if serial not in state.issued:
                raise BadInputError(
                    f"serial {serial:x} was not issued by this CA", hint="check the serial number"
                )
            if void:
                state.issued[serial]["voided"] = True
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
