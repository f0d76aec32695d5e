"""``edgefl quantize``: build and verify edge artifacts.

Heavy imports (torch, litert-torch, the quantizer, runtimes) happen inside the
commands so ``edgefl --help`` stays instant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error, print_table
from edgefl.errors import VerificationError
from edgefl.quantize.recipes import DEFAULT_VARIANTS

__all__ = ["app"]

app = typer.Typer(
    help="Turn a trained torch model into verified edge artifacts.", no_args_is_help=True
)

RuntimesOption = Annotated[
    str | None,
    typer.Option(
        "--runtimes",
        help="Comma-separated runtimes to verify on (default: every one available for the "
        "artifact's format: ai-edge-litert, tflite-runtime for .tflite; onnxruntime for .onnx).",
    ),
]


def _split(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


@app.command("list")
@exits_on_error
def list_cmd(as_json: Annotated[bool, JSON_OPTION] = False) -> None:
    """List zoo models, recipes and the device runtimes available here."""
    from edgefl.quantize.recipes import get_recipe, recipe_keys
    from edgefl.quantize.verify import resolve_targets
    from edgefl.runtimes import available_runtimes, runtime_keys
    from edgefl.zoo import MODELS

    targets = []
    for fmt in ("tflite", "onnx"):
        # Listing must work on a machine without any runtime.
        with contextlib.suppress(Exception):
            targets += resolve_targets(None, artifact_format=fmt)
    providers: list[str] = []
    if "onnxruntime" in available_runtimes():
        from edgefl.runtimes.onnx import usable_providers

        providers = usable_providers()
    payload: dict[str, Any] = {
        "models": {
            n: {"dataset": s.dataset, "description": s.description} for n, s in MODELS.items()
        },
        "recipes": {k: get_recipe(k).description for k in recipe_keys()},
        "default_variants": list(DEFAULT_VARIANTS),
        "runtimes": {k: k in available_runtimes() for k in runtime_keys()},
        "verification_targets": targets,
        # What an onnxruntime session here would ask for, in order (TensorRT, CUDA, CPU).
        "onnxruntime_providers": providers,
    }
    if as_json:
        emit_json(payload)
        return
    print_table(
        [("model", "left"), ("dataset", "left"), ("description", "left")],
        [(name, info["dataset"], info["description"]) for name, info in payload["models"].items()],
        title="models",
    )
    typer.echo("")
    print_table(
        [("recipe", "left"), ("description", "left")],
        payload["recipes"].items(),
        title="recipes (prefix prunedNN- for structured pruning)",
    )
    typer.echo("")
    print_table(
        [("runtime", "left"), ("importable here", "left"), ("verification target", "left")],
        [
            (key, "yes" if installed else "no", "yes" if key in targets else "no")
            for key, installed in payload["runtimes"].items()
        ],
        title="device runtimes here",
    )
    if providers:
        typer.echo(f"onnxruntime execution providers, in order: {', '.join(providers)}")


@app.command()
@exits_on_error
def build(
    model: Annotated[str, typer.Option("--model", help="Zoo model name (see `list`).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    recipes: Annotated[
        str,
        typer.Option("--recipes", help="Comma-separated variants, e.g. fp32,int8,pruned50-int8."),
    ] = ",".join(DEFAULT_VARIANTS),
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="Trained state dict (.pt); trained here if omitted."),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="Calibration inputs (.npy, N x input shape)."),
    ] = None,
    runtimes: RuntimesOption = None,
    seed: Annotated[int, typer.Option(help="Seed for training, splits and calibration.")] = 0,
    epochs: Annotated[
        int | None, typer.Option(help="Training epochs (default: the zoo's).", min=1)
    ] = None,
    bench_iters: Annotated[
        int, typer.Option(help="Single-sample runs timed per runtime.", min=0)
    ] = 200,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Train (or load), prune, convert, quantize and verify; write artifacts and reports.

    Exits 6 if any variant was refused by verification (the accepted ones are still
    published, the refused ones are not).
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgefl.quantize.build import BuildOptions, build_artifacts, count_steps
    from edgefl.quantize.recipes import parse_variants
    from edgefl.zoo import get_spec

    get_spec(model)
    variants = parse_variants(recipes)
    opts = BuildOptions(
        model=model,
        variants=variants,
        out=out,
        weights=weights,
        calibration=calibration,
        runtimes=_split(runtimes),
        seed=seed,
        epochs=epochs,
        bench_iters=bench_iters,
    )
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
    ) as bar:
        task = bar.add_task(f"building {model}", total=count_steps(variants))
        result = build_artifacts(
            opts, progress=lambda what, done: bar.update(task, completed=done, description=what)
        )
    if as_json:
        emit_json(result.to_dict())
    else:
        typer.echo((out / "report.md").read_text())
    if result.refused:
        names = ", ".join(v.variant for v in result.refused)
        raise VerificationError(
            f"{len(result.refused)} variant(s) refused by verification: {names}",
            hint=f"see {out / 'report.md'} for the reasons",
        )


@app.command()
@exits_on_error
def verify(
    artifact: Annotated[Path, typer.Argument(help="The .tflite or .onnx file to re-check.")],
    manifest: Annotated[
        Path | None,
        typer.Option("--manifest", help="Its manifest (default: NAME.manifest.json beside it)."),
    ] = None,
    runtimes: RuntimesOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Re-check one artifact: hash and size, tensor specs, golden vectors on each runtime."""
    from edgefl.quantize.manifest import manifest_path_for, read_manifest
    from edgefl.quantize.verify import artifact_format_of, resolve_targets, reverify

    m = read_manifest(manifest or manifest_path_for(artifact))
    fmt = artifact_format_of(m)
    results = reverify(artifact, m, resolve_targets(_split(runtimes), artifact_format=fmt))
    failed = {k: v for k, v in results.items() if not v.passed}
    if as_json:
        emit_json(
            {
                "artifact": str(artifact),
                "sha256": m.sha256,
                "passed": not failed,
                "runtimes": {k: v.model_dump(mode="json") for k, v in results.items()},
            }
        )
    else:
        print_table(
            [
                ("runtime", "left"),
                ("version", "left"),
                ("max abs err", "right"),
                ("top-1 agreement", "right"),
                ("result", "left"),
            ],
            [
                (
                    key,
                    check.version,
                    f"{check.max_abs_error:.3g}",
                    f"{check.top1_agreement:.0%}",
                    "ok" if check.passed else "FAILED: " + "; ".join(check.reasons),
                )
                for key, check in results.items()
            ],
            title=f"{artifact.name} (sha256 {m.sha256[:12]}...)",
        )
    if failed:
        raise VerificationError(
            f"{artifact.name} disagrees with its reference on {', '.join(failed)}",
            hint="do not ship it; rebuild with a recipe that passes on these runtimes",
        )
