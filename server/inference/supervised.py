"""The inference service as a supervised child of ``edgefl server start`` (``inference.enabled``).

The ``inference:`` section of server.yaml holds every setting ``edgefl server inference``
takes as a flag; with ``enabled: true`` the server runs that command as a child process
(:class:`InferenceChild`) and restarts it with backoff like its other children. Its port
is picked once (``port: 0``), so a restarted child listens where devices dial.

What the section leaves unset is filled in from the server (:func:`resolve_inference`):
``tls`` (unless ``tls.cert_file`` is given) is the server certificate with mutual TLS
against the fleet CA, ``crl`` the CA's, ``registry_url`` the registry: only admitted,
unrevoked devices are served, as by the other services.

Its first start trains the model when the weights cache is empty (minutes): :meth:`start`
returns once the process runs, without waiting for the port; ``server.json`` names the
address at once, and the log (``<state_dir>/inference/inference.log``) says when it serves.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefl.netutil import free_port
from edgefl.process import ManagedProcess

if TYPE_CHECKING:
    from edgefl.server.config import InferenceServerConfig, ServerConfig

__all__ = ["InferenceChild", "resolve_inference"]

log = logging.getLogger(__name__)


def resolve_inference(server: ServerConfig) -> InferenceServerConfig:
    """The ``inference:`` section with what it leaves unset filled in (module docstring)."""
    cfg = server.inference
    ca_dir = server.resolved_ca_dir
    update: dict[str, Any] = {}
    if cfg.tls.cert_file is None:
        update["tls"] = cfg.tls.model_copy(
            update={
                "cert_file": ca_dir / "server" / "cert.pem",
                "key_file": ca_dir / "server" / "key.pem",
                "ca_file": ca_dir / "ca.pem",
            }
        )
        if cfg.crl is None:
            update["crl"] = ca_dir / "crl.pem"
        if cfg.registry_url is None:
            update["registry_url"] = server.resolved_db_url
    if cfg.port == 0:
        update["port"] = free_port(cfg.host)
    if cfg.metrics_port is None and server.metrics.enabled:
        update["metrics_port"] = free_port("127.0.0.1")  # the server folds them in
    elif cfg.metrics_port == 0:
        update["metrics_port"] = free_port("127.0.0.1")
    return cfg.model_copy(update=update)


class InferenceChild:
    """``edgefl server inference -c <generated config>`` as a supervised child.

    Args:
        server: The server's config (its ``inference:`` section and CA).
        workdir: Folder for the generated config and the log.
    """

    def __init__(self, server: ServerConfig, workdir: Path) -> None:
        self.settings = resolve_inference(server)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.config_file = self.workdir / "inference.json"
        section = self.settings.model_dump(mode="json", exclude={"enabled"})
        self.config_file.write_text(
            json.dumps({"inference": section}, indent=2, sort_keys=True) + "\n",
            encoding="utf-8",
        )
        self.config_file.chmod(0o600)  # it may name a registry URL with a password
        self.log_path = self.workdir / "inference.log"
        self._proc: ManagedProcess | None = None

    @property
    def port(self) -> int:
        """The port it listens on (fixed across restarts)."""
        return self.settings.port

    @property
    def metrics_url(self) -> str | None:
        """``http://127.0.0.1:PORT/metrics`` of the child, or ``None`` (metrics off)."""
        port = self.settings.metrics_port
        return None if port is None else f"http://127.0.0.1:{port}/metrics"

    @property
    def address(self) -> str:
        """``host:port``."""
        host = self.settings.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def command(self) -> list[str]:
        """The command line (this environment's ``edgefl``)."""
        exe = Path(sys.executable).parent / "edgefl"
        head = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgefl.cli"]
        return [*head, "server", "inference", "-c", str(self.config_file), "--json"]

    @property
    def pid(self) -> int | None:
        """PID of the running process."""
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.running()

    def start(self) -> None:
        """Start the process (it trains first if its weights cache is empty)."""
        if self.running():
            return
        self._proc = ManagedProcess(
            self.command(), self.log_path, name="edgefl server inference", cwd=self.workdir
        )
        pid = self._proc.start()
        log.info("started the inference service pid %d on %s", pid, self.address)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (in-flight calls get ``grace_s``), SIGKILL after ``timeout`` seconds."""
        if self._proc is not None:
            self._proc.stop(timeout)
