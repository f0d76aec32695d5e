"""The server's config file (``server.yaml``): one model, one section per service.

:class:`ServerConfig` is what ``edgefl server start -c server.yaml`` validates; its sections
are the broker (:class:`BrokerConfig`), the ingest (:class:`ServerIngestConfig`), the
SuperLink, the Fleet API proxy and the inference service. The models live apart from
:mod:`edgefl.server.serve` (which runs the processes they describe) so that every
``edgefl server`` command can read the same file without importing the supervisor:
:func:`read_server_config` is the one reader, and :func:`read_ingest_file` also accepts the
bare ingest config ``edgefl server ingest -c`` read before (with a warning, for one release).
"""

from __future__ import annotations

import ipaddress
import logging
import warnings
from pathlib import Path
from typing import ClassVar, Self

from pydantic import Field, field_validator, model_validator

from edgefl.config import (
    RenamedKeyWarning,
    RenameMap,
    StrictModel,
    TlsFiles,
    read_config_data,
    validate_config,
)
from edgefl.server.fl.fleet_proxy import FleetProxyConfig
from edgefl.server.fl.superlink import SuperLinkConfig
from edgefl.server.fleet_ca import CRL_VALIDITY_DAYS, SERVER_IDENTITY
from edgefl.server.ingest import IngestConfig
from edgefl.server.registry.db import DEFAULT_DB_FILENAME
from edgefl.server.retention import RetentionConfig

__all__ = [
    "AdminApiConfig",
    "BrokerConfig",
    "InferenceServerConfig",
    "MetricsConfig",
    "ModelServiceConfig",
    "ServerConfig",
    "ServerIngestConfig",
    "read_ingest_file",
    "read_server_config",
]

log = logging.getLogger(__name__)


class BrokerConfig(StrictModel):
    """The MQTT broker (``broker:`` section)."""

    enabled: bool = Field(
        True,
        description="Run mosquitto with the shipped config; false: use an external broker "
        "at host:port (it must trust the fleet CA and read its CRL).",
    )
    host: str = Field(
        "127.0.0.1",
        description="Address the broker listens on (an IP), and what the ingest dials.",
    )
    port: int = Field(8883, ge=0, le=65535, description="Mutual-TLS port; 0 picks a free one.")
    data_dir: Path | None = Field(
        None, description="Persistence folder (default <state_dir>/broker)."
    )
    executable: str = Field("mosquitto", description="mosquitto binary (name or path).")
    run_as_user: str | None = Field(
        None,
        description="User mosquitto runs as (default: the user running the server, who "
        "can read the keys in state_dir).",
    )


class ServerIngestConfig(IngestConfig):
    """The MQTT ingest (``ingest:`` section): :class:`IngestConfig` plus ``enabled``.

    ``broker`` (host, port), ``db_url`` and ``tls`` default to the server's
    broker, registry and the CA's ``edgefl-ingest`` service certificate.
    """

    enabled: bool = Field(True, description="Run the ingest in the server process.")
    stall_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Watchdog: an ingest that acknowledges nothing for this long while "
        "messages wait (or whose worker thread died) is restarted, and the restart "
        "counted (ingest_restarts in server.json). Not while it waits for an unavailable "
        "database: a restart cannot help then.",
    )


