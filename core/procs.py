"""Facts about other processes by PID (Linux ``/proc``), and ending a process group.

For processes this one did not start, or no longer holds a handle to: an agent's status
reader checking the daemon, a server ending what a predecessor killed with ``-9`` left
running. A PID can be reused, so callers check :func:`cmdline` or :func:`cwd` before they
signal anything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

__all__ = [
    "ancestors",
    "cmdline",
    "cwd",
    "descendants",
    "end_process_group",
    "handles_signal",
    "pid_alive",
    "start_ticks",
]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie is not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc to ask: it answered the signal
    return state != "Z"


def cmdline(pid: int) -> list[str]:
    """The process's arguments, or ``[]`` if it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name (field 3 onwards), or ``[]``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``None`` if it is gone)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if len(fields) > 19 else None


def ancestors(pid: int) -> list[int]:
    """``pid``'s parent, its parent and so on up to (not including) PID 0."""
    found: list[int] = []
    fields = _stat_fields(pid)
    while len(fields) > 1 and int(fields[1]) > 0 and int(fields[1]) not in found:
        found.append(int(fields[1]))
        fields = _stat_fields(found[-1])
    return found


def descendants(pid: int) -> list[int]:
    """The PIDs of ``pid``'s children, their children and so on (``[]`` without /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        try:
            ppid = int(fields[1])
        except (IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(parents.get(child, []))
    return found


def handles_signal(pid: int, signum: int) -> bool:
    """Whether ``pid`` has a handler installed for ``signum`` (``SigCgt`` in its status).

    ``False`` when it is gone, unreadable, or would take the signal's default action.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            try:
                return bool(int(line.split()[1], 16) >> (int(signum) - 1) & 1)
            except (IndexError, ValueError):
                return False
    return False


def cwd(pid: int) -> Path | None:
    """The process's working folder, or ``None`` if it is gone or unreadable."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def end_process_group(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM ``pid`` (its whole group when it leads one), SIGKILL after ``timeout``.

    Returns:
        Whether it is gone.
    """
    try:
        group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return True

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        send(signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    if group:
        send(signal.SIGKILL)  # what the leader left of its group (its own children)
    return not pid_alive(pid)
