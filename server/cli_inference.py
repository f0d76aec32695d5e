"""``edgefl server inference``: the gRPC inference service in the foreground.

Its settings are the ``inference:`` section of the server config, then the flags; the
service itself is :mod:`edgefl.server.inference.service`. Apart from the other commands
because its options (every serving knob) are half of what the command line declares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, exits_on_error
from edgefl.server.cli_common import ServerConfigOption, server_config

__all__ = ["app"]

app = typer.Typer()


@app.command()
@exits_on_error
def inference(
    config: ServerConfigOption = None,
    model: Annotated[
        str | None, typer.Option(help="Heavy model to serve. (default: digits)")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on. (default: 127.0.0.1)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port; 0 picks a free one. (default: 0)")] = None,
    weights: Annotated[
        Path | None,
        typer.Option(help="Weights cache folder (trained once if empty). (default: ~/.cache)"),
    ] = None,
    train_epochs: Annotated[
        int | None, typer.Option(help="Epochs if the model must be trained.")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Most samples per forward pass. (default: 32)")
    ] = None,
    max_wait_ms: Annotated[
        float | None, typer.Option(help="Longest wait to fill a batch. (default: 2.0)")
    ] = None,
    no_batching: Annotated[
        bool, typer.Option("--no-batching", help="One request per forward pass.")
    ] = False,
    max_concurrency: Annotated[
        int | None,
        typer.Option(help="In-flight requests before RESOURCE_EXHAUSTED. (default: 256)"),
    ] = None,
    max_samples_per_request: Annotated[
        int | None,
        typer.Option(help="Most samples in one request (INVALID_ARGUMENT past it). (default: 256)"),
    ] = None,
    max_message_bytes: Annotated[
        int | None, typer.Option(help="Largest request/response in bytes. (default: 4 MiB)")
    ] = None,
    torch_threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads. (default: 1)")
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option("--cert", "--tls-cert", help="Server certificate (PEM): tls.cert_file."),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", "--tls-key", help="Server private key (PEM): tls.key_file."),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca",
            "--client-ca",
            help="Require client certificates from this CA (mutual TLS): tls.ca_file.",
        ),
    ] = None,
    crl: Annotated[
        Path | None, typer.Option(help="The client CA's CRL: revoked devices are refused.")
    ] = None,
    registry_url: Annotated[
        str | None, typer.Option(help="Device registry URL: unlisted devices are refused.")
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Serve the heavy model over gRPC (edgefl.v1.Inference + health) until SIGINT/SIGTERM.

    Settings come from the ``inference:`` section of the server config (-c), then the
    flags. Prints the bound address once the model is SERVING (one JSON line with --json).
    (``--tls-cert``, ``--tls-key`` and ``--client-ca`` are the old names of ``--cert``,
    ``--key`` and ``--ca``.)
    """
    import json

    from edgefl.clikit import error_console_print
    from edgefl.config import validate_config
    from edgefl.server.inference.service import InferenceServer, InferenceServerConfig, serve

    base = server_config(config).inference.model_dump(exclude_unset=True)
    flags: dict[str, Any] = {
        "host": host,
        "port": port,
        "model": model,
        "weights": weights,
        "train_epochs": train_epochs,
        "max_batch": 1 if no_batching else max_batch,
        "max_wait_ms": max_wait_ms,
        "max_concurrency": max_concurrency,
        "max_samples_per_request": max_samples_per_request,
        "max_message_bytes": max_message_bytes,
        "crl": crl,
        "registry_url": registry_url,
    }
    base.update({k: v for k, v in flags.items() if v is not None})
    tls = {"cert_file": cert, "key_file": key, "ca_file": ca}
    base["tls"] = {**base.get("tls", {}), **{k: v for k, v in tls.items() if v is not None}}
    settings = validate_config(
        InferenceServerConfig, base, source=f"{config or 'command line'} (inference)"
    )

    def ready(server: InferenceServer) -> None:
        served = server.models[settings.model]
        info = {
            "address": server.address,
            "host": settings.host,
            "port": server.port,
            "model": served.name,
            "version": served.version,
            "heldout_accuracy": served.heldout_accuracy,
            "max_batch": settings.max_batch,
            "max_samples_per_request": settings.max_samples_per_request,
            "tls": settings.tls.cert_file is not None,
            "mutual_tls": settings.tls.ca_file is not None,
        }
        if as_json:
            # One line, so a supervisor can read it with readline() while we keep running.
            typer.echo(json.dumps(info, sort_keys=True))
        else:
            typer.echo(
                f"serving {served.name} version {served.version} on {server.address} "
                f"(held-out accuracy {served.heldout_accuracy:.4f}, "
                f"{'mutual TLS' if info['mutual_tls'] else 'TLS' if info['tls'] else 'plaintext'})"
            )

    serve(
        settings,
        on_ready=ready,
        progress=lambda what, done, total: error_console_print(f"[{done}/{total}] {what}"),
    )
