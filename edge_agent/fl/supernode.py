"""The agent's Flower SuperNode: when to run it and how (:class:`SuperNodeSupervisor`).

:class:`SuperNodeSupervisor` is polled by the agent's main loop about once a second. It
starts ``flower-supernode`` (TLS to the SuperLink with the fleet CA, node authentication
with the device's node key from ``edgefl agent enroll``) when the policy allows it
(:class:`~edgefl.edge_agent.fl.policy.TrainingPolicy`: connected, enough samples, inside
the time windows, under the resource thresholds). It stops it (SIGTERM to its process
group, SIGKILL after a grace period) when the policy stops allowing it, and restarts it
with exponential backoff and jitter when it exits on its own; the backoff resets after a
stable run (:class:`edgefl.supervise.RestartBackoff`).

With ``warm_start`` (the default) the SuperNode's ``PATH`` starts with a private bin dir
whose ``flwr-clientapp`` runs each message in a process forked from a warm zygote
(:mod:`edgefl.edge_agent.fl.warmstart`), in the same process group; the first message
of a run, and any message the warm path cannot take, is a normal cold start.

The SuperNode is a managed process (:class:`edgefl.process.ManagedProcess`: its own
process group, so its ``flwr-clientapp`` children go with it) writing to
``<state_dir>/supernode.log``. When it exits, the supervisor logs the line of that log
that names the cause with a hint (:mod:`edgefl.edge_agent.fl.supernode_log`), so a
refusal is clear in the agent's own log. An unreachable SuperLink does not make the
SuperNode exit: it retries by itself, and the agent keeps collecting meanwhile.

Its pid (and the node id it last activated as) is kept in ``<state_dir>/supernode.json``.
An agent killed with ``-9`` cannot stop its SuperNode, which then keeps the device's node
online on the SuperLink, so the next activation would be refused; before its first start
a supervisor ends such leftovers (:meth:`SuperNodeSupervisor.end_leftovers`), and a
refused activation is logged with the likely cause (node still online after a SuperNode
went away without signing off, key no longer accepted, key never registered).

The config (:mod:`~edgefl.edge_agent.fl.supernode_config`), the policy
(:mod:`~edgefl.edge_agent.fl.policy`), the resource reader
(:mod:`~edgefl.edge_agent.fl.resources`) and the log heuristics live in their own
modules; their names are re-exported here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

from edgefl.edge_agent.fl import superexec
from edgefl.edge_agent.fl.apptrust import write_policy
from edgefl.edge_agent.fl.policy import TrainingPolicy
from edgefl.edge_agent.fl.resources import Resources, read_resources
from edgefl.edge_agent.fl.supernode_config import NodeConfigValue, TrainingConfig, node_config_arg
from edgefl.edge_agent.fl.supernode_log import (
    ANSI,
    ENDED,
    HEALTHY,
    NODE_ID,
    REFUSED,
    RETRYING,
    TROUBLE,
    meaningful_line,
    tls_hint,
)
from edgefl.edge_agent.fl.warmstart import BIN_DIR, POLICY_FILE, install_launcher
from edgefl.enrollment import IdentityPaths
from edgefl.files import write_text_atomic
from edgefl.netutil import free_port
from edgefl.process import ManagedProcess
from edgefl.procs import cmdline, cwd, descendants, end_process_group, handles_signal, pid_alive
from edgefl.supervise import RestartBackoff

__all__ = [
    "LOG_FILE",
    "RUNTIME_FILE",
    "TELEMETRY_DIR",
    "Resources",
    "SuperNodeSupervisor",
    "TrainingConfig",
    "TrainingPolicy",
    "meaningful_line",
    "node_config_arg",
    "read_resources",
]

logger = logging.getLogger(__name__)

LOG_FILE: Final = "supernode.log"
RUNTIME_FILE: Final = "supernode.json"
"""The running SuperNode's pid and the node id it last activated as (in the state dir)."""
TELEMETRY_DIR: Final = "fl-telemetry"
"""Folder (in the state dir) where the ClientApp spools one JSON document per round."""

_LINGER_S = 10.0
"""How long a SuperNode that said it gave up (supernode_log.ENDED) may stay alive."""
_STALL_S = 30.0
"""Silence after a connection error (supernode_log.TROUBLE) that counts as wedged."""

