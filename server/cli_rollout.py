"""``edgefl server rollout``, ``rollouts``, ``rollout-status`` and ``results``.

The work is in :mod:`edgefl.server.staged_rollout`; this module parses options, shows the
progress of a running rollout (rich, on stderr) and prints.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error
from edgefl.server.cli_common import (
    ReleasedModelArgument,
    ReleaseVersionArgument,
    ServerConfigOption,
    VariantOption,
)
from edgefl.server.cli_ops import RemoteOptions, remote_options

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from edgefl.server.staged_rollout import RolloutProgress

__all__ = ["app"]

app = typer.Typer()

EXIT_NOT_COMPLETED = 9
"""Exit code of a rollout that halted or failed (the RUN_FAILED code)."""
EXIT_INTERRUPTED = 130


class _Display:
    """The live view of a rollout: one bar per cohort and a line of evidence, on stderr."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def event(self, message: str) -> None:
        self.progress.console.print(message, markup=False, soft_wrap=True)

    def update(self, view: RolloutProgress) -> None:
        for cohort, counts in (("canaries", view.canaries), ("rest", view.rest)):
            total = sum(counts.values())
            if not total:
                continue
            settled = sum(n for state, n in counts.items() if state not in ("pending", "published"))
            detail = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
            if cohort == "canaries" and view.evaluated:
                detail += f"; accuracy {view.accuracy:.1%} on {view.evaluated} samples"
                if view.previous_accuracy is not None:
                    detail += f" (previous {view.previous_accuracy:.1%})"
            task = self.tasks.get(cohort)
            if task is None:
                task = self.tasks[cohort] = self.progress.add_task(cohort, total=total, detail="")
            left = f" {view.seconds_left:.0f}s left" if view.seconds_left else ""
            self.progress.update(
                task,
                completed=settled,
                total=total,
                description=f"{cohort} [{view.phase}{left}]" if cohort == "canaries" else cohort,
                detail=detail,
            )


def _next_steps(status: dict[str, Any]) -> list[str]:
    """How to continue or roll back an interrupted (or failed) rollout."""
    release = f"{status['model']} {status['version']} --variant {status['variant']}"
    where = f" --fleet {status['fleet']}" if status["fleet"] else ""
    lines = [
        f"to continue, start it again: edgefl server rollout {release}{where} "
        "(devices already running it count as installed at once)"
    ]
    for device in status["devices"]:
        previous = device["previous"]
        if device["state"] == "shadow" and previous is not None:
            lines.append(
                f"to remove the shadow from {device['device_id']}: edgefl server deploy "
                f"{previous['model']} {previous['version']} --variant {previous['variant']} "
                f"--device {device['device_id']}"
            )
            continue
        if not device["published_at"] or previous is None:
            continue
        if previous["version"] == status["version"] and previous["model"] == status["model"]:
            continue
        lines.append(
            f"to roll {device['device_id']} back: edgefl server deploy {previous['model']} "
            f"{previous['version']} --variant {previous['variant']} --device "
            f"{device['device_id']} --rollback"
        )
    return lines


