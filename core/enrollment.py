"""The enrollment contract between a device and the server (both sides import it).

Enrollment joins a device's three identities under one device id:

1. ``edgefl agent enroll`` makes, on the device, a TLS key with a certificate signing
   request (CN = device id) and a Flower node key (ECDSA P-384, OpenSSH format, what
   ``flower-supernode --auth-supernode-private-key`` reads). It writes an
   :class:`EnrollmentRequest`; private keys never leave the device.
2. ``edgefl server admit REQUEST`` signs the CSR with the fleet CA (the device's MQTT
   and gRPC client certificate), registers the node public key with the SuperLink
   (``flwr supernode register``), records both under the device id in the registry and
   writes an :class:`EnrollmentBundle`.
3. ``edgefl agent enroll --install BUNDLE`` checks the bundle against the device's own
   keys and installs the certificate, the CA certificate and the fleet's app-signing
   and release-signing public keys (pinned: the device's app gate and model manager
   trust them whatever its config says).

On the device everything lives in ``<state_dir>/identity/`` (:class:`IdentityPaths`).

Renewal: certificates are valid for a year. Before its certificate expires, the agent
publishes a :class:`RenewalRequest` (a CSR for its current key) on
:func:`renewal_request_topic` over its current mutual-TLS connection; the server's
certificate service answers with the fleet command :data:`INSTALL_CERT_COMMAND` carrying
the new certificate, which the agent checks, installs atomically and reconnects with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, ValidationError, field_validator

from edgefl.appsign import PINNED_KEYS_FILE, load_public_key
from edgefl.config import StrictModel, format_validation_error
from edgefl.errors import BadInputError
from edgefl.files import write_text_atomic
from edgefl.proto.ids import ID_REGEX
from edgefl.proto.topics import cert_request_topic
from edgefl.releasesign import PINNED_KEYS_FILE as RELEASE_KEYS_FILE

__all__ = [
    "IDENTITY_DIR",
    "INSTALL_CERT_COMMAND",
    "SERVICE_ID_PREFIX",
    "EnrollmentBundle",
    "EnrollmentRequest",
    "IdentityPaths",
    "RenewalRequest",
    "read_bundle",
    "read_request",
    "refuse_service_id",
    "renewal_request_topic",
    "write_json_document",
]

IDENTITY_DIR = "identity"
_DocT = TypeVar("_DocT", bound=StrictModel)

SERVICE_ID_PREFIX = "edgefl-"
"""Certificate CNs starting with this (any case) belong to the cloud services and operators.

