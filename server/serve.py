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
- the **MQTT ingest**, in this process, authenticated with the service certificate;
- the **model delivery service** (:mod:`edgefl.server.models_service`), in this process:
  admitted devices download release artifacts from ``<state_dir>/releases`` over mutual
  TLS (``models.enabled``; its address is ``models`` in server.json);
- the **admin API** (:mod:`edgefl.server.admin_api`), HTTPS in a thread of this process,
  supervised like a child (``admin.enabled``; its URL is ``admin.url`` in server.json);
- the **inference service** (``inference.enabled``, off by default: its first start trains
  a model), ``edgefl server inference`` as a supervised child with the ``inference:``
  section as its settings (:mod:`edgefl.server.inference.supervised`; its address is
  ``inference`` in server.json);
- the **retention** of records, dead letters and checkpoints (:mod:`edgefl.server.retention`),
  applied every ``retention.interval_s`` in a thread.

A child process that dies is restarted after an exponential backoff with jitter
(:class:`edgefl.supervise.Supervisor`, on :func:`edgefl.backoff.backoff_delay`, the one
retry curve of the project). The CA's ``crl.pem`` is watched
(:class:`edgefl.server.upkeep.CAUpkeep`, which also renews the server's own
certificates): mosquitto 2.0 reads its ``crlfile`` only at start-up,
so when ``edgefl server revoke`` rewrites the CRL the broker is restarted (gracefully, so
its persistence file keeps queued messages) and the revoked device's certificate is
refused from then on. SIGTERM or SIGINT stops everything.

While running, ``<state_dir>/server.json`` holds the addresses, ports and PIDs, so the
admin commands (``edgefl server admit`` ...) find a SuperLink whose port was picked at
start (``port: 0``), and a server started after a ``kill -9`` ends what its predecessor
left running (:mod:`edgefl.server.runtime`).

The pieces live in their own modules: the config models in :mod:`edgefl.server.config`,
the broker process in :mod:`edgefl.server.broker`; this module keeps the orchestrator
and re-exports the old names.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edgefl.config import TlsFiles
from edgefl.errors import ConfigError, EdgeflError
from edgefl.files import write_text_atomic
from edgefl.netutil import dial_host, free_port
from edgefl.server import metrics as server_metrics
from edgefl.server.broker import BrokerError, MosquittoBroker
from edgefl.server.cert_renewal import CertRenewalService
from edgefl.server.config import BrokerConfig, ServerConfig, ServerIngestConfig
from edgefl.server.fl.fleet_proxy import FleetProxy, ProxyTLS
from edgefl.server.fl.superlink import CONNECTION as FLOWER_CONNECTION
from edgefl.server.fl.superlink import FlowerAdmin, SuperLink, SuperLinkConfig
from edgefl.server.fleet_ca import CERTS_IDENTITY, OPERATOR_PREFIX, SERVER_IDENTITY, FleetCA
from edgefl.server.ingest import Ingest, IngestConfig
from edgefl.server.models_service import ModelService, resolve_settings
from edgefl.server.registry.db import display_url, upgrade
from edgefl.server.retention import RetentionLoop
from edgefl.server.runtime import RUNTIME_FILE, end_leftovers, read_runtime
from edgefl.server.upkeep import LOOPBACK_NAME, CAUpkeep
from edgefl.supervise import Supervisor

if TYPE_CHECKING:
    from edgefl.server.admin_api.server import AdminServer
    from edgefl.server.inference.supervised import InferenceChild

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

ADMIN_FLWR_HOME = "admin-flwr-home"
"""Folder in ``state_dir``: the ``FLWR_HOME`` of the admin commands on the server host."""