class InferenceServerConfig(StrictModel):
    """The gRPC inference service (``inference:`` section; ``edgefl server inference``).

    See :mod:`edgefl.server.inference.service` for what each setting does.
    """

    renamed_keys: ClassVar[RenameMap] = {
        "tls_cert": "tls.cert_file",
        "tls_key": "tls.key_file",
        "client_ca": "tls.ca_file",
    }

    enabled: bool = Field(
        False,
        description="Run it as a supervised child of `edgefl server start` (off by default: "
        "its first start trains the model when the weights cache is empty).",
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(0, ge=0, le=65535, description="Port; 0 picks a free one.")
    model: str = Field("digits", min_length=1, description="Heavy model to serve.")
    weights: Path | None = Field(
        None, description="Weights cache folder; default ~/.cache/edgefl/inference."
    )
    train_epochs: int | None = Field(
        None, ge=1, description="Epochs when the cache is empty; default: the recipe's."
    )
    max_batch: int = Field(32, ge=1, le=4096, description="Samples per forward pass; 1: off.")
    max_wait_ms: float = Field(2.0, ge=0, le=100, description="Longest wait to fill a batch.")
    max_concurrency: int = Field(256, ge=1, description="In-flight requests before refusing.")
    max_samples_per_request: int = Field(
        256,
        ge=1,
        le=65536,
        description="Most samples one request may carry (INVALID_ARGUMENT past it), so one "
        "request cannot hold the model for long.",
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=1024**3, description="Largest request or response."
    )
    torch_threads: int | None = Field(
        1, ge=1, description="torch intra-op threads while serving; None leaves torch's."
    )
    tls: TlsFiles = Field(
        default_factory=lambda: TlsFiles(),
        description="cert_file/key_file: the server certificate (TLS); ca_file: the CA of "
        "client certificates (mutual TLS).",
    )
    crl: Path | None = Field(None, description="CRL of tls.ca_file; revoked devices are refused.")
    registry_url: str | None = Field(
        None, description="Device registry (SQLAlchemy URL): unlisted devices are refused."
    )
    registry_ttl_s: float = Field(30.0, ge=0, description="How long registry answers are reused.")
    grace_s: float = Field(2.0, ge=0, description="Time in-flight calls get when stopping.")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve this process's Prometheus metrics on 127.0.0.1:PORT (loopback "
        "only; 0 picks one); edgefl server start sets it for its child and folds them into "
        "its /metrics.",
    )

    @model_validator(mode="after")
    def _tls_consistent(self) -> Self:
        tls = self.tls
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: give both or neither")
        if tls.ca_file is not None and tls.cert_file is None:
            raise ValueError("tls.ca_file (mutual TLS) needs tls.cert_file and tls.key_file")
        if self.crl is not None and tls.ca_file is None:
            raise ValueError("crl needs tls.ca_file: revocation applies to client certificates")
        if self.registry_url is not None and tls.ca_file is None:
            raise ValueError("registry_url needs tls.ca_file: devices are known by certificate")
        return self


class ModelServiceConfig(StrictModel):
    """The model delivery service (``models:`` section; gRPC ``edgefl.models.v1.Models``).

    Devices download signed release artifacts from ``releases_dir`` over mutual TLS; see
    :mod:`edgefl.server.models_service`. ``tls``, ``crl``, ``registry_url`` and
    ``releases_dir`` default to the server's certificate, the fleet CA and its CRL, the
    registry and ``<state_dir>/releases``.
    """

    enabled: bool = Field(True, description="Run the service in `edgefl server start`.")
    host: str = Field("127.0.0.1", description="Address to listen on (devices dial it).")
    port: int = Field(0, ge=0, le=65535, description="Port; 0 picks a free one.")
    chunk_bytes: int = Field(
        64 * 1024, ge=1024, le=1024 * 1024, description="Artifact bytes per streamed chunk."
    )
    max_downloads: int = Field(
        32, ge=1, le=1024, description="Calls served at once; more get RESOURCE_EXHAUSTED."
    )
    max_manifest_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest manifest file the service sends."
    )
    releases_dir: Path | None = Field(
        None, description="Published releases (default <state_dir>/releases)."
    )
    max_accuracy_drop: float = Field(
        1.5,
        ge=0,
        description="`server release` leaves out a variant more than this many accuracy "
        "points below the float model (--max-accuracy-drop overrides it).",
    )
    tls: TlsFiles = Field(
        default_factory=lambda: TlsFiles(),
        description="cert_file/key_file: the server certificate; ca_file: the fleet CA "
        "client certificates must come from (default: the server's own, mutual TLS).",
    )
    crl: Path | None = Field(None, description="CRL of tls.ca_file (default: the CA's).")
    registry_url: str | None = Field(
        None, description="Registry whose admitted enrollments may download (default: db_url)."
    )
    registry_ttl_s: float = Field(
        5.0, ge=0, description="How long the list of admitted devices is reused."
    )
    grace_s: float = Field(2.0, ge=0, description="Time in-flight downloads get when stopping.")
    public_host: str | None = Field(
        None, description="Host devices dial, when not host (a wildcard or behind NAT)."
    )


