"""``edgefl server job ID``, and following a remote server's background job.

``edgefl server release --server URL`` and ``rollout --server URL`` start a job on the
server (see :mod:`edgefl.server.ops.background`) and follow it here: :func:`follow_job`
polls the ``job`` operation, prints the new progress lines on stderr and returns the
finished job; the command then prints its result as it does locally.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error
from edgefl.errors import EdgeflError
from edgefl.server.cli_common import ServerConfigOption
from edgefl.server.cli_ops import RemoteOptions, remote_options

__all__ = ["RemoteJobError", "app", "failure", "follow_job", "start_remote_job"]

app = typer.Typer()

POLL_S = 1.0


class RemoteJobError(EdgeflError):
    """A remote job ended failed; it carries the job's exit code."""

    def __init__(self, message: str, *, hint: str = "", exit_code: int = 1) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code  # type: ignore[assignment]  # the job's own code


def failure(doc: dict[str, Any]) -> RemoteJobError:
    """The error a failed job's document describes."""
    error = doc.get("error") or {}
    return RemoteJobError(
        f"job {doc['id']} ({doc['kind']} {doc['target']}) failed: "
        + str(error.get("message") or "no reason given"),
        hint=str(error.get("hint") or ""),
        exit_code=int(error.get("exit_code") or 1),
    )


def follow_job(
    job_id: str,
    *,
    remote: RemoteOptions,
    poll_s: float = POLL_S,
    quiet: bool = False,
) -> dict[str, Any]:
    """Poll ``job`` until it ends, printing its new progress lines on stderr.

    Returns:
        The finished job's document (state ``succeeded`` or ``failed``).
    """
    from edgefl.clikit import error_console_print
    from edgefl.server.cli_fleet import call_op

    seen = 0
    while True:
        doc: dict[str, Any] = call_op("job", {"id": job_id}, config=None, remote=remote)
        offset = int(doc.get("progress_offset", 0))
        lines = doc["progress"]
        start = max(0, seen - offset)
        if not quiet:
            for line in lines[start:]:
                error_console_print(line)
        seen = offset + len(lines)
        if doc["state"] != "running":
            return doc
        time.sleep(poll_s)


def start_remote_job(
    name: str, arguments: dict[str, Any], *, remote: RemoteOptions, wait: bool, as_json: bool
) -> dict[str, Any] | None:
    """Start operation ``name`` on the remote server; follow it unless ``wait`` is false.

    Returns:
        The finished job's document, or None when not waiting (the job id was printed).
    """
    from edgefl.clikit import error_console_print
    from edgefl.server.cli_fleet import call_op

    started = call_op(name, arguments, config=None, remote=remote)
    job_id = started["job"]
    if not wait:
        if as_json:
            emit_json(started)
        else:
            typer.echo(job_id)
            error_console_print(
                f"{name} started on the server as job {job_id}; follow it with "
                f"`edgefl server job {job_id} --wait --server ...`"
            )
        return None
    error_console_print(f"{name} runs on the server as job {job_id}")
    return follow_job(job_id, remote=remote)


@app.command()
@exits_on_error
@remote_options
def job(
    remote: RemoteOptions,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job id (j-...).")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow it until it ends (exit code: the job's).")
    ] = False,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Show a background job of the server (a remote release or rollout).

    Its state (running, succeeded, failed), progress lines and result. Jobs live in the
    server process's memory: a restart forgets them (their records stay: `server
    releases`, `server rollouts`).
    """
    from edgefl.server.cli_fleet import call_op

    if wait and remote.remote:
        doc = follow_job(job_id, remote=remote, quiet=as_json)
    else:
        doc = call_op("job", {"id": job_id}, config=config, remote=remote)
    if as_json:
        emit_json(doc)
    else:
        typer.echo(
            f"job {doc['id']}: {doc['kind']} {doc['target']} by {doc['by']}: "
            f"{doc['state'].upper()} (started {doc['started_at']}"
            + (f", ended {doc['finished_at']})" if doc["finished_at"] else ")")
        )
        if not wait:
            for line in doc["progress"][-10:]:
                typer.echo(f"  {line}")
    if doc["state"] == "failed":
        raise failure(doc)
