"""``edgefl server train``: start a federated run of a plan, and follow it with --wait.

The work (the run's app, the polling with its deadline, the report and its exit code) is
in :mod:`edgefl.server.runs`; this module only parses options and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error
from edgefl.server.cli_common import ServerConfigOption

__all__ = ["app"]

app = typer.Typer()


@app.command()
@exits_on_error
def train(
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
    finishes, then print the registry's rounds and each device's ε from the ledger.
    """
    from edgefl.clikit import error_console_print
    from edgefl.config import load_config
    from edgefl.errors import BadInputError
    from edgefl.federation import FederationPlan
    from edgefl.files import check_safe_name
    from edgefl.server.admin import connect
    from edgefl.server.fl.ledger import new_run_id
    from edgefl.server.runs import default_timeout_s, report_run, submit_run, wait_for_run

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
    with connect(config) as ctx:
        submitted = submit_run(ctx, fed_plan, rid)
        flower_run_id = submitted["flower_run_id"]
        if not wait:
            if as_json:
                emit_json(submitted)
            else:
                typer.echo(
                    f"submitted run {rid} (Flower run {flower_run_id}); follow it with "
                    f"`edgefl server train ... --wait` or `flwr ls`"
                )
            return
        error_console_print(f"submitted run {rid} (Flower run {flower_run_id}); waiting")
        status = wait_for_run(
            ctx,
            flower_run_id,
            rid,
            fed_plan.rounds,
            poll_s,
            timeout_s if timeout_s is not None else default_timeout_s(fed_plan),
        )
        db_url = ctx.config.resolved_db_url
    report_run(submitted, status, as_json, db_url=db_url)
