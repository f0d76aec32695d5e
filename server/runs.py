"""Federated runs from the command line: submit a plan, follow it, report it.

``edgefl server train`` does three things that have little to do with typer: it writes and
submits the run's app, it polls the SuperLink until the run ends (now with a deadline: a
run whose SuperLink never says "finished" used to keep the command waiting for ever), and
it reads the registry to print the rounds and each device's ε and to decide the exit code.
They live here, on a typed :class:`~edgefl.server.admin.AdminContext`, apart from the
command wiring in :mod:`edgefl.server.cli`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import typer

from edgefl.clikit import emit_json, error_console_print
from edgefl.errors import EdgeflError, RunFailedError

if TYPE_CHECKING:
    from edgefl.federation import FederationPlan
    from edgefl.server.admin import AdminContext

__all__ = ["default_timeout_s", "print_rounds", "report_run", "submit_run", "wait_for_run"]

_START_SLACK_S = 300.0
"""Added to a plan's own bounds for the run to start and the app to load."""


def default_timeout_s(plan: FederationPlan) -> float:
    """How long ``server train --wait`` follows a run of ``plan`` at most by default.

    The plan's own bounds: the wait for nodes, then per round a training and an evaluation
    phase of at most ``round_timeout_s`` each, plus some minutes for the run to start.
    """
    return plan.node_wait_s + plan.rounds * 2 * plan.round_timeout_s + _START_SLACK_S


def submit_run(ctx: AdminContext, plan: FederationPlan, run_id: str) -> dict[str, Any]:
    """Write the run's app (signed when the server has an app-signing key) and submit it.

    Returns:
        What ``server train`` prints: ``run_id``, ``flower_run_id``, ``app_dir`` and
        ``db_url`` (shown without its password).
    """
    from edgefl.server.fl.app_signing import load_app_signing_key
    from edgefl.server.fl.superlink import write_run_app
    from edgefl.server.registry.db import display_url

    state_dir = ctx.config.resolved_state_dir
    run_dir = state_dir / "runs" / run_id
    # Signed when the server has an app-signing key (`edgefl server app-key`); devices
    # run edgefl's installed ClientApp either way.
    app_dir = write_run_app(
        run_dir / "app",
        plan,
        registry_url=ctx.config.resolved_db_url,
        run_id=run_id,
        admitted_only=True,  # nodes not admitted with `edgefl server admit` never train
        signing_key=load_app_signing_key(state_dir),
    )
    flower_run_id = ctx.admin.submit_run(app_dir)
    (run_dir / "flower-run-id").write_text(f"{flower_run_id}\n", encoding="utf-8")
    return {
        "run_id": run_id,
        "flower_run_id": flower_run_id,
        "app_dir": str(app_dir),
        "db_url": display_url(ctx.config.resolved_db_url),  # shown: never with its password
    }


def rounds_done(db_url: str, run_id: str) -> int:
    """Rounds of ``run_id`` committed to the registry so far (0 when it has none yet)."""
    from edgefl.server.fl.ledger import FlStore

    try:
        store = FlStore(db_url)
    except EdgeflError:
        return 0
    try:
        return len(store.result(run_id).rounds)
    except EdgeflError:
        return 0
    finally:
        store.close()


