"""One managed child process: start, readiness, stop by process group, log tail.

Every process edgefl starts and owns (mosquitto, ``flower-superlink``, nginx,
``flower-supernode``, and the ``edgefl`` processes tests run) goes through
:class:`ManagedProcess`:

- **start**: in its own session, so it leads a process group of its own (the children it
  starts go with it, and a Ctrl-C in our terminal is ours to handle), its output appended
  to one log file;
- **readiness**: a TCP port that accepts connections (:meth:`ManagedProcess.wait_for_port`)
  or a log line that matches a pattern (:meth:`ManagedProcess.wait_for_log`), with a
  timeout; a process that exits first or does not become ready in time fails with its
  log's last meaningful line and the log's path;
- **stop**: SIGTERM to the group, SIGKILL after a grace period, then SIGKILL to what the
  group left behind, waiting until the group is empty (a listening socket closes only
  when the last process holding it is gone);
- the **log tail** and its **last meaningful line** (:func:`last_meaningful_line`, the one
  log-line picker).

Restarting a process that died is the supervisor's job (:mod:`edgefl.supervise`), on the
one backoff curve (:func:`edgefl.backoff.backoff_delay`). The SIGTERM-then-SIGKILL sequence
is :func:`edgefl.procs.end_process_group`, which also ends a process this one holds no
handle to (left running by a killed predecessor).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from edgefl.netutil import port_open
from edgefl.procs import end_process_group

__all__ = [
    "ManagedProcess",
    "ProcessNotReadyError",
    "last_log_line",
    "last_meaningful_line",
    "read_tail",
    "wait_until",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ProcessNotReadyError(Exception):
    """A managed process exited at start-up or did not become ready in time.

    Attributes:
        message: What happened, ending with the log's last meaningful line when it exited.
        hint: ``see LOG``.
        exit_code: Its exit code, or ``None`` when it timed out.
    """

    def __init__(self, message: str, *, hint: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, *, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; an exception it raises ends the wait at once.

    Raises:
        TimeoutError: It did not hold within ``timeout`` seconds (the message names ``what``).
    """
    retrying = Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_fixed(interval),
        retry=retry_if_result(lambda held: not held),
        retry_error_callback=lambda _state: False,
    )
    if not retrying(condition):
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def read_tail(path: Path, max_bytes: int = 64 * 1024) -> str:
    """The last ``max_bytes`` of a log file as text (``""`` if it cannot be read)."""
    try:
        with Path(path).open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


_BOX = "".join(chr(c) for c in range(0x2500, 0x2580))
"""Box-drawing characters: the frame rich draws around an error."""


