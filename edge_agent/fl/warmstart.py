"""Warm start for the ClientApp: Flower's per-message process forked from a warm zygote.

Flower's SuperNode starts a new ``flwr-clientapp`` process for every message, and each
one imports flwr, torch and Opacus (about 6 s here) before it trains. With
``training.warm_start`` the agent's supervisor puts a private bin dir
(``<state_dir>/warmstart-bin``) first on the SuperNode's ``PATH``; the executable named
``flwr-clientapp`` there is a small stdlib-only launcher (:func:`launch`):

- it connects to the zygote's AF_UNIX socket (``<state_dir>/warmstart.sock``, mode
  0600), sends its argv, cwd and environment with its stdin/stdout/stderr descriptors
  (``socket.send_fds``), receives the pid of the forked child, forwards SIGTERM/SIGINT
  to it, and exits with the child's exit status (or dies by the child's signal);
- when there is no zygote (the run's first message, or it exited while idle) it starts
  one in the background, in the same process group (the supervisor's ``killpg`` reaches
  it), and waits for it (``first_wait_s``) before it runs this message cold;
- any failure before the zygote has forked the child falls back to a cold start, so no
  message is lost to the warm path.

Warm or cold, the message runs behind edgefl's app trust gate
(:func:`edgefl.edge_agent.fl.apptrust.run_gated`), which decides from the app bundle,
before any of its code runs, whether the device runs it; a cold start is
``python -I -m edgefl.edge_agent.fl.apptrust --policy FILE -- ARGS``, never the stock
``flwr-clientapp``. Without ``training.warm_start`` the launcher is still installed and
always starts cold, so the gate does not depend on the warm path.

The zygote (:func:`serve`, ``python -m edgefl.edge_agent.fl.warmstart serve``) imports
what the ClientApp needs (Flower's ``flwr-clientapp`` entry point, edgefl's ClientApp,
trainer, privacy and data modules, torch, Opacus) without starting threads, opening
channels or running tensor ops, then serves requests in one thread: for each it
``fork``'s a child that puts the received descriptors on 0/1/2, takes the caller's
cwd, environment and argv, reseeds the RNGs a fresh interpreter seeds at start-up and
runs Flower's entry point behind the trust gate, as a cold start does; the child ends with
``os._exit`` and the zygote sends its wait status back. A launcher that disappears takes
its child with it (SIGKILL, as for a killed ``flwr-clientapp``). The zygote exits after
``--idle-exit-s`` seconds without a running child, so its memory is held only while runs
are active. Every fork and exit is appended as a JSON line to ``warmstart-forks.log``.

This module imports only the standard library at module level: the launcher loads it by
path in an isolated interpreter (``python -IS``) that has no site-packages.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import selectors
import signal
import socket
import stat
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Final, NoReturn

__all__ = [
    "BIN_DIR",
    "DEFAULT_IDLE_EXIT_S",
    "FORK_LOG",
    "LOG_FILE",
    "POLICY_FILE",
    "PREWARM_ARG",
    "SOCKET_NAME",
    "gated_command",
    "install_launcher",
    "launch",
    "main",
    "serve",
]

BIN_DIR: Final = "warmstart-bin"
SOCKET_NAME: Final = "warmstart.sock"
LOG_FILE: Final = "warmstart.log"
FORK_LOG: Final = "warmstart-forks.log"
POLICY_FILE: Final = "app-trust.json"
"""The device's app trust policy (edgefl.edge_agent.fl.apptrust), in the state dir."""
DEFAULT_IDLE_EXIT_S: Final = 600.0
_MAX_MESSAGE = 1 << 20
_PID_TIMEOUT_S = 15.0  # the zygote answers at once unless it is swapping
_HEARTBEAT_S = 10.0  # Flower drops a launched task's claim after 30 s without one
PREWARM_ARG: Final = "--edgefl-prewarm"
"""``flwr-clientapp --edgefl-prewarm`` starts the zygote (if none runs) and returns at once:
the light SuperExec runs it when the SuperNode starts with ``training.warm_start_prewarm``,
so a run's first message finds the zygote warm (its memory is then held from the
SuperNode's start until ``--idle-exit-s`` without a message)."""
FIRST_WAIT_S: Final = 40.0
"""How long the first message waits for the zygote it started before it runs cold."""
_PRELOAD: Final = (
    # Flower's flwr-clientapp entry point comes through apptrust.flwr_clientapp_entry
    # (serve), without the SuperNode's own CLI its package __init__ imports.
    "flwr.supernode.runtime.run_clientapp",
    "edgefl.appsign",
    "edgefl.edge_agent.fl.apptrust",
    "edgefl.edge_agent.fl.clientapp",
    "edgefl.edge_agent.fl.trainer",
    "edgefl.edge_agent.fl.privacy",
    "edgefl.edge_agent.fl.data",
    "edgefl.edge_agent.datastore",
    "edgefl.zoo",
    "torch",
    "torch.utils.data",
    "httpx",
    "httpcore",
    "opacus",
    "opacus.validators",
    "opacus.accountants",
    "opacus.accountants.utils",
    "opacus.accountants.analysis.rdp",
)
_PRELOAD_IF_PRESENT: Final = (
    # torch imports these lazily during a message's training: torch._dynamo (about 3 s
    # of imports) behind torch.optim's `_disable_dynamo` wrappers at the first optimizer,
    # although nothing is compiled, the rest at the first backward and step. Every forked
    # child paid them again. Private modules: one a torch release lacks is skipped.
    "torch._dynamo",
    "torch.nn.utils._expanded_weights",
    "torch.profiler._cupti_monitor",
)


