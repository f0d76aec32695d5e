"""A light stand-in for Flower's ``flower-superexec``: the SuperNode's ClientApp launcher loop.

Flower's SuperNode (``--isolation subprocess``, the default) starts ``flower-superexec``
by name: a second process that asks the SuperNode's Runtime API for a pending task about
once a second (``AcquireTask``) and starts ``flwr-clientapp --token ...`` for each one.
That loop imports all of Flower (SQLAlchemy, Alembic, FastAPI, Rich, NumPy: about 1,500
modules) and held about 130 MB resident on an idle device, half of the SuperNode's share.

The agent's supervisor puts ``flower-superexec`` (:func:`install`) in the same private
bin dir as the ClientApp launcher (first on the SuperNode's ``PATH``). It runs this module
by path in an isolated interpreter (``python -IS``: standard library only, no
site-packages) for the one case the SuperNode starts it with: ``--insecure
--runtime-api-address HOST:PORT --parent-pid PID`` (the Runtime API on loopback without
TLS, what Flower's SuperNode always passes unless it serves that API over TLS). Any other
argument list execs Flower's own ``flower-superexec`` unchanged.

What it does, as Flower's loop does for a ClientApp task:

- ``POST /v1/runtime/acquire-task`` (protobuf ``AcquireTaskRequest`` with
  ``supported_task_types = ["flwr-clientapp"]``, and Flower's runtime-version headers) every
  ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds (default 1, as Flower's);
- for a task it was given (``AcquireTaskResponse``: the task and its token), it starts
  ``flwr-clientapp --runtime-api-address ADDRESS --token TOKEN --insecure --parent-pid
  OWN_PID`` found on ``PATH`` (edgefl's gated launcher, :mod:`edgefl.edge_agent.fl.warmstart`),
  with its output visible, and reaps it when it exits;
- it exits when the SuperNode (``--parent-pid``) is gone, and on SIGTERM/SIGINT;
- with ``EDGEFL_WARMSTART_PREWARM=1`` (``training.warm_start_prewarm``) it first runs
  ``flwr-clientapp --edgefl-prewarm``, which starts the ClientApp's warm zygote in the
  SuperNode's process group before any message;
- on ``SIGUSR1`` (:data:`PREWARM_SIGNAL`) it runs the same, at once: the agent sends it
  when the server says a run is about to start (the ``prewarm-training`` command), so the
  zygote's imports overlap the server's own start instead of delaying the run's first
  message. A zygote that already runs is left as it is.

Differences, all narrowing: it asks for ClientApp tasks only (Flower's would also start
``flwr-agentapp``, ``flwr-connector`` and ``flwr-model`` processes, which edgefl's app
trust gate does not cover), and it refuses a response it cannot parse or whose token is
not a plain token (it never becomes an option of the ClientApp's command line). The
SuperNode, its node authentication to the SuperLink and the app trust gate are unchanged.

Standard library only at module level (it is loaded by path without site-packages).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import select
import signal
import sys
import time
from pathlib import Path
from typing import Final, NoReturn

__all__ = [
    "CLIENTAPP_TASK",
    "PREWARM_ENV",
    "PREWARM_SIGNAL",
    "decode_acquire_response",
    "encode_acquire_request",
    "install",
    "main",
    "parse_args",
]

CLIENTAPP_TASK: Final = "flwr-clientapp"
PREWARM_ENV: Final = "EDGEFL_WARMSTART_PREWARM"
"""Set to ``1`` in the SuperNode's environment: start the warm zygote with the loop."""
PREWARM_ARG: Final = "--edgefl-prewarm"  # edgefl.edge_agent.fl.warmstart.PREWARM_ARG
PREWARM_SIGNAL: Final = signal.SIGUSR1
"""Sent by the agent: start the warm zygote now (the loop handles it once it runs)."""
EXECUTABLE: Final = "flower-superexec"
_ACQUIRE_PATH: Final = "/v1/runtime/acquire-task"
_MEDIA_TYPE: Final = "application/protobuf"
_POLL_ENV: Final = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
_DEFAULT_POLL_S: Final = 1.0
_MAX_RESPONSE: Final = 1 << 20
_TOKEN: Final = re.compile(r"^[A-Za-z0-9_]{8,512}$")
_ADDRESS: Final = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")


class ProtocolError(ValueError):
    """A Runtime API response this loop does not accept."""