def _print_status(status: dict[str, Any]) -> None:
    from edgefl.clikit import print_table

    accuracy = ""
    if status["min_accuracy"] is not None:
        accuracy += f", min accuracy {status['min_accuracy']:.1%}"
    if status["max_accuracy_drop"] is not None:
        accuracy += f", max accuracy drop {status['max_accuracy_drop']:g} pts"
    if status.get("shadow"):
        accuracy += ", shadow first"
        if status.get("min_agreement") is not None:
            accuracy += f" (min agreement {status['min_agreement']:.1%})"
    typer.echo(
        f"rollout {status['id']}: {status['model']} v{status['version']} ({status['variant']}) "
        f"to {status['fleet'] or 'every fleet'}: {status['state'].upper()}"
        f"{' (no heartbeat: its controller stopped)' if status['stale'] else ''} "
        f"[{status['phase']}]"
    )
    typer.echo(
        f"canary {status['canary_fraction']:.0%} ({status['canaries']} device(s)), soak "
        f"{status['soak_s']:g} s, max failures {status['max_failures']:.0%}{accuracy}; "
        f"started {status['created_at']} by {status['created_by']}"
        + (f", ended {status['finished_at']}" if status["finished_at"] else "")
    )
    if status["reason"]:
        typer.echo(f"reason: {status['reason']}")

    def model(doc: dict[str, Any] | None, state: bool = False) -> str | None:
        if doc is None:
            return None
        text = f"v{doc['version']} ({doc['variant']})"
        return f"{text} {doc['state']}" if state else text

    def shadow_cell(device: dict[str, Any]) -> str | None:
        shadow = device.get("shadow")
        if not shadow or shadow.get("agreement") is None:
            return None
        text = f"{shadow['agreement']:.1%} agree/{shadow['compared']}"
        if shadow.get("accuracy") is not None:
            text += f", {shadow['accuracy']:.1%} (served {shadow['served_accuracy']:.1%})"
        return text

    def accuracy_cell(device: dict[str, Any]) -> str | None:
        if device["accuracy"] is None:
            return None
        text = f"{device['accuracy']:.1%}/{device['evaluated']}"
        if device["previous_accuracy"] is not None:
            text += f" (prev {device['previous_accuracy']:.1%}/{device['previous_evaluated']})"
        return text

    shadow = bool(status.get("shadow"))
    columns: list[tuple[str, Literal["left", "right"]]] = [
        ("device", "left"),
        ("cohort", "left"),
        ("state", "left"),
        ("previous", "left"),
        ("now", "left"),
        ("presence", "left"),
        ("accuracy/n", "left"),
        ("results", "right"),
        ("reason", "left"),
    ]
    if shadow:
        columns.insert(7, ("shadow", "left"))
    rows = []
    for d in status["devices"]:
        row: list[object] = [
            d["device_id"],
            d["cohort"],
            d["state"],
            model(d["previous"]),
            model(d["now"], state=True),
            "online" if d["online"] else "offline",
            accuracy_cell(d),
            d["results"],
            d["reason"] or None,
        ]
        if shadow:
            row.insert(7, shadow_cell(d))
        rows.append(row)
    print_table(columns, rows)


