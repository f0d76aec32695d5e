"""The admin CA: client certificates for people administering the server.

A CA of its own, apart from the fleet CA, in ``<ca_dir>/admin/`` (created on first use:
``edgefl server admin-cert`` or ``edgefl server start``): every device holds a fleet-CA
certificate, so the admin API must never take one as an administrator. The layout is the
fleet CA's (``ca.pem``, ``ca.key``, ``state.json``, ``crl.pem``; see
:mod:`edgefl.server.fleet_ca`), but no private key of an admin certificate is kept here:
:meth:`AdminCA.issue_admin_cert` returns it to the caller, who hands it to the person.

An admin certificate's subject is ``CN=<name>, OU=<role>`` (``viewer``, ``operator`` or
``admin``) with extended key usage clientAuth. Each is recorded in the registry's
``admin_certs`` table (serial, name, role, dates), and the admin API accepts a certificate
only when (:func:`verify_admin_cert`):

- it is signed by this CA's key (a fleet-CA or any other certificate is refused),
- now is inside its validity,
- its serial is in ``admin_certs`` and not revoked (``edgefl server admin-revoke``), and
- the role in the certificate is the recorded one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefl.errors import BadInputError
from edgefl.server.admin_tokens import as_utc, credential_fields, iso_utc
from edgefl.server.audit import Principal
from edgefl.server.fleet_ca import FleetCA, public_key_fingerprint

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "ADMIN_CA_DIR",
    "AdminCA",
    "AdminCertRefusedError",
    "IssuedAdminCert",
    "admin_ca_dir",
    "list_admin_certs",
    "open_admin_ca",
    "revoke_admin_certs",
    "verify_admin_cert",
]

ADMIN_CA_DIR: Final = "admin"
"""Folder of the admin CA inside the server's ``ca_dir``."""


class AdminCertRefusedError(Exception):
    """A client certificate is not a valid admin certificate.

    Attributes:
        reason: Why, for the API's message.
        status: 403 (not an admin certificate at all, or a role mismatch) or 401
            (an admin certificate that expired or was revoked).
    """

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class IssuedAdminCert:
    """An admin certificate just issued; ``key_pem`` is the only copy of its key."""

    name: str
    role: str
    serial: int
    cert_pem: bytes
    key_pem: bytes
    not_after: dt.datetime

    @property
    def serial_hex(self) -> str:
        """The serial as ``admin_certs`` stores it."""
        return f"{self.serial:x}"


def admin_ca_dir(ca_dir: Path) -> Path:
    """Where the admin CA of a server whose fleet CA is ``ca_dir`` lives."""
    return Path(ca_dir) / ADMIN_CA_DIR


class AdminCA(FleetCA):
    """The admin CA (see the module docstring); a :class:`FleetCA` folder of its own."""

    def issue_admin_cert(self, name: str, role: str, *, days: float = 365) -> IssuedAdminCert:
        """Issue a client certificate ``CN=name, OU=role`` with a fresh P-256 key.

        Raises:
            BadInputError: Invalid name, role or validity.
        """
        from edgefl.server.admin_tokens import check_name
        from edgefl.server.registry.models import ADMIN_ROLES

        check_name(name)
        if role not in ADMIN_ROLES:
            raise BadInputError(
                f"invalid role {role!r}", hint=f"use one of {', '.join(ADMIN_ROLES)}"
            )
        if days <= 0:
            raise BadInputError(f"certificate validity must be positive, got {days} days")
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        cert = self._sign(
            subject_cn=name,
            subject_ou=role,
            public_key=public,
            san=None,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            days=days,
        )
        with self._writing() as state:
            state.issued[cert.serial_number] = {
                "kind": "admin",
                "cn": name,
                "role": role,
                "not_after": cert.not_valid_after_utc.isoformat(),
                "public_key_sha256": public_key_fingerprint(public),
            }
        return IssuedAdminCert(
            name=name,
            role=role,
            serial=cert.serial_number,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            not_after=cert.not_valid_after_utc,
        )


def open_admin_ca(ca_dir: Path) -> AdminCA:
    """The admin CA of the server whose fleet CA is in ``ca_dir``, created if missing."""
    folder = admin_ca_dir(ca_dir)
    if not (folder / "ca.pem").exists():
        AdminCA.create(folder, common_name="edgefl admin CA")
    ca = AdminCA.load(folder)
    assert isinstance(ca, AdminCA)
    return ca


