"""``edgefl server deploy``: publish the signed desired model for a device or the fleet.

The work (reading the release, signing, publishing retained as ``edgefl-rollout``) is in
:mod:`edgefl.server.rollout`; this module only parses options and prints.
"""

from __future__ import annotations

from typing import Annotated

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error
from edgefl.server.cli_common import (
    ReleasedModelArgument,
    ReleaseVersionArgument,
    ServerConfigOption,
    VariantOption,
)
from edgefl.server.cli_ops import RemoteOptions, remote_options

__all__ = ["app"]

app = typer.Typer()


@app.command()
@exits_on_error
@remote_options
def deploy(
    remote: RemoteOptions,
    model: ReleasedModelArgument,
    version: ReleaseVersionArgument,
    variant: VariantOption = None,
    device: Annotated[
        str | None, typer.Option(help="One admitted device (its fleet from the registry).")
    ] = None,
    fleet: Annotated[
        bool, typer.Option("--fleet", help="Every admitted device, fleet by fleet.")
    ] = False,
    rollback: Annotated[
        bool,
        typer.Option(
            "--rollback", help="Name an older version on purpose: devices downgrade to it."
        ),
    ] = False,
    expires_days: Annotated[
        float, typer.Option(help="Days the desired state stays valid.", min=0.001)
    ] = 30.0,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Sign the desired state naming MODEL VERSION and publish it retained on state/desired.

    Give --device D for one device or --fleet for every admitted device. Devices download
    the artifact from the server's model delivery service and check it before running it.
    """
    from edgefl.errors import BadInputError
    from edgefl.server.cli_fleet import call_op

    if (device is None) == (not fleet):
        raise BadInputError("give exactly one of --device D and --fleet")
    summary = call_op(
        "deploy",
        {
            "model": model,
            "version": version,
            "variant": variant,
            "device": device,
            "fleet": fleet,
            "rollback": rollback,
            "expires_days": expires_days,
        },
        config=config,
        remote=remote,
    )
    if as_json:
        emit_json(summary)
        return
    typer.echo(
        f"{'rollback to' if rollback else 'deployed'} {summary['model']} {summary['version']} "
        f"{summary['variant']} (sha256 {str(summary['sha256'])[:12]}…, {summary['size_bytes']} "
        f"bytes), signed by release key {summary['key_id']}, on {len(summary['topics'])} "
        f"device topic(s) ({', '.join(summary['targets'])}); valid until "
        f"{summary['expires_at']} (unix)"
    )
