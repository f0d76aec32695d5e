"""Options the ``edgefl server`` command modules share: the one server config file.

Every command that takes ``-c/--config`` reads the same ``server.yaml``
(:mod:`edgefl.server.config`), so its option is written once, here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from edgefl.server.config import ServerConfig

__all__ = ["RegistryConfigOption", "ServerConfigOption", "server_config"]

ServerConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Server config file (YAML, TOML or JSON), the one `edgefl server start` uses. "
        "(default: built-in defaults, state in ./edgefl-server)",
    ),
]
RegistryConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Server config file (server.yaml; its ingest: section and registry). A bare "
        "ingest config file is still read, with a warning, until the next release. "
        "(default: a local plaintext broker on 1883, SQLite)",
    ),
]


def server_config(config: Path | None) -> ServerConfig:
    """The server config file, or the built-in defaults without one."""
    from edgefl.server.config import read_server_config

    return read_server_config(config)