class Server:
    """The cloud side, in-process (see the module docstring).

    ``Server(config).start()`` returns once everything is up; :meth:`stop` ends it.
    :meth:`run` does both around a wait for SIGTERM/SIGINT.

    Args:
        config: Validated settings.
        progress: Called with a short line for each start-up step (stderr in the CLI).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        progress: Callable[[str], None] | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.admin_api: AdminServer | None = None
        self.inference: InferenceChild | None = None
        self.retention: RetentionLoop | None = None
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
        self.models: ModelService | None = None
        self._cert_engine: Any = None
        self._certs_due_at = 0.0  # monotonic time of the next own-certificate check
        self.cert_renewals: list[str] = []  # what _renew_own_certs re-issued, in order
        self._lock = threading.RLock()
        self.supervisor = Supervisor(
            config.restart_min_s,
            config.restart_max_s,
            config.stable_after_s,
            lock=self._lock,
            on_restart=lambda _sup: self._write_runtime(),
        )
        self.upkeep = CAUpkeep(config, self.ca_dir)
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._wrote_runtime = False  # whether server.json in state_dir is this server's
        self.broker_restarts_for_crl = 0
        self.ingest_restarts = 0
        """How often the watchdog restarted a stalled ingest (:meth:`_check_ingest`)."""
        self._ingest_restart_at = 0.0  # monotonic time of the last watchdog restart
        self._ingest_db_wait_logged = False
        self._metrics = server_metrics.configure(config.metrics.enabled)

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
        return f"{dial_host(self.superlink.config.host)}:{self.superlink.port}"

    @property
    def models_address(self) -> str | None:
        """``host:port`` devices dial for the model delivery service, or ``None`` (off)."""
        if self.models is None:
            return None
        cfg = self.config.models
        host = cfg.public_host or cfg.host
        if host in ("0.0.0.0", "::", ""):
            names = self.config.hostnames or self.config.ips
            host = names[0]
        return f"[{host}]:{self.models.port}" if ":" in host else f"{host}:{self.models.port}"

    @property
    def broker_port(self) -> int:
        """Port of the broker (ours or the external one)."""
        return self.broker.port if self.broker is not None else self.config.broker.port

    @property
    def broker_host(self) -> str:
        """Host the broker is reached at."""
        return dial_host(self.config.broker.host)

    @property
    def admin_flwr_home(self) -> Path:
        """The ``FLWR_HOME`` the admin commands on this host use (one connection, ``edgefl``)."""
        return self.state_dir / ADMIN_FLWR_HOME

    def admin(self, home: Path | None = None) -> FlowerAdmin:
        """A ``flwr`` wrapper for the SuperLink (own ``FLWR_HOME`` under ``state_dir``)."""
        insecure = self.config.superlink.insecure
        return FlowerAdmin(
            self.superlink_admin_address,
            home or self.admin_flwr_home,
            root_certificates=None if insecure else self.ca_dir / "ca.pem",
            insecure=insecure,
        )

    def operator_identity(self) -> dict[str, Any]:
        """The read-only identities for watching the fleet with ``mosquitto_sub``.

        An operator certificate (CN ``edgefl-op-NAME``, made by ``edgefl server
        operator-cert NAME``) may read ``edgefl/#`` and write nothing; the CA keeps a copy
        in ``ca_dir/operators/NAME/``. Nobody needs to borrow a service's key.
        """
        ca_file = self.ca_dir / "ca.pem"
        try:
            cns = FleetCA.load(self.ca_dir).operator_names()
        except (EdgeflError, OSError, ValueError):
            cns = []
        identities = []
        for cn in cns:
            folder = self.ca_dir / "operators" / cn.removeprefix(OPERATOR_PREFIX)
            identities.append(
                {
                    "cn": cn,
                    "cert_file": str(folder / "cert.pem"),
                    "key_file": str(folder / "key.pem"),
                }
            )
        folder_text = (
            str(Path(identities[0]["cert_file"]).parent)
            if identities
            else str(self.ca_dir / "operators" / "NAME")
        )
        return {
            "cn": f"{OPERATOR_PREFIX}NAME",
            "make": "edgefl server operator-cert NAME --config SERVER_CONFIG "
            "(read-only: edgefl/# only)",
            "ca_file": str(ca_file),
            "identities": identities,
            "mosquitto_sub": (
                f"mosquitto_sub -h {self.broker_host} -p {self.broker_port} --cafile {ca_file} "
                f"--cert {folder_text}/cert.pem --key {folder_text}/key.pem -t 'edgefl/#' -v"
            ),
        }

    def pids(self) -> dict[str, int | None]:
        """PID of every child process, and of this process (``server``)."""
        out = self.supervisor.pids()
        out["server"] = os.getpid()
        return out

    def restarts(self) -> dict[str, int]:
        """How often each child was restarted after it died (CRL restarts excluded)."""
        return self.supervisor.restarts()

    @property
    def admin_url(self) -> str | None:
        """``https://HOST:PORT`` of the admin API, or ``None`` (off)."""
        if self.admin_api is None:
            return None
        return self.config.admin.public_url or self.admin_api.url

    def children_state(self) -> list[dict[str, Any]]:
        """Each supervised child and in-process service: pid, running, restarts, last error.

        What the admin API's ``/api/v1/children`` answers.
        """
        from datetime import UTC, datetime

        now = time.monotonic()
        out: list[dict[str, Any]] = []
        for sup in self.supervisor.children():
            backoff = sup.backoff
            out.append(
                {
                    "name": sup.name,
                    # The admin API is a thread of this process.
                    "pid": sup.child.pid or (os.getpid() if sup.name == "admin_api" else None),
                    "running": sup.child.running(),
                    "restarts": backoff.restarts,
                    "last_restart_at": datetime.fromtimestamp(backoff.history[-1], UTC).isoformat()
                    if backoff.history
                    else None,
                    "restart_in_s": round(max(0.0, backoff.next_at - now), 3)
                    if backoff.next_at is not None
                    else None,
                    "last_error": backoff.last_error or None,
                }
            )
        ingest = self.ingest
        if ingest is not None:
            out.append(
                {
                    "name": "ingest",
                    "pid": os.getpid(),
                    "running": ingest.progress().worker_alive,
                    "restarts": self.ingest_restarts,
                    "last_restart_at": None,
                    "restart_in_s": None,
                    "last_error": None,
                }
            )
        return out

    def _child_restarts(self) -> dict[str, int]:
        """Restarts per child for ``edgefl_child_restarts_total`` (the ingest: watchdog)."""
        out = self.supervisor.restarts()
        if self.ingest is not None or self.ingest_restarts:
            out["ingest"] = self.ingest_restarts
        return out

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
            "models": self.models_address,
            "inference": self.inference.address if self.inference is not None else None,
            "admin": {"url": self.admin_url, "port": self.admin_api.port}
            if self.admin_api is not None
            else None,
            "ingest_restarts": self.ingest_restarts,
            "pids": self.pids(),
            "operator": self.operator_identity(),
            "admin_flwr_home": {
                "path": str(self.admin_flwr_home),
                "flwr": f"FLWR_HOME={self.admin_flwr_home} flwr ls {FLOWER_CONNECTION}",
            },
        }

    # -- start / stop -----------------------------------------------------------------

    def start(self) -> None:
        """Prepare the CA and registry, start the broker, SuperLink and ingest, supervise.

        Raises:
            ConfigError: Bad settings, an unusable CA or registry.
            BrokerError: mosquitto did not start.
            SuperLinkError: flower-superlink did not start.
        """
        if self._watcher is not None:
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
        end_leftovers(self.state_dir)
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
            self.supervisor.add("broker", self.broker)
        else:
            self._progress(f"[3/5] external broker at {cfg.broker.host}:{cfg.broker.port}")
        self.upkeep.crl_stamp = self.upkeep.crl_state()
        server_metrics.attach_server(
            self._registry(), restarts=self._child_restarts, ca_dir=self.ca_dir
        )

        sl_cfg = cfg.superlink
        if not sl_cfg.insecure and sl_cfg.tls.cert_file is None:
            sl_cfg = sl_cfg.model_copy(
                update={
                    "tls": TlsFiles(
                        ca_file=self.ca_dir / "ca.pem", cert_file=server_cert, key_file=server_key
                    )
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
        self.supervisor.add("superlink", self.superlink)
        if proxy_cfg.enabled:
            self.fleet_proxy = self._make_fleet_proxy(sl_cfg, self.superlink.port)
            self.fleet_proxy.start()
            self.supervisor.add("fleet_proxy", self.fleet_proxy)

        if cfg.ingest.enabled:
            self._progress(f"[5/5] MQTT ingest as {SERVER_IDENTITY}")
            self.ingest = Ingest(self._ingest_config(), metrics=self._metrics.ingest)
            self.ingest.start()
            if not self.ingest.wait_ready(30.0):
                log.warning("the ingest is not subscribed yet; it keeps retrying")
        else:
            self._progress("[5/5] ingest disabled")
        if cfg.cert_service:
            self._start_cert_service()
        if cfg.models.enabled:
            self.models = ModelService(resolve_settings(cfg))
            self.models.start()
            self._progress(f"model delivery service on {self.models_address}")
        if cfg.inference.enabled:
            # Imported here: the inference package loads torch.
            from edgefl.server.inference.supervised import InferenceChild

            self.inference = InferenceChild(cfg, self.state_dir / "inference")
            self.inference.start()
            if self.inference.metrics_url is not None:
                server_metrics.add_child_endpoint("inference", self.inference.metrics_url)
            self.supervisor.add("inference", self.inference)
            self._progress(
                f"inference service on {self.inference.address} (log "
                f"{self.inference.log_path}; a first start trains the model)"
            )
        if cfg.retention.enabled:
            from edgefl.server.registry.db import make_engine

            self.retention = RetentionLoop(lambda: make_engine(self.db_url), cfg.retention)
            self.retention.start()
        if cfg.admin.enabled:
            self._start_admin_api()
        self._certs_due_at = time.monotonic() + cfg.cert_check_s
        self.admin()  # writes admin-flwr-home/config.toml: server.json's flwr example works
        self._write_runtime()
        self._watcher = threading.Thread(
            target=self._watch, name="edgefl-server-supervisor", daemon=True
        )
        self._watcher.start()

    def _start_admin_api(self) -> None:
        """Serve the admin API (HTTPS, admin CA created if missing), supervised."""
        from edgefl.server.admin_api.server import admin_server_for

        self.admin_api = admin_server_for(
            self.config,
            config_path=self.config_path,
            engine=self._registry(),
            children=self.children_state,
        )
        self.admin_api.start()
        self.supervisor.add("admin_api", self.admin_api)
        self._progress(f"admin API on {self.admin_url}")

    def _make_fleet_proxy(self, sl_cfg: SuperLinkConfig, upstream_port: int) -> FleetProxy:
        """The nginx Fleet API proxy on ``superlink.host/port``, before the SuperLink."""
        public = self.config.superlink
        tls = None
        if not sl_cfg.insecure:
            # _start fills them in from the fleet CA when the config names none.
            cert_file, key_file, ca_file = (
                sl_cfg.tls.cert_file,
                sl_cfg.tls.key_file,
                sl_cfg.tls.ca_file,
            )
            if cert_file is None or key_file is None or ca_file is None:
                raise ConfigError(
                    "superlink: TLS needs tls.cert_file, tls.key_file and tls.ca_file"
                )
            tls = ProxyTLS(
                cert_file=cert_file,
                key_file=key_file,
                ca_file=ca_file,
                upstream_name=LOOPBACK_NAME,
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

    def _prepare_ca(self) -> FleetCA:
        ca, renewed = self.upkeep.prepare()
        self.cert_renewals.extend(renewed)
        return ca

    def _renew_own_certs(self, ca: FleetCA, *, restart: bool = True) -> list[str]:
        """Re-issue the server's own certificates that are missing or due; restart their users.

        The broker and the SuperLink read the server certificate at start-up (the Fleet
        API proxy reloads it by itself), the ingest and the certificate service read theirs
        when they connect: each one using a renewed certificate is restarted (``restart``;
        not during start-up, when none runs yet).

        Returns:
            What was re-issued: ``server``, and the service CNs.
        """
        renewed = self.upkeep.renew_due(ca)
        self.cert_renewals.extend(renewed)
        if not restart or not renewed:
            return renewed
        with self._lock:
            if "server" in renewed:
                for sup in self.supervisor.children():
                    if sup.name == "fleet_proxy":
                        continue  # nginx reloads certificates without dropping devices
                    try:
                        sup.child.stop()
                        sup.child.start()
                    except EdgeflError as exc:  # the supervisor retries a dead child
                        log.error("restarting %s with the renewed certificate: %s", sup.name, exc)
            if "server" in renewed and self.models is not None:
                # It read the server certificate at start: serve the renewed one, same port.
                port = self.models.port
                self.models.stop()
                settings = resolve_settings(self.config).model_copy(update={"port": port})
                self.models = ModelService(settings)
                self.models.start()
            if SERVER_IDENTITY in renewed and self.ingest is not None:
                self.ingest.stop()
                self.ingest = Ingest(self._ingest_config(), metrics=self._metrics.ingest)
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

    def _ingest_config(self) -> IngestConfig:
        try:
            return self.config.ingest_settings(self.broker_host, self.broker_port, migrate=False)
        except ValueError as exc:
            raise ConfigError(f"ingest: {exc}") from exc

    def _write_runtime(self) -> None:
        self._wrote_runtime = True
        write_text_atomic(
            self.state_dir / RUNTIME_FILE, json.dumps(self.info(), indent=2, sort_keys=True) + "\n"
        )

    def stop(self) -> None:
        """Stop the ingest, the SuperLink and the broker (idempotent)."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(10.0)
            self._watcher = None
        if self.admin_api is not None:
            try:
                self.admin_api.stop()  # first: no request runs while the rest stops
            except Exception:  # stopping the rest matters more
                log.exception("stopping the admin API failed")
            from edgefl.server.jobs import JOBS

            JOBS.stop_all()  # a remote rollout ends interrupted while the broker still runs
        if self.cert_service is not None:
            self.cert_service.stop()
            self.cert_service = None
        if self.models is not None:
            try:
                self.models.stop()
            except Exception:  # stopping the rest matters more
                log.exception("stopping the model delivery service failed")
            self.models = None
        server_metrics.detach_server()
        if self.retention is not None:
            self.retention.stop()
            self.retention = None
        if self._cert_engine is not None:
            self._cert_engine.dispose()
            self._cert_engine = None
        if self.ingest is not None:
            try:
                self.ingest.stop()
            except Exception:  # stopping the rest matters more
                log.exception("stopping the ingest failed")
            self.ingest = None
        self.supervisor.stop_all()
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

    def _watch(self) -> None:
        next_crl = time.monotonic()
        while not self._stopping.wait(0.2):
            now = time.monotonic()
            try:
                self.supervisor.check(now, self._stopping.is_set)
                self._check_ingest(now)
                if now >= next_crl:
                    next_crl = now + self.config.crl_poll_s
                    self._check_crl()
                    if self.fleet_proxy is not None:
                        # A re-issued server certificate: nginx reloads without dropping
                        # the devices' connections.
                        self.fleet_proxy.reload_if_certificates_changed()
                    # Devices admitted or revoked (another process), operator
                    # certificates added or revoked (server.json lists operators).
                    if self.broker is not None and self.broker.reload_acl():
                        self._write_runtime()
                if now >= self._certs_due_at:
                    self._certs_due_at = now + self.config.cert_check_s
                    self._renew_own_certs(self.ca)
            except Exception:  # the supervisor must not die
                log.exception("supervisor step failed")

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
            self.ingest = Ingest(self._ingest_config(), metrics=self._metrics.ingest)
            self.ingest.start()
        self.ingest_restarts += 1
        log.warning("restarted the ingest (%d watchdog restarts so far)", self.ingest_restarts)
        if self._wrote_runtime:
            self._write_runtime()

    def _check_crl(self) -> None:
        if not self.upkeep.crl_changed(self.ca):
            return
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