def last_meaningful_line(
    text: str,
    *,
    causes: re.Pattern[str] | Sequence[str] = (),
    noise: Sequence[str] = (),
    skip: Sequence[str] = (),
    levels: Sequence[str] = (),
) -> str:
    """The line of a process's output that best says what went wrong (``""`` if none).

    ANSI colours, blank lines and the frame of a boxed message (rich draws errors in a box
    of U+2500-U+257F characters) are dropped, so a boxed error yields its text, not its
    border. In order of preference:

    1. the last *useful* line (one that neither starts with a ``noise`` prefix nor
       contains a ``skip`` text) naming a cause (matching ``causes``, a pattern or texts
       any of which the line contains);
    2. the last line starting with one of ``levels`` (e.g. ``ERROR``);
    3. the last useful line.

    With no arguments this is the last non-blank line.
    """
    lines = [_ANSI.sub("", ln).strip().strip(_BOX).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    useful = [
        ln for ln in lines if not ln.startswith(tuple(noise)) and not any(s in ln for s in skip)
    ]
    if isinstance(causes, re.Pattern):
        pattern = causes

        def is_cause(line: str) -> bool:
            return pattern.search(line) is not None
    else:
        words = tuple(causes)

        def is_cause(line: str) -> bool:
            return any(w in line for w in words)

    if causes:
        for line in reversed(useful):
            if is_cause(line):
                return line
    if levels:
        for line in reversed(lines):
            if line.startswith(tuple(levels)):
                return line
    return useful[-1] if useful else ""


def last_log_line(
    *paths: Path,
    causes: re.Pattern[str] | Sequence[str] = (),
    max_bytes: int = 64 * 1024,
) -> str:
    """:func:`last_meaningful_line` of the first of ``paths`` whose tail has a line."""
    for path in paths:
        line = last_meaningful_line(read_tail(path, max_bytes), causes=causes)
        if line:
            return line
    return ""


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class ManagedProcess:
    """One child process leading its own process group, its output in one log file.

    Args:
        argv: The command line.
        log_path: File its stdout and stderr are appended to.
        name: How messages name it (``mosquitto``, ``flower-superlink`` ...).
        env: Its environment (default: ours).
        cwd: Its working folder.
        error_logs: Logs its last meaningful line is looked for in before ``log_path``
            (nginx writes its errors to a file of its own).
        causes: What marks a line naming a cause (see :func:`last_meaningful_line`).
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        error_logs: Sequence[Path] = (),
        causes: re.Pattern[str] | Sequence[str] = (),
    ) -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.name = name or Path(self.argv[0]).name
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.error_logs = tuple(error_logs)
        self.causes = causes
        self.log_offset = 0
        """Size of the log when the process was last started (where its output begins)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- state ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the process (also while it is an unreaped zombie), ``None`` if not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Its exit code once :meth:`poll` or a stop saw it exit."""
        return self._proc.returncode if self._proc is not None else None

    def poll(self) -> int | None:
        """Its exit code if it has exited (reaping it), else ``None``."""
        return self._proc.poll() if self._proc is not None else None

    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to exit; its exit code.

        Raises:
            RuntimeError: It was never started.
            subprocess.TimeoutExpired: It still runs after ``timeout`` seconds.
        """
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._proc.wait(timeout)

    # -- start ------------------------------------------------------------------------

    def start(self) -> int:
        """Start it (unless it runs), appending its output to the log; its PID.

        Raises:
            OSError: The command cannot be run (the log is closed again).
        """
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        self.close_log()
        self._proc = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.log_offset = self._log.tell()
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own group: its children go with it
            )
        except OSError:
            self.close_log()
            raise
        return self._proc.pid

    def wait_for_port(
        self, host: str, port: int, timeout: float, *, interval: float = 0.05
    ) -> None:
        """Wait until ``host:port`` accepts connections.

        Raises:
            ProcessNotReadyError: It exited first, or did not listen within ``timeout`` seconds
                (then it is killed).
        """
        self._wait_ready(
            lambda: port_open(host, port), timeout, f"listen on {host}:{port}", interval
        )

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float, *, interval: float = 0.05
    ) -> re.Match[str]:
        """Wait until a line of its output (since the last start) matches ``pattern``.

        Raises:
            ProcessNotReadyError: It exited first, or no line matched within ``timeout`` seconds
                (then it is killed).
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        found: list[re.Match[str]] = []

        def matched() -> bool:
            match = regex.search(self.output())
            if match is not None:
                found.append(match)
            return match is not None

        self._wait_ready(matched, timeout, f"log a line matching {regex.pattern!r}", interval)
        return found[0]

    def _wait_ready(
        self, ready: Callable[[], bool], timeout: float, what: str, interval: float
    ) -> None:
        proc = self._proc
        if proc is None:
            raise RuntimeError(f"{self.name} was not started")

        def check() -> bool:
            if ready():
                return True
            code = proc.poll()
            if code is not None:
                raise ProcessNotReadyError(
                    f"{self.name} exited with code {code} at start-up: {self.last_line()}",
                    hint=f"see {self.error_logs[0] if self.error_logs else self.log_path}",
                    exit_code=code,
                )
            return False

        try:
            wait_until(check, timeout, what, interval=interval)
        except TimeoutError:
            self.kill()
            raise ProcessNotReadyError(
                f"{self.name} did not {what} within {timeout:g} s",
                hint=f"see {self.error_logs[0] if self.error_logs else self.log_path}",
                exit_code=None,
            ) from None

    # -- signals and stop -------------------------------------------------------------

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to its process group (nothing if it is gone)."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process alone (e.g. SIGHUP: reload), if it runs."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL after ``grace`` seconds, then what the group left.

        Returns once the group is empty (at most 5 s after the SIGKILL); idempotent.

        Returns:
            Its exit code (``None`` if it was never started).
        """
        proc = self._proc
        if proc is None:
            self.close_log()
            return None
        if proc.poll() is None:
            end_process_group(proc.pid, timeout=grace)  # gone or a zombie now
            proc.wait()
        self._end_group()
        self.close_log()
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole group at once (a crash) and reap it.

        Returns:
            Its exit code (``None`` if it was never started).
        """
        proc = self._proc
        if proc is None:
            return None
        self.signal_group(signal.SIGKILL)
        proc.wait()
        self._end_group()
        self.close_log()
        return proc.returncode

    def _end_group(self) -> None:
        """SIGKILL what is left of the group, and wait (5 s at most) until it is empty."""
        if self._proc is None:
            return
        self.signal_group(signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while not _group_gone(self._proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def close_log(self) -> None:
        """Close our handle on the log file (the process keeps its own)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- log --------------------------------------------------------------------------

    def output(self, max_bytes: int = 256 * 1024) -> str:
        """What it wrote to the log since it was last started (its last ``max_bytes``)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                end = fh.tell()
                fh.seek(max(self.log_offset, end - max_bytes))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, max_bytes: int = 64 * 1024) -> str:
        """The end of the log file."""
        return read_tail(self.log_path, max_bytes)

    def last_line(self) -> str:
        """The last meaningful line of its error logs, else of its log (``""`` if none)."""
        return last_log_line(*self.error_logs, self.log_path, causes=self.causes)

    def __enter__(self) -> ManagedProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
