"""Options the ``edgefl server`` command modules share: the one server config file.

Every command that takes ``-c/--config`` reads the same ``server.yaml``
(:mod:`edgefl.server.config`), so its option is written once, here; so are the release
arguments (MODEL VERSION, --variant) of the commands that send a release to devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from edgefl.server.config import ServerConfig

__all__ = [
    "RegistryConfigOption",
    "ReleaseVersionArgument",
    "ReleasedModelArgument",
    "ServerConfigOption",
    "VariantOption",
    "server_config",
]

# The release a command acts on (``deploy``, ``rollout``): MODEL VERSION [--variant V].
ReleasedModelArgument = Annotated[str, typer.Argument(help="Released model name.")]
ReleaseVersionArgument = Annotated[int, typer.Argument(help="Release version.", min=1)]
VariantOption = Annotated[
    str | None,
    typer.Option(help="Variant to run (needed when the release has several)."),
]

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
