"""The MQTT broker ``edgefl server start`` runs: one mosquitto with the shipped config.

:class:`MosquittoBroker` renders ``deploy/mosquitto/`` (mutual TLS with the fleet CA, the
CRL, the ACL with a block per admitted device and per operator certificate, persistence)
into its folder and runs mosquitto as a managed process (:mod:`edgefl.process`). The
server supervises it (restarts it when it dies, and after a CRL change: mosquitto 2.0
reads its ``crlfile`` only at start-up) and calls :meth:`MosquittoBroker.reload_acl`
while it runs.
"""

from __future__ import annotations

import getpass
import logging
import shutil
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

from edgefl.errors import ConfigError, EdgeflError
from edgefl.files import write_text_atomic
from edgefl.netutil import dial_host, free_port, port_open
from edgefl.process import ManagedProcess, ProcessNotReadyError
from edgefl.server.broker_config import MAX_PAYLOAD_BYTES, render_acl, render_mosquitto_config
from edgefl.server.config import BrokerConfig
from edgefl.server.fleet_ca import FleetCA

__all__ = ["BrokerError", "MosquittoBroker"]

log = logging.getLogger(__name__)


class BrokerError(EdgeflError):
    """mosquitto did not start or died at start-up."""


class MosquittoBroker:
    """One mosquitto running the shipped config (rendered into ``workdir``).

    Args:
        workdir: Folder for the config, the log and (by default) persistence.
        ca: The fleet CA (``cafile``, ``crlfile``).
        certfile: The broker's server certificate.
        keyfile: Its key.
        config: Host, port, binary and user.
    """

    def __init__(
        self,
        workdir: Path,
        ca: FleetCA,
        certfile: Path,
        keyfile: Path,
        config: BrokerConfig,
        *,
        message_size_limit: int = MAX_PAYLOAD_BYTES,
        devices: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        exe = shutil.which(config.executable)
        if (
            exe is None
            and Path("/usr/sbin/mosquitto").exists()
            and config.executable == ("mosquitto")
        ):
            exe = "/usr/sbin/mosquitto"
        if exe is None:
            raise ConfigError(
                f"mosquitto binary {config.executable!r} not found",
                hint="install mosquitto (apt-get install mosquitto), set broker.executable, "
                "or set broker.enabled: false to use an external broker",
            )
        self.exe = exe
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = config.host
        self.port = config.port or free_port(config.host)
        data_dir = (config.data_dir or self.workdir / "data").expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        # The shipped ACL plus one block per admitted device (pinned to its enrolled fleet)
        # and one read-only block per operator certificate. Rendered here, so a device
        # admitted while the server was down can publish as soon as the broker is up.
        self.acl_path = self.workdir / "acl"
        self._ca_dir = ca.directory
        self._devices = devices
        self._acl_stamp: tuple[int, int, int] | None = None
        self._operators = ca.operator_names()
        write_text_atomic(self.acl_path, render_acl(self._operators, devices=self._admitted()))
        text = render_mosquitto_config(
            port=self.port,
            cafile=ca.cert_path.resolve(),
            certfile=certfile.resolve(),
            keyfile=keyfile.resolve(),
            crlfile=ca.crl_path.resolve(),
            data_dir=data_dir,
            acl_file=self.acl_path.resolve(),
            bind_address=config.host,
            run_as_user=config.run_as_user or getpass.getuser(),
            message_size_limit=message_size_limit,
        )
        write_text_atomic(self.conf_path, text)
        self._proc: ManagedProcess | None = None

    @property
    def pid(self) -> int | None:
        """PID of the running broker."""
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.running()

    def start(self, timeout: float = 20.0) -> None:
        """Start mosquitto and wait until it accepts connections.

        Raises:
            BrokerError: The port is taken, or mosquitto exited or did not listen in time.
        """
        if self.running():
            return
        dial = dial_host(self.host)
        if port_open(dial, self.port):
            raise BrokerError(
                f"broker port {self.host}:{self.port} is already in use",
                hint="stop what listens there or choose another broker.port",
            )
        # Its own session: a Ctrl-C in our terminal is ours to handle.
        self._proc = ManagedProcess([self.exe, "-c", str(self.conf_path)], self.log_path)
        pid = self._proc.start()
        log.info("started mosquitto pid %d on %s:%d", pid, self.host, self.port)
        try:
            self._proc.wait_for_port(dial, self.port, timeout)
        except ProcessNotReadyError as exc:
            raise BrokerError(
                exc.message.replace(f"listen on {dial}:", f"listen on {self.host}:"),
                hint=exc.hint,
            ) from None

    def _admitted(self) -> Mapping[str, str]:
        """Device id -> enrolled fleet of every admitted device (none without a source)."""
        return self._devices() if self._devices is not None else {}

    def reload_acl(self) -> bool:
        """Render the ACL again; SIGHUP mosquitto if it changed.

        It changes when an operator certificate is issued or revoked (the CA's
        ``state.json`` changed: only then is the CA loaded again) or when the set of
        admitted devices or their fleets changed (read from the registry on every call, a
        single small query: ``admit`` and ``revoke`` run in other processes, and the
        registry row may be committed after the CA wrote ``state.json``). mosquitto
        re-reads ``acl_file`` on SIGHUP without dropping connections; until it has, a newly
        admitted device's publishes are refused (PUBACK 0x87) and stay in its outbox.

        Returns:
            Whether the ACL changed.
        """
        try:
            stamp = (self._ca_dir / "state.json").stat()
        except OSError:
            pass
        else:
            key = (stamp.st_mtime_ns, stamp.st_size, stamp.st_ino)
            if key != self._acl_stamp:  # the CA issued or revoked something
                self._acl_stamp = key
                self._operators = FleetCA.load(self._ca_dir).operator_names()
        text = render_acl(self._operators, devices=self._admitted())
        try:
            if self.acl_path.read_text(encoding="utf-8") == text:
                return False
        except OSError:
            pass
        write_text_atomic(self.acl_path, text)
        if self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)
        log.warning("broker ACL changed (devices admitted or revoked, or operators): reloading")
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), SIGKILL after ``timeout``."""
        if self._proc is not None:
            self._proc.stop(timeout)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL at once."""
        if self._proc is not None:
            self._proc.kill()
            self._proc = None
