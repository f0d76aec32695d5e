"""How an ``edgefl server`` admin command runs its operation: here, or on a remote server.

A command module parses its flags, then calls :func:`run_op` with the operation's name
(:mod:`edgefl.server.ops`) and its arguments as JSON-ready values, and renders what comes
back (a rich table, or the value itself with ``--json``). :func:`run_op` decides where it
runs:

- with ``--server URL`` (or ``EDGEFL_SERVER``, or a client config file naming a server):
  through the admin API, authenticated by an admin certificate or an API token
  (:mod:`edgefl.server.admin_client`);
- otherwise locally, against the server's files and registry (``-c server.yaml``), as the
  host's user, who is an admin (they hold the server's keys anyway).

Either way the same operation definition checks the role, validates the arguments and
writes the audit log, so local and remote use cannot differ.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, ParamSpec, TypeVar

import typer

__all__ = [
    "DEFAULT_CLIENT_CONFIG",
    "AdminCaOption",
    "AdminCertOption",
    "AdminKeyOption",
    "AdminServerOption",
    "AdminTokenOption",
    "ClientConfigOption",
    "RemoteOptions",
    "read_client_config",
    "remote_options",
    "run_op",
]

DEFAULT_CLIENT_CONFIG: Final = Path("~/.config/edgefl/admin.yaml")
"""The client config file read when present and no other is named."""

_PANEL = "Remote"

AdminServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="Admin API of a remote server (https://HOST:PORT); authenticate with "
        "--admin-cert/--admin-key or --token, or a client config file (--client-config). "
        "(default: EDGEFL_SERVER, else this host's server files)",
        rich_help_panel=_PANEL,
    ),
]
ClientConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--client-config",
        help="Admin client config (YAML: server, ca_file, cert_file, key_file, token or "
        f"token_file). (default: {DEFAULT_CLIENT_CONFIG} when it exists)",
        rich_help_panel=_PANEL,
    ),
]
AdminCertOption = Annotated[
    Path | None,
    typer.Option("--admin-cert", help="Admin client certificate (PEM).", rich_help_panel=_PANEL),
]
AdminKeyOption = Annotated[
    Path | None,
    typer.Option("--admin-key", help="Its private key (PEM).", rich_help_panel=_PANEL),
]
AdminCaOption = Annotated[
    Path | None,
    typer.Option(
        "--admin-ca",
        help="CA file the server's certificate is checked against (the ca.pem next to the "
        "admin certificate).",
        rich_help_panel=_PANEL,
    ),
]
AdminTokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="API token (efl_...) instead of a certificate; prefer EDGEFL_ADMIN_TOKEN, "
        "which other users cannot read in the process list.",
        rich_help_panel=_PANEL,
        show_default=False,
    ),
]


def read_client_config(path: Path) -> dict[str, Any]:
    """Read an admin client config file.

    Its keys: ``server``, ``ca_file``, ``cert_file``, ``key_file``, ``token`` or
    ``token_file`` (relative paths are relative to the file's folder).

    Raises:
        ConfigError: The file is missing, unparsable, or has other keys.
    """
    from edgefl.config import read_config_data
    from edgefl.errors import ConfigError

    data = read_config_data(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the admin client config must be a mapping")
    known = {"server", "ca_file", "cert_file", "key_file", "token", "token_file"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}",
            hint=f"the admin client config takes {', '.join(sorted(known))}",
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {key} must be a string")
        if key.endswith("_file"):
            file = Path(value).expanduser()
            out[key] = file if file.is_absolute() else path.parent / file
        else:
            out[key] = value
    token_file = out.pop("token_file", None)
    if token_file is not None and "token" not in out:
        try:
            out["token"] = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read token_file {token_file}: {exc}") from exc
    return out


class RemoteOptions:
    """Where and how to reach a remote admin API.

    Each setting comes from the first that gives it: the flag, the environment
    (``EDGEFL_SERVER``, ``EDGEFL_ADMIN_TOKEN``), the client config file (``--client-config``,
    else :data:`DEFAULT_CLIENT_CONFIG` when it exists).

    Raises:
        ConfigError: The client config file is unreadable or invalid.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        client_config: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        ca: Path | None = None,
        token: str | None = None,
    ) -> None:
        file: dict[str, Any] = {}
        named = client_config
        if named is None and DEFAULT_CLIENT_CONFIG.expanduser().is_file():
            named = DEFAULT_CLIENT_CONFIG.expanduser()
        if named is not None:
            file = read_client_config(named)
        self.client_config = named
        self.server: str | None = server or os.environ.get("EDGEFL_SERVER") or file.get("server")
        self.cert: Path | None = cert or file.get("cert_file")
        self.key: Path | None = key or file.get("key_file")
        self.ca: Path | None = ca or file.get("ca_file")
        self.token: str | None = (
            token or os.environ.get("EDGEFL_ADMIN_TOKEN") or file.get("token") or None
        )
        self._explicit = client_config is not None

    @property
    def remote(self) -> bool:
        """Whether the command goes to a remote admin API (a server is named)."""
        return bool(self.server) or self._explicit


P = ParamSpec("P")
R = TypeVar("R")

_REMOTE_PARAMS: Final = (
    ("server", AdminServerOption),
    ("client_config", ClientConfigOption),
    ("admin_cert", AdminCertOption),
    ("admin_key", AdminKeyOption),
    ("admin_ca", AdminCaOption),
    ("token", AdminTokenOption),
)


def remote_options(func: Callable[P, R]) -> Callable[..., R]:
    """Give a typer command the remote flags, and its ``remote`` parameter their value.

    The decorated function declares ``remote: RemoteOptions``; the command gets
    ``--server``, ``--client-config``, ``--admin-cert``, ``--admin-key``, ``--admin-ca`` and
    ``--token`` in its help's Remote panel, and ``remote`` is built from them::

        @app.command()
        @exits_on_error
        @remote_options
        def devices(remote: RemoteOptions, config: ServerConfigOption = None) -> None:
            rows = run_op("devices", {}, config=config, remote=remote)
    """
    signature = inspect.signature(func, eval_str=True)
    if "remote" not in signature.parameters:
        raise TypeError(f"{func.__name__} needs a `remote: RemoteOptions` parameter")
    params = [p for p in signature.parameters.values() if p.name != "remote"]
    taken = {p.name for p in params}
    for name, annotation in _REMOTE_PARAMS:
        if name in taken:
            raise TypeError(f"{func.__name__} already has a parameter named {name!r}")
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
            )
        )

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        remote = RemoteOptions(
            kwargs.pop("server", None),
            client_config=kwargs.pop("client_config", None),
            cert=kwargs.pop("admin_cert", None),
            key=kwargs.pop("admin_key", None),
            ca=kwargs.pop("admin_ca", None),
            token=kwargs.pop("token", None),
        )
        return func(*args, remote=remote, **kwargs)  # type: ignore[arg-type]

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


def run_op(
    name: str,
    arguments: Mapping[str, Any],
    *,
    config: Path | None,
    remote: RemoteOptions | None = None,
) -> Any:
    """Run operation ``name`` locally or remotely (see the module docstring).

    Raises:
        EdgeflError: The operation's refusal or failure (an :class:`~edgefl.server.ops.OpError`
            carries the status), or the remote API could not be reached.
    """
    if remote is not None and remote.remote:
        from edgefl.server.admin_client import invoke_remote

        return invoke_remote(name, arguments, remote)
    from edgefl.server.audit import Principal
    from edgefl.server.ops import OpContext, invoke

    with OpContext(Principal.local(), config_path=config) as ctx:
        return invoke(name, arguments, ctx)
