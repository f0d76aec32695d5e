"""Helpers for tests that run a real Flower deployment: SuperLink, SuperNodes, runs.

Everything here starts real processes (``flower-superlink``, ``flower-supernode``) on
loopback with free ports, each a :class:`edgefl.process.ManagedProcess` in its own process
group, and stops only what it started, by that group.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgefl.config import TlsFiles
from edgefl.process import ManagedProcess
from edgefl.server.fl.superlink import FlowerAdmin, SuperLink, SuperLinkConfig, flower_env
from edgefl.server.fleet_ca import FleetCA
from edgefl.testing import free_port

__all__ = [
    "Deployment",
    "SuperNodeProcess",
    "group_processes",
    "start_deployment",
    "wait_clientapp_running",
    "wait_run_finished",
]


@dataclass
class Deployment:
    """A fleet CA and a TLS SuperLink with node authentication."""

    ca: FleetCA
    superlink: SuperLink
    admin: FlowerAdmin

    def stop(self) -> None:
        self.superlink.stop()


def start_deployment(workdir: Path, *, node_auth: bool = True) -> Deployment:
    """A new fleet CA, a server certificate for 127.0.0.1 and a started SuperLink."""
    ca = FleetCA.create(workdir / "ca")
    server = ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    assert server.key_path is not None
    link = SuperLink(
        SuperLinkConfig(
            port=0,
            tls=TlsFiles(
                ca_file=ca.cert_path, cert_file=server.cert_path, key_file=server.key_path
            ),
            node_auth=node_auth,
        ),
        workdir / "superlink",
    )
    link.start()
    return Deployment(ca=ca, superlink=link, admin=link.admin())


def _node_config(values: Mapping[str, str | int | float]) -> str:
    parts = []
    for key, value in values.items():
        text = f'"{value}"' if isinstance(value, str) else str(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class SuperNodeProcess:
    """One ``flower-supernode`` started directly (the agent normally supervises it)."""

    def __init__(
        self,
        workdir: Path,
        superlink: str,
        *,
        root_certificates: Path,
        node_key: Path | None,
        node_config: Mapping[str, str | int | float],
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "supernode.log"
        cmd = [
            str(Path(sys.executable).parent / "flower-supernode"),
            "--superlink",
            superlink,
            "--root-certificates",
            str(root_certificates),
            "--port",
            str(free_port()),
            "--node-config",
            _node_config(node_config),
        ]
        if node_key is not None:
            cmd += ["--auth-supernode-private-key", str(node_key)]
        self.process = ManagedProcess(
            cmd, self.log_path, name="flower-supernode", env=flower_env(workdir / "flwr-home")
        )
        self._pid = self.process.start()

    @property
    def pid(self) -> int:
        return self._pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ended(self) -> bool:
        """Exited, or gave up: Flower 1.41's SuperNode can stay alive, disconnected and no
        longer retrying, after giving up reconnecting, so its word counts as an exit."""
        if self.process.poll() is not None:
            return True
        text = self.log_text()
        if "Giving up reconnection" in text or "SuperNode terminated gracefully" in text:
            return True
        # Or wedged after a network cut: a TLS error, then 30 s of silence (the agent's
        # supervisor applies the same rule).
        trouble = max(text.rfind(t) for t in ("SSL/TLS handshake error", "Failed to send"))
        healthy = max(text.rfind(h) for h in ("Received successfully", "Sent successfully"))
        silent_s = time.time() - self.log_path.stat().st_mtime
        return trouble > healthy and silent_s >= 30.0

    def kill(self) -> None:
        """SIGKILL the SuperNode and its ClientApp processes (a crash)."""
        self.process.kill()

    def stop(self) -> None:
        """SIGTERM its group, SIGKILL after 15 s, then the ClientApps it left behind."""
        self.process.stop(15.0)


def wait_run_finished(admin: FlowerAdmin, run_id: int, timeout: float) -> str:
    """Poll ``flwr ls`` until the run is finished; returns its status text."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = str(admin.run_info(run_id).get("status", ""))
        if status.startswith("finished"):
            return status
        time.sleep(2.0)
    raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s (status {status!r})")


def group_processes(pgid: int, needle: str) -> list[int]:
    """PIDs in process group ``pgid`` whose command line contains ``needle`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and needle in cmdline:
            found.append(int(entry.name))
    return found


def wait_clientapp_running(node: SuperNodeProcess, timeout: float) -> int:
    """Wait until the SuperNode runs a ClientApp process (it got a message); its PID."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = group_processes(node.pid, "flwr-clientapp")
        if pids:
            return pids[0]
        time.sleep(0.05)
    raise TimeoutError(f"no ClientApp process under SuperNode {node.pid} within {timeout:.0f} s")
