"""``edgefl server release`` and ``edgefl server releases``: a run's model, signed and verified.

The work is in :mod:`edgefl.server.releases`; this module only parses options and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error
from edgefl.server.cli_common import ServerConfigOption
from edgefl.server.cli_ops import RemoteOptions, remote_options

if TYPE_CHECKING:
    from edgefl.server.config import ServerConfig
    from edgefl.server.releases import ReleaseOutcome

__all__ = ["app"]

app = typer.Typer()

DbUrlOption = Annotated[
    str | None, typer.Option("--db-url", help="Override db_url (SQLAlchemy URL).")
]


def _releases_folder(cfg: ServerConfig) -> Path:
    """The folder the delivery service serves (``models.releases_dir``), made absolute."""
    from edgefl.server.models_service import resolve_settings

    folder = resolve_settings(cfg).releases_dir
    assert folder is not None  # resolve_settings fills it in
    return folder.expanduser().resolve()


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def _result(variant: dict[str, Any]) -> str:
    """A variant's result column: ok, FAILED (verification) or why it was left out."""
    status = variant.get("status")
    if status == "published":
        return "ok"
    if status == "failed":
        return "FAILED"
    if status == "accuracy_drop":
        return f"left out: accuracy_drop ({_fmt(variant.get('accuracy_drop'), '+.2f')} pts)"
    return "verified, not published"


def _print_release(outcome: ReleaseOutcome) -> None:
    from edgefl.clikit import print_table

    privacy = outcome.privacy
    eps = _fmt(privacy["epsilon_max"], ".3g")
    typer.echo(
        f"{outcome.model} version {outcome.version}: {outcome.status.upper()} "
        f"(run {outcome.run_id} round {outcome.round}, plan {outcome.plan_hash}; "
        f"{privacy['mode']} DP, ε max {eps}, δ {_fmt(privacy['delta'], '.0e')}; "
        f"float accuracy {_fmt(outcome.float_accuracy, '.1%')}; "
        f"calibration {outcome.calibration})"
    )
    print_table(
        [
            ("variant", "left"),
            ("size", "right"),
            ("accuracy", "right"),
            ("drop (pts)", "right"),
            ("latency p50 (µs)", "left"),
            ("for (device class / runtime)", "left"),
            ("sha256", "left"),
            ("result", "left"),
        ],
        [
            (
                name,
                v["size_bytes"],
                _fmt(v["accuracy"], ".1%"),
                _fmt(v["accuracy_drop"], "+.2f"),
                ", ".join(f"{k} {_fmt(us, '.0f')}" for k, us in v["latency_us"].items()),
                f"{v['device_class']} / {v['runtime']}",
                v["sha256"][:12] or None,
                _result(v),
            )
            for name, v in outcome.variants.items()
        ],
        title=f"for device class {outcome.device_class}",
    )
    for name, v in outcome.variants.items():
        for reason in v["reasons"]:
            verdict = "left out" if v["status"] == "accuracy_drop" else "failed"
            typer.echo(f"{name} {verdict}: {reason}")
    for note in outcome.notes:
        typer.echo(f"note: {note}")
    if outcome.path:
        typer.echo(f"signed with key {outcome.key_id}; files in {outcome.path}")