# ---------------------------------------------------------------------- the launcher


def gated_command(python: str, policy: Path) -> list[str]:
    """The cold start: Flower's ClientApp process behind the gate (arguments follow)."""
    # -I: no PYTHONPATH, user site or working folder on sys.path (safe path).
    return [python, "-I", "-m", "edgefl.edge_agent.fl.apptrust", "--policy", str(policy), "--"]


def install_launcher(
    state_dir: Path,
    *,
    warm: bool = True,
    idle_exit_s: float = DEFAULT_IDLE_EXIT_S,
    first_wait_s: float = FIRST_WAIT_S,
    python: str | None = None,
) -> Path:
    """Write the ``flwr-clientapp`` launcher into ``<state_dir>/warmstart-bin``.

    Args:
        state_dir: The agent's state dir (socket, logs, trust policy and the bin dir).
        warm: Use the warm zygote; ``False``: every message starts cold (still gated).
        idle_exit_s: The zygote's idle time before it exits.
        first_wait_s: How long a message that finds no zygote waits for the one it starts
            before it runs cold (0: run cold at once).
        python: Interpreter of the venv that has Flower and edgefl (default: this one).

    Returns:
        The bin dir, to put first on the SuperNode's ``PATH``.

    Raises:
        OSError: The bin dir or the script cannot be written.
    """
    exe = python or sys.executable
    state_dir = Path(state_dir).absolute()
    bin_dir = state_dir / BIN_DIR
    bin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    policy = state_dir / POLICY_FILE
    gated = gated_command(exe, policy)
    serve_cmd = [
        exe,
        "-I",
        "-m",
        "edgefl.edge_agent.fl.warmstart",
        "serve",
        "--socket",
        str(state_dir / SOCKET_NAME),
        "--idle-exit-s",
        repr(float(idle_exit_s)),
    ]
    script = (
        f"#!{exe} -IS\n"
        "# Written by edgefl's SuperNode supervisor: runs Flower's ClientApp behind edgefl's\n"
        "# app trust gate, in a process forked from a warm zygote or in a cold one.\n"
        "import os, sys\n"
        f"GATED = {gated!r}\n"
        f"if not {bool(warm)!r}:\n"
        "    os.execv(GATED[0], GATED + sys.argv[1:])\n"
        "try:\n"
        "    import importlib.util\n"
        f"    spec = importlib.util.spec_from_file_location('_edgefl_warmstart', {__file__!r})\n"
        "    mod = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(mod)\n"
        "except BaseException:\n"
        "    os.execv(GATED[0], GATED + sys.argv[1:])\n"
        f"if sys.argv[1:] == [{PREWARM_ARG!r}]:\n"
        f"    mod._spawn_zygote({serve_cmd!r}, {str(state_dir / LOG_FILE)!r})\n"
        "    sys.exit(0)\n"
        "mod.launch(\n"
        "    sys.argv,\n"
        f"    socket_path={str(state_dir / SOCKET_NAME)!r},\n"
        "    real=GATED,\n"
        f"    serve_cmd={serve_cmd!r},\n"
        f"    log_path={str(state_dir / LOG_FILE)!r},\n"
        f"    first_wait_s={float(first_wait_s)!r},\n"
        f"    policy={str(policy)!r},\n"
        ")\n"
    )
    target = bin_dir / "flwr-clientapp"
    tmp = bin_dir / ".flwr-clientapp.tmp"
    tmp.write_text(script)
    tmp.chmod(0o700)
    os.replace(tmp, target)
    return bin_dir


