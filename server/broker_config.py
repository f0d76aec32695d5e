"""Render the mosquitto configuration edgefl ships (``deploy/mosquitto/``).

The template and the ACL live in the repository's ``deploy/mosquitto/`` folder so that
operators can read them; deployments and the broker tests both go through
:func:`render_mosquitto_config` and :func:`render_acl`, so the tests exercise exactly what
is shipped.

:data:`MAX_PAYLOAD_BYTES` is the one payload limit of the fleet, the wire contract's
:data:`~edgefl.proto.serde.MAX_ENVELOPE_BYTES`: the broker's ``message_size_limit``
defaults to it, as does the ingest's ``max_payload_bytes`` (``edgefl server start`` passes
the configured one, which may only be lower).

Devices get no ``pattern`` lines: mosquitto patterns substitute only ``%u`` and ``%c``, so
a pattern cannot say which fleet a device enrolled in. :func:`render_acl` writes one
``user`` block per admitted device instead, from the registry's enrollments, whose topics
carry that device's fleet: a device can publish and subscribe only under
``edgefl/<its fleet>/<its id>/``, and a device that is not admitted, nothing at all.
"""

from __future__ import annotations

import ipaddress
import logging
import string
from collections.abc import Iterable, Mapping
from pathlib import Path

from edgefl.errors import ConfigError
from edgefl.proto.ids import ID_PATTERN, is_id
from edgefl.proto.serde import MAX_ENVELOPE_BYTES
from edgefl.proto.topics import ROOT, device_prefix
from edgefl.resources import deploy_path

__all__ = [
    "DEVICE_READS",
    "DEVICE_WRITES",
    "MAX_PAYLOAD_BYTES",
    "default_acl_path",
    "default_template_path",
    "deploy_dir",
    "device_acl_block",
    "render_acl",
    "render_mosquitto_config",
]

logger = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = MAX_ENVELOPE_BYTES
"""Largest MQTT payload the broker accepts: the wire contract's envelope limit."""

DEVICE_WRITES = (
    "telemetry/#",
    "data/#",
    "result/#",
    "status",
    "cmd-resp/#",
    "state/reported",
    "cert/request",
)
"""What a device may publish, under ``edgefl/<fleet>/<device>/``. Never ``cmd/#`` or
``state/desired``: a device that could write (retained) there could forge its own
commands and desired state."""

DEVICE_READS = ("cmd/#", "state/desired")
"""What a device may receive, under ``edgefl/<fleet>/<device>/`` (a renewed certificate
comes as ``cmd/install-cert``)."""

_OPERATOR_PREFIX = "edgefl-op-"
# The service prefix is no device.
_SERVICE_PREFIX = "edgefl-"


def deploy_dir() -> Path:
    """The shipped ``deploy/mosquitto`` folder (in the wheel: ``edgefl/deploy/mosquitto``).

    Raises:
        ConfigError: The folder is not there (an install without its package data).
    """
    return deploy_path("mosquitto")


def default_template_path() -> Path:
    """The shipped ``edgefl.conf.template``."""
    return deploy_dir() / "edgefl.conf.template"


def default_acl_path() -> Path:
    """The shipped ACL file."""
    return deploy_dir() / "acl"


def device_acl_block(device_id: str, fleet: str) -> str:
    """The ``user`` block of one admitted device: its own subtree in its enrolled fleet.

    Raises:
        ConfigError: The device id or fleet is not an id of the fleet contract
            (:mod:`edgefl.proto.ids`; a device id must not take the ``edgefl-`` service
            prefix).
    """
    # A newline, space or wildcard in a name would add ACL lines or topics of its own.
    if not is_id(device_id) or device_id.startswith(_SERVICE_PREFIX):
        raise ConfigError(f"{device_id!r} is not a device id the ACL can name")
    if not is_id(fleet):
        raise ConfigError(f"{fleet!r} (fleet of {device_id!r}) is not a fleet id ({ID_PATTERN})")
    base = f"{device_prefix(fleet, device_id)}/"
    lines = [f"user {device_id}"]
    lines += [f"topic write {base}{rest}" for rest in DEVICE_WRITES]
    lines += [f"topic read {base}{rest}" for rest in DEVICE_READS]
    return "\n".join(lines) + "\n"