# ------------------------------------------------------------------ protobuf wire format


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_acquire_request(task_types: list[str]) -> bytes:
    """``AcquireTaskRequest{supported_task_types: task_types}`` (field 1, repeated string)."""
    out = bytearray()
    for name in task_types:
        data = name.encode()
        out += b"\x0a" + _varint(len(data)) + data
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise ProtocolError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= 1 << 64:
                raise ProtocolError("varint over 64 bits")
            return value, pos
    raise ProtocolError("varint over 10 bytes")


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """The (field number, value) pairs of a message: ints for varints, bytes otherwise."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtocolError("field number 0")
        value: int | bytes
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ProtocolError(f"wire type {wire}")
        if pos > len(data):
            raise ProtocolError("truncated field")
        out.append((number, value))
    return out


def decode_acquire_response(data: bytes) -> tuple[int, str, str] | None:
    """``(task_id, task type, token)`` of an ``AcquireTaskResponse``; ``None``: no task.

    ``AcquireTaskResponse``: 1 ``task`` (``Task``: 1 ``task_id``, 2 ``type``), 2
    ``token``. Unknown fields are skipped, as protobuf does.

    Raises:
        ProtocolError: Not a message of that shape, or a task without a plain token.
    """
    task: bytes | None = None
    token = b""
    for number, value in _fields(data):
        if number == 1:
            if not isinstance(value, bytes):
                raise ProtocolError("task is not a message")
            task = value
        elif number == 2:
            if not isinstance(value, bytes):
                raise ProtocolError("token is not a string")
            token = value
    if task is None or not token:
        return None
    task_id, task_type = 0, ""
    for number, value in _fields(task):
        if number == 1 and isinstance(value, int):
            task_id = value
        elif number == 2 and isinstance(value, bytes):
            task_type = value.decode("utf-8", "replace")
    try:
        text = token.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("token is not ASCII") from None
    if not _TOKEN.match(text):
        raise ProtocolError("token is not a plain token")
    return task_id, task_type, text


# --------------------------------------------------------------------------- the loop


def parse_args(argv: list[str]) -> tuple[str, int] | None:
    """``(runtime API address, parent pid)`` when this loop can stand in, else ``None``.

    Only ``--insecure --runtime-api-address HOST:PORT --parent-pid PID`` (in any order) is
    taken; anything else (TLS to the Runtime API, dependency installation, a health
    server, plugin or executor configs) is left to Flower's own SuperExec.
    """
    address: str | None = None
    parent: int | None = None
    insecure = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--insecure" and not insecure:
            insecure = True
        elif arg == "--runtime-api-address" and args and address is None:
            address = args.pop(0)
        elif arg == "--parent-pid" and args and parent is None:
            value = args.pop(0)
            if not value.isdigit():
                return None
            parent = int(value)
        else:
            return None
    if not insecure or address is None or parent is None or not _ADDRESS.match(address):
        return None
    return address, parent


def _poll_interval() -> float:
    raw = os.environ.get(_POLL_ENV)
    if raw is None:
        return _DEFAULT_POLL_S
    try:
        value = float(raw)
    except ValueError:
        return _DEFAULT_POLL_S
    return value if 0.01 <= value <= 60.0 else _DEFAULT_POLL_S


def _log(text: str, level: str = "INFO") -> None:
    # Flower's own line format: the SuperNode supervisor reads INFO lines as chatter.
    print(f"{level} :      edgefl superexec[{os.getpid()}]: {text}", file=sys.stderr, flush=True)


class _Loop:
    def __init__(self, address: str, parent: int, flwr_version: str) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self.host = host.strip("[]")
        self.port = int(port)
        self.parent = parent
        self.body = encode_acquire_request([CLIENTAPP_TASK])
        self.headers = {
            "content-type": _MEDIA_TYPE,
            "accept": _MEDIA_TYPE,
            # Flower's runtime-version headers (RuntimeVersionHttpInterceptor).
            "flwr-package-name": "flwr",
            "flwr-package-version": flwr_version,
            "flwr-component-name": "SuperExec",
        }
        self.conn: http.client.HTTPConnection | None = None
        self.children: list[int] = []
        self.failures = 0
        self.started_under = os.getppid()

    def acquire(self) -> tuple[int, str, str] | None:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30.0)
        try:
            self.conn.request("POST", _ACQUIRE_PATH, body=self.body, headers=self.headers)
            response = self.conn.getresponse()
            data = response.read(_MAX_RESPONSE + 1)
            note = response.getheader("flwr-version-incompatibility-message")
            if note:
                _log(f"the SuperNode says: {note[:300]}", "WARNING")
            if response.status != 200:
                raise ProtocolError(f"HTTP {response.status}: {data[:200]!r}")
            if len(data) > _MAX_RESPONSE or not response.isclosed():
                raise ProtocolError("response over 1 MiB")
            return decode_acquire_response(data)
        except BaseException:
            # Whatever is left of that answer is never read as the next one.
            self.conn.close()
            self.conn = None
            raise

    def launch(self, task_id: int, task_type: str, token: str) -> None:
        if task_type != CLIENTAPP_TASK:
            # Not asked for; never started (Flower's plugin would fail it the same way).
            _log(f"not starting task {task_id} of type {task_type[:40]!r}", "WARNING")
            return
        argv = [
            CLIENTAPP_TASK,
            "--runtime-api-address",
            self.address,
            "--token",
            token,
            "--insecure",
            "--parent-pid",
            str(os.getpid()),
        ]
        try:
            pid = os.posix_spawnp(CLIENTAPP_TASK, argv, dict(os.environ))
        except OSError as exc:
            _log(f"cannot start {CLIENTAPP_TASK} for task {task_id}: {exc}", "ERROR")
            return
        self.children.append(pid)

    def prewarm(self) -> None:
        """Start ``flwr-clientapp --edgefl-prewarm``: the warm zygote, if none runs."""
        _log("starting the ClientApp launcher's warm zygote")
        try:
            self.children.append(
                os.posix_spawnp(CLIENTAPP_TASK, [CLIENTAPP_TASK, PREWARM_ARG], dict(os.environ))
            )
        except OSError as exc:
            _log(f"cannot start {CLIENTAPP_TASK} {PREWARM_ARG}: {exc}", "WARNING")

    def reap(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
            self.children.remove(pid)

    def parent_alive(self) -> bool:
        if self.parent == self.started_under and os.getppid() != self.parent:
            return False  # re-parented: the SuperNode exited (maybe not reaped yet)
        try:
            os.kill(self.parent, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def run(self, interval: float) -> int:
        try:
            pidfd: int | None = os.pidfd_open(self.parent)
        except OSError:
            pidfd = None
        while True:
            if not self.parent_alive():
                return 0
            try:
                task = self.acquire()
                self.failures = 0
            except (OSError, http.client.HTTPException, ProtocolError) as exc:
                if not self.parent_alive():
                    return 0  # the SuperNode went away (its API with it): nothing to say
                self.failures += 1
                if self.failures in (3, 30) or self.failures % 600 == 0:
                    _log(
                        f"no answer from the Runtime API at {self.address} ({exc}); retrying",
                        "WARNING",
                    )
                task = None
            if task is not None:
                self.launch(*task)
                continue  # another task may be pending: ask again at once
            self.reap()
            if pidfd is not None:
                ready, _, _ = select.select([pidfd], [], [], interval)
                if ready:
                    return 0  # the SuperNode exited
            else:
                time.sleep(interval)


def _exec_flower(real: str, argv: list[str]) -> NoReturn:
    os.execv(real, [real, *argv])


def main(argv: list[str], *, real: str, flwr_version: str) -> int:
    """Run the loop for ``argv`` (without the program name), or exec Flower's SuperExec.

    Args:
        argv: The arguments the SuperNode started ``flower-superexec`` with.
        real: Flower's ``flower-superexec`` executable.
        flwr_version: The installed Flower version (sent in the runtime-version headers).
    """
    parsed = parse_args(argv)
    if parsed is None:
        _exec_flower(real, argv)
    address, parent = parsed

    def stop(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _log(f"polling the Runtime API at {address} for ClientApp tasks (SuperNode pid {parent})")
    loop = _Loop(address, parent, flwr_version)
    # Python runs the handler between two steps of the loop (a select or an HTTP call is
    # resumed after it), so spawning there is safe.
    signal.signal(PREWARM_SIGNAL, lambda _signum, _frame: loop.prewarm())
    if os.environ.get(PREWARM_ENV) == "1":
        # The ClientApp launcher starts its zygote now rather than at a run's first message.
        loop.prewarm()
    return loop.run(_poll_interval())


def install(bin_dir: Path, *, python: str | None = None) -> Path:
    """Write the ``flower-superexec`` script into ``bin_dir`` (first on the SuperNode's PATH).

    Raises:
        OSError: The script cannot be written.
        FileNotFoundError: Flower's own ``flower-superexec`` is not beside ``python``.
    """
    from importlib.metadata import version

    exe = python or sys.executable
    real = Path(exe).parent / EXECUTABLE
    if not real.exists():
        raise FileNotFoundError(f"no {EXECUTABLE} beside {exe}")
    script = (
        f"#!{exe} -IS\n"
        "# Written by edgefl's SuperNode supervisor: the SuperNode's ClientApp task loop\n"
        "# (edgefl.edge_agent.fl.superexec), or Flower's own for arguments it does not take.\n"
        "import os, sys\n"
        f"REAL = {str(real)!r}\n"
        "try:\n"
        "    import importlib.util\n"
        f"    spec = importlib.util.spec_from_file_location('_edgefl_superexec', {__file__!r})\n"
        "    mod = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(mod)\n"
        "except BaseException:\n"
        "    os.execv(REAL, [REAL] + sys.argv[1:])\n"
        f"sys.exit(mod.main(sys.argv[1:], real=REAL, flwr_version={version('flwr')!r}))\n"
    )
    bin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = bin_dir / EXECUTABLE
    tmp = bin_dir / f".{EXECUTABLE}.tmp"
    tmp.write_text(script)
    tmp.chmod(0o700)
    os.replace(tmp, target)
    return target
