"""A private mosquitto for tests and benchmarks, killed by PID.

Each broker gets its own config file and a free loopback port. Stdlib only, so it ships
with the package at no cost.

Tests use it through a fixture such as::

    @pytest.fixture
    def broker(tmp_path: Path) -> Iterator[Mosquitto]:
        with Mosquitto(tmp_path) as b:
            yield b
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["Mosquitto", "free_port", "mosquitto_executable", "wait_for"]


def mosquitto_executable() -> str | None:
    """The mosquitto binary (on PATH, or Debian's /usr/sbin), or ``None`` if not installed."""
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


def free_port() -> int:
    """Ask the kernel for a free loopback TCP port."""
    from edgefl.netutil import free_port as _free

    return _free("127.0.0.1")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


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
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until its port accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        proc = self.proc

        def accepting() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for(accepting, timeout, f"mosquitto on port {self.port}")

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
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL this broker (by its PID only) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
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
