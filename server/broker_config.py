"""Render the mosquitto configuration edgefl ships (``deploy/mosquitto/``).

The template and the ACL live in the repository's ``deploy/mosquitto/`` folder so that
operators can read them; deployments and the broker tests both go through
:func:`render_mosquitto_config`, so the tests exercise exactly what is shipped.
"""

from __future__ import annotations

import ipaddress
import logging
import string
from pathlib import Path

from edgefl.errors import ConfigError

__all__ = [
    "default_acl_path",
    "default_template_path",
    "deploy_dir",
    "render_mosquitto_config",
]

logger = logging.getLogger(__name__)


def deploy_dir() -> Path:
    """The ``deploy/mosquitto`` folder of this source tree.

    Raises:
        ConfigError: The folder is not there (a wheel install does not ship ``deploy/``).
    """
    folder = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
    if not folder.is_dir():
        raise ConfigError(
            f"mosquitto templates not found at {folder}",
            hint="pass template= and acl_file= explicitly, or use a source checkout",
        )
    return folder


def default_template_path() -> Path:
    """The shipped ``edgefl.conf.template``."""
    return deploy_dir() / "edgefl.conf.template"


def default_acl_path() -> Path:
    """The shipped ACL file."""
    return deploy_dir() / "acl"


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
    }
    try:
        rendered = string.Template(text).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{template_path}: unknown or malformed field {exc}") from exc
    logger.debug("rendered mosquitto config from %s for port %d", template_path, port)
    return rendered
