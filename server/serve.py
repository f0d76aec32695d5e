"""``edgefl server start``: the cloud side of a deployment, supervised in one process.

:class:`Server` prepares and then supervises:

- the **fleet CA** (``ca_dir``; created on first start with a TLS server certificate for
  the configured host names and IPs, and the ``edgefl-ingest`` service certificate the
  ingest authenticates with);
- the **registry** (``db_url``; migrated to head at start);
- a **mosquitto** broker running the shipped configuration (``deploy/mosquitto/``:
  mutual TLS, ACL, CRL, persistence), unless ``broker.enabled`` is false and an external
  broker is used;
- a **flower-superlink** with TLS, SuperNode authentication and an on-disk database,
  listening on loopback only, behind
- an **nginx Fleet API proxy** (:mod:`edgefl.server.fl.fleet_proxy`) on
  ``superlink.host``/``superlink.port``, the address devices dial: it terminates TLS and
  passes on only the Fleet API routes, so the SuperLink's unauthenticated Control and
  Runtime APIs cannot be reached from the network (``fleet_proxy.enabled``);
- the **MQTT ingest**, in this process, authenticated with the service certificate.

A child process that dies is restarted after an exponential backoff with jitter
(:func:`edgefl.backoff.backoff_delay`, the one retry curve of the project).
The CA's ``crl.pem`` is watched: mosquitto 2.0 reads its ``crlfile`` only at start-up,
so when ``edgefl server revoke`` rewrites the CRL the broker is restarted (gracefully, so
its persistence file keeps queued messages) and the revoked device's certificate is
refused from then on. SIGTERM or SIGINT stops everything.

While running, ``<state_dir>/server.json`` holds the addresses, ports and PIDs, so the
admin commands (``edgefl server admit`` ...) find a SuperLink whose port was picked at
start (``port: 0``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol

from cryptography import x509

from edgefl.backoff import backoff_delay
from edgefl.errors import ConfigError, EdgeflError
from edgefl.files import write_text_atomic
from edgefl.netutil import free_port, port_open
from edgefl.procs import cmdline, cwd, end_process_group, pid_alive
from edgefl.server.broker_config import MAX_PAYLOAD_BYTES, render_acl, render_mosquitto_config
from edgefl.server.cert_renewal import CertRenewalService
from edgefl.server.config import BrokerConfig, ServerConfig, ServerIngestConfig
from edgefl.server.fl.fleet_proxy import FleetProxy, ProxyTLS
from edgefl.server.fl.superlink import FlowerAdmin, SuperLink, SuperLinkConfig
from edgefl.server.fleet_ca import CERTS_IDENTITY, SERVER_IDENTITY, FleetCA
from edgefl.server.ingest import Ingest, IngestConfig
from edgefl.server.registry.db import display_url, upgrade

__all__ = [
    "RUNTIME_FILE",
    "BrokerConfig",
    "BrokerError",
    "MosquittoBroker",
    "Server",
    "ServerConfig",
    "ServerIngestConfig",
    "read_runtime",
]

log = logging.getLogger(__name__)

RUNTIME_FILE = "server.json"
"""Written into ``state_dir`` while the server runs (addresses, ports, PIDs)."""


class BrokerError(EdgeflError):
    """mosquitto did not start or died at start-up."""


def read_runtime(state_dir: Path) -> dict[str, Any] | None:
    """The running server's ``server.json`` (see :data:`RUNTIME_FILE`), or ``None``."""
    try:
        data = json.loads((Path(state_dir) / RUNTIME_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


_LOOPBACK_NAME = "localhost"
"""DNS name in the server certificate the proxy checks the loopback SuperLink by (nginx
1.22 matches only DNS names of an upstream certificate, not IP addresses)."""


def _dial_host(host: str) -> str:
    """Where to connect to reach a listener bound to ``host`` on this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


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
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the running broker."""
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start mosquitto and wait until it accepts connections.

        Raises:
            BrokerError: The port is taken, or mosquitto exited or did not listen in time.
        """
        if self.running():
            return
        self._reap()
        dial = _dial_host(self.host)
        if port_open(dial, self.port):
            raise BrokerError(
                f"broker port {self.host}:{self.port} is already in use",
                hint="stop what listens there or choose another broker.port",
            )
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in our terminal is ours to handle
        )
        log.info("started mosquitto pid %d on %s:%d", self._proc.pid, self.host, self.port)
        deadline = time.monotonic() + timeout
        while not port_open(dial, self.port):
            code = self._proc.poll()
            if code is not None:
                raise BrokerError(
                    f"mosquitto exited with code {code} at start-up: {self._last_line()}",
                    hint=f"see {self.log_path}",
                )
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"mosquitto did not listen on {self.host}:{self.port} within {timeout:g} s",
                    hint=f"see {self.log_path}",
                )
            time.sleep(0.05)

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
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGHUP)
        log.warning("broker ACL changed (devices admitted or revoked, or operators): reloading")
        return True

    def _last_line(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), SIGKILL after ``timeout``."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL at once."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._proc is None and self._log is not None:
            self._log.close()
            self._log = None


class _Child(Protocol):
    @property
    def pid(self) -> int | None: ...

    def running(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class _Supervised:
    name: str
    child: _Child
    attempt: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    restarts: int = 0
    last_error: str = ""
    history: list[float] = field(default_factory=list)


class Server:
    """The cloud side, in-process (see the module docstring).

    ``Server(config).start()`` returns once everything is up; :meth:`stop` ends it.
    :meth:`run` does both around a wait for SIGTERM/SIGINT.

    Args:
        config: Validated settings.
        progress: Called with a short line for each start-up step (stderr in the CLI).
    """

    def __init__(
        self, config: ServerConfig, *, progress: Callable[[str], None] | None = None
    ) -> None:
        self.config = config
        self.state_dir = config.resolved_state_dir
        self.ca_dir = config.resolved_ca_dir
        self.db_url = config.resolved_db_url
        self._progress = progress or (lambda line: log.info("%s", line))
        self._ca: FleetCA | None = None
        self.superlink: SuperLink | None = None
        self.fleet_proxy: FleetProxy | None = None
        self.broker: MosquittoBroker | None = None
        self.ingest: Ingest | None = None
        self.cert_service: CertRenewalService | None = None
        self._cert_engine: Any = None
        self._certs_due_at = 0.0  # monotonic time of the next own-certificate check
        self.cert_renewals: list[str] = []  # what _renew_own_certs re-issued, in order
        self._children: list[_Supervised] = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._crl_stamp: tuple[int, int] | None = None
        self._crl_due_at = 0.0  # wall-clock time the CRL is due for re-signing
        self._wrote_runtime = False  # whether server.json in state_dir is this server's
        self.broker_restarts_for_crl = 0
        self.ingest_restarts = 0
        """How often the watchdog restarted a stalled ingest (:meth:`_check_ingest`)."""
        self._ingest_restart_at = 0.0  # monotonic time of the last watchdog restart
        self._ingest_db_wait_logged = False

    # -- properties -------------------------------------------------------------------

    @property
    def ca(self) -> FleetCA:
        """The fleet CA (after :meth:`start`), freshly loaded from ``ca_dir``.

        Admin commands in other processes write to the same folder (``edgefl server
        admit``/``revoke``), so a copy held since start-up would be stale: writing through
        it would drop their serials from ``state.json`` and the CRL.
        """
        if self._ca is None:
            raise RuntimeError("Server.start() has not run")
        return FleetCA.load(self.ca_dir)

    @property
    def superlink_address(self) -> str:
        """``host:port`` devices dial for the SuperLink."""
        if self.superlink is None:
            raise RuntimeError("Server.start() has not run")
        sl = self.config.superlink  # the proxy listens where the config says
        if sl.public_address:
            return sl.public_address
        port = self.fleet_proxy.port if self.fleet_proxy is not None else self.superlink.port
        if sl.host in ("0.0.0.0", "::", ""):
            # A wildcard is not dialable: name the host the server certificate is for.
            names = self.config.hostnames or self.config.ips
            return f"{names[0]}:{port}"
        return f"{sl.host}:{port}"

    @property
    def superlink_admin_address(self) -> str:
        """``host:port`` the admin commands on this machine use."""
        if self.superlink is None:
            raise RuntimeError("Server.start() has not run")
        return f"{_dial_host(self.superlink.config.host)}:{self.superlink.port}"

    @property
    def broker_port(self) -> int:
        """Port of the broker (ours or the external one)."""
        return self.broker.port if self.broker is not None else self.config.broker.port

    @property
    def broker_host(self) -> str:
        """Host the broker is reached at."""
        return _dial_host(self.config.broker.host)

    def admin(self, home: Path | None = None) -> FlowerAdmin:
        """A ``flwr`` wrapper for the SuperLink (own ``FLWR_HOME`` under ``state_dir``)."""
        insecure = self.config.superlink.insecure
        return FlowerAdmin(
            self.superlink_admin_address,
            home or self.state_dir / "admin-flwr-home",
            root_certificates=None if insecure else self.ca_dir / "ca.pem",
            insecure=insecure,
        )

    def pids(self) -> dict[str, int | None]:
        """PID of every child process, and of this process (``server``)."""
        with self._lock:
            out: dict[str, int | None] = {s.name: s.child.pid for s in self._children}
        out["server"] = os.getpid()
        return out

    def restarts(self) -> dict[str, int]:
        """How often each child was restarted after it died (CRL restarts excluded)."""
        with self._lock:
            return {s.name: s.restarts for s in self._children}

    def info(self) -> dict[str, Any]:
        """What ``edgefl server start --json`` prints when ready."""
        return {
            "state_dir": str(self.state_dir),
            "ca_dir": str(self.ca_dir),
            "ca_file": str(self.ca_dir / "ca.pem"),
            "db_url": display_url(self.db_url),  # printed and in server.json: no password
            "superlink": self.superlink_address,
            "superlink_admin": self.superlink_admin_address,
            "fleet_proxy": self.fleet_proxy.address if self.fleet_proxy is not None else None,
            "broker": {
                "host": self.broker_host,
                "port": self.broker_port,
                "managed": self.broker is not None,
            },
            "ingest": self.ingest is not None,
            "ingest_restarts": self.ingest_restarts,
            "pids": self.pids(),
        }

    # -- start / stop -----------------------------------------------------------------

    def start(self) -> None:
        """Prepare the CA and registry, start the broker, SuperLink and ingest, supervise.

        Raises:
            ConfigError: Bad settings, an unusable CA or registry.
            BrokerError: mosquitto did not start.
            SuperLinkError: flower-superlink did not start.
        """
        if self._supervisor is not None:
            raise RuntimeError("Server.start() called twice")
        self._stopping.clear()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        cfg = self.config
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._end_leftovers()
        self._progress(f"[1/5] fleet CA in {self.ca_dir}")
        self._ca = self._prepare_ca()
        server_cert = self.ca_dir / "server" / "cert.pem"
        server_key = self.ca_dir / "server" / "key.pem"
        self._progress("[2/5] registry: migrating to head")
        upgrade(self.db_url)

        if cfg.broker.enabled:
            self._progress("[3/5] mosquitto (mutual TLS, ACL, CRL, persistence)")
            self.broker = MosquittoBroker(
                self.state_dir / "broker",
                self._ca,
                server_cert,
                server_key,
                cfg.broker,
                message_size_limit=cfg.ingest.max_payload_bytes,
                devices=self.admitted_devices,
            )
            self.broker.start()
            self._supervise("broker", self.broker)
        else:
            self._progress(f"[3/5] external broker at {cfg.broker.host}:{cfg.broker.port}")
        self._crl_stamp = self._crl_state()

        sl_cfg = cfg.superlink
        if not sl_cfg.insecure and sl_cfg.certfile is None:
            sl_cfg = sl_cfg.model_copy(
                update={
                    "certfile": server_cert,
                    "keyfile": server_key,
                    "ca_file": self.ca_dir / "ca.pem",
                }
            )
        if sl_cfg.database is None:
            sl_cfg = sl_cfg.model_copy(update={"database": self.state_dir / "superlink.db"})
        proxy_cfg = cfg.fleet_proxy
        if proxy_cfg.enabled:
            # The SuperLink's Control and Runtime APIs are unauthenticated: loopback only.
            sl_cfg = sl_cfg.model_copy(
                update={
                    "host": "127.0.0.1",
                    "port": proxy_cfg.superlink_port,
                    "public_address": None,
                }
            )
        self._progress(
            "[4/5] flower-superlink (TLS, node authentication, on-disk state"
            + (", loopback only behind the nginx Fleet API proxy)" if proxy_cfg.enabled else ")")
        )
        self.superlink = SuperLink(sl_cfg, self.state_dir / "superlink")
        self.superlink.start()
        self._supervise("superlink", self.superlink)
        if proxy_cfg.enabled:
            self.fleet_proxy = self._make_fleet_proxy(sl_cfg, self.superlink.port)
            self.fleet_proxy.start()
            self._supervise("fleet_proxy", self.fleet_proxy)

        if cfg.ingest.enabled:
            self._progress(f"[5/5] MQTT ingest as {SERVER_IDENTITY}")
            self.ingest = Ingest(self._ingest_config())
            self.ingest.start()
            if not self.ingest.wait_ready(30.0):
                log.warning("the ingest is not subscribed yet; it keeps retrying")
        else:
            self._progress("[5/5] ingest disabled")
        if cfg.cert_service:
            self._start_cert_service()
        self._certs_due_at = time.monotonic() + cfg.cert_check_s
        self._write_runtime()
        self._supervisor = threading.Thread(
            target=self._watch, name="edgefl-server-supervisor", daemon=True
        )
        self._supervisor.start()

    def _make_fleet_proxy(self, sl_cfg: SuperLinkConfig, upstream_port: int) -> FleetProxy:
        """The nginx Fleet API proxy on ``superlink.host/port``, before the SuperLink."""
        public = self.config.superlink
        tls = None
        if not sl_cfg.insecure:
            # _start fills them in from the fleet CA when the config names none.
            certfile, keyfile, ca_file = sl_cfg.certfile, sl_cfg.keyfile, sl_cfg.ca_file
            if certfile is None or keyfile is None or ca_file is None:
                raise ConfigError("superlink: TLS needs certfile, keyfile and ca_file")
            tls = ProxyTLS(
                certfile=certfile,
                keyfile=keyfile,
                ca_file=ca_file,
                upstream_name=_LOOPBACK_NAME,
            )
        return FleetProxy(
            self.state_dir / "fleet-proxy",
            self.config.fleet_proxy,
            listen_host=public.host,
            listen_port=public.port or free_port(public.host),
            upstream_port=upstream_port,
            tls=tls,
            self_registration=not sl_cfg.node_auth,
        )

    def _end_leftovers(self) -> None:
        """End the children a server on this ``state_dir`` left running when it was killed.

        A server killed with ``-9`` (or by the OOM killer) cannot stop its broker and
        SuperLink; they keep its ports and files. Its ``server.json`` names them: each one
        still alive whose command line or working folder lies in ``state_dir`` is ended
        (its process group: SIGTERM, SIGKILL after 10 s).

        Raises:
            ConfigError: The server that wrote ``server.json`` still runs.
        """
        previous = read_runtime(self.state_dir)
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
                f"an edgefl server (pid {server_pid}) already runs on {self.state_dir}",
                hint="stop it first (SIGTERM), or give this one another state_dir",
            )
        home = self.state_dir  # absolute (ServerConfig.resolved_state_dir)
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
                self.state_dir,
            )
            if not end_process_group(pid):
                raise ConfigError(
                    f"{name} (pid {pid}) left by an earlier server does not end",
                    hint=f"end it by hand (kill -9 {pid}), then start again",
                )

    def _prepare_ca(self) -> FleetCA:
        if (self.ca_dir / "ca.pem").exists():
            ca = FleetCA.load(self.ca_dir)
        else:
            ca = FleetCA.create(self.ca_dir)
        if not self._server_cert_matches():
            ca.issue_server_cert(*self._server_cert_names())
        self._renew_own_certs(ca, restart=False)
        # A server that was down past the CRL's nextUpdate must not start a broker that
        # refuses every device.
        self._refresh_crl(ca)
        return ca

    def _refresh_crl(self, ca: FleetCA) -> None:
        """Re-sign the CRL if it is due (see ``crl_refresh_days``); note when it is next due."""
        before = dt.timedelta(days=self.config.crl_refresh_days)
        next_update = ca.refresh_crl(before=before) or ca.crl_next_update()
        if next_update is None:  # unreadable right after signing: try again in a minute
            self._crl_due_at = time.time() + 60.0
        else:
            self._crl_due_at = (next_update - before).timestamp()

    # -- own certificates (cert_renew_days) ----------------------------------------------

    def _cert_due(self, folder: Path) -> bool:
        """Whether ``folder``'s cert.pem/key.pem is missing, unreadable or due for renewal."""
        try:
            cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
        except (OSError, ValueError):
            return True
        if not (folder / "key.pem").exists():
            return True
        left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
        return left < dt.timedelta(days=self.config.cert_renew_days)

    def _renew_own_certs(self, ca: FleetCA, *, restart: bool = True) -> list[str]:
        """Re-issue the server's own certificates that are missing or due; restart their users.

        The broker and the SuperLink read the server certificate at start-up (the Fleet
        API proxy reloads it by itself), the ingest and the certificate service read theirs
        when they connect: each one using a renewed certificate is restarted (``restart``;
        not during start-up, when none runs yet).

        Returns:
            What was re-issued: ``server``, and the service CNs.
        """
        renewed: list[str] = []
        if self._cert_due(self.ca_dir / "server"):
            ca.issue_server_cert(*self._server_cert_names())
            renewed.append("server")
        for name in (SERVER_IDENTITY, CERTS_IDENTITY):
            if self._cert_due(self.ca_dir / "services" / name):
                ca.issue_service_cert(name)
                renewed.append(name)
        if renewed:
            log.warning("re-issued the server's own certificates: %s", ", ".join(renewed))
            self.cert_renewals.extend(renewed)
        if not restart or not renewed:
            return renewed
        with self._lock:
            if "server" in renewed:
                for sup in self._children:
                    if sup.name == "fleet_proxy":
                        continue  # nginx reloads certificates without dropping devices
                    try:
                        sup.child.stop()
                        sup.child.start()
                    except EdgeflError as exc:  # the supervisor retries a dead child
                        log.error("restarting %s with the renewed certificate: %s", sup.name, exc)
            if SERVER_IDENTITY in renewed and self.ingest is not None:
                self.ingest.stop()
                self.ingest = Ingest(self._ingest_config())
                self.ingest.start()
            if CERTS_IDENTITY in renewed and self.cert_service is not None:
                self.cert_service.stop()
                self._start_cert_service()
        self._write_runtime()
        return renewed

    def _registry(self) -> Any:
        """The server's own SQLAlchemy engine on the registry (created on first use)."""
        from edgefl.server.registry.db import make_engine

        if self._cert_engine is None:
            self._cert_engine = make_engine(self.db_url)
        return self._cert_engine

    def admitted_devices(self) -> dict[str, str]:
        """Device id -> enrolled fleet of every admitted device: the broker ACL's devices.

        Raises:
            ConfigError: The registry cannot be read.
        """
        from edgefl.server.enrollment import admitted_fleets

        return admitted_fleets(self._registry())

    def _start_cert_service(self) -> None:
        """Start the certificate renewal service (CN ``edgefl-certs``) on the broker."""
        folder = self.ca_dir / "services" / CERTS_IDENTITY
        self._registry()
        self.cert_service = CertRenewalService(
            host=self.broker_host,
            port=self.broker_port,
            ca_file=self.ca_dir / "ca.pem",
            cert_file=folder / "cert.pem",
            key_file=folder / "key.pem",
            load_ca=lambda: FleetCA.load(self.ca_dir),
            engine=self._cert_engine,
            cert_days=self.config.device_cert_days,
        )
        self.cert_service.start()

    def _server_cert_matches(self) -> bool:
        """Whether the existing server certificate names exactly the configured hosts."""
        try:
            cert = x509.load_pem_x509_certificate(
                (self.ca_dir / "server" / "cert.pem").read_bytes()
            )
            if not (self.ca_dir / "server" / "key.pem").exists():
                return False
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (OSError, ValueError, x509.ExtensionNotFound):
            return False
        dns = set(san.get_values_for_type(x509.DNSName))
        ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        hostnames, wanted = self._server_cert_names()
        wanted_ips = {str(ipaddress.ip_address(ip)) for ip in wanted}
        return dns == set(hostnames) and ips == wanted_ips

    def _server_cert_names(self) -> tuple[list[str], list[str]]:
        """DNS names and IPs for the server certificate.

        The configured ones, plus the loopback names the Fleet API proxy and the admin
        commands check the SuperLink by.
        """
        hostnames = list(self.config.hostnames)
        ips = list(self.config.ips)
        if self.config.fleet_proxy.enabled:
            if _LOOPBACK_NAME not in hostnames:
                hostnames.append(_LOOPBACK_NAME)
            if "127.0.0.1" not in ips:
                ips.append("127.0.0.1")
        return hostnames, ips

    def _ingest_config(self) -> IngestConfig:
        section = self.config.ingest
        data = section.model_dump(exclude={"enabled", "stall_timeout_s"}, exclude_unset=True)
        service = self.ca_dir / "services" / SERVER_IDENTITY
        data.setdefault("broker_host", self.broker_host)
        data.setdefault("broker_port", self.broker_port)
        data.setdefault("db_url", self.db_url)
        data.setdefault("migrate", False)  # done at start
        if "ca_file" not in data:
            data["ca_file"] = self.ca_dir / "ca.pem"
            data.setdefault("cert_file", service / "cert.pem")
            data.setdefault("key_file", service / "key.pem")
        try:
            return IngestConfig.model_validate(data)
        except ValueError as exc:
            raise ConfigError(f"ingest: {exc}") from exc

    def _supervise(self, name: str, child: _Child) -> None:
        with self._lock:
            self._children.append(_Supervised(name, child, started_at=time.monotonic()))

    def _write_runtime(self) -> None:
        self._wrote_runtime = True
        write_text_atomic(
            self.state_dir / RUNTIME_FILE, json.dumps(self.info(), indent=2, sort_keys=True) + "\n"
        )

    def stop(self) -> None:
        """Stop the ingest, the SuperLink and the broker (idempotent)."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(10.0)
            self._supervisor = None
        if self.cert_service is not None:
            self.cert_service.stop()
            self.cert_service = None
        if self._cert_engine is not None:
            self._cert_engine.dispose()
            self._cert_engine = None
        if self.ingest is not None:
            try:
                self.ingest.stop()
            except Exception:  # stopping the rest matters more
                log.exception("stopping the ingest failed")
            self.ingest = None
        with self._lock:
            children = list(reversed(self._children))
        for sup in children:
            try:
                sup.child.stop()
            except Exception:
                log.exception("stopping %s failed", sup.name)
        if self._wrote_runtime:  # a start that failed early leaves another's file alone
            (self.state_dir / RUNTIME_FILE).unlink(missing_ok=True)
            self._wrote_runtime = False
        log.info("server stopped")

    def run(self, on_ready: Callable[[Server], None] | None = None) -> None:
        """Start, call ``on_ready``, wait for SIGTERM/SIGINT (main thread) or :meth:`stop`.

        Raises:
            ConfigError: See :meth:`start`.
            BrokerError: See :meth:`start`.
            SuperLinkError: See :meth:`start`.
        """
        if threading.current_thread() is threading.main_thread():

            def _on_signal(signum: int, _frame: FrameType | None) -> None:
                log.info("server got signal %d, stopping", signum)
                self._stopping.set()

            signal.signal(signal.SIGTERM, _on_signal)
            signal.signal(signal.SIGINT, _on_signal)
        self.start()
        try:
            if on_ready is not None:
                on_ready(self)
            while not self._stopping.wait(0.5):
                pass
        finally:
            self.stop()

    # -- supervision ------------------------------------------------------------------

    def _crl_state(self) -> tuple[int, int] | None:
        try:
            st = (self.ca_dir / "crl.pem").stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def _watch(self) -> None:
        next_crl = time.monotonic()
        while not self._stopping.wait(0.2):
            now = time.monotonic()
            try:
                self._check_children(now)
                self._check_ingest(now)
                if now >= next_crl:
                    next_crl = now + self.config.crl_poll_s
                    self._check_crl()
                    if self.fleet_proxy is not None:
                        # A re-issued server certificate: nginx reloads without dropping
                        # the devices' connections.
                        self.fleet_proxy.reload_if_certificates_changed()
                    if self.broker is not None:
                        # Devices admitted or revoked (another process), operator
                        # certificates added or revoked.
                        self.broker.reload_acl()
                if now >= self._certs_due_at:
                    self._certs_due_at = now + self.config.cert_check_s
                    self._renew_own_certs(self.ca)
            except Exception:  # the supervisor must not die
                log.exception("supervisor step failed")

    def _check_children(self, now: float) -> None:
        cfg = self.config
        with self._lock:
            children = list(self._children)
        for sup in children:
            if self._stopping.is_set():
                return
            if sup.child.running():
                if sup.attempt and now - sup.started_at >= cfg.stable_after_s:
                    sup.attempt = 0
                continue
            if sup.restart_at is None:
                delay = backoff_delay(sup.attempt, cfg.restart_min_s, cfg.restart_max_s)
                sup.restart_at = now + delay
                log.error("%s (pid %s) died; restarting in %.1f s", sup.name, sup.child.pid, delay)
                continue
            if now < sup.restart_at:
                continue
            sup.restart_at = None
            sup.attempt += 1
            try:
                with self._lock:
                    sup.child.stop()  # reap it, close its log, kill leftovers
                    sup.child.start()
                sup.started_at = time.monotonic()
                sup.restarts += 1
                sup.history.append(time.time())
                log.warning("restarted %s (pid %s)", sup.name, sup.child.pid)
                self._write_runtime()
            except EdgeflError as exc:
                sup.last_error = str(exc)
                log.error("restarting %s failed: %s", sup.name, exc)

    def _check_ingest(self, now: float) -> None:
        """The ingest watchdog: restart an ingest that stopped acknowledging.

        A poison message can no longer hold a batch back (the ingest isolates it), but a
        hung database call or a bug could still stop acknowledgements; the broker then
        stops sending once the ingest's Receive Maximum is used up, and every device's
        records wait. A restart resumes the persistent session, and the broker redelivers
        what was not acknowledged. An ingest that waits for an unavailable database is
        left alone (logged once): nothing could be stored after a restart either.
        """
        ingest = self.ingest
        if ingest is None or self._stopping.is_set():
            return
        progress = ingest.progress()
        limit = self.config.ingest.stall_timeout_s
        if progress.worker_alive and progress.stalled_s < limit:
            self._ingest_db_wait_logged = False
            return
        if progress.worker_alive and progress.waiting_for_database:
            if not self._ingest_db_wait_logged:
                self._ingest_db_wait_logged = True
                log.error(
                    "the ingest has acknowledged nothing for %.0f s (%d messages wait): the "
                    "database is unavailable; it keeps retrying",
                    progress.stalled_s,
                    progress.pending,
                )
            return
        if now - self._ingest_restart_at < limit:
            return  # one restart per stall_timeout_s at most
        self._ingest_restart_at = now
        why = (
            "its worker thread died"
            if not progress.worker_alive
            else f"{progress.pending} message(s) pending, nothing acknowledged for "
            f"{progress.stalled_s:.0f} s"
        )
        log.error("the ingest stalled (%s); restarting it", why)
        with self._lock:
            try:
                ingest.stop(timeout=5.0)
            except Exception:  # the new ingest matters more than a clean stop
                log.exception("stopping the stalled ingest failed")
            self.ingest = Ingest(self._ingest_config())
            self.ingest.start()
        self.ingest_restarts += 1
        log.warning("restarted the ingest (%d watchdog restarts so far)", self.ingest_restarts)
        if self._wrote_runtime:
            self._write_runtime()

    def _check_crl(self) -> None:
        stamp = self._crl_state()
        if stamp != self._crl_stamp or time.time() >= self._crl_due_at:
            # Changed by an admin command (it may have signed a short one), or due.
            try:
                self._refresh_crl(self.ca)
            except (EdgeflError, OSError) as exc:
                log.error("cannot refresh the CRL in %s: %s", self.ca_dir, exc)
                self._crl_due_at = time.time() + 60.0
            stamp = self._crl_state()
        if stamp == self._crl_stamp:
            return
        self._crl_stamp = stamp
        if self.broker is None:
            log.warning("crl.pem changed: reload the external broker so it refuses revoked devices")
            return
        log.warning("crl.pem changed: restarting the broker so it reads the new CRL")
        with self._lock:
            self.broker.stop()
            try:
                self.broker.start()
            except EdgeflError as exc:
                log.error("broker restart after the CRL change failed: %s", exc)
        self.broker_restarts_for_crl += 1
        self._write_runtime()
