"""Test kit: a private mosquitto, the ``edgefl`` processes tests run, a relay that cuts.

:class:`CuttingRelay` is a loopback TCP relay that resets a stream at a set byte (tests
and benchmarks inject network cuts with it).

Each broker gets its own config file and a free loopback port, and runs as a
:class:`~edgefl.process.ManagedProcess` (its own process group, killed by that group).
Only the base dependencies, so it ships with the package at no cost.

Tests use it through a fixture such as::

    @pytest.fixture
    def broker(tmp_path: Path) -> Iterator[Mosquitto]:
        with Mosquitto(tmp_path) as b:
            yield b
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgefl.netutil import free_port as _free
from edgefl.process import ManagedProcess, ProcessNotReadyError, wait_until

__all__ = [
    "CuttingRelay",
    "EdgeflProcesses",
    "Mosquitto",
    "edgefl_executable",
    "first_line",
    "free_port",
    "mosquitto_executable",
    "prometheus_server",
    "start_edgefl",
    "wait_for",
]


def mosquitto_executable() -> str | None:
    """The mosquitto binary (on PATH, or Debian's /usr/sbin), or ``None`` if not installed."""
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


def free_port() -> int:
    """Ask the kernel for a free loopback TCP port (:func:`edgefl.netutil.free_port`)."""
    return _free("127.0.0.1")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    wait_until(condition, timeout, what, interval=0.02)


@contextlib.contextmanager
def prometheus_server(folder: Path, config: Mapping[str, Any]) -> Iterator[str]:
    """Debian's Prometheus running ``config`` on a free loopback port, for the block.

    ``config`` is written to ``folder/prometheus.yml`` (relative paths in it, such as
    ``rule_files``, are relative to ``folder``); the data goes to ``folder/data``. Yields
    the base URL (``http://127.0.0.1:PORT``) once ``/-/ready`` answers; stops it after.

    Raises:
        RuntimeError: ``prometheus`` is not installed (``scripts/setup`` installs it).
    """
    import yaml

    exe = shutil.which("prometheus")
    if exe is None:
        raise RuntimeError("prometheus is not installed (scripts/setup installs it)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
    port = free_port()
    proc = ManagedProcess(
        [
            exe,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        folder / "prometheus.log",
        name="prometheus",
    )
    proc.start()
    try:
        proc.wait_for_port("127.0.0.1", port, 30)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {proc.last_line()}")
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as answer:
                    return bool(answer.status == 200)
            except (urllib.error.URLError, ConnectionError, OSError):  # 503 while it starts
                return False

        wait_for(ready, 30, "Prometheus ready")
        yield base
    finally:
        proc.stop(10)


class Mosquitto:
    """One mosquitto process on 127.0.0.1 with a config file written in ``workdir``.

    Args:
        workdir: Folder for the config file, the broker's log and its persistence file.
        extra_lines: Extra ``mosquitto.conf`` lines.
        port: Port to listen on; a free one when ``None``.
        users: When given, anonymous clients are refused and only these user/password
            pairs may connect; :meth:`set_users` changes them on the running broker.
        persistence: Keep sessions and queued messages in ``workdir``, saved every
            second, so a ``kill -9`` loses at most the last second of them.
    """

    def __init__(
        self,
        workdir: Path,
        extra_lines: Sequence[str] = (),
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        *,
        persistence: bool = False,
    ) -> None:
        exe = mosquitto_executable()
        if exe is None:
            raise RuntimeError("mosquitto is not installed")
        self.exe = exe
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.workdir = workdir
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"
        self.passwd = workdir / f"mosquitto-{self.port}.passwd"
        workdir.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} 127.0.0.1"]
        if persistence:
            lines += [
                "persistence true",
                f"persistence_location {workdir}/",
                f"persistence_file mosquitto-{self.port}.db",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        if os.geteuid() == 0:
            # Run as root, mosquitto switches to the "mosquitto" user after reading its
            # config, and could then not read a password file in a 0700 pytest tmp dir.
            lines.append("user root")
        if users is None:
            lines.append("allow_anonymous true")
        else:
            self._write_users(users)
            lines += ["allow_anonymous false", f"password_file {self.passwd}"]
        lines += extra_lines
        self.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.proc: ManagedProcess | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until its port accepts connections.

        Raises:
            RuntimeError: mosquitto exited at start-up (the message quotes its log).
            TimeoutError: It did not listen within ``timeout`` seconds (it is killed).
        """
        if self.proc is not None and self.proc.running():
            return
        self.proc = ManagedProcess([self.exe, "-c", str(self.conf)], self.log, name="mosquitto")
        self.proc.start()
        try:
            self.proc.wait_for_port(self.host, self.port, timeout, interval=0.02)
        except ProcessNotReadyError as exc:
            if exc.exit_code is None:
                raise TimeoutError(f"{exc} ({exc.hint})") from None
            raise RuntimeError(f"{exc} ({exc.hint})") from None

    def _write_users(self, users: Mapping[str, str]) -> None:
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            raise RuntimeError("mosquitto_passwd is not installed")
        self.passwd.unlink(missing_ok=True)
        self.passwd.touch()
        for user, password in users.items():
            subprocess.run([tool, "-b", str(self.passwd), user, password], check=True)

    def set_users(self, users: Mapping[str, str]) -> None:
        """Replace the password file and make the running broker reload it (SIGHUP)."""
        self._write_users(users)
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL this broker (its own process group) and reap it."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc = None

    def restart(self, timeout: float = 10.0) -> None:
        """Kill (if running) and start again on the same port.

        The port can be briefly held by sockets in TIME_WAIT; mosquitto sets SO_REUSEADDR,
        so a restart binds at once, and :meth:`start` fails loudly if it does not.
        """
        self.kill()
        self.start(timeout)

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def edgefl_executable() -> str:
    """The ``edgefl`` command of the environment the running interpreter belongs to."""
    return str(Path(sys.executable).parent / "edgefl")


def start_edgefl(
    args: Sequence[str],
    log_path: Path,
    *,
    stdout_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start ``edgefl ARGS`` as a managed process, its output appended to ``log_path``.

    With ``stdout_path``, its stdout is appended to that file and only its stderr to
    ``log_path``, for a caller that reads what a command prints on stdout alone (the
    ``--json`` line). A shell then opens that file and replaces itself with ``edgefl``
    (``exec``), so the PID and the signals it gets are edgefl's own.

    The caller stops it (:meth:`~edgefl.process.ManagedProcess.stop`), or lets an
    :class:`EdgeflProcesses` do it.
    """
    argv = [edgefl_executable(), *args]
    if stdout_path is not None:
        argv = ["/bin/sh", "-c", 'out=$1; shift; exec "$@" >>"$out"', "sh", str(stdout_path), *argv]
    name = " ".join(["edgefl", *args[:2]])
    proc = ManagedProcess(argv, log_path, name=name, env=env)
    proc.start()
    return proc


def first_line(proc: ManagedProcess, path: Path, timeout: float) -> str:
    """The first line ``proc`` writes to ``path`` (its ``stdout_path``), with its newline.

    Raises:
        AssertionError: The process exited without writing one (the message quotes its
            log's last meaningful line).
        TimeoutError: No line within ``timeout`` seconds.
    """

    def written() -> bool:
        exited = proc.poll() is not None
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        assert "\n" in text or not exited, (
            f"{proc.name} exited with code {proc.returncode} and no line: {proc.last_line()}"
        )
        return "\n" in text

    wait_for(written, timeout, f"a line from {proc.name}")
    return path.read_text(encoding="utf-8").partition("\n")[0] + "\n"


class EdgeflProcesses:
    """The ``edgefl`` processes one test or benchmark runs; all stopped when it ends.

    Used as a context manager (tests get one from a fixture): on exit every process it
    started that still runs gets SIGTERM at once, then each is stopped in turn (SIGKILL to
    its group after ``grace`` seconds).

    Args:
        folder: Where the log files go.
        grace: Seconds a process has to exit after SIGTERM.
    """

    def __init__(self, folder: Path, *, grace: float = 30.0) -> None:
        self.folder = folder
        self.grace = grace
        self.started: list[ManagedProcess] = []

    def start(
        self,
        *args: str,
        log: str = "edgefl.log",
        stdout: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        """:func:`start_edgefl` with the log ``folder/log``."""
        proc = start_edgefl(args, self.folder / log, stdout_path=stdout, env=env)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        """SIGTERM every running one, then stop each (idempotent)."""
        for proc in self.started:
            if proc.running():
                proc.signal_group(signal.SIGTERM)
        for proc in self.started:
            proc.stop(self.grace)

    def __enter__(self) -> EdgeflProcesses:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


class CuttingRelay:
    """A loopback TCP relay to ``upstream_port`` that resets the first connection mid-stream.

    Args:
        upstream_port: Where to relay to.
        cut_after: Bytes towards the client after which the first connection is reset
            (RST both ways); ``None`` never cuts. Later connections pass untouched.

    Attributes:
        downstream: Bytes relayed towards the client, over every connection.
        cuts: How many connections were cut.
    """

    def __init__(self, upstream_port: int, cut_after: int | None) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.downstream = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> CuttingRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(5)

    def _accept(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, upstream]
            limit = self.cut_after if first else None
            first = False
            conn = (client, upstream)
            threading.Thread(
                target=self._pump, args=(client, upstream, None, conn), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, limit, conn), daemon=True
            ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        limit: int | None,
        conn: tuple[socket.socket, socket.socket],
    ) -> None:
        counted = src is conn[1]  # towards the client
        passed = 0
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if limit is not None and passed + len(data) >= limit:
                data = data[: max(0, limit - passed)]
            try:
                dst.sendall(data)
            except OSError:
                break
            passed += len(data)
            if counted:
                with self._lock:
                    self.downstream += len(data)
            if limit is not None and passed >= limit:
                self.cuts += 1
                for s in conn:  # a reset, both ways: the peers see it at once
                    with contextlib.suppress(OSError):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.close()
                return
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
