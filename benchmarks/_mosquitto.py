"""A private mosquitto for the benchmarks: own config, free loopback port, killed by PID.

Benchmarks do not import from ``tests/``; this is the benchmark's own copy of that helper,
with what the benchmarks need: a large ``max_queued_messages`` and optional persistence
(the chaos run needs the ingest's session to survive a ``kill -9`` of the broker).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Mosquitto", "free_port"]


def free_port() -> int:
    """Ask the kernel for a free loopback TCP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One mosquitto process on 127.0.0.1 with a config file written in ``workdir``.

    Args:
        workdir: Folder for the config file, the log and the persistence file.
        persistence: Keep sessions in ``workdir`` (saved every second, so a ``kill -9``
            loses at most the last second of session changes).
        extra_lines: Extra ``mosquitto.conf`` lines.
    """

    def __init__(
        self, workdir: Path, *, persistence: bool = False, extra_lines: Sequence[str] = ()
    ) -> None:
        exe = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if exe is None:
            raise RuntimeError("mosquitto is not installed")
        self.exe = exe
        self.host = "127.0.0.1"
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "max_queued_messages 1000000",
        ]
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
            lines.append("user root")
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
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"mosquitto did not listen on {self.port}") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL this broker (by its PID only) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