def _exec_real(real: list[str], argv: list[str]) -> NoReturn:
    os.execv(real[0], [*real, *argv[1:]])


def _spawn_zygote(serve_cmd: list[str], log_path: str) -> None:
    """Start the zygote detached from this process but in its process group."""
    try:
        pid = os.fork()
    except OSError:
        return
    if pid == 0:  # intermediate: fork the zygote and exit, so init adopts it
        try:
            if os.fork() == 0:
                try:
                    null = os.open(os.devnull, os.O_RDONLY)
                    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    os.dup2(null, 0)
                    os.dup2(log, 1)
                    os.dup2(log, 2)
                    os.closerange(3, 65536)
                    os.execv(serve_cmd[0], serve_cmd)
                finally:
                    os._exit(127)
        finally:
            os._exit(0)
    with contextlib.suppress(OSError):
        os.waitpid(pid, 0)


def _connect(socket_path: str) -> socket.socket | None:
    """A connection to the zygote, or ``None`` when none listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(_PID_TIMEOUT_S)
        sock.connect(socket_path)
    except OSError:
        sock.close()
        return None
    return sock


def _die_like(status: int) -> NoReturn:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        sig = -code
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(code)


def launch(
    argv: list[str],
    *,
    socket_path: str,
    real: list[str],
    serve_cmd: list[str],
    log_path: str,
    first_wait_s: float = FIRST_WAIT_S,
    policy: str = "",
) -> NoReturn:
    """Run this message in a child forked by the zygote, or cold; gated either way.

    Args:
        argv: The launcher's ``sys.argv`` (as Flower's SuperExec gave it).
        socket_path: The zygote's socket.
        real: The cold start's command (:func:`gated_command`), the message's arguments
            follow it.
        serve_cmd: How to start a zygote.
        log_path: Where the zygote writes its own output.
        first_wait_s: How long to wait for a zygote this call had to start.
        policy: The app trust policy file the forked child is gated by.
    """
    pending: list[int] = []
    child = 0

    def forward(signum: int, _frame: object) -> None:
        if child:
            with contextlib.suppress(OSError):
                os.kill(child, signum)
        else:
            pending.append(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    sock = _connect(socket_path)
    if sock is None:
        # First message of a run (or the zygote exited when idle): start one and wait for
        # it rather than import everything a second time beside it, which on a small
        # device doubles this message's cold start; give up and run cold if it is slow.
        _spawn_zygote(serve_cmd, log_path)
        deadline = time.monotonic() + first_wait_s
        beat = 0.0
        while sock is None and time.monotonic() < deadline and not pending:
            if time.monotonic() >= beat:
                _task_heartbeat(argv)
                beat = time.monotonic() + _HEARTBEAT_S
            time.sleep(0.05)
            sock = _connect(socket_path)
        if sock is None:
            _restore_and_exec(real, argv, pending)
    try:
        request = json.dumps(
            {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "policy": policy}
        )
        socket.send_fds(sock, [request.encode()], [0, 1, 2])
        reply = json.loads(sock.recv(_MAX_MESSAGE) or b"{}")
        child = int(reply["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        sock.close()
        _restore_and_exec(real, argv, pending)
    # From here on the message belongs to the child: never fall back.
    for signum in pending:
        with contextlib.suppress(OSError):
            os.kill(child, signum)
    try:
        pidfd: int | None = os.pidfd_open(child)
    except OSError:
        pidfd = None
    sock.settimeout(None)
    try:
        data = sock.recv(_MAX_MESSAGE)
        status = int(json.loads(data)["status"]) if data else None
    except (OSError, ValueError, KeyError, TypeError):
        status = None
    if status is None:  # the zygote went away: wait for the child itself
        if pidfd is not None:
            with contextlib.suppress(OSError):
                while not select_readable(pidfd):
                    pass
        os._exit(1)
    _die_like(status)


def _task_heartbeat(argv: list[str]) -> None:
    """Tell the SuperNode this message's ClientApp is alive, while it waits for the zygote.

    Flower offers a task again when its ClientApp has not sent a heartbeat (or pulled the
    task) within 30 s of being launched; a first message waiting for a zygote that imports
    for longer (a small or busy device) was launched twice, the second process refused.
    A heartbeat (an empty request with the task's token, what Flower's ClientApp sends)
    keeps the claim for 60 s. Best effort: plain HTTP on the runtime API's loopback address
    only; any failure is ignored.
    """
    import http.client

    args = argv[1:]
    try:
        address = args[args.index("--runtime-api-address") + 1]
        token = args[args.index("--token") + 1]
    except (ValueError, IndexError):
        return
    if "--root-certificates" in args:
        return  # TLS: Flower's own client is needed
    host, _, port = address.rpartition(":")
    try:
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=2.0)
    except ValueError:
        return
    try:
        conn.request(
            "POST",
            "/v1/runtime/send-task-heartbeat",
            body=b"",
            headers={
                "content-type": "application/protobuf",
                "accept": "application/protobuf",
                "flwr-task-token": token,
            },
        )
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        pass
    finally:
        conn.close()


def select_readable(fd: int) -> bool:
    """Block until ``fd`` is readable (retries after signal handlers run)."""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(None))


def _restore_and_exec(real: list[str], argv: list[str], pending: list[int]) -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if pending:  # asked to stop before the message started: stop as the real one would
        os.kill(os.getpid(), pending[0])
    _exec_real(real, argv)


# ------------------------------------------------------------------------ the zygote


def _log(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} warmstart[{os.getpid()}] {text}", flush=True)


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


class _Zygote:
    def __init__(self, socket_path: Path, idle_exit_s: float, fork_log: Path) -> None:
        self.socket_path = socket_path
        self.idle_exit_s = idle_exit_s
        self.fork_log = fork_log
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.conns: dict[int, socket.socket] = {}  # fd -> connection without a child yet
        self.children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, conn)
        self.by_conn: dict[int, int] = {}  # conn fd -> pid of its running child
        self.extra_fds: list[int] = []  # closed in every child
        self.forks = 0

    def bind(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        old = os.umask(0o177)
        try:
            self.listener.bind(str(self.socket_path))
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.inode = self.socket_path.stat().st_ino
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")

    def run(self) -> None:
        idle_since = time.monotonic()
        while True:
            timeout = None
            if not self.children:
                timeout = idle_since + self.idle_exit_s - time.monotonic()
                if timeout <= 0:
                    _log(f"idle for {self.idle_exit_s:g} s; exiting after {self.forks} forks")
                    return
            for key, _ in self.sel.select(timeout):
                kind = key.data
                if kind == "listen":
                    self._accept()
                elif kind == "request":
                    self._request(self.conns.pop(key.fd))
                elif kind == "launcher":
                    self._launcher_readable(key.fd)
                else:
                    self._reap(key.fd)
                    if not self.children:
                        idle_since = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.socket_path.stat().st_ino == self.inode:
                self.socket_path.unlink()
        self.listener.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        uid = int.from_bytes(creds[4:8], sys.byteorder)
        if uid != os.getuid():
            _log(f"refused a connection from uid {uid}")
            conn.close()
            return
        conn.setblocking(True)
        self.conns[conn.fileno()] = conn
        self.sel.register(conn, selectors.EVENT_READ, "request")

    def _request(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        fds: list[int] = []
        try:
            conn.settimeout(5.0)
            msg, fds, flags, _ = socket.recv_fds(conn, _MAX_MESSAGE, 3)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 3:
                raise ValueError(f"malformed request ({len(fds)} descriptors, flags {flags})")
            request = json.loads(msg)
            if not isinstance(request.get("argv"), list) or not isinstance(
                request.get("env"), dict
            ):
                raise ValueError("request without argv or env")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
        except (OSError, ValueError) as exc:
            _log(f"request not served (the launcher falls back): {exc}")
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"error": str(exc)}).encode())
            conn.close()
            return
        if pid == 0:
            _child(request, fds, self._fds_to_close(conn))
        for fd in fds:
            os.close(fd)
        self.forks += 1
        self._record({"event": "fork", "pid": pid, "zygote": os.getpid()})
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # cannot watch it: wait for it here (it is our child)
            _, status, usage = os.wait4(pid, 0)
            self._finish(pid, conn, status, usage.ru_utime + usage.ru_stime)
            return
        try:
            conn.sendall(json.dumps({"pid": pid}).encode())
        except OSError:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.children[pidfd] = (pid, conn)
        self.by_conn[conn.fileno()] = pid
        self.sel.register(pidfd, selectors.EVENT_READ, "child")
        self.sel.register(conn, selectors.EVENT_READ, "launcher")

    def _launcher_readable(self, fd: int) -> None:
        # A launcher sends nothing after its request: readable means it went away.
        pid = self.by_conn.get(fd)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(fd)
        if pid is not None:
            _log(f"the launcher of child {pid} went away; killing the child")
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _reap(self, pidfd: int) -> None:
        pid, conn = self.children.pop(pidfd)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        self.by_conn.pop(conn.fileno(), None)
        _, status, usage = os.wait4(pid, 0)
        self._finish(pid, conn, status, usage.ru_utime + usage.ru_stime)

    def _finish(self, pid: int, conn: socket.socket, status: int, cpu_s: float) -> None:
        code = os.waitstatus_to_exitcode(status)
        # cpu_s: the message's CPU time (user + system), which the machine's load leaves as is.
        self._record({"event": "exit", "pid": pid, "code": code, "cpu_s": round(cpu_s, 3)})
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"status": status}).encode())
        conn.close()

    def _fds_to_close(self, conn: socket.socket) -> list[int]:
        fds = [self.listener.fileno(), conn.fileno(), *self.extra_fds, *self.children]
        fds += [c.fileno() for c in self.conns.values()]
        fds += [c.fileno() for _, c in self.children.values()]
        with contextlib.suppress(AttributeError, OSError):
            fds.append(self.sel.fileno())
        return [fd for fd in fds if fd >= 0]

    def _record(self, entry: dict[str, Any]) -> None:
        entry["time"] = time.time()
        with contextlib.suppress(OSError):
            fd = os.open(self.fork_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (json.dumps(entry) + "\n").encode())
            finally:
                os.close(fd)


def _exit_code(value: object) -> int:
    """What ``sys.exit(value)`` makes the process's exit code."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _child(request: dict[str, Any], fds: list[int], close: list[int]) -> NoReturn:
    """The forked child: become the (gated) ``flwr-clientapp`` process of this message."""
    code = 1
    try:
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(str(request.get("cwd") or "/"))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        sys.argv = [str(a) for a in request["argv"]]
        # A fresh interpreter seeds these from the OS at start-up; forked children
        # would otherwise all share the zygote's state (torch's default generator is
        # fixed-seeded at start-up anyway, and the zygote never drew from it).
        import random

        import numpy as np

        random.seed()
        np.random.seed()
        from edgefl.edge_agent.fl.apptrust import run_gated

        try:
            # Behind the trust gate, as a cold start is; no policy: edgefl's app alone.
            run_gated(str(request.get("policy") or "") or None)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            import logging

            logging.shutdown()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)