@app.command()
@exits_on_error
@remote_options
def rollout(
    remote: RemoteOptions,
    model: ReleasedModelArgument,
    version: ReleaseVersionArgument,
    variant: VariantOption = None,
    fleet: Annotated[
        str | None, typer.Option(help="Only admitted devices of this fleet (default: all).")
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(help="Only these admitted devices, comma-separated (e.g. pi-01,pi-02)."),
    ] = None,
    canary: Annotated[
        str,
        typer.Option(help="Share of the online targets in the canary cohort: 10% or 0.1."),
    ] = "10%",
    soak: Annotated[
        str,
        typer.Option(
            help="Watch the canaries this long after they all installed: 30s, 2m. Make it at "
            "least the devices' models.health_window_s."
        ),
    ] = "30s",
    max_failures: Annotated[
        str,
        typer.Option(
            help="Share of a cohort that may fail (roll back, refuse, not report in time, "
            "miss an accuracy threshold) without halting: 5%."
        ),
    ] = "5%",
    min_accuracy: Annotated[
        str | None,
        typer.Option(
            help="Halt when a canary's on-device accuracy with the release, on evaluation "
            "samples, is below this: 0.9 or 90%."
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            "--max-accuracy-drop",
            metavar="POINTS",
            help="Halt when a canary's accuracy falls more than POINTS below the previous "
            "version's on the same device.",
        ),
    ] = None,
    min_evaluated: Annotated[
        int,
        typer.Option(
            help="Evaluation samples a canary must answer with the release before its "
            "accuracy is judged (fewer by the deadline: a failure).",
            min=1,
        ),
    ] = 50,
    install_timeout: Annotated[
        str,
        typer.Option(
            help="How long a device may take to report the release running (and the "
            "longest wait for accuracy evidence after the soak): 2m."
        ),
    ] = "2m",
    expires_days: Annotated[
        float, typer.Option(help="Days the signed desired states stay valid.", min=0.001)
    ] = 30.0,
    by: Annotated[
        str | None, typer.Option("--by", help="Operator name recorded with the OS user.")
    ] = None,
    shadow: Annotated[
        bool,
        typer.Option(
            "--shadow",
            help="First run the release on the canaries beside their current model without "
            "serving its answers; go on only if its agreement and accuracy pass (else halt "
            "and remove it: no answer ever changed).",
        ),
    ] = False,
    min_agreement: Annotated[
        str | None,
        typer.Option(
            help="With --shadow: halt when a canary's shadow agrees with fewer of the served "
            "answers than this: 0.9 or 90%."
        ),
    ] = None,
    config: ServerConfigOption = None,
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
    """Roll MODEL VERSION out in stages: a canary cohort first, then the rest or a rollback.

    With --shadow the canaries first run the release beside their current model, its
    answers never served, and report its agreement with the served answers and its
    accuracy on evaluation samples; the thresholds (--min-agreement, --min-accuracy,
    --max-accuracy-drop against the served answers on the same samples) decide before
    any answer changes, and a halt only removes the shadow.

    The canaries (among the online targets) get the signed desired state first; after
    they all report it running and the soak passed without too many failures (and, with
    --min-accuracy or --max-accuracy-drop, with their on-device accuracy), the rest get
    it; offline devices get it retained when they reconnect. Otherwise the canaries are
    rolled back to what they ran before. Every step is recorded (`server rollouts`,
    `server rollout-status ID`). Exits 9 when the rollout halted or failed, 130 when
    interrupted (Ctrl-C, SIGTERM: the devices are left as they are).

    With --server it runs as a background job of the server (it watches the canaries
    for minutes): the command follows it, printing its progress, and prints and exits as
    it does here (Ctrl-C stops following, not the rollout); --no-wait prints the job id
    (`edgefl server job ID`). The audit log records it. `server rollouts` and
    `server rollout-status` read it from anywhere.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from edgefl.server.cli_common import server_config
    from edgefl.server.cli_fleet import local_audit
    from edgefl.server.ops.background import rollout_options
    from edgefl.server.rollout import broker_address, releases_folder
    from edgefl.server.staged_rollout import StagedRollout

    job_arguments: dict[str, Any] = {
        "model": model,
        "version": version,
        "variant": variant,
        "fleet": fleet,
        "devices": devices,
        "canary": canary,
        "soak": soak,
        "max_failures": max_failures,
        "min_accuracy": min_accuracy,
        "max_accuracy_drop": max_accuracy_drop,
        "min_evaluated": min_evaluated,
        "install_timeout": install_timeout,
        "expires_days": expires_days,
        "by": by,
        "shadow": shadow,
        "min_agreement": min_agreement,
    }
    if remote.remote:
        _remote_rollout(remote, job_arguments, wait=wait, as_json=as_json)
        return
    options = rollout_options(**job_arguments)
    arguments = {
        "model": model,
        "version": version,
        "variant": variant,
        "fleet": fleet,
        "devices": devices,
        "canary": canary,
        "soak": soak,
        "shadow": shadow,
    }
    with local_audit(
        "rollout", arguments, config=config, target=f"{model} v{version} -> {fleet or 'fleet'}"
    ):
        cfg = server_config(config)
        host, port = broker_address(cfg)
        stop = threading.Event()

        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            stop.set()

        console = Console(stderr=True, highlight=False)
        if not console.is_terminal:  # a log file or a pipe: whole lines, no colour codes
            console = Console(stderr=True, highlight=False, width=1000, no_color=True)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
        ) as progress:
            display = _Display(progress)
            controller = StagedRollout(
                options,
                ca_dir=cfg.resolved_ca_dir,
                db_url=cfg.resolved_db_url,
                releases_dir=releases_folder(cfg),
                broker_host=host,
                broker_port=port,
                stop=stop,
                on_progress=display.update,
                on_event=display.event,
            )
            previous = {
                sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                status = controller.run()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        if as_json:
            emit_json(status)
        else:
            _print_status(status)
        if status["state"] in ("interrupted", "failed"):
            for line in _next_steps(status):
                console.print(line, markup=False, soft_wrap=True)
        if status["state"] == "interrupted":
            raise typer.Exit(EXIT_INTERRUPTED)
        if status["state"] != "completed":
            raise typer.Exit(EXIT_NOT_COMPLETED)


def _remote_rollout(
    remote: RemoteOptions, arguments: dict[str, Any], *, wait: bool, as_json: bool
) -> None:
    """Run the rollout as a job of the remote server; print and exit as locally."""
    from edgefl.clikit import error_console_print
    from edgefl.server.cli_jobs import failure, start_remote_job

    doc = start_remote_job("rollout", arguments, remote=remote, wait=wait, as_json=as_json)
    if doc is None:
        return
    status = doc["result"]
    if status is not None:
        if as_json:
            emit_json(status)
        else:
            _print_status(status)
        if status["state"] in ("interrupted", "failed"):
            for line in _next_steps(status):
                error_console_print(line)
    if doc["state"] != "succeeded":
        raise failure(doc)


@app.command()
@exits_on_error
@remote_options
def rollouts(
    remote: RemoteOptions,
    config: ServerConfigOption = None,
    limit: Annotated[int, typer.Option(help="Newest this many.", min=1)] = 50,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List staged rollouts, newest first, with their state and device counts."""
    from edgefl.clikit import print_table
    from edgefl.server.cli_fleet import call_op

    rows = call_op("rollouts", {"limit": limit}, config=config, remote=remote)["rollouts"]
    if as_json:
        emit_json({"rollouts": rows})
        return
    if not rows:
        typer.echo("no rollouts in the registry (start one with `edgefl server rollout`)")
        return
    print_table(
        [
            ("id", "left"),
            ("release", "left"),
            ("fleet", "left"),
            ("state", "left"),
            ("devices", "left"),
            ("started", "left"),
            ("reason", "left"),
        ],
        [
            (
                r["id"],
                f"{r['model']} v{r['version']} ({r['variant']})"
                + (" shadow first" if r.get("shadow") else ""),
                r["fleet"] or "*",
                r["state"] + (" (stale)" if r["stale"] else ""),
                ", ".join(f"{n} {s}" for s, n in sorted(r["device_states"].items())),
                r["created_at"],
                r["reason"] or None,
            )
            for r in rows
        ],
    )


@app.command("rollout-status")
@exits_on_error
@remote_options
def rollout_status(
    remote: RemoteOptions,
    rollout_id: Annotated[str, typer.Argument(metavar="ID", help="The rollout id (r-...).")],
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Show one rollout: its state and reason, and each device's state with its reason.

    `now` is what the device reports it runs today (an offline device that came back
    shows the release there); `results` counts the stored results the release computed
    on it.
    """
    from edgefl.server.cli_fleet import call_op

    status = call_op("rollout-status", {"rollout": rollout_id}, config=config, remote=remote)
    if as_json:
        emit_json(status)
        return
    _print_status(status)


@app.command()
@exits_on_error
@remote_options
def results(
    remote: RemoteOptions,
    model: Annotated[str | None, typer.Option(help="Only results of this model.")] = None,
    version: Annotated[int | None, typer.Option(help="Only this release version.")] = None,
    device: Annotated[str | None, typer.Option(help="Only this device.")] = None,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Count the stored results per device and the model version that computed them."""
    from edgefl.clikit import print_table
    from edgefl.server.cli_fleet import call_op

    rows = call_op(
        "results",
        {"model": model, "version": version, "device": device},
        config=config,
        remote=remote,
    )["results"]
    if as_json:
        emit_json({"results": rows})
        return
    if not rows:
        typer.echo("no stored results match")
        return
    print_table(
        [
            ("device", "left"),
            ("model", "left"),
            ("version", "right"),
            ("variant", "left"),
            ("results", "right"),
            ("first", "left"),
            ("last", "left"),
        ],
        [
            (
                r["device_id"],
                r["model"],
                r["version"],
                r["variant"],
                r["results"],
                r["first_received"],
                r["last_received"],
            )
            for r in rows
        ],
    )
