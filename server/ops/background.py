"""Long operations run as background jobs of the server: ``release``, ``rollout``, ``job``.

``release`` (building, verifying and signing variants) and ``rollout`` (soaking and
watching canaries) take minutes. Through the admin API they validate their arguments,
start the work in a thread of the server process (:mod:`edgefl.server.jobs`) and answer
``{"job": ID, ...}`` at once; ``job ID`` answers its state (running, succeeded, failed),
its progress lines and the result document the local command prints with ``--json``.
The audit log records the start (who, what, allowed or denied).

On the server host without ``--server`` the commands keep running in the CLI process
(:mod:`edgefl.server.cli_release`, :mod:`edgefl.server.cli_rollout`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import Field

from edgefl.errors import ExitCode
from edgefl.server.ops import ConflictError, NotFoundError, OpContext, Params, operation

if TYPE_CHECKING:
    from edgefl.server.config import ServerConfig
    from edgefl.server.releases import ReleaseRequest
    from edgefl.server.staged_rollout import RolloutOptions

__all__ = ["release_request", "rollout_options"]


def _start(ctx: OpContext, kind: str, key: str, target: str, work: Any) -> dict[str, Any]:
    from edgefl.server.jobs import JOBS, JobRunningError

    try:
        job = JOBS.start(kind, key, target=target, by=ctx.principal.name, work=work)
    except JobRunningError as exc:
        raise ConflictError(str(exc), hint=exc.hint) from exc
    return {"job": job.id, "kind": kind, "target": target, "state": "running"}


class ReleaseParams(Params):
    run: str = Field(min_length=1, max_length=128, description="The federated run to release.")
    round: int | None = Field(None, ge=1, description="This round's checkpoint (default: last).")
    recipes: list[str] | None = Field(None, description="Variants (default: what the data allows).")
    calibration: str = Field("held-out", description="held-out, synthetic or none.")
    device_class: str = Field("generic", max_length=64, description="For the .tflite variants.")
    onnx_device_class: str = Field("jetson", max_length=64, description="For the ONNX variants.")
    runtime: str | None = Field(None, max_length=64, description="For the .tflite variants.")
    expires_days: float = Field(90.0, gt=0, description="Days the signatures stay valid.")
    by: str | None = Field(None, max_length=128, description="Operator name recorded.")
    bench_iters: int = Field(100, ge=0, le=100_000, description="Timed runs per variant.")
    max_accuracy_drop: float | None = Field(None, ge=0, description="Accuracy gate (points).")


def release_request(
    cfg: ServerConfig,
    *,
    run: str,
    round: int | None,
    recipes: list[str] | None,
    calibration: str,
    device_class: str,
    onnx_device_class: str,
    runtime: str | None,
    expires_days: float,
    by: str | None,
    bench_iters: int,
    max_accuracy_drop: float | None,
) -> ReleaseRequest:
    """The release request from the command's (or operation's) arguments.

    ``calibration`` must be one of ``CALIBRATION_SOURCES`` (the callers check it, each
    with its own error); ``max_accuracy_drop`` defaults to the server's setting.
    """
    from edgefl.server.releases import ReleaseRequest

    return ReleaseRequest(
        run_id=run,
        round=round,
        recipes=recipes,
        calibration=calibration,  # type: ignore[arg-type]  # checked by the callers
        device_class=device_class,
        onnx_device_class=onnx_device_class,
        runtime=runtime,
        expires_days=expires_days,
        by=by,
        bench_iters=bench_iters,
        max_accuracy_drop=(
            max_accuracy_drop if max_accuracy_drop is not None else cfg.models.max_accuracy_drop
        ),
    )


@operation(
    "release",
    role="operator",
    params=ReleaseParams,
    summary="Build, verify, sign and publish a run's model as a release (a background job).",
    mutating=True,
    target=lambda p: p.run,
)
def release(ctx: OpContext, params: ReleaseParams) -> dict[str, Any]:
    """Start the release in a job; its result is ``ReleaseOutcome.to_dict()``.

    The job fails with exit code 6 (and the outcome as its result) when the release is
    not published, as the local command does.

    Raises:
        BadInputError: An unknown calibration or recipe (nothing starts).
        ConflictError: A release of this run is already running.
    """
    from edgefl.errors import BadInputError, VerificationError
    from edgefl.quantize.build import count_steps
    from edgefl.server.jobs import Job, JobFailedError
    from edgefl.server.models_service import resolve_settings
    from edgefl.server.releases import (
        CALIBRATION_SOURCES,
        create_release,
        select_variants,
    )

    if params.calibration not in CALIBRATION_SOURCES:
        raise BadInputError(
            f"unknown calibration {params.calibration!r}",
            hint=f"--calibration: one of {', '.join(CALIBRATION_SOURCES)}",
        )
    cfg = ctx.config
    names = [n.strip() for n in params.recipes if n.strip()] if params.recipes else None
    request = release_request(
        cfg,
        **{**params.model_dump(), "recipes": names, "by": params.by or ctx.principal.name},
    )
    variants, _ = select_variants(names, request.calibration)
    total = count_steps(variants) + 2
    db_url = ctx.engine.url.render_as_string(hide_password=False)
    folder = resolve_settings(cfg).releases_dir
    assert folder is not None  # resolve_settings fills it in
    releases_dir = folder.expanduser().resolve()
    ca_dir = cfg.resolved_ca_dir

    def work(_job: Job, report: Callable[[str], None]) -> Any:
        report(f"releasing run {params.run}")
        outcome = create_release(
            db_url,
            releases_dir,
            ca_dir,
            request,
            progress=lambda what, done: report(f"[{done}/{total}] {what}"),
        )
        doc = outcome.to_dict()
        if outcome.status != "published":
            error = VerificationError(
                f"{outcome.model} version {outcome.version} is not published: "
                + "; ".join(outcome.reasons),
            )
            raise JobFailedError(
                str(error),
                result=doc,
                exit_code=int(ExitCode.VERIFICATION_FAILED),
                hint="no file was written; release other --recipes (fp32 is never left out "
                "for accuracy), a round whose model verifies (--round), or allow a larger "
                "--max-accuracy-drop",
            )
        return doc

    return _start(ctx, "release", params.run, params.run, work)


class RolloutParams(Params):
    model: str = Field(min_length=1, max_length=64, description="Released model name.")
    version: int = Field(ge=1, description="Release version.")
    variant: str | None = Field(None, max_length=64, description="Variant.")
    fleet: str | None = Field(None, max_length=64, description="Only this fleet.")
    devices: str | None = Field(None, max_length=10_000, description="Only these, comma-separated.")
    canary: str = Field("10%", max_length=16, description="Canary share: 10% or 0.1.")
    soak: str = Field("30s", max_length=16, description="Soak after the canaries installed.")
    max_failures: str = Field("5%", max_length=16, description="Share of a cohort that may fail.")
    min_accuracy: str | None = Field(None, max_length=16, description="Halt below this.")
    max_accuracy_drop: float | None = Field(None, description="Halt past this drop (points).")
    min_evaluated: int = Field(50, ge=1, description="Samples before accuracy is judged.")
    install_timeout: str = Field("2m", max_length=16, description="Install deadline.")
    expires_days: float = Field(30.0, ge=0.001, description="Days the desired states are valid.")
    by: str | None = Field(None, max_length=128, description="Operator name recorded.")
    shadow: bool = Field(False, description="Shadow the canaries first.")
    min_agreement: str | None = Field(None, max_length=16, description="With shadow.")


def rollout_options(
    *,
    model: str,
    version: int,
    variant: str | None,
    fleet: str | None,
    devices: str | None,
    canary: str,
    soak: str,
    max_failures: str,
    min_accuracy: str | None,
    max_accuracy_drop: float | None,
    min_evaluated: int,
    install_timeout: str,
    expires_days: float,
    by: str | None,
    shadow: bool,
    min_agreement: str | None,
) -> RolloutOptions:
    """The checked options of a rollout from the command's (or operation's) arguments.

    ``devices`` is comma-separated; shares and durations are parsed as on the command
    line.

    Raises:
        BadInputError: A bad option (named).
    """
    from edgefl.server.staged_rollout import RolloutOptions, parse_duration, parse_share

    options = RolloutOptions(
        model=model,
        version=version,
        variant=variant,
        fleet=fleet,
        devices=None
        if devices is None
        else tuple(d.strip() for d in devices.split(",") if d.strip()),
        canary=parse_share(canary, "--canary"),
        soak_s=parse_duration(soak, "--soak"),
        max_failures=parse_share(max_failures, "--max-failures"),
        min_accuracy=None if min_accuracy is None else parse_share(min_accuracy, "--min-accuracy"),
        max_accuracy_drop=max_accuracy_drop,
        min_evaluated=min_evaluated,
        install_timeout_s=parse_duration(install_timeout, "--install-timeout"),
        expires_days=expires_days,
        by=by,
        shadow=shadow,
        min_agreement=None
        if min_agreement is None
        else parse_share(min_agreement, "--min-agreement"),
    )
    options.check()
    return options


@operation(
    "rollout",
    role="operator",
    params=RolloutParams,
    summary="Roll a release out in stages: canaries, then the rest or a rollback (a job).",
    mutating=True,
    target=lambda p: f"{p.model} v{p.version} -> {p.fleet or 'fleet'}",
)
def rollout(ctx: OpContext, params: RolloutParams) -> dict[str, Any]:
    """Start the staged rollout in a job; its result is the rollout's status document.

    The job fails with exit code 9 when the rollout halted or failed, 130 when it was
    interrupted (the server stopped), with the status as its result.

    Raises:
        BadInputError: A bad option (named; nothing starts).
        ConflictError: A rollout of this model is already running here.
    """
    from edgefl.server.jobs import Job, JobFailedError
    from edgefl.server.rollout import broker_address, releases_folder
    from edgefl.server.staged_rollout import StagedRollout

    options = rollout_options(
        **params.model_dump(exclude={"by"}), by=params.by or ctx.principal.name
    )
    cfg = ctx.config
    host, port = broker_address(cfg)
    db_url = ctx.engine.url.render_as_string(hide_password=False)
    releases_dir = releases_folder(cfg)
    target = f"{params.model} v{params.version} -> {params.fleet or 'fleet'}"

    def work(job: Job, report: Callable[[str], None]) -> Any:
        last: list[str] = [""]

        def on_progress(view: Any) -> None:
            parts = []
            for cohort, counts in (("canaries", view.canaries), ("rest", view.rest)):
                if sum(counts.values()):
                    detail = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                    parts.append(f"{cohort}: {detail}")
            line = f"[{view.phase}] " + "; ".join(parts)
            if line != last[0]:
                last[0] = line
                report(line)

        controller = StagedRollout(
            options,
            ca_dir=cfg.resolved_ca_dir,
            db_url=db_url,
            releases_dir=releases_dir,
            broker_host=host,
            broker_port=port,
            stop=job.stop,
            on_progress=on_progress,
            on_event=report,
        )
        status = controller.run()
        if status["state"] == "interrupted":
            raise JobFailedError(
                f"rollout {status['id']} was interrupted (the devices are left as they are)",
                result=status,
                exit_code=int(ExitCode.INTERRUPTED),
            )
        if status["state"] != "completed":
            raise JobFailedError(
                f"rollout {status['id']} {status['state']}"
                + (f": {status['reason']}" if status.get("reason") else ""),
                result=status,
                exit_code=int(ExitCode.RUN_FAILED),
            )
        return status

    return _start(ctx, "rollout", params.model, target, work)


class JobParams(Params):
    id: str = Field(min_length=1, max_length=32, description="The job id (j-...).")


@operation(
    "job",
    role="viewer",
    params=JobParams,
    summary="Show a background job: state, progress lines, result or error.",
)
def job(ctx: OpContext, params: JobParams) -> dict[str, Any]:
    """The job's document (see :meth:`edgefl.server.jobs.Job.to_dict`).

    Raises:
        NotFoundError: No such job in this server process (jobs live in memory).
    """
    from edgefl.server.jobs import JOBS

    doc = JOBS.get(params.id)
    if doc is None:
        raise NotFoundError(
            f"no job {params.id!r} on this server",
            hint="jobs are kept in memory (the newest 50 finished ones) and a server "
            "restart forgets them; `edgefl server releases` / `rollouts` list the records",
        )
    return doc