def serve(socket_path: Path, idle_exit_s: float = DEFAULT_IDLE_EXIT_S) -> int:
    """Run the zygote until it has been idle for ``idle_exit_s`` seconds.

    Returns:
        The process exit code: 0 after an idle exit or when another zygote already
        serves this socket, 1 when the preloaded modules left threads running (forking
        then is unsafe; launchers keep falling back to cold starts).
    """
    socket_path = Path(socket_path).absolute()
    lock = os.open(f"{socket_path}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return 0  # another launcher started one first
    t0 = time.perf_counter()
    c0 = time.process_time()
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
    for name in _PRELOAD_IF_PRESENT:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    from edgefl.edge_agent.fl.apptrust import flwr_clientapp_entry

    flwr_clientapp_entry()
    import threading

    if threading.active_count() != 1:
        names = [t.name for t in threading.enumerate()]
        _log(f"preloading started Python threads {names}; not serving (forking is unsafe)")
        return 1
    # Native threads here are OpenBLAS's pools (numpy, scipy), which re-create them
    # after fork (pthread_atfork); torch's own pools start only at the first tensor op.
    count = len(_PRELOAD) + len(_PRELOAD_IF_PRESENT)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    _log(
        f"preloaded {count} modules in {wall:.1f} s ({cpu:.1f} s CPU) "
        f"({_thread_count()} native threads); serving {socket_path}"
    )
    zygote = _Zygote(socket_path, idle_exit_s, socket_path.parent / FORK_LOG)
    zygote.extra_fds.append(lock)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        zygote.bind()
        zygote.run()
    finally:
        zygote.close()
        os.close(lock)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m edgefl.edge_agent.fl.warmstart serve --socket PATH [--idle-exit-s N]``."""
    parser = argparse.ArgumentParser(description="edgefl ClientApp warm-start zygote")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="Preload the ClientApp and fork one child per request.")
    srv.add_argument("--socket", type=Path, required=True)
    srv.add_argument("--idle-exit-s", type=float, default=DEFAULT_IDLE_EXIT_S)
    args = parser.parse_args(argv)
    if stat.S_ISDIR(os.stat(args.socket.parent).st_mode) is False:
        parser.error(f"{args.socket.parent} is not a directory")
    return serve(args.socket, args.idle_exit_s)


if __name__ == "__main__":
    sys.exit(main())
