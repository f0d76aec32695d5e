"""What a running server leaves in its state folder, and the clean-up after a kill.

While ``edgefl server start`` runs, ``<state_dir>/server.json`` (:data:`RUNTIME_FILE`)
holds its addresses, ports and PIDs: the admin commands find the SuperLink there, and
the next server on the same folder finds what a killed predecessor left running
(:func:`end_leftovers`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from edgefl.errors import ConfigError
from edgefl.procs import cmdline, cwd, end_process_group, pid_alive

__all__ = ["RUNTIME_FILE", "end_leftovers", "read_runtime"]

log = logging.getLogger(__name__)

RUNTIME_FILE = "server.json"
"""Written into ``state_dir`` while the server runs (addresses, ports, PIDs)."""


def read_runtime(state_dir: Path) -> dict[str, Any] | None:
    """The running server's ``server.json`` (see :data:`RUNTIME_FILE`), or ``None``."""
    try:
        data = json.loads((Path(state_dir) / RUNTIME_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def end_leftovers(state_dir: Path) -> None:
    """End the children a server on ``state_dir`` left running when it was killed.

    A server killed with ``-9`` (or by the OOM killer) cannot stop its broker and
    SuperLink; they keep its ports and files. Its ``server.json`` names them: each one
    still alive whose command line or working folder lies in ``state_dir`` is ended
    (its process group: SIGTERM, SIGKILL after 10 s).

    Raises:
        ConfigError: The server that wrote ``server.json`` still runs.
    """
    previous = read_runtime(state_dir)
    pids = previous.get("pids") if previous else None
    if not isinstance(pids, dict):
        return
    server_pid = pids.get("server")
    if (
        isinstance(server_pid, int)
        and server_pid != os.getpid()
        and pid_alive(server_pid)
        and any("edgefl" in arg for arg in cmdline(server_pid))
    ):
        raise ConfigError(
            f"an edgefl server (pid {server_pid}) already runs on {state_dir}",
            hint="stop it first (SIGTERM), or give this one another state_dir",
        )
    home = state_dir  # absolute (ServerConfig.resolved_state_dir)
    for name, pid in pids.items():
        if name == "server" or not isinstance(pid, int) or not pid_alive(pid):
            continue
        folder = cwd(pid)
        in_home = any(str(home) in arg for arg in cmdline(pid)) or (
            folder is not None and folder.is_relative_to(home)
        )
        if not in_home:
            continue  # the PID was reused by something else
        log.warning(
            "ending %s (pid %d), left running by a server on %s that did not stop",
            name,
            pid,
            state_dir,
        )
        if not end_process_group(pid):
            raise ConfigError(
                f"{name} (pid {pid}) left by an earlier server does not end",
                hint=f"end it by hand (kill -9 {pid}), then start again",
            )