The broker takes a certificate's CN as MQTT username and client id, and the ACL grants
each service CN its own topics, so a device enrolled as ``edgefl-ingest`` would be the
ingest: no device id may start with it.
"""


def refuse_service_id(device_id: str) -> str:
    """Refuse a device id in the service namespace (:data:`SERVICE_ID_PREFIX`).

    Raises:
        BadInputError: The id starts with ``edgefl-`` (any case).
    """
    if device_id.lower().startswith(SERVICE_ID_PREFIX):
        raise BadInputError(
            f"device id {device_id!r} is reserved: names starting with {SERVICE_ID_PREFIX!r} "
            "belong to the cloud services and operators",
            hint="choose another device id",
        )
    return device_id


INSTALL_CERT_COMMAND = "install-cert"
"""The fleet command that carries a renewed certificate to the device."""


def renewal_request_topic(fleet: str, device_id: str) -> str:
    """Where a device publishes its :class:`RenewalRequest` (QoS 1, not retained)."""
    return cert_request_topic(fleet, device_id)


class EnrollmentRequest(StrictModel):
    """What a device hands to the administrator (public material only)."""

    kind: Literal["edgefl-enrollment-request"] = "edgefl-enrollment-request"
    version: Literal[1] = 1
    device_id: str = Field(pattern=ID_REGEX)
    fleet: str = Field(pattern=ID_REGEX)
    csr_pem: str = Field(description="PEM CSR of the device's TLS key, subject CN = device_id.")
    node_public_key: str = Field(
        description="The Flower node public key, one OpenSSH line (ecdsa-sha2-nistp384 ...)."
    )

    @field_validator("device_id")
    @classmethod
    def _not_a_service(cls, value: str) -> str:
        try:
            return refuse_service_id(value)
        except BadInputError as exc:
            raise ValueError(exc.message) from exc


class EnrollmentBundle(StrictModel):
    """What the server hands back to an admitted device."""

    kind: Literal["edgefl-enrollment-bundle"] = "edgefl-enrollment-bundle"
    version: Literal[1] = 1
    device_id: str = Field(pattern=ID_REGEX)
    fleet: str = Field(pattern=ID_REGEX)
    cert_pem: str = Field(description="The device certificate the fleet CA issued.")
    ca_pem: str = Field(description="The fleet CA certificate (MQTT broker, gRPC, SuperLink).")
    cert_serial: str = Field(description="Serial of cert_pem, hexadecimal.")
    node_id: str = Field(description="The SuperLink's node id for the node key (decimal).")
    superlink: str | None = Field(None, description="host:port of the SuperLink, if known.")
    app_signing_keys: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="The fleet's app-signing public keys (OpenSSH lines), if it has any: "
        "the device pins them and runs app bundles they signed (edgefl.appsign).",
    )

    release_signing_keys: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="The fleet's release-signing public keys (PEM), if it has any: the "
        "device pins them and runs only models and desired states they signed "
        "(edgefl.releasesign).",
    )

    @field_validator("app_signing_keys")
    @classmethod
    def _signing_keys(cls, value: list[str]) -> list[str]:
        lines = []
        for line in value:
            if "\n" in line.strip() or len(line) > 512:
                raise ValueError("each app-signing key is one OpenSSH line")
            load_public_key(line)  # ValueError: not an Ed25519 key
            lines.append(line.strip())
        return lines

    @field_validator("release_signing_keys")
    @classmethod
    def _release_keys(cls, value: list[str]) -> list[str]:
        pems = []
        for pem in value:
            if len(pem) > 1024 or not pem.strip().startswith("-----BEGIN PUBLIC KEY-----"):
                raise ValueError("each release-signing key is one PEM public key")
            load_public_key(pem)  # ValueError: not an Ed25519 key
            pems.append(pem.strip() + "\n")
        return pems


class RenewalRequest(StrictModel):
    """What a device publishes on :func:`renewal_request_topic` to renew its certificate."""

    kind: Literal["edgefl-cert-request"] = "edgefl-cert-request"
    version: Literal[1] = 1
    request_id: str = Field(pattern=ID_REGEX, description="Echoed back in the install command.")
    csr_pem: str = Field(max_length=8192, description="PEM CSR, subject CN = device id.")


class IdentityPaths:
    """Where a device keeps its identity: ``<state_dir>/identity/``."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = Path(state_dir) / IDENTITY_DIR
        self.tls_key = self.directory / "device.key"
        """TLS private key, PKCS#8 PEM, mode 0600."""
        self.csr = self.directory / "device.csr"
        self.cert = self.directory / "device.pem"
        """The certificate, once the bundle is installed."""
        self.ca = self.directory / "ca.pem"
        self.node_key = self.directory / "node.key"
        """Flower node private key, OpenSSH PEM, mode 0600."""
        self.node_public_key = self.directory / "node.pub"
        self.request = self.directory / "enroll-request.json"
        self.bundle = self.directory / "enrollment.json"
        """The installed bundle (node id, serial)."""
        self.app_signing_keys = self.directory / PINNED_KEYS_FILE
        """The fleet's app-signing public keys from the bundle (absent: it had none)."""
        self.release_signing_keys = self.directory / RELEASE_KEYS_FILE
        """The fleet's release-signing public keys from the bundle, PEM blocks (absent: none)."""


def _read_document(model: type[_DocT], path: Path, what: str) -> _DocT:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInputError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(
            f"{path} is not a JSON {what}: {exc}", hint=f"pass the file `{what}` wrote"
        ) from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadInputError(format_validation_error(exc, str(path))) from exc


def read_request(path: Path) -> EnrollmentRequest:
    """Read and validate an enrollment request.

    Raises:
        BadInputError: Unreadable, not JSON, or not a valid request.
    """
    return _read_document(EnrollmentRequest, path, "enrollment request")


def read_bundle(path: Path) -> EnrollmentBundle:
    """Read and validate an enrollment bundle.

    Raises:
        BadInputError: Unreadable, not JSON, or not a valid bundle.
    """
    return _read_document(EnrollmentBundle, path, "enrollment bundle")


def write_json_document(path: Path, document: StrictModel) -> None:
    """Write a request or bundle atomically (pretty JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(document.model_dump(mode="json"), indent=2) + "\n")
