"""Background jobs of the server process: long admin operations started remotely.

``edgefl server release --server URL`` and ``rollout --server URL`` run for minutes: the
operation starts the work in a thread of the server process and answers a job id at
once; the ``job`` operation reads the job's state, its progress lines and its result.

Jobs live in memory only (:data:`JOBS`): a server restart forgets them (the work they
did is in the registry: ``edgefl server releases``, ``rollouts``). The history is
bounded: the newest :data:`MAX_FINISHED` finished jobs are kept, and each job keeps its
newest :data:`MAX_LINES` progress lines. One job of a kind runs at a time per key (a
run for ``release``, a model for ``rollout``).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from edgefl.errors import EdgeflError, ExitCode

__all__ = [
    "JOBS",
    "MAX_FINISHED",
    "MAX_LINES",
    "Job",
    "JobFailedError",
    "JobRunningError",
    "Jobs",
]

MAX_FINISHED: Final = 50
"""Finished jobs kept (oldest forgotten first)."""
MAX_LINES: Final = 200
"""Progress lines kept per job (oldest dropped first)."""


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class JobRunningError(EdgeflError):
    """A job of this kind already runs for this key."""

    exit_code = ExitCode.BAD_INPUT


class JobFailedError(Exception):
    """Raised by a job's work to end it failed while still handing back a result.

    Args:
        message: Why it failed.
        result: The result document (printed like a success's).
        exit_code: The exit code the command gives.
        hint: What to do.
    """

    def __init__(
        self, message: str, *, result: Any = None, exit_code: int = 1, hint: str = ""
    ) -> None:
        super().__init__(message)
        self.result = result
        self.exit_code = exit_code
        self.hint = hint


@dataclass
class Job:
    """One background job; read it with :meth:`to_dict` (under the registry's lock)."""

    id: str
    kind: str
    key: str
    target: str
    by: str
    state: str = "running"
    started_at: str = field(default_factory=_now)
    finished_at: str | None = None
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_LINES))
    dropped: int = 0
    result: Any = None
    error: dict[str, Any] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document the ``job`` operation answers."""
        return {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "by": self.by,
            "state": self.state,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": list(self.lines),
            "progress_offset": self.dropped,
            "result": self.result,
            "error": self.error,
        }


class Jobs:
    """The jobs of this process, thread-safe, with a bounded history."""

    def __init__(self, max_finished: int = MAX_FINISHED) -> None:
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._max_finished = max_finished

    def start(
        self,
        kind: str,
        key: str,
        *,
        target: str,
        by: str,
        work: Callable[[Job, Callable[[str], None]], Any],
    ) -> Job:
        """Start ``work(job, report)`` in a daemon thread; its return value is the result.

        ``report(line)`` appends a progress line. The work ends the job ``failed`` by
        raising (:class:`JobFailedError` keeps a result and an exit code; an
        :class:`~edgefl.errors.EdgeflError` keeps its message, hint and exit code).

        Raises:
            JobRunningError: A ``kind`` job for ``key`` still runs.
        """
        with self._lock:
            for other in self._jobs.values():
                if other.kind == kind and other.key == key and other.state == "running":
                    raise JobRunningError(
                        f"a {kind} job for {key} is already running: {other.id} "
                        f"(started {other.started_at} by {other.by})",
                        hint=f"follow it with `edgefl server job {other.id} --server ...`",
                    )
            job = Job(f"j-{secrets.token_hex(6)}", kind, key, target, by)
            self._jobs[job.id] = job
            self._trim()

        def report(line: str) -> None:
            with self._lock:
                if len(job.lines) == MAX_LINES:
                    job.dropped += 1
                job.lines.append(line)

        def run() -> None:
            state, result, error = "succeeded", None, None
            try:
                result = work(job, report)
            except JobFailedError as exc:
                state, result = "failed", exc.result
                error = {"message": str(exc), "hint": exc.hint, "exit_code": exc.exit_code}
            except EdgeflError as exc:
                state = "failed"
                error = {
                    "message": exc.message,
                    "hint": exc.hint,
                    "exit_code": int(exc.exit_code),
                }
            except Exception as exc:  # the job must end, whatever broke
                state = "failed"
                error = {"message": f"{type(exc).__name__}: {exc}", "hint": "", "exit_code": 1}
            with self._lock:
                job.state, job.result, job.error = state, result, error
                job.finished_at = _now()
                self._trim()

        job.thread = threading.Thread(target=run, name=f"edgefl-job-{job.id}", daemon=True)
        job.thread.start()
        return job

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's document, or None when unknown (or forgotten)."""
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else job.to_dict()

    def list(self) -> list[dict[str, Any]]:
        """Every job kept, oldest first."""
        with self._lock:
            return [job.to_dict() for job in self._jobs.values()]

    def stop_all(self, timeout: float = 10.0) -> None:
        """Ask every running job to stop and wait up to ``timeout`` s for them to end.

        A rollout ends ``interrupted``, leaving the devices as they are; a release cannot
        stop midway (the process exit ends it; nothing is published then).
        """
        with self._lock:
            threads = [j.thread for j in self._jobs.values() if j.thread is not None]
            for job in self._jobs.values():
                job.stop.set()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _trim(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.state != "running"]
        for job_id in finished[: max(0, len(finished) - self._max_finished)]:
            del self._jobs[job_id]


JOBS: Final = Jobs()
"""The server process's jobs."""