def render_acl(
    operators: Iterable[str] = (),
    *,
    devices: Mapping[str, str] | None = None,
    acl: Path | None = None,
) -> str:
    """The shipped ACL plus one block per admitted device and per operator certificate.

    mosquitto's ACL has no wildcard for user names and its patterns cannot name a fleet,
    so each admitted device (:func:`device_acl_block`) and each operator CN
    (``FleetCA.operator_names()``, reading ``edgefl/#``) gets its own ``user`` block.

    Args:
        operators: Operator CNs (``edgefl-op-<name>``).
        devices: Device id -> enrolled fleet of every admitted device (the registry's
            enrollments); a device not named here may publish and receive nothing.
        acl: The base ACL; the shipped ``deploy/mosquitto/acl`` by default.

    Returns:
        The ACL text for mosquitto's ``acl_file``.

    Raises:
        ConfigError: The base ACL cannot be read, a name is not an operator CN, or a
            device id or fleet is not an id.
    """
    path = acl if acl is not None else default_acl_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read mosquitto ACL {path}: {exc.strerror}") from exc
    blocks = [
        device_acl_block(device_id, fleet) for device_id, fleet in sorted((devices or {}).items())
    ]
    for name in sorted(set(operators)):
        # A newline or space in a name would add ACL lines of its own.
        # An operator CN is an id (at most 64 characters in all) with the operator prefix.
        if not (name.startswith(_OPERATOR_PREFIX) and name != _OPERATOR_PREFIX and is_id(name)):
            raise ConfigError(f"{name!r} is not an operator identity (edgefl-op-NAME)")
        blocks.append(f"user {name}\ntopic read {ROOT}/#\n")
    return text.rstrip("\n") + "\n\n" + "\n".join(blocks) if blocks else text


def _path_value(name: str, value: Path) -> str:
    text = str(value)
    if not Path(text).is_absolute():
        raise ConfigError(f"mosquitto {name} must be an absolute path, got {text!r}")
    _check_token(name, text)
    return text


def _check_token(name: str, text: str) -> None:
    # mosquitto.conf is line based and splits on spaces: a newline would inject options,
    # a space would truncate the value.
    if not text or any(c.isspace() for c in text):
        raise ConfigError(f"mosquitto {name} must be non-empty without whitespace, got {text!r}")


def render_mosquitto_config(
    *,
    port: int,
    cafile: Path,
    certfile: Path,
    keyfile: Path,
    crlfile: Path,
    data_dir: Path,
    acl_file: Path | None = None,
    bind_address: str = "0.0.0.0",
    run_as_user: str | None = None,
    log_dest: str = "stderr",
    template: Path | None = None,
    message_size_limit: int = MAX_PAYLOAD_BYTES,
) -> str:
    """Fill the shipped mosquitto template.

    Args:
        port: TCP port of the mutual-TLS listener (1-65535).
        cafile: The fleet CA certificate (``FleetCA.cert_path``).
        certfile: The broker's server certificate (``FleetCA.issue_server_cert``).
        keyfile: Its private key.
        crlfile: The fleet CRL (``FleetCA.crl_path``); re-read only on broker restart.
        data_dir: Folder for the persistence database.
        acl_file: ACL to use; the shipped ``deploy/mosquitto/acl`` by default.
        bind_address: Address to listen on, e.g. ``127.0.0.1`` in tests.
        run_as_user: Emit ``user NAME``; mosquitto started as root otherwise drops to
            ``mosquitto``, which may not read files owned by the caller.
        log_dest: mosquitto ``log_dest`` value (``stderr``, ``syslog``, ``file /path``).
        template: Template to fill; the shipped one by default.
        message_size_limit: Largest payload accepted (bytes); set it to the ingest's
            ``max_payload_bytes``.

    Returns:
        The configuration text, ready for ``mosquitto -c FILE``.

    Raises:
        ConfigError: A value is out of range, a path is relative or contains whitespace,
            or the template cannot be read or has an unknown field.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"mosquitto port must be 1-65535, got {port!r}")
    try:
        ipaddress.ip_address(bind_address)
    except ValueError as exc:
        raise ConfigError(f"bind_address must be an IP address, got {bind_address!r}") from exc
    if "\n" in log_dest or not log_dest.strip():
        raise ConfigError(f"invalid log_dest {log_dest!r}")
    if run_as_user is not None:
        _check_token("run_as_user", run_as_user)
    if (
        not isinstance(message_size_limit, int)
        or isinstance(message_size_limit, bool)
        or not 0 < message_size_limit <= 268_435_455
    ):
        raise ConfigError(
            f"message_size_limit must be 1-268435455 bytes, got {message_size_limit!r}"
        )
    template_path = template if template is not None else default_template_path()
    try:
        text = template_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read mosquitto template {template_path}: {exc.strerror}"
        ) from exc
    values = {
        "port": str(port),
        "bind_address": bind_address,
        "cafile": _path_value("cafile", cafile),
        "certfile": _path_value("certfile", certfile),
        "keyfile": _path_value("keyfile", keyfile),
        "crlfile": _path_value("crlfile", crlfile),
        "data_dir": _path_value("data_dir", data_dir).rstrip("/") or "/",
        "acl_file": _path_value("acl_file", acl_file if acl_file else default_acl_path()),
        "user_line": f"user {run_as_user}" if run_as_user else "# user: mosquitto's default",
        "log_dest": log_dest,
        "message_size_limit": str(message_size_limit),
    }
    try:
        rendered = string.Template(text).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{template_path}: unknown or malformed field {exc}") from exc
    logger.debug("rendered mosquitto config from %s for port %d", template_path, port)
    return rendered