class AdminApiConfig(StrictModel):
    """The admin API (``admin:`` section): HTTPS, in the server process.

    See :mod:`edgefl.server.admin_api`. Clients authenticate with an admin certificate
    (``edgefl server admin-cert``) or an API token (``edgefl server admin-token``).
    """

    enabled: bool = Field(True, description="Serve the admin API in `edgefl server start`.")
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on (loopback by default: set the host's address, or "
        "0.0.0.0, to administer it from other machines).",
    )
    port: int = Field(
        0, ge=0, le=65535, description="HTTPS port; 0 picks a free one (see server.json)."
    )
    public_url: str | None = Field(
        None,
        description="https://HOST:PORT clients use, when not host:port (a wildcard, NAT); "
        "written into server.json and the admin.yaml of `edgefl server admin-cert`.",
    )
    tls: TlsFiles = Field(
        default_factory=lambda: TlsFiles(),
        description="cert_file/key_file: the server certificate (default: the fleet CA's "
        "server certificate, so clients check it against the fleet CA's ca.pem). ca_file is "
        "not used: client certificates must come from the admin CA.",
    )
    metrics_auth: bool = Field(
        True,
        description="/metrics needs a credential (any role); false: anyone who reaches the "
        "port may scrape it.",
    )
    session_ttl_s: float = Field(
        8 * 3600.0, gt=0, description="A browser session ends after this long unused."
    )

    @model_validator(mode="after")
    def _cert_and_key(self) -> Self:
        if (self.tls.cert_file is None) != (self.tls.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: give both or neither")
        if self.tls.ca_file is not None:
            raise ValueError(
                "tls.ca_file: client certificates are checked against the admin CA; remove it"
            )
        return self


class MetricsConfig(StrictModel):
    """Prometheus metrics of the server process (``metrics:`` section; /metrics)."""

    enabled: bool = Field(
        True,
        description="Count ingest and inference metrics and read the registry's at scrape "
        "time (edgefl.server.metrics); false: the ingest runs without hooks, /metrics is empty.",
    )


class ServerConfig(StrictModel):
    """``edgefl server start`` settings (YAML, TOML or JSON; unknown keys are errors)."""

    state_dir: Path = Field(
        Path("edgefl-server"), description="Everything the server keeps (relative: to cwd)."
    )
    ca_dir: Path | None = Field(None, description="The fleet CA (default <state_dir>/ca).")
    hostnames: list[str] = Field(
        default_factory=lambda: ["localhost"],
        description="DNS names in the server certificate (broker and SuperLink).",
    )
    ips: list[str] = Field(
        default_factory=lambda: ["127.0.0.1"],
        description="IP addresses in the server certificate.",
    )
    db_url: str | None = Field(
        None, description=f"Registry URL (default sqlite:///<state_dir>/{DEFAULT_DB_FILENAME})."
    )
    admin: AdminApiConfig = Field(
        default_factory=lambda: AdminApiConfig(),
        description="The admin API (HTTPS; admin certificates of a separate admin CA, or "
        "API tokens): the remote CLI, /metrics and the dashboard.",
    )
    superlink: SuperLinkConfig = Field(
        default_factory=lambda: SuperLinkConfig(),
        description="The SuperLink; host/port is what devices dial (the Fleet API proxy "
        "listens there unless fleet_proxy.enabled is false).",
    )
    fleet_proxy: FleetProxyConfig = Field(
        default_factory=lambda: FleetProxyConfig(),
        description="nginx in front of a loopback-only SuperLink (Fleet API routes only).",
    )
    broker: BrokerConfig = Field(default_factory=lambda: BrokerConfig())
    ingest: ServerIngestConfig = Field(default_factory=lambda: ServerIngestConfig())
    inference: InferenceServerConfig = Field(
        default_factory=lambda: InferenceServerConfig(),
        description="The gRPC inference service: a supervised child of `edgefl server "
        "start` when enabled (default off); `edgefl server inference` runs it alone, its "
        "flags overriding this section.",
    )
    models: ModelServiceConfig = Field(
        default_factory=lambda: ModelServiceConfig(),
        description="The gRPC model delivery service devices download releases from.",
    )
    metrics: MetricsConfig = Field(
        default_factory=lambda: MetricsConfig(),
        description="Prometheus metrics (served at /metrics by the admin API).",
    )
    retention: RetentionConfig = Field(
        default_factory=lambda: RetentionConfig(),
        description="How long records, dead letters and checkpoints are kept; applied by "
        "`edgefl server start` and `edgefl server retention`.",
    )
    restart_min_s: float = Field(1.0, gt=0, description="First restart delay of a child.")
    restart_max_s: float = Field(30.0, gt=0, description="Cap on the restart delay.")
    stable_after_s: float = Field(
        30.0, gt=0, description="A child up this long has its restart delay reset."
    )
    crl_poll_s: float = Field(1.0, gt=0, description="How often crl.pem is checked.")
    crl_refresh_days: float = Field(
        10.0,
        gt=0,
        lt=CRL_VALIDITY_DAYS,
        description=f"Re-sign the CRL (valid {CRL_VALIDITY_DAYS} days) when less than this "
        "is left; the broker refuses every device once it has expired.",
    )

    cert_renew_days: float = Field(
        30.0,
        gt=0,
        lt=365,
        description="Re-issue the server's own certificates (broker/SuperLink server "
        "certificate, ingest and certificate-service client certificates) when less than "
        "this is left of them, at start-up and while running; devices renew theirs over "
        "MQTT (cert/request) in the window of their agent config.",
    )
    cert_check_s: float = Field(
        3600.0, gt=0, description="How often the server checks its own certificates."
    )
    device_cert_days: float = Field(
        365.0, gt=0, description="Validity of device certificates renewed over MQTT."
    )
    cert_service: bool = Field(
        True,
        description="Answer devices' certificate renewal requests (the edgefl-certs "
        "identity; needs the broker).",
    )

    @field_validator("ips")
    @classmethod
    def _ips_parse(cls, value: list[str]) -> list[str]:
        for ip in value:
            ipaddress.ip_address(ip)
        return value

    @property
    def resolved_state_dir(self) -> Path:
        """``state_dir`` as an absolute path."""
        return self.state_dir.expanduser().resolve()

    @property
    def resolved_ca_dir(self) -> Path:
        """``ca_dir`` (or its default) as an absolute path."""
        return (self.ca_dir or self.resolved_state_dir / "ca").expanduser().resolve()

    @property
    def resolved_db_url(self) -> str:
        """``db_url`` or the SQLite default inside ``state_dir``."""
        return self.db_url or f"sqlite:///{self.resolved_state_dir / DEFAULT_DB_FILENAME}"

    def ingest_settings(
        self, broker_host: str, broker_port: int, *, migrate: bool | None = None
    ) -> IngestConfig:
        """The ingest's settings: the ``ingest:`` section, what it leaves unset filled in.

        ``broker`` defaults to ``broker_host:broker_port`` (where this server's broker is
        reached), ``db_url`` to the registry, ``tls`` (unless ``tls.ca_file`` is given) to
        the fleet CA and its ``edgefl-ingest`` service certificate.

        Raises:
            ValueError: The result is not a valid :class:`IngestConfig` (pydantic's error).
        """
        data = self.ingest.model_dump(exclude={"enabled", "stall_timeout_s"}, exclude_unset=True)
        service = self.resolved_ca_dir / "services" / SERVER_IDENTITY
        broker = data.setdefault("broker", {})
        broker.setdefault("host", broker_host)
        broker.setdefault("port", broker_port)
        data.setdefault("db_url", self.resolved_db_url)
        if migrate is not None:
            data.setdefault("migrate", migrate)
        tls = data.setdefault("tls", {})
        if "ca_file" not in tls:
            tls["ca_file"] = self.resolved_ca_dir / "ca.pem"
            tls.setdefault("cert_file", service / "cert.pem")
            tls.setdefault("key_file", service / "key.pem")
        return IngestConfig.model_validate(data)


def read_server_config(path: Path | None) -> ServerConfig:
    """The server config file (``server.yaml``), or the built-in defaults without one.

    Raises:
        ConfigError: The file is missing, unparsable or invalid (naming each bad key).
    """
    if path is None:
        return ServerConfig()
    return validate_config(ServerConfig, read_config_data(path), source=str(path))


def _bare_ingest_keys(data: object) -> set[str]:
    """Top-level keys that only a bare :class:`IngestConfig` file has (not server.yaml)."""
    if not isinstance(data, dict):
        return set()
    ingest_keys = set(IngestConfig.model_fields) | set(IngestConfig.renamed_keys)
    return (set(data) & ingest_keys) - set(ServerConfig.model_fields)


def read_ingest_file(path: Path) -> ServerConfig | IngestConfig:
    """``edgefl server ingest -c`` / ``server devices -c``: server.yaml, or an old ingest file.

    A file with a key only an :class:`IngestConfig` has (``client_id``, ``fleet``,
    ``broker``...) at the top is the bare ingest config these commands read before the
    ``ingest:`` section of server.yaml: it is still read, with a warning, for one release.
    Any other file (``db_url`` alone included) is a server config.

    Raises:
        ConfigError: The file is missing, unparsable or invalid.
    """
    data = read_config_data(path)
    if not _bare_ingest_keys(data):
        return validate_config(ServerConfig, data, source=str(path))
    text = (
        f"{path}: a bare ingest config is read as before, until the next release; move its "
        "keys into the ingest: section of the server config (server.yaml)"
    )
    log.warning("%s", text)
    warnings.warn(text, RenamedKeyWarning, stacklevel=2)
    return validate_config(IngestConfig, data, source=str(path))
