"""``edgefl server train`` and ``edgefl server privacy``: runs and what devices spent.

``train`` starts a federated run of a plan and follows it with --wait; ``privacy`` shows
each device's ε in a run beside its lifetime ε over every run.

The work (the run's app, the polling with its deadline, the report and its exit code) is
in :mod:`edgefl.server.runs`; this module only parses options and prints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error
from edgefl.server.cli_common import RegistryConfigOption, ServerConfigOption
from edgefl.server.cli_ops import RemoteOptions, remote_options

__all__ = ["app"]

app = typer.Typer()


@app.command()
@exits_on_error
@remote_options
def train(
    remote: RemoteOptions,
    plan: Annotated[
        Path,
        typer.Option(
            "--plan",
            help="Federation plan (TOML, YAML or JSON). Keys, types and defaults: README "
            "'Federation plan keys'; example: deploy/plans/digits-dp.toml. A simulation "
            "scenario file works as it is (its simulation table is ignored).",
        ),
    ],
    config: ServerConfigOption = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Our run id (an existing one resumes).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the run; print rounds and ε per device.")
    ] = False,
    poll_s: Annotated[float, typer.Option(help="Seconds between status checks.")] = 3.0,
    timeout_s: Annotated[
        float | None,
        typer.Option(
            help="With --wait: give up (exit 9) when the run has not finished after this "
            "long; it keeps running. (default: the plan's node_wait_s + 2 x rounds x "
            "round_timeout_s + 300 s)"
        ),
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Start a federated run of PLAN on the server's SuperLink (edgefl's ServerApp/ClientApp).

    Devices take part through their agents' SuperNodes. With --wait, follow it until it
    finishes, then print the registry's rounds and each device's ε from the ledger. With
    --server the run is submitted through the admin API, and --wait follows it there
    (`server run-show RUN` each --poll-s) until the registry says it completed or stopped.
    """
    from edgefl.clikit import error_console_print
    from edgefl.config import load_config
    from edgefl.errors import BadInputError
    from edgefl.federation import FederationPlan
    from edgefl.files import check_safe_name
    from edgefl.server.admin import connect
    from edgefl.server.cli_fleet import call_op
    from edgefl.server.fl.ledger import new_run_id
    from edgefl.server.runs import default_timeout_s, report_run, wait_for_run

    if run_id is not None:
        # The run id names a folder under state_dir/runs: ".", ".." or "a/b" would write
        # the run's files somewhere else.
        try:
            check_safe_name(run_id, "run id")
        except BadInputError as exc:
            raise typer.BadParameter(str(exc), param_hint="--run-id") from exc
    if timeout_s is not None and timeout_s <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--timeout-s")
    fed_plan = load_config(FederationPlan, plan)
    budget = fed_plan.central_budget
    if budget is not None and budget.rounds_fit < fed_plan.rounds:
        error_console_print(f"warning: {budget.describe()}")
    rid = run_id or new_run_id()
    submitted = call_op(
        "train",
        {"plan": json.loads(fed_plan.model_dump_json()), "run_id": rid},
        config=config,
        remote=remote,
    )
    submitted.pop("rounds", None)
    flower_run_id = submitted["flower_run_id"]
    if not wait:
        if as_json:
            emit_json(submitted)
        else:
            typer.echo(
                f"submitted run {rid} (Flower run {flower_run_id}); follow it with "
                f"`edgefl server run-show {rid}`, `edgefl server train ... --wait` or `flwr ls`"
            )
        return
    told = len(submitted.get("prewarmed") or [])
    error_console_print(
        f"submitted run {rid} (Flower run {flower_run_id}); {told} online device(s) told "
        "to get ready; waiting"
    )
    deadline_s = timeout_s if timeout_s is not None else default_timeout_s(fed_plan)
    if remote.remote:
        follow_remote(rid, fed_plan.rounds, poll_s, deadline_s, as_json, config, remote)
        return
    with connect(config) as ctx:
        status = wait_for_run(ctx, flower_run_id, rid, fed_plan.rounds, poll_s, deadline_s)
        db_url = ctx.config.resolved_db_url
    report_run(submitted, status, as_json, db_url=db_url)


@app.command()
@exits_on_error
@remote_options
def privacy(
    remote: RemoteOptions,
    config: RegistryConfigOption = None,
    db_url: Annotated[str | None, typer.Option(help="Override db_url (SQLAlchemy URL).")] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id", help="Show this run's ledger ε beside (its devices only); default: all."
        ),
    ] = None,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="Only this device (repeatable).")
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Each device's lifetime ε over every run in the registry, beside a run's ledger.

    The lifetime ε is recomputed from the privacy ledger: every run's accountant history
    of the device, composed (RDP) and converted at the δ the device reports for its
    lifetime. Also shown: the runs composed, and the lifetime cap the device reports
    (training.privacy.lifetime_epsilon in its agent config); a device refuses a run that
    would pass it (lifetime_budget_exhausted).
    """
    from edgefl.server.cli_fleet import call_op
    from edgefl.server.runs import print_device_privacy

    doc = call_op(
        "privacy",
        {"run": run_id, "devices": device or None},
        config=config,
        remote=remote,
        db_url=db_url,
        registry_file=True,
    )
    run_epsilon, lifetime = doc["run_epsilon"], doc["lifetime"]
    if as_json:
        emit_json({"run_id": run_id, "run_epsilon": run_epsilon, "lifetime": lifetime})
        return
    if not lifetime and not run_epsilon:
        typer.echo("no device has privacy ledger rows" + (f" in run {run_id}" if run_id else ""))
        return
    print_device_privacy(run_epsilon, lifetime)


def follow_remote(
    run_id: str,
    rounds: int,
    poll_s: float,
    timeout_s: float,
    as_json: bool,
    config: Path | None,
    remote: RemoteOptions,
) -> None:
    """Follow a run on a remote server (``run-show`` each ``poll_s``) until it ends.

    Raises:
        RunFailedError: It stopped, trained fewer rounds than planned, or has not ended
            after ``timeout_s`` (it keeps running).
    """
    from edgefl.clikit import error_console_print
    from edgefl.errors import RunFailedError
    from edgefl.server.cli_fleet import call_op
    from edgefl.server.ops import NotFoundError

    deadline = time.monotonic() + timeout_s
    last = ""
    doc: dict[str, Any] | None = None
    while True:
        try:
            doc = call_op("run-show", {"run": run_id}, config=config, remote=remote)
        except NotFoundError:
            doc = None  # the ServerApp has not started it yet
        status = doc["status"] if doc else "starting"
        line = f"run {run_id}: {status}, round {len(doc['rounds']) if doc else 0}/{rounds}"
        if line != last:
            error_console_print(line)
            last = line
        if doc is not None and status != "running":
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise RunFailedError(
                f"run {run_id} has not finished after {timeout_s:g} s ({line})",
                hint=f"it keeps running: `edgefl server run-show {run_id} --server ...`; "
                f"`edgefl server stop {run_id}` stops it",
            )
        time.sleep(min(poll_s, left))
    if as_json:
        emit_json(doc)
    else:
        from edgefl.clikit import print_table

        print_table(
            [("round", "right"), ("accuracy", "right"), ("ε max", "right")],
            [
                (r["round"], f"{r['accuracy']:.4f}", f"{r['epsilon_max']:.3f}")
                for r in doc["rounds"]
            ],
        )
    if status != "completed" or len(doc["rounds"]) < rounds:
        raise RunFailedError(
            f"run {run_id} ended {status} after {len(doc['rounds'])} of {rounds} rounds"
            + (f": {doc['stop_reason']}" if doc.get("stop_reason") else "")
        )