_OURS: Final = (
    "flower-supernode",
    "flwr-clientapp",
    "edgefl.edge_agent.fl.warmstart",
    "edgefl.edge_agent.fl.apptrust",
)
"""Command-line marks of the processes a supervisor starts (the SuperNode and its apps)."""
_STILL_ONLINE_S = 120.0
"""How long after a SuperNode of this device went away without signing off the SuperLink
may still count its node as online (heartbeat 30 s x patience 2, with slack)."""


def _leftover_candidates(state_dir: Path) -> list[int]:
    """PIDs of processes working in ``state_dir`` whose command line is one of ours."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if cwd(pid) == state_dir and any(m in a for a in cmdline(pid) for m in _OURS):
            found.append(pid)
    return found


State = Literal["stopped", "waiting", "running", "stopping", "backoff"]


class SuperNodeSupervisor:
    """Runs ``flower-supernode`` while the policy allows it (see the module docstring).

    Args:
        config: The training section.
        device_id: This device's id (``device-id`` node config).
        state_dir: The agent's state dir: log, accountant, identity, telemetry spool.
        data_store: The local data store file the ClientApp reads.
        clock: Monotonic clock (tests inject one).
        wallclock: Local wall-clock time for the windows.
        resources: Source of resource readings.
        rng: Uniform ``[0, 1)`` numbers for the backoff jitter.
    """

    def __init__(
        self,
        config: TrainingConfig,
        *,
        device_id: str,
        state_dir: Path,
        data_store: Path,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], dt.datetime] = dt.datetime.now,
        resources: Callable[[], Resources] = read_resources,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.policy = TrainingPolicy(config)
        self.device_id = device_id
        self.state_dir = Path(state_dir)
        self.data_store = Path(data_store)
        self.telemetry_dir = self.state_dir / TELEMETRY_DIR
        identity = IdentityPaths(self.state_dir)
        self.root_certificates = config.tls.ca_file or identity.ca
        self.node_key = config.auth_key_file or identity.node_key
        self.log_path = self.state_dir / LOG_FILE
        self.flower_home = self.state_dir / "flwr-home"
        self._clock = clock
        self._wallclock = wallclock
        self._resources = resources
        self._proc: ManagedProcess | None = None
        self._read_offset = 0
        self._tail = ""
        self._port = config.clientappio_port
        self._stop_deadline: float | None = None
        self._backoff = RestartBackoff(
            config.restart_min_s, config.restart_max_s, config.stable_after_s, rng
        )
        self._decision: tuple[bool, str] | None = None
        self._warned_retrying = False
        self._ended_at: float | None = None
        self._suspect = False
        self._last_output = 0.0
        self.state: State = "stopped"
        self.reason = "not polled yet"
        self.starts = 0
        self.last_exit_code: int | None = None
        self.last_error = ""
        self.node_id: int | None = None
        self.refused_apps = 0
        self.last_refusal = ""
        self._partial_line = ""
        self.runtime_path = self.state_dir / RUNTIME_FILE
        self._leftovers_checked = False
        # When a SuperNode of this device last went away without signing off (ended as a
        # leftover, crashed, killed): the SuperLink may count its node online until then.
        self._unclean_end_at: float | None = None
        known = self._read_runtime().get("node_id")
        self._known_node_id: int | None = known if isinstance(known, int) else None

    # ------------------------------------------------------------------ public API

    @property
    def pid(self) -> int | None:
        """PID of the running SuperNode."""
        return self._proc.pid if self._proc is not None else None

    @property
    def restarts(self) -> int:
        """How often the SuperNode was scheduled to start again after it exited."""
        return self._backoff.restarts

    def command(self) -> list[str]:
        """The ``flower-supernode`` command line (the port is chosen on first use)."""
        if self._port is None:
            self._port = free_port()
        exe = Path(sys.executable).parent / "flower-supernode"
        cmd = [str(exe) if exe.exists() else "flower-supernode"]
        cmd += ["--superlink", str(self.config.superlink)]
        if self.config.insecure:
            cmd.append("--insecure")
        else:
            cmd += [
                "--root-certificates",
                str(self.root_certificates),
                "--auth-supernode-private-key",
                str(self.node_key),
            ]
        cmd += ["--port", str(self._port), "--node-config", node_config_arg(self.node_config())]
        return cmd

    def node_config(self) -> dict[str, NodeConfigValue]:
        """What the ClientApp finds in ``context.node_config``."""
        return {
            "device-id": self.device_id,
            "state-dir": str(self.state_dir),
            "data-store": str(self.data_store),
            "eval-fraction": self.config.eval_fraction,
            "telemetry-dir": str(self.telemetry_dir),
            **self.config.node_config,
            # The lifetime budget (0.0: no cap); after the extra entries, which cannot
            # change it.
            "lifetime-epsilon": self.config.privacy.lifetime_epsilon or 0.0,
            "lifetime-delta": self.config.privacy.lifetime_delta,
        }

    def poll(self, *, connected: bool, samples: int) -> None:
        """One supervision step: reap, decide, start or stop. Never blocks for long."""
        now = self._clock()
        self._follow_log()
        if self._proc is not None and self._proc.poll() is not None:
            self._reaped(now)
        elif (
            self._proc is not None
            and self._ended_at is not None
            and now - self._ended_at >= _LINGER_S
        ):
            logger.warning(
                "the SuperNode (pid %d) gave up %.0f s ago but its process is still there; "
                "killing it so it can be restarted",
                self._proc.pid,
                now - self._ended_at,
            )
            self._ended_at = None
            self._proc.signal_group(signal.SIGKILL)
        elif (
            self._proc is not None
            and self._suspect
            and self._stop_deadline is None
            and now - self._last_output >= _STALL_S
        ):
            logger.warning(
                "the SuperNode (pid %d) reported a connection error and has been silent for "
                "%.0f s since (it can wedge after a network cut); killing it so it can be "
                "restarted",
                self._proc.pid,
                now - self._last_output,
            )
            self._suspect = False
            self._proc.signal_group(signal.SIGKILL)
        allowed, reason = self._decide(connected, samples)
        if self._proc is not None:
            if self._stop_deadline is not None:
                if now >= self._stop_deadline:
                    self._proc.signal_group(signal.SIGKILL)
                return
            if not allowed:
                logger.info("stopping the SuperNode (pid %d): %s", self._proc.pid, reason)
                self._terminate(now, reason)
            return
        if not allowed:
            self.state, self.reason = "waiting", reason
            return
        if not self._backoff.due(now):
            self.state = "backoff"
            return
        self._start(now)

    def close(self, timeout: float | None = None) -> None:
        """Stop the SuperNode (if running) and wait for it; for agent shutdown."""
        grace = self.config.stop_grace_s if timeout is None else timeout
        if self._proc is not None:
            if self._proc.running():
                logger.info("stopping the SuperNode (pid %d): agent shutdown", self._proc.pid)
            # SIGTERM, SIGKILL after the grace, then its leftover ClientApp processes.
            self.last_exit_code = self._proc.stop(grace)
            self._proc = None
            self._write_runtime(pid=None)
        self.state, self.reason = "stopped", "agent stopped"

    def status(self) -> dict[str, Any]:
        """The supervisor's state for ``agent status``."""
        return {
            "state": self.state,
            "reason": self.reason,
            "pid": self.pid,
            "superlink": str(self.config.superlink),
            "node_id": self.node_id,
            "starts": self.starts,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit_code,
            "last_error": self.last_error,
            "clientappio_port": self._port,
            "log": str(self.log_path),
            "refused_apps": self.refused_apps,
            "last_refusal": self.last_refusal,
        }

    def prewarm(self) -> dict[str, Any]:
        """Start the ClientApp's warm zygote now: the server says a run is about to start.

        The zygote's imports (torch, Opacus, Flower: several seconds of CPU) then run while
        the server starts the run, not after its first message arrived. The SuperNode's
        light task loop starts it (:data:`superexec.PREWARM_SIGNAL`), in the SuperNode's
        process group, so it ends with it; the zygote exits after
        ``warm_start_idle_exit_s`` without a message, as always. The signal goes only to
        this SuperNode's own loop (``<state_dir>/warmstart-bin/flower-superexec``) and only
        once that loop handles it: SIGUSR1's default action ends a process.

        Returns:
            ``prewarmed`` (whether the loop was asked) and, when not, ``reason``.
        """
        if not self.config.warm_start:
            return {"prewarmed": False, "reason": "training.warm_start is off"}
        if not self.config.light_superexec:
            return {
                "prewarmed": False,
                "reason": "training.light_superexec is off (Flower's own task loop cannot "
                "be asked to)",
            }
        proc = self._proc
        root = proc.pid if proc is not None and proc.running() else None
        if root is None:
            return {"prewarmed": False, "reason": f"the SuperNode is not running ({self.reason})"}
        script = str(self.state_dir / BIN_DIR / superexec.EXECUTABLE)
        for pid in descendants(root):
            if script in cmdline(pid)[:3] and handles_signal(pid, superexec.PREWARM_SIGNAL):
                try:
                    os.kill(pid, superexec.PREWARM_SIGNAL)
                except ProcessLookupError:
                    continue
                logger.info("starting the ClientApp's warm zygote: a run is about to start")
                return {"prewarmed": True}
        return {
            "prewarmed": False,
            "reason": "the SuperNode's ClientApp task loop is not running yet",
        }

    # ------------------------------------------------------------------ internals

    def _decide(self, connected: bool, samples: int) -> tuple[bool, str]:
        resources = (
            self._resources()
            if self.config.max_load_per_cpu is not None
            or self.config.min_free_memory_mb is not None
            else None
        )
        decision = self.policy.evaluate(self._wallclock(), connected, samples, resources)
        if decision[0]:
            missing = self._missing_identity()
            if missing:
                decision = (False, missing)
        self._log_decision(decision)
        return decision

    def _log_decision(self, decision: tuple[bool, str]) -> None:
        # Log once per change of the verdict or of the kind of reason (not per sample).
        key = (decision[0], re.sub(r"[\d.]+", "N", decision[1]))
        if self._decision is None or key != (
            self._decision[0],
            re.sub(r"[\d.]+", "N", self._decision[1]),
        ):
            if decision[0]:
                logger.info("training allowed: %s", decision[1])
            else:
                logger.info("training not allowed: %s", decision[1])
        self._decision = decision

    def _missing_identity(self) -> str:
        if self.config.insecure:
            return ""
        for what, path in (("CA certificate", self.root_certificates), ("node key", self.node_key)):
            if not path.is_file():
                return (
                    f"not enrolled: no {what} at {path} (run `edgefl agent enroll`, have it "
                    "admitted, then `edgefl agent enroll --install BUNDLE`)"
                )
        return ""

    def _read_runtime(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.runtime_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _write_runtime(self, **updates: int | None) -> None:
        doc = {**self._read_runtime(), **updates}
        try:
            write_text_atomic(self.runtime_path, json.dumps(doc) + "\n")
        except OSError as exc:
            logger.warning("cannot write %s: %s", self.runtime_path, exc)

    def end_leftovers(self) -> list[int]:
        """End the SuperNode (and its ClientApps) an earlier agent process left running.

        An agent killed with ``-9`` cannot stop its SuperNode: that runs in its own
        process group, is adopted by init and keeps the device's node online on the
        SuperLink, so the next SuperNode's activation is refused. Each process named in
        ``supernode.json`` or working in this state dir whose command line is a
        SuperNode, a ClientApp or a warm-start zygote is ended with its process group
        (SIGTERM, which lets a SuperNode sign its node off; SIGKILL after
        ``stop_grace_s``). Called once before the first start.

        Returns:
            The PIDs ended.
        """
        home = self.state_dir.resolve()
        recorded = self._read_runtime().get("pid")
        candidates = [recorded] if isinstance(recorded, int) else []
        # Leaders first: ending a SuperNode's group ends its apps with it.
        scanned = sorted(
            _leftover_candidates(home),
            key=lambda pid: not any("flower-supernode" in a for a in cmdline(pid)),
        )
        candidates += [pid for pid in scanned if pid not in candidates]
        own = {os.getpid(), os.getppid()}
        ended = []
        for pid in candidates:
            if pid in own or (self._proc is not None and pid == self._proc.pid):
                continue
            if not pid_alive(pid):
                continue
            args = cmdline(pid)
            in_home = cwd(pid) == home or any(str(self.state_dir) in a for a in args)
            if not in_home or not any(m in a for a in args for m in _OURS):
                continue  # the PID was reused by something else
            logger.warning(
                "ending %s (pid %d), left running on %s by an agent process that did not "
                "stop (killed?)",
                next((Path(a).name for a in args for m in _OURS if m in a), "a process"),
                pid,
                self.state_dir,
            )
            if end_process_group(pid, timeout=self.config.stop_grace_s):
                ended.append(pid)
            else:
                logger.error("the leftover process %d does not end; end it by hand", pid)
        if ended:
            self._unclean_end_at = self._clock()
        if isinstance(recorded, int):
            self._write_runtime(pid=None)
        return ended

    def _activation_cause(self, now: float) -> str:
        """Why the SuperLink refused to activate this device's node, as far as we know.

        Flower's SuperNode only prints ``Failed to activate SuperNode``; the SuperLink
        keeps the reason to itself. The supervisor knows whether a SuperNode of this
        device went away recently without signing off and whether this node key was
        ever accepted, which tells the likely cases apart.
        """
        node = f"node {self._known_node_id}" if self._known_node_id else "this device's node"
        if self._unclean_end_at is not None and now - self._unclean_end_at < _STILL_ONLINE_S:
            return (
                f"the SuperLink still counts {node} as online: a previous SuperNode of this "
                f"device went away {now - self._unclean_end_at:.0f} s ago without signing "
                "off, and the SuperLink frees its node after about a minute of missed "
                "heartbeats; retrying until then"
            )
        if self._known_node_id is not None:
            return (
                f"the SuperLink no longer accepts this device's node key (accepted before as "
                f"{node}): it was unregistered or revoked (see `edgefl server enrollments`), "
                "or another process holds the node online"
            )
        return (
            "this device's node key is not registered on the SuperLink: have the device "
            "admitted (`edgefl server admit`) and its bundle installed, or it was revoked"
        )

    def _start(self, now: float) -> None:
        if not self._leftovers_checked:
            self._leftovers_checked = True
            self.end_leftovers()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.flower_home.mkdir(exist_ok=True)
        self.telemetry_dir.mkdir(exist_ok=True)
        cmd = self.command()
        bin_dir = str(Path(sys.executable).parent)
        path = os.environ.get("PATH", "")
        path = f"{bin_dir}{os.pathsep}{path}" if path else bin_dir
        try:
            # The trust gate is not optional: without it the SuperNode would run whatever
            # ClientApp a run names, so a launcher that cannot be installed means no start.
            write_policy(
                self.state_dir / POLICY_FILE,
                self.config.trusted_clientapps,
                self.config.app_signing_keys,
            )
            gate_bin = install_launcher(
                self.state_dir,
                warm=self.config.warm_start,
                idle_exit_s=self.config.warm_start_idle_exit_s,
            )
            self._install_superexec(gate_bin)
        except OSError as exc:
            self.last_error = f"cannot install the ClientApp launcher: {exc}"
            logger.error("%s; not starting the SuperNode", self.last_error)
            self._schedule_restart(now, 0.0)
            return
        # Flower's SuperNode starts `flower-superexec` and that runs `flwr-clientapp`, both
        # by name: ours come first.
        path = f"{gate_bin}{os.pathsep}{path}"
        env = {
            **os.environ,
            "PATH": path,
            "FLWR_HOME": str(self.flower_home),
            "PYTHONUNBUFFERED": "1",
            # Flower's usage telemetry posts the device's platform details to a Flower
            # server at every ClientApp start and exit (and the exit waits up to 4 s for
            # it); a device does not phone home unless its operator asks for it.
            "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
            superexec.PREWARM_ENV: "1"
            if self.config.warm_start and self.config.warm_start_prewarm
            else "0",
        }
        self._tail = ""
        self._partial_line = ""
        self._warned_retrying = False
        self._ended_at = None
        self._suspect = False
        self._last_output = now
        self.node_id = None
        # Its own process group: its ClientApps go with it.
        proc = ManagedProcess(
            cmd, self.log_path, name="flower-supernode", env=env, cwd=self.state_dir
        )
        try:
            pid = proc.start()
        except OSError as exc:
            self.last_error = f"cannot start flower-supernode: {exc}"
            logger.error("%s", self.last_error)
            self._schedule_restart(now, 0.0)
            return
        self._proc = proc
        self._read_offset = proc.log_offset
        self._write_runtime(pid=pid)
        self.starts += 1
        self._backoff.started(now)
        self._stop_deadline = None
        self.state, self.reason = "running", f"connecting to {self.config.superlink}"
        logger.info(
            "started flower-supernode pid %d for %s (SuperLink %s, log %s)",
            pid,
            self.device_id,
            self.config.superlink,
            self.log_path,
        )

    def _install_superexec(self, bin_dir: Path) -> None:
        """Put the light ClientApp task loop in ``bin_dir`` (or take it away when off)."""
        if self.config.light_superexec:
            try:
                superexec.install(bin_dir)
                return
            except FileNotFoundError as exc:  # no Flower SuperExec to fall back on
                logger.warning("Flower's own SuperExec runs the ClientApps: %s", exc)
        (bin_dir / superexec.EXECUTABLE).unlink(missing_ok=True)

    def _terminate(self, now: float, reason: str) -> None:
        if self._proc is not None:
            self._proc.signal_group(signal.SIGTERM)
        self._stop_deadline = now + self.config.stop_grace_s
        self.state, self.reason = "stopping", reason

    def _reaped(self, now: float) -> None:
        assert self._proc is not None
        code = self._proc.returncode
        pid = self._proc.pid
        self._proc.signal_group(signal.SIGKILL)  # ClientApps it left behind
        self._follow_log(react=False)
        self._proc.close_log()
        self._proc = None
        self._write_runtime(pid=None)
        self.last_exit_code = code
        ran = now - self._backoff.started_at
        # Stopped by SIGTERM (ours) or exiting cleanly, a SuperNode signs its node off; one
        # killed or crashed leaves it online on the SuperLink for up to a minute.
        signed_off = code == 0 or (self._stop_deadline is not None and code != -signal.SIGKILL)
        if self.node_id is not None and not signed_off:
            self._unclean_end_at = now
        if self._stop_deadline is not None:
            self._stop_deadline = None
            self.state = "waiting"
            logger.info("the SuperNode (pid %d) stopped with code %s", pid, code)
            return
        line = meaningful_line(self._tail)
        if not line:
            line = (
                f"killed by signal {-code} (no error in its output)"
                if code is not None and code < 0
                else "no error in its output"
            )
        self.last_error = line
        hint = (
            self._activation_cause(now)
            if "Failed to activate SuperNode" in line
            else tls_hint(line, str(self.config.superlink), self.root_certificates)
        )
        self._backoff.note_running(now)  # a run of stable_after_s resets the backoff
        delay = self._schedule_restart(now, ran)
        if "Failed to activate SuperNode" in line:
            self.reason = f"restarting in {delay:.1f} s: {hint}"
        logger.error(
            "flower-supernode (pid %d) exited with code %s after %.1f s: %s%s; restarting in "
            "%.1f s",
            pid,
            code,
            ran,
            line,
            f" ({hint})" if hint else "",
            delay,
        )

    def _schedule_restart(self, now: float, ran: float) -> float:
        delay = self._backoff.schedule(now)
        self._backoff.count_restart()
        self.state = "backoff"
        self.reason = f"restarting in {delay:.1f} s after an exit" + (
            f": {self.last_error}" if self.last_error else ""
        )
        return delay

    def _follow_log(self, *, react: bool = True) -> None:
        """Read what the SuperNode wrote since the last poll; react to a few lines.

        Args:
            react: Log the connection progress it shows (not for an exited SuperNode,
                whose shutdown chatter would read like a connection problem).
        """
        if self._proc is None:
            return
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._read_offset)
                chunk = fh.read(256 * 1024)
        except OSError:
            return
        if not chunk:
            return
        self._read_offset += len(chunk)
        text = chunk.decode("utf-8", "replace")
        self._tail = (self._tail + text)[-32 * 1024 :]
        if not react:
            return
        match = NODE_ID.search(ANSI.sub("", text))
        if match:
            self.node_id = int(match.group(1))
            self.reason = f"connected to {self.config.superlink} as node {self.node_id}"
            if self.node_id != self._known_node_id:
                self._known_node_id = self.node_id
                self._write_runtime(node_id=self.node_id)
            self._warned_retrying = False
            logger.info(
                "SuperNode registered with %s as node %d", self.config.superlink, self.node_id
            )
        self._last_output = self._clock()
        trouble = max((text.rfind(t) for t in TROUBLE), default=-1)
        healthy = max((text.rfind(h) for h in HEALTHY), default=-1)
        if trouble > healthy:
            self._suspect = True
        elif healthy > trouble:
            self._suspect = False
        if self._ended_at is None and any(line in text for line in ENDED):
            self._ended_at = self._clock()
        self._note_refusals(text)
        if RETRYING in text and not self._warned_retrying:
            self._warned_retrying = True
            self.last_error = f"cannot reach the SuperLink at {self.config.superlink}; retrying"
            self.reason = self.last_error
            logger.warning(
                "the SuperNode cannot reach the SuperLink at %s yet; it keeps retrying "
                "(data collection goes on)",
                self.config.superlink,
            )

    def _note_refusals(self, text: str) -> None:
        """Count and log the app bundles the ClientApp gate refused (complete lines only)."""
        lines = (self._partial_line + text).split("\n")
        self._partial_line = lines.pop()[-4096:]
        for line in lines:
            at = line.find(REFUSED)
            if at < 0:
                continue
            self.refused_apps += 1
            self.last_refusal = line[at + len("edgefl app trust: ") :].strip()[:300]
            logger.warning("the device refused to run an app: %s", self.last_refusal)
