"""Enrollment operations: ``admit`` and ``revoke`` (role admin), ``enrollments`` (viewer).

``admit`` takes the enrollment request document itself (the JSON `edgefl agent enroll`
wrote) and returns the bundle document, so it works the same through the admin API: the
CLI reads the request file and writes the bundle file on the caller's side.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from edgefl.server.ops import InvalidError, NotFoundError, OpContext, Params, operation

__all__: list[str] = []


class AdmitParams(Params):
    request: dict[str, Any] = Field(description="The enrollment request document (JSON).")
    readmit: bool = Field(False, description="Admit a revoked device again (with new keys).")


def _admit_target(params: AdmitParams) -> str:
    device = params.request.get("device_id")
    return device if isinstance(device, str) else ""


@operation(
    "admit",
    role="admin",
    params=AdmitParams,
    summary="Admit a device: sign its CSR, register its node key; returns its bundle.",
    mutating=True,
    target=_admit_target,
)
def admit(ctx: OpContext, params: AdmitParams) -> dict[str, Any]:
    """Admit the device of the request; return its bundle.

    Returns ``{"summary": {device_id, fleet, node_id, cert_serial, superlink,
    app_signing_keys, release_signing_keys}, "bundle": <the bundle document>}``.

    Raises:
        InvalidError: The request document does not validate (nothing is admitted).
        BadInputError: Already enrolled, revoked without ``readmit``, reused keys ...
    """
    from edgefl.config import format_validation_error
    from edgefl.enrollment import EnrollmentRequest
    from edgefl.server.enrollment import admit as admit_device
    from edgefl.server.fl.app_signing import app_signing_public_keys
    from edgefl.server.release_keys import trusted_public_keys

    try:
        req = EnrollmentRequest.model_validate(params.request)
    except ValidationError as exc:
        raise InvalidError(
            format_validation_error(exc, "enrollment request"),
            hint="pass the file `edgefl agent enroll` wrote",
        ) from exc
    admin = ctx.admin()
    bundle = admit_device(
        req,
        ca=admin.ca,
        admin=admin.admin,
        engine=admin.engine,
        superlink_address=admin.superlink_address,
        readmit=params.readmit,
        # Read before admitting: an unreadable key fails with nothing admitted.
        app_signing_keys=app_signing_public_keys(admin.config.resolved_state_dir),
        release_signing_keys=trusted_public_keys(admin.config.resolved_ca_dir),
    )
    return {
        "summary": {
            "device_id": bundle.device_id,
            "fleet": bundle.fleet,
            "node_id": bundle.node_id,
            "cert_serial": bundle.cert_serial,
            "superlink": bundle.superlink,
            "app_signing_keys": len(bundle.app_signing_keys),
            "release_signing_keys": len(bundle.release_signing_keys),
        },
        "bundle": bundle.model_dump(mode="json"),
    }


class RevokeParams(Params):
    device: str = Field(min_length=1, max_length=64, description="The device id to revoke.")
    reason: str = Field("", max_length=1000, description="Why (kept in the registry).")


@operation(
    "revoke",
    role="admin",
    params=RevokeParams,
    summary="Revoke a device: its certificate (CRL), its SuperLink node, its registry row.",
    mutating=True,
    target=lambda p: p.device,
)
def revoke(ctx: OpContext, params: RevokeParams) -> dict[str, Any]:
    """Revoke the device; return what was done.

    Returns the enrollment row after revoking, ``already_revoked``,
    ``node_was_registered``, ``crl`` (the CRL's path on the server).

    Raises:
        NotFoundError: The device was never enrolled.
    """
    from edgefl.server.enrollment import NotEnrolledError
    from edgefl.server.enrollment import revoke as revoke_device

    admin = ctx.admin()
    try:
        result = revoke_device(
            params.device, params.reason, ca=admin.ca, admin=admin.admin, engine=admin.engine
        )
    except NotEnrolledError as exc:
        raise NotFoundError(str(exc), hint=exc.hint) from exc
    return {
        **result.enrollment.to_dict(),
        "already_revoked": result.already_revoked,
        "node_was_registered": result.node_was_registered,
        "crl": str(admin.ca.crl_path),
    }


class EnrollmentsParams(Params):
    status: str | None = Field(None, description="Only this status (admitted, revoked).")


@operation(
    "enrollments",
    role="viewer",
    params=EnrollmentsParams,
    summary="List enrolled devices: status, node id, certificate serial, SuperLink view.",
)
def enrollments(ctx: OpContext, params: EnrollmentsParams) -> dict[str, Any]:
    """Every enrollment (``{"enrollments": [...]}``).

    ``superlink_status`` is the node's status on the SuperLink, or ``unknown`` when it
    cannot be asked.
    """
    from edgefl.errors import ServiceUnavailableError
    from edgefl.server.enrollment import list_enrollments

    admin = ctx.admin(need_superlink=False)
    rows: list[dict[str, Any]] = [
        dict(e.to_dict()) for e in list_enrollments(admin.engine, status=params.status)
    ]
    nodes: dict[str, str] | None
    try:
        nodes = {str(n.node_id): n.status for n in admin.admin.list_nodes()} if rows else {}
    except ServiceUnavailableError:
        nodes = None
    for row in rows:
        row["superlink_status"] = (
            "unknown" if nodes is None else nodes.get(str(row["node_id"]), "absent")
        )
    return {"enrollments": rows}