def record_issued(engine: Engine, issued: IssuedAdminCert) -> None:
    """Add an issued admin certificate to ``admin_certs``."""
    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import AdminCert

    with session_factory(engine)() as session, session.begin():
        session.add(
            AdminCert(
                serial=issued.serial_hex,
                name=issued.name,
                role=issued.role,
                issued_at=dt.datetime.now(dt.UTC),
                expires_at=issued.not_after,
                revoked_at=None,
            )
        )


def _cert_row(row: Any, now: dt.datetime) -> dict[str, Any]:
    return {
        "serial": row.serial,
        **credential_fields(row, now),
        "issued_at": iso_utc(row.issued_at),
        "expires_at": iso_utc(row.expires_at),
        "revoked_at": iso_utc(row.revoked_at),
    }


def list_admin_certs(engine: Engine) -> list[dict[str, Any]]:
    """Every admin certificate issued (``admin_certs``), newest first."""
    from sqlalchemy import select

    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import AdminCert

    now = dt.datetime.now(dt.UTC)
    with session_factory(engine)() as session:
        rows = session.scalars(select(AdminCert).order_by(AdminCert.issued_at.desc()))
        return [_cert_row(r, now) for r in rows]


def revoke_admin_certs(
    engine: Engine, ca: AdminCA, *, name: str | None = None, serial: str | None = None
) -> list[dict[str, Any]]:
    """Revoke the admin certificates of ``name`` (all of them) or the one ``serial`` (hex).

    Sets ``revoked_at`` (what the API checks) and lists the serial in the admin CA's CRL.

    Raises:
        BadInputError: Neither or both given, or nothing matches.
    """
    from sqlalchemy import select

    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import AdminCert

    if (name is None) == (serial is None):
        raise BadInputError("give a name or a serial to revoke")
    now = dt.datetime.now(dt.UTC)
    with session_factory(engine)() as session, session.begin():
        query = select(AdminCert)
        if name is not None:
            query = query.where(AdminCert.name == name)
        else:
            query = query.where(AdminCert.serial == str(serial).lower().removeprefix("0x"))
        rows = list(session.scalars(query))
        if not rows:
            what = f"name {name!r}" if name is not None else f"serial {serial}"
            raise BadInputError(
                f"no admin certificate with {what}",
                hint="`edgefl server admin-certs` lists them",
            )
        for row in rows:
            if row.revoked_at is None:
                row.revoked_at = now
        out = [_cert_row(r, now) for r in rows]
    for listed in out:
        # Issued by an earlier admin CA: the registry row decides.
        with contextlib.suppress(BadInputError):
            ca.revoke(int(listed["serial"], 16))
    return out


def verify_admin_cert(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    engine: Engine,
    *,
    now: dt.datetime | None = None,
) -> Principal:
    """The principal an admin client certificate stands for (see the module docstring).

    Raises:
        AdminCertRefusedError: Not signed by the admin CA, outside its validity, unknown to
            the registry, revoked, or its role differs from the recorded one.
    """
    from edgefl.server.registry import session_factory
    from edgefl.server.registry.models import ADMIN_ROLES, AdminCert

    now = now or dt.datetime.now(dt.UTC)
    try:
        if cert.issuer != ca_cert.subject:
            raise InvalidSignature
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise AdminCertRefusedError(
            "this client certificate was not issued by the admin CA (device and other "
            "certificates cannot administer the server)",
            403,
        ) from exc
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    name = str(cns[0].value) if cns else ""
    role = str(ous[0].value) if len(ous) == 1 else ""
    if not name or role not in ADMIN_ROLES:
        raise AdminCertRefusedError("the admin certificate names no valid role", 403)
    if now < cert.not_valid_before_utc:
        raise AdminCertRefusedError(f"admin certificate {name} is not valid yet", 401)
    if now >= cert.not_valid_after_utc:
        raise AdminCertRefusedError(
            f"admin certificate {name} expired at {cert.not_valid_after_utc.isoformat()}", 401
        )
    serial = f"{cert.serial_number:x}"
    with session_factory(engine)() as session:
        row = session.get(AdminCert, serial)
        if row is None:
            raise AdminCertRefusedError(
                f"admin certificate {name} (serial {serial}) is unknown to this server", 403
            )
        if row.revoked_at is not None:
            raise AdminCertRefusedError(
                f"admin certificate {name} (serial {serial}) was revoked at "
                f"{as_utc(row.revoked_at).isoformat()}",
                401,
            )
        if row.role != role or row.name != name:
            raise AdminCertRefusedError(
                f"admin certificate {name}: its subject differs from the recorded one", 403
            )
    return Principal(name, role, "api")