def wait_for_run(
    ctx: AdminContext,
    flower_run_id: int,
    run_id: str,
    rounds: int,
    poll_s: float,
    timeout_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Poll the SuperLink until the run finishes; return Flower's final status.

    Progress lines go to stderr when they change.

    Raises:
        RunFailedError: The run has not finished after ``timeout_s`` (exit 9); it keeps
            running on the SuperLink.
        ServiceUnavailableError: The SuperLink could not be asked.
    """
    deadline = clock() + timeout_s
    last = ""
    while True:
        info = ctx.admin.run_info(flower_run_id)
        status = str(info.get("status", "unknown"))
        done = rounds_done(ctx.config.resolved_db_url, run_id)
        line = f"run {run_id}: {status}, round {done}/{rounds} committed"
        if line != last:
            error_console_print(line)
            last = line
        if status.startswith("finished"):
            return status
        left = deadline - clock()
        if left <= 0:
            raise RunFailedError(
                f"run {run_id} (Flower run {flower_run_id}) has not finished after "
                f"{timeout_s:g} s: {status}, round {done}/{rounds} committed",
                hint=f"it keeps running on the SuperLink: follow it with `flwr ls --run-id "
                f"{flower_run_id}`, stop it with `flwr stop {flower_run_id}`; --timeout-s "
                "waits longer",
            )
        sleep(min(poll_s, left))


def has_run(db_url: str, run_id: str) -> bool:
    """Whether the registry has a run called ``run_id``."""
    from edgefl.server.fl.ledger import FlStore

    try:
        store = FlStore(db_url)
    except EdgeflError:
        return False
    try:
        store.result(run_id)
        return True
    except EdgeflError:
        return False
    finally:
        store.close()


def report_run(
    submitted: dict[str, Any], status: str, as_json: bool, *, db_url: str | None = None
) -> None:
    """Print a finished run; raise RunFailedError (exit 9) unless it trained every round.

    ``db_url`` is the registry with its password; ``submitted["db_url"]`` is only shown.
    """
    from edgefl.server.fl.ledger import load_result

    run_id = str(submitted["run_id"])
    url = db_url or str(submitted["db_url"])
    result = load_result(url, run_id) if has_run(url, run_id) else None
    if as_json:
        emit_json(
            {
                **submitted,
                "flower_status": status,
                "result": result.to_dict() if result is not None else None,
            }
        )
    else:
        typer.echo(f"run {run_id} (Flower run {submitted['flower_run_id']}): {status}")
        if result is not None:
            print_rounds(
                [r.to_dict() for r in result.rounds],
                notes=[
                    "" if r.aggregated else f"trained nobody: {r.why_nothing_trained()}"
                    for r in result.rounds
                ],
            )
            if result.epsilon_per_device or result.lifetime:
                print_device_privacy(result.epsilon_per_device, result.lifetime)
            if result.central_epsilon is not None:
                typer.echo(f"central ε {result.central_epsilon:.4f}")
    if status != "finished:completed":
        raise RunFailedError(
            f"Flower run {submitted['flower_run_id']} ended {status}",
            hint=f"see `flwr log {submitted['flower_run_id']}` and the SuperLink log in the "
            "server's state_dir/superlink/",
        )
    # Flower's "completed" only says the ServerApp returned: a run whose rounds trained
    # nobody, or that stopped early, did not do what was asked.
    shortfall = result.shortfall() if result is not None else "the registry has no such run"
    if shortfall is not None:
        raise RunFailedError(f"run {run_id} did not complete: {shortfall}")


def print_rounds(
    rounds: Sequence[Mapping[str, Any]], *, notes: Sequence[str] | None = None
) -> None:
    """A run's rounds as a table (rows of ``RoundReport.to_dict``).

    With ``notes`` (one per round), a ``note`` column too.
    """
    from edgefl.clikit import print_table

    columns: list[tuple[str, Literal["left", "right"]]] = [
        ("round", "right"),
        ("accuracy", "right"),
        ("loss", "right"),
        ("replies", "right"),
        ("ε max", "right"),
        ("s", "right"),
    ]
    rows: list[tuple[Any, ...]] = [
        (
            r["round"],
            f"{r['accuracy']:.4f}",
            f"{r['loss']:.4f}",
            f"{r['num_replies']}/{r['num_selected']}",
            f"{r['epsilon_max']:.3f}",
            f"{r['wall_s']:.1f}",
        )
        for r in rounds
    ]
    if notes is not None:
        columns.append(("note", "left"))
        rows = [(*row, note) for row, note in zip(rows, notes, strict=True)]
    print_table(columns, rows)


def print_device_privacy(
    run_epsilon: dict[str, float] | None, lifetime: dict[str, dict[str, Any]]
) -> None:
    """The per-run ledger's ε of each device beside its lifetime ε over every run.

    ``lifetime`` is :attr:`~edgefl.federation.FederationResult.lifetime` (or
    :meth:`~edgefl.server.fl.ledger.FlStore.lifetime` as dicts); ``-`` where a device has
    no ε in this run (it refused) or no lifetime figure. ``run_epsilon`` None: no run
    column (every device of the registry).
    """
    from edgefl.clikit import Column, print_table

    def cap(info: dict[str, Any] | None) -> str:
        if info is None or info.get("cap") is None:
            return "-"
        return f"{float(info['cap']):g}"

    run_eps = run_epsilon or {}
    devices = sorted(set(run_eps) | set(lifetime))
    rows: list[tuple[object, ...]] = [
        (
            device,
            f"{run_eps[device]:.4f}" if device in run_eps else "-",
            f"{lifetime[device]['epsilon']:.4f}" if device in lifetime else "-",
            f"{lifetime[device]['delta']:g}" if device in lifetime else "-",
            len(lifetime[device]["runs"]) if device in lifetime else "-",
            cap(lifetime.get(device)),
        )
        for device in devices
    ]
    columns: list[Column] = [
        ("device", "left"),
        ("ε this run", "right"),
        ("lifetime ε", "right"),
        ("lifetime δ", "right"),
        ("runs", "right"),
        ("lifetime cap", "right"),
    ]
    if run_epsilon is None:
        columns.pop(1)
        rows = [(row[0], *row[2:]) for row in rows]
    print_table(columns, rows)
