"""Admitting and revoking devices: one device id for the certificate, the node and the registry.

:func:`admit` turns a device's :class:`~edgefl.enrollment.EnrollmentRequest` into an
:class:`~edgefl.enrollment.EnrollmentBundle`:

1. the fleet CA signs the CSR (CN = device id): the device's MQTT and gRPC identity;
2. the SuperLink registers the Flower node public key under the name ``device_id``;
3. one registry transaction records both (``enrollments`` row, status ``admitted``).

Nothing is left half-admitted: if the registration fails the new certificate is revoked,
and if the commit fails the node is unregistered and the certificate revoked.

The bundle also carries the fleet's app-signing public keys when the server has them
(the caller passes them in), which the device pins for its app gate.

:func:`revoke` works the other way round and in an order that any retry finishes: it
revokes the certificate serial (the CA rewrites ``crl.pem``; ``edgefl server start``
restarts its broker when that file changes, which ends the device's MQTT access),
unregisters the node from the SuperLink (its key can no longer activate a SuperNode), and
only then marks the row ``revoked``. Each step is idempotent, so a revoke that failed
half-way is completed by running it again; a row marked ``revoked`` means every step is
done. A revoked device is never admitted again silently: :func:`admit` refuses it unless
the caller asks for ``readmit`` explicitly, and every admission (a readmission above all)
refuses a TLS key or a Flower node key that any earlier certificate or enrollment of this
fleet carried (:class:`ReusedKeyError`): a revoked device comes back only with new keys,
so its old, possibly stolen ``device.key`` or ``node.key`` stays useless.

:func:`enrolled_nodes` gives the ServerApp the node id -> device id map of admitted
devices, so it can refuse a reply whose claimed device id is not its node's.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from edgefl.enrollment import EnrollmentBundle, EnrollmentRequest
from edgefl.errors import BadInputError, ConfigError, EdgeflError
from edgefl.server.fl.superlink import FlowerAdmin, FlowerCommandError
from edgefl.server.fleet_ca import FleetCA, check_not_reserved, public_key_fingerprint
from edgefl.server.registry.db import session_factory
from edgefl.server.registry.models import Enrollment

__all__ = [
    "AlreadyEnrolledError",
    "EnrollmentInfo",
    "NotEnrolledError",
    "ReusedKeyError",
    "RevokeResult",
    "RevokedDeviceError",
    "admit",
    "admitted_fleets",
    "enrolled_nodes",
    "get_enrollment",
    "is_admitted",
    "list_enrollments",
    "renew_device_cert",
    "revoke",
]

log = logging.getLogger(__name__)


class AlreadyEnrolledError(BadInputError):
    """The device is already admitted."""


class RevokedDeviceError(BadInputError):
    """The device was revoked; it is not admitted again without ``readmit``."""


class NotEnrolledError(BadInputError):
    """No enrollment of that device id exists."""


class ReusedKeyError(RevokedDeviceError):
    """The request carries a TLS or node key that an earlier enrollment used."""


@dataclass(frozen=True)
class EnrollmentInfo:
    """One ``enrollments`` row, detached from the database.

    Attributes:
        device_id: The device id.
        fleet: Its fleet.
        status: ``admitted`` or ``revoked``.
        cert_serial: Certificate serial, hexadecimal.
        node_id: SuperLink node id, decimal string.
        admitted_at: When it was admitted (UTC).
        revoked_at: When it was revoked, or ``None``.
        revoke_reason: Why it was revoked (``""`` while admitted).
    """

    device_id: str
    fleet: str
    status: str
    cert_serial: str
    node_id: str
    admitted_at: datetime
    revoked_at: datetime | None
    revoke_reason: str
    node_public_key: str = ""
    cert_pem: str = ""

    def to_dict(self) -> dict[str, str | None]:
        """A JSON-ready dict (timestamps ISO 8601, UTC)."""
        return {
            "device_id": self.device_id,
            "fleet": self.fleet,
            "status": self.status,
            "cert_serial": self.cert_serial,
            "node_id": self.node_id,
            "admitted_at": _utc(self.admitted_at).isoformat(),
            "revoked_at": _utc(self.revoked_at).isoformat() if self.revoked_at else None,
            "revoke_reason": self.revoke_reason,
        }


@dataclass(frozen=True)
class RevokeResult:
    """What :func:`revoke` did.

    Attributes:
        enrollment: The row after the revocation.
        already_revoked: The row was already ``revoked`` (the steps were re-checked).
        node_was_registered: The SuperLink still had the node registered (it is not now).
    """

    enrollment: EnrollmentInfo
    already_revoked: bool
    node_was_registered: bool


def _utc(when: datetime) -> datetime:
    # SQLite gives naive datetimes back; they mean UTC.
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _info(row: Enrollment) -> EnrollmentInfo:
    return EnrollmentInfo(
        device_id=row.device_id,
        fleet=row.fleet,
        status=row.status,
        cert_serial=row.cert_serial,
        node_id=row.node_id,
        admitted_at=_utc(row.admitted_at),
        revoked_at=_utc(row.revoked_at) if row.revoked_at else None,
        revoke_reason=row.revoke_reason,
        node_public_key=row.node_public_key,
        cert_pem=row.cert_pem,
    )


def _registry_error(engine: Engine, exc: SQLAlchemyError) -> ConfigError:
    url = engine.url.render_as_string(hide_password=True)
    return ConfigError(
        f"cannot use the registry at {url}: {str(exc).splitlines()[0]}",
        hint="check db_url in the server config (edgefl server start migrates it)",
    )


def _parse_csr(request: EnrollmentRequest) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(request.csr_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise BadInputError(
            f"enrollment request of {request.device_id!r}: csr_pem is not a PEM CSR: {exc}",
            hint="pass the request `edgefl agent enroll` wrote, unmodified",
        ) from exc


def _node_key_line(request: EnrollmentRequest) -> str:
    line = request.node_public_key.strip()
    try:
        key = serialization.load_ssh_public_key(line.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise BadInputError(
            f"enrollment request of {request.device_id!r}: node_public_key is not an "
            f"OpenSSH public key: {exc}",
            hint="pass the request `edgefl agent enroll` wrote, unmodified",
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise BadInputError(
            f"enrollment request of {request.device_id!r}: the node key is a "
            f"{type(key).__name__}, Flower needs an ECDSA key",
            hint="make the node key with `edgefl agent enroll` (ECDSA P-384)",
        )
    return line


def get_enrollment(engine: Engine, device_id: str) -> EnrollmentInfo | None:
    """The enrollment of one device, or ``None``.

    Raises:
        ConfigError: The registry cannot be read.
    """
    try:
        with session_factory(engine)() as session:
            row = session.get(Enrollment, device_id)
            return _info(row) if row is not None else None
    except SQLAlchemyError as exc:
        raise _registry_error(engine, exc) from exc


def admit(
    request: EnrollmentRequest,
    *,
    ca: FleetCA,
    admin: FlowerAdmin,
    engine: Engine,
    superlink_address: str | None = None,
    readmit: bool = False,
    cert_days: int = 365,
    app_signing_keys: Sequence[str] = (),
    release_signing_keys: Sequence[str] = (),
) -> EnrollmentBundle:
    """Admit a device: sign its CSR, register its node key, record both (see module doc).

    Args:
        request: The device's request (already validated as a document).
        ca: The fleet CA.
        admin: ``flwr`` access to the SuperLink.
        engine: The registry (migrated).
        superlink_address: ``host:port`` devices dial, written into the bundle.
        readmit: Admit a device whose enrollment was revoked, with the keys of this
            request (its old certificate stays revoked, its old node unregistered).
        cert_days: Validity of the device certificate.
        app_signing_keys: The fleet's app-signing public keys (OpenSSH lines,
            :func:`edgefl.server.fl.app_signing.app_signing_public_keys`), written into
            the bundle for the device to pin.
        release_signing_keys: The fleet's trusted release-signing public keys (PEM,
            :func:`edgefl.server.release_keys.trusted_public_keys`), pinned likewise.

    Returns:
        The bundle to hand back to the device.

    Raises:
        BadInputError: Unusable CSR or node key, CSR CN not the device id
            (:class:`AlreadyEnrolledError`, :class:`RevokedDeviceError` for a device
            already admitted or revoked).
        FlowerCommandError: The SuperLink refused the node key (the certificate was
            revoked again).
        ConfigError: The registry cannot be used (nothing stays admitted).
    """
    device_id = request.device_id
    check_not_reserved(device_id)
    csr = _parse_csr(request)
    node_key = _node_key_line(request)
    existing = get_enrollment(engine, device_id)
    if existing is not None and existing.status == "admitted":
        raise AlreadyEnrolledError(
            f"device {device_id!r} is already admitted (node {existing.node_id}, "
            f"certificate serial {existing.cert_serial})",
            hint=f"to give it new keys, run `edgefl server revoke {device_id}`, make new keys "
            "on the device (`edgefl agent enroll --force`) and run "
            "`edgefl server admit REQUEST --readmit`",
        )
    if existing is not None and not readmit:
        raise RevokedDeviceError(
            f"device {device_id!r} was revoked"
            + (f" ({existing.revoke_reason})" if existing.revoke_reason else "")
            + " and is not admitted again silently",
            hint="if it may come back, make new keys on it (`edgefl agent enroll --force`) "
            "and run `edgefl server admit REQUEST --readmit`",
        )
    if existing is not None and existing.node_public_key == node_key:
        raise ReusedKeyError(
            f"device {device_id!r}: this request carries the node key that was revoked",
            hint="make new keys on the device with `edgefl agent enroll --force`",
        )
    _refuse_reused_keys(device_id, csr, node_key, ca=ca, engine=engine)

    issued = ca.issue_device_cert(device_id, csr=csr, days=cert_days, node_key=node_key)
    serial_hex = f"{issued.serial:x}"
    try:
        with tempfile.TemporaryDirectory(prefix="edgefl-admit-") as tmp:
            key_path = Path(tmp) / f"{device_id}.pub"
            key_path.write_text(node_key + "\n", encoding="ascii")
            node_id = admin.register_node(key_path, name=device_id)
    except BaseException as exc:
        _compensate(ca, issued.serial, None, None, device_id, exc)
        raise
    node_id_text = str(node_id)
    try:
        with session_factory(engine).begin() as session:
            row = session.get(Enrollment, device_id)
            if row is None:
                row = Enrollment(device_id=device_id)
                session.add(row)
            elif row.status == "admitted":
                # Admitted by someone else meanwhile.
                raise AlreadyEnrolledError(
                    f"device {device_id!r} was admitted concurrently",
                    hint="check `edgefl server enrollments`",
                )
            row.fleet = request.fleet
            row.status = "admitted"
            row.cert_serial = serial_hex
            row.cert_pem = issued.cert_pem.decode("ascii")
            row.node_public_key = node_key
            row.node_id = node_id_text
            row.admitted_at = datetime.now(UTC)
            row.revoked_at = None
            row.revoke_reason = ""
    except BaseException as exc:
        _compensate(ca, issued.serial, admin, node_id, device_id, exc)
        if isinstance(exc, SQLAlchemyError):
            raise _registry_error(engine, exc) from exc
        raise
    log.info("admitted %r: certificate serial %s, node %s", device_id, serial_hex, node_id_text)
    return EnrollmentBundle(
        device_id=device_id,
        fleet=request.fleet,
        cert_pem=issued.cert_pem.decode("ascii"),
        ca_pem=ca.cert_pem.decode("ascii"),
        cert_serial=serial_hex,
        node_id=node_id_text,
        superlink=superlink_address,
        app_signing_keys=list(app_signing_keys),
        release_signing_keys=list(release_signing_keys),
    )


def _compensate(
    ca: FleetCA,
    serial: int,
    admin: FlowerAdmin | None,
    node_id: int | None,
    device_id: str,
    cause: BaseException,
) -> None:
    """Undo a half-done admission; failures are logged (the cause is what gets raised)."""
    log.error("admitting %r failed (%s); undoing what was done", device_id, cause)
    if admin is not None and node_id is not None:
        try:
            admin.unregister_node(node_id)
        except EdgeflError as exc:
            log.error(
                "could not unregister node %d of %r: %s; run `edgefl server revoke %s`",
                node_id,
                device_id,
                exc,
                device_id,
            )
    try:
        # Voided: the certificate never served, so the same request may be retried.
        ca.revoke(serial, void=True)
    except (EdgeflError, OSError) as exc:
        log.error("could not revoke certificate serial %x of %r: %s", serial, device_id, exc)


def _refuse_reused_keys(
    device_id: str,
    csr: x509.CertificateSigningRequest,
    node_key: str | None,
    *,
    ca: FleetCA,
    engine: Engine,
) -> None:
    """Refuse keys that an earlier certificate or enrollment (of any device) carried.

    ``node_key`` ``None`` checks the TLS key alone (a renewal with a new TLS key).

    Two sources, so nothing issued before the CA kept key fingerprints slips through:
    the CA's ``state.json`` history and every ``enrollments`` row (its current
    certificate and node key).

    Raises:
        ReusedKeyError: Naming which key, where it was used and what to do.
        ConfigError: The registry cannot be read.
    """
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return  # issue_device_cert refuses it with its own reason
    hint = (
        "a device comes back only with new keys: run `edgefl agent enroll --force` on it "
        "and admit the new request"
    )
    for use in ca.key_history(public_key=public_key):
        raise ReusedKeyError(
            f"device {device_id!r}: the TLS key of this request was used before by "
            f"certificate serial {use.serial:x} of {use.cn!r}"
            + (" (revoked)" if use.revoked else ""),
            hint=hint,
        )
    for use in ca.key_history(node_key=node_key) if node_key else []:
        raise ReusedKeyError(
            f"device {device_id!r}: the node key of this request was enrolled before with "
            f"certificate serial {use.serial:x} of {use.cn!r}"
            + (" (revoked)" if use.revoked else ""),
            hint=hint,
        )
    wanted = public_key_fingerprint(public_key)
    for row in list_enrollments(engine):
        if node_key and row.node_public_key.split()[:2] == node_key.split()[:2]:
            raise ReusedKeyError(
                f"device {device_id!r}: the node key of this request is the one of the "
                f"enrollment of {row.device_id!r} ({row.status})",
                hint=hint,
            )
        if _cert_key_fingerprint(row.cert_pem) == wanted:
            raise ReusedKeyError(
                f"device {device_id!r}: the TLS key of this request is the one of the "
                f"certificate serial {row.cert_serial} of {row.device_id!r} ({row.status})",
                hint=hint,
            )


def _cert_key_fingerprint(cert_pem: str) -> str | None:
    try:
        key = x509.load_pem_x509_certificate(cert_pem.encode("ascii")).public_key()
    except (ValueError, UnicodeEncodeError):
        return None
    return public_key_fingerprint(key) if isinstance(key, ec.EllipticCurvePublicKey) else None


def _unregister(admin: FlowerAdmin, node_id: int) -> bool:
    """Unregister ``node_id``; True if it was registered. Already gone counts as done."""
    try:
        admin.unregister_node(node_id)
        return True
    except FlowerCommandError:
        # Flower answers "Node ID not found" for a node unregistered before: check that
        # this is the case rather than some other failure.
        nodes = {n.node_id: n for n in admin.list_nodes()}
        node = nodes.get(node_id)
        if node is None or node.status == "unregistered":
            return False
        raise


def revoke(
    device_id: str,
    reason: str = "",
    *,
    ca: FleetCA,
    admin: FlowerAdmin,
    engine: Engine,
) -> RevokeResult:
    """Revoke a device: certificate, then SuperLink node, then registry row (see module doc).

    Args:
        device_id: The device to revoke.
        reason: Why (stored in the registry).
        ca: The fleet CA that issued its certificate.
        admin: ``flwr`` access to the SuperLink.
        engine: The registry.

    Returns:
        What was done. Revoking an already revoked device re-checks every step.

    Raises:
        NotEnrolledError: No enrollment of that device.
        BadInputError: The certificate was not issued by this CA.
        FlowerCommandError: The SuperLink could not be reached (run it again).
        ConfigError: The registry cannot be used (run it again).
    """
    current = get_enrollment(engine, device_id)
    if current is None:
        raise NotEnrolledError(
            f"no enrollment of device {device_id!r}",
            hint="`edgefl server enrollments` lists the enrolled devices",
        )
    ca.revoke(int(current.cert_serial, 16))
    # A renewed device may still hold its previous, unexpired certificate too.
    for serial in ca.device_serials(device_id):
        ca.revoke(serial)
    was_registered = _unregister(admin, int(current.node_id))
    already = current.status == "revoked"
    try:
        with session_factory(engine).begin() as session:
            row = session.get(Enrollment, device_id)
            if row is None:  # pragma: no cover - deleted meanwhile by hand
                raise NotEnrolledError(f"enrollment of {device_id!r} disappeared")
            if row.status != "revoked":
                row.status = "revoked"
                row.revoked_at = datetime.now(UTC)
                row.revoke_reason = reason
            info = _info(row)
    except SQLAlchemyError as exc:
        raise _registry_error(engine, exc) from exc
    log.warning(
        "revoked %r: certificate serial %s, node %s (%s)",
        device_id,
        current.cert_serial,
        current.node_id,
        reason or "no reason given",
    )
    return RevokeResult(info, already_revoked=already, node_was_registered=was_registered)


def list_enrollments(engine: Engine, *, status: str | None = None) -> list[EnrollmentInfo]:
    """Every enrollment by device id, optionally only those with ``status``.

    Raises:
        ConfigError: The registry cannot be read.
    """
    query = select(Enrollment).order_by(Enrollment.device_id)
    if status is not None:
        query = query.where(Enrollment.status == status)
    try:
        with session_factory(engine)() as session:
            return [_info(row) for row in session.scalars(query)]
    except SQLAlchemyError as exc:
        raise _registry_error(engine, exc) from exc


def is_admitted(engine: Engine, device_id: str) -> bool:
    """Whether ``device_id`` is currently admitted.

    Raises:
        ConfigError: The registry cannot be read.
    """
    info = get_enrollment(engine, device_id)
    return info is not None and info.status == "admitted"


def enrolled_nodes(engine: Engine) -> dict[str, str]:
    """Node id (decimal string) -> device id of every admitted device.

    Raises:
        ConfigError: The registry cannot be read.
    """
    return {e.node_id: e.device_id for e in list_enrollments(engine, status="admitted")}


def admitted_fleets(engine: Engine) -> dict[str, str]:
    """Device id -> enrolled fleet of every admitted device (the broker ACL's devices).

    Reads two columns only: the running server calls it every poll.

    Raises:
        ConfigError: The registry cannot be read.
    """
    query = select(Enrollment.device_id, Enrollment.fleet).where(Enrollment.status == "admitted")
    try:
        with engine.connect() as conn:
            return {str(device): str(fleet) for device, fleet in conn.execute(query)}
    except SQLAlchemyError as exc:
        raise _registry_error(engine, exc) from exc


def renew_device_cert(
    fleet: str,
    device_id: str,
    csr_pem: str,
    *,
    ca: FleetCA,
    engine: Engine,
    cert_days: float = 365,
    reissue_after: timedelta = timedelta(minutes=5),
) -> EnrollmentInfo:
    """Issue a new certificate to an admitted device that asked over its own identity.

    The caller (:mod:`edgefl.server.cert_renewal`) read the request on
    ``edgefl/{fleet}/{device_id}/cert/request``, a topic the broker's ACL lets only the
    certificate with CN ``device_id`` write, so the topic names the requester. Here the
    request must also agree with the registry: the device is admitted, in that fleet, the
    CSR's CN is the device id, and its key is the device's current TLS key (renewal) or a
    key no certificate ever carried (rotation). The enrollment row then holds the new
    certificate, so a later :func:`revoke` revokes it (and any older one still valid).

    A request for the same key that a new certificate would extend by less than
    ``reissue_after`` (it was just renewed) gets the current certificate again instead of
    a new one: a device whose answer was lost retries, and a device that floods requests
    cannot make the CA sign without bound.

    Args:
        fleet: The fleet in the request's topic.
        device_id: The device in the request's topic.
        csr_pem: The CSR, PEM.
        ca: The fleet CA.
        engine: The registry.
        cert_days: Validity of the new certificate.
        reissue_after: See above.

    Returns:
        The enrollment after the renewal (``cert_pem`` is the certificate to install).

    Raises:
        NotEnrolledError: No enrollment of that device.
        RevokedDeviceError: The device is revoked, or the fleet differs.
        ReusedKeyError: The CSR's key is neither the current one nor new.
        BadInputError: The CSR is unreadable, its CN differs or its signature is bad.
        ConfigError: The registry cannot be used.
    """
    current = get_enrollment(engine, device_id)
    if current is None:
        raise NotEnrolledError(f"certificate renewal: no enrollment of {device_id!r}")
    if current.status != "admitted":
        raise RevokedDeviceError(f"certificate renewal: {device_id!r} is {current.status}")
    if current.fleet != fleet:
        raise RevokedDeviceError(
            f"certificate renewal: {device_id!r} is enrolled in fleet {current.fleet!r}, "
            f"the request came on fleet {fleet!r}"
        )
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise BadInputError(f"certificate renewal of {device_id!r}: not a PEM CSR") from exc
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise BadInputError(f"certificate renewal of {device_id!r}: not an EC key")
    current_cert = x509.load_pem_x509_certificate(current.cert_pem.encode("ascii"))
    same_key = _cert_key_fingerprint(current.cert_pem) == public_key_fingerprint(public_key)
    best = min(datetime.now(UTC) + timedelta(days=cert_days), ca.cert.not_valid_after_utc)
    if same_key and current_cert.not_valid_after_utc >= best - reissue_after:
        log.info("certificate renewal of %r repeated: the current certificate again", device_id)
        return current
    if not same_key:
        _refuse_reused_keys(device_id, csr, None, ca=ca, engine=engine)
    issued = ca.issue_device_cert(
        device_id, csr=csr, days=cert_days, node_key=current.node_public_key
    )
    try:
        with session_factory(engine).begin() as session:
            row = session.get(Enrollment, device_id)
            if row is None or row.status != "admitted":
                raise RevokedDeviceError(f"{device_id!r} was revoked during its renewal")
            row.cert_serial = f"{issued.serial:x}"
            row.cert_pem = issued.cert_pem.decode("ascii")
            info = _info(row)
    except BaseException as exc:
        with contextlib.suppress(EdgeflError, OSError):
            ca.revoke(issued.serial, void=True)
        if isinstance(exc, SQLAlchemyError):
            raise _registry_error(engine, exc) from exc
        raise
    log.info(
        "renewed the certificate of %r: serial %x until %s",
        device_id,
        issued.serial,
        issued.certificate.not_valid_after_utc.isoformat(timespec="seconds"),
    )
    return info