@app.command()
@exits_on_error
@remote_options
def release(
    remote: RemoteOptions,
    run: Annotated[str, typer.Option("--run", help="The federated run to release.")],
    round_: Annotated[
        int | None,
        typer.Option("--round", min=1, help="Release this round's checkpoint (default: last)."),
    ] = None,
    recipes: Annotated[
        str | None,
        typer.Option(
            "--recipes",
            help="Comma-separated variants, e.g. int8,pruned50-int8,onnx (default: fp32,int8,"
            "pruned50-int8,onnx, narrowed to what --calibration and the installed toolkit "
            "allow).",
        ),
    ] = None,
    calibration: Annotated[
        str,
        typer.Option(
            "--calibration",
            help="Calibration and verification data: held-out (the plan's held-out split), "
            "synthetic (generated inputs) or none (only fp32, fp16, int8-wo, onnx, onnx-int8).",
        ),
    ] = "held-out",
    device_class: Annotated[
        str,
        typer.Option("--device-class", help="The device class the .tflite variants are for."),
    ] = "generic",
    onnx_device_class: Annotated[
        str,
        typer.Option(
            "--onnx-device-class",
            help="The device class the ONNX variants (onnx, onnx-int8) are for; their "
            "runtime is onnxruntime.",
        ),
    ] = "jetson",
    runtime: Annotated[
        str | None,
        typer.Option(
            "--runtime",
            help="The runtime the .tflite variants are for (default: the preferred one "
            "verified on).",
        ),
    ] = None,
    expires_days: Annotated[
        float, typer.Option("--expires-days", help="Days the signatures stay valid.")
    ] = 90.0,
    by: Annotated[
        str | None, typer.Option("--by", help="Operator name recorded with the OS user.")
    ] = None,
    bench_iters: Annotated[
        int, typer.Option(help="Single-sample runs timed per runtime and variant.", min=0)
    ] = 100,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            "--max-accuracy-drop",
            min=0.0,
            metavar="POINTS",
            help="Leave out a variant whose accuracy is more than POINTS below the float "
            "model's on the evaluation set (held-out only; fp32 is always kept). Default: "
            "models.max_accuracy_drop of the config, 1.5.",
        ),
    ] = None,
    config: ServerConfigOption = None,
    db_url: DbUrlOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="With --server: follow the job until it ends (default), or print its id "
            "and return (`edgefl server job ID` shows it).",
        ),
    ] = True,
) -> None:
    """Build, verify, sign and publish a run's model as a new release version.

    A variant more than --max-accuracy-drop points below the float model is left out
    (reason accuracy_drop) and the others are published. Exits 6 when a variant fails
    verification, or every variant is left out: the release is then recorded as failed,
    with the reasons, and nothing is published.

    With --server it runs as a background job of the server (building and verifying the
    variants takes minutes): the command follows it, printing its progress, and prints
    and exits as it does here; --no-wait prints the job id (`edgefl server job ID`).
    The audit log records it. `server releases` reads the releases from anywhere.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgefl.errors import VerificationError
    from edgefl.quantize.build import count_steps
    from edgefl.server.cli_common import server_config
    from edgefl.server.cli_fleet import local_audit
    from edgefl.server.ops.background import release_request
    from edgefl.server.releases import (
        CALIBRATION_SOURCES,
        ReleaseOutcome,
        create_release,
        select_variants,
    )

    if calibration not in CALIBRATION_SOURCES:
        raise typer.BadParameter(
            f"one of: {', '.join(CALIBRATION_SOURCES)}", param_hint="--calibration"
        )
    names = [n.strip() for n in recipes.split(",") if n.strip()] if recipes is not None else None
    job_arguments: dict[str, Any] = {
        "run": run,
        "round": round_,
        "recipes": names,
        "calibration": calibration,
        "device_class": device_class,
        "onnx_device_class": onnx_device_class,
        "runtime": runtime,
        "expires_days": expires_days,
        "by": by,
        "bench_iters": bench_iters,
        "max_accuracy_drop": max_accuracy_drop,
    }
    if remote.remote:
        from edgefl.server.cli_jobs import failure, start_remote_job

        if db_url is not None:
            raise typer.BadParameter(
                "not with --server (the server's registry is used)", param_hint="--db-url"
            )
        doc = start_remote_job("release", job_arguments, remote=remote, wait=wait, as_json=as_json)
        if doc is None:
            return
        if doc["result"] is not None:
            if as_json:
                emit_json(doc["result"])
            else:
                _print_release(ReleaseOutcome(**doc["result"]))
        if doc["state"] != "succeeded":
            raise failure(doc)
        return
    cfg = server_config(config)
    request = release_request(cfg, **job_arguments)
    variants, _ = select_variants(names, request.calibration)
    arguments = {"run": run, "round": round_, "recipes": names, "calibration": calibration}
    with local_audit("release", arguments, config=config, target=run, db_url=db_url):
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=as_json,
        ) as bar:
            task = bar.add_task(f"releasing run {run}", total=count_steps(variants) + 2)
            outcome = create_release(
                db_url or cfg.resolved_db_url,
                _releases_folder(cfg),
                cfg.resolved_ca_dir,
                request,
                progress=lambda what, done: bar.update(task, completed=done, description=what),
            )
        if as_json:
            emit_json(outcome.to_dict())
        else:
            _print_release(outcome)
        if outcome.status != "published":
            raise VerificationError(
                f"{outcome.model} version {outcome.version} is not published: "
                + "; ".join(outcome.reasons),
                hint="no file was written; release other --recipes (fp32 is never left out "
                "for accuracy), a round whose model verifies (--round), or allow a larger "
                "--max-accuracy-drop",
            )


@app.command()
@exits_on_error
@remote_options
def releases(
    remote: RemoteOptions,
    config: ServerConfigOption = None,
    db_url: DbUrlOption = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List releases (published and failed) with their privacy guarantee and variants."""
    from edgefl.clikit import print_table
    from edgefl.server.cli_fleet import call_op
    from edgefl.server.releases import ReleaseOutcome

    docs = call_op(
        "releases",
        {"model": model} if model is not None else {},
        config=config,
        remote=remote,
        db_url=db_url,
    )["releases"]
    if as_json:
        emit_json({"releases": docs})
        return
    rows = [ReleaseOutcome(**d) for d in docs]
    if not rows:
        typer.echo("no releases yet (make one with `edgefl server release --run RUN_ID`)")
        return
    print_table(
        [
            ("model", "left"),
            ("version", "right"),
            ("status", "left"),
            ("run", "left"),
            ("round", "right"),
            ("DP", "left"),
            ("ε max", "right"),
            ("δ", "right"),
            ("variants (bytes, accuracy)", "left"),
            ("by", "left"),
            ("created (UTC)", "left"),
        ],
        [
            (
                r.model,
                r.version,
                r.status,
                r.run_id,
                r.round,
                r.privacy["mode"],
                _fmt(r.privacy["epsilon_max"], ".3g"),
                _fmt(r.privacy["delta"], ".0e"),
                ", ".join(
                    f"{name} ({v['size_bytes']}, {_fmt(v['accuracy'], '.1%')}"
                    + (
                        f", for {v['device_class']}/{v['runtime']}"
                        if v["device_class"] != r.device_class
                        else ""
                    )
                    + (", left out: accuracy_drop" if v["status"] == "accuracy_drop" else "")
                    + ")"
                    for name, v in r.variants.items()
                ),
                r.created_by,
                r.created_at[:19],
            )
            for r in rows
        ],
    )
