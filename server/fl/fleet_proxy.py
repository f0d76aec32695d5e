"""The Fleet API proxy: nginx in front of a loopback-only SuperLink.

Flower 1.41's ``flower-superlink`` serves three APIs on its one HTTP ``--host/--port``:
the **Fleet API** (``/v1/fleet/*``, what SuperNodes call), the **Control API**
(``/v1/control/*``: register and unregister nodes, start and stop runs, list them) and the
**Runtime API** (``/v1/runtime/*``: the ServerApp's side). The open-source build
authenticates none of the Control API, so anyone who reached that port with the (public)
fleet CA certificate could register a node of their own, unregister enrolled devices, or
``flwr run`` an app whose ServerApp runs as the server's user.

``edgefl server start`` therefore binds the SuperLink to ``127.0.0.1`` and puts the
distribution's nginx (Debian ``nginx``) on the address devices dial. :class:`FleetProxy`
renders the shipped ``deploy/nginx/fleet-proxy.conf.template`` (:func:`render_proxy_config`)
and runs nginx in the foreground (``daemon off``) as a supervised child, every file it
writes (pid, logs, temp bodies) inside the server's state folder. nginx

- terminates TLS with the fleet CA's server certificate (the one devices already trust);
- forwards only the Fleet routes a SuperNode with node authentication uses
  (:data:`FLEET_ROUTES`, exact paths, ``POST`` only) to the SuperLink, over TLS verified
  against the fleet CA (the SuperLink keeps TLS: Flower refuses node authentication
  without it);
- answers everything else itself: 403 for the Control and Runtime APIs, 404 for any
  other path.

The admin commands (``edgefl server admit``, ``revoke``, ``enrollments``, ``train``) run on
the server host and reach the SuperLink directly on loopback (``server.json``'s
``superlink_admin``).

**Why node authentication and no mutual TLS at the proxy.** A stock SuperNode cannot
present a client certificate (its HTTP client has no ``cert`` option), so mutual TLS here
would need a TLS wrapper on every device (stunnel4) and a second moving part per device
that must be kept running, restarted and given renewed certificates. What it would add is
small: with the Control API out of reach, the routes left open are the Fleet routes, and
the SuperLink refuses every one of them unless the request is signed with a node key that
was registered through ``edgefl server admit`` (which requires a certificate request the
operator admitted); a revoked device's node key is unregistered. An outsider holding only
the CA certificate gets a TLS session and then 403, 404 or Flower's node-auth refusal.
What mutual TLS would still stop is unauthenticated load on those routes (TLS handshakes
and rejected requests); that is a rate-limiting concern, not an access-control one.
So devices authenticate with Flower's node authentication only.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from edgefl.config import StrictModel
from edgefl.errors import ConfigError, ServiceUnavailableError
from edgefl.files import write_text_atomic
from edgefl.netutil import dial_host, port_open
from edgefl.process import ManagedProcess, ProcessNotReadyError, last_log_line
from edgefl.resources import deploy_path

__all__ = [
    "FLEET_ROUTES",
    "SELF_REGISTRATION_ROUTES",
    "FleetProxy",
    "FleetProxyConfig",
    "FleetProxyError",
    "ProxyTLS",
    "default_template_path",
    "render_proxy_config",
]

log = logging.getLogger(__name__)

FLEET_ROUTES: tuple[str, ...] = (
    "/v1/fleet/activate-node",
    "/v1/fleet/deactivate-node",
    "/v1/fleet/send-node-heartbeat",
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/get-run",
    "/v1/fleet/get-fab",
    "/v1/fleet/push-object",
    "/v1/fleet/pull-object",
    "/v1/fleet/confirm-message-received",
)
"""What a SuperNode with node authentication calls (``flwr/supernode/fleet_http_client.py``)."""

SELF_REGISTRATION_ROUTES: tuple[str, ...] = (
    "/v1/fleet/register-node",
    "/v1/fleet/unregister-node",
)
"""Called only by SuperNodes that register themselves, i.e. without node authentication
(the SuperLink refuses them when it is on); passed on only for an ``insecure`` SuperLink."""


class FleetProxyError(ServiceUnavailableError):
    """nginx did not start or died at start-up."""


class FleetProxyConfig(StrictModel):
    """The Fleet API proxy (``edgefl server start``'s ``fleet_proxy:`` section).

    The proxy listens where ``superlink.host``/``superlink.port`` say (what devices dial);
    the SuperLink itself then listens on ``127.0.0.1:superlink_port``.
    """

    enabled: bool = Field(
        True,
        description="Put nginx in front of a loopback-only SuperLink. false: the SuperLink "
        "itself listens on superlink.host/port with its Control API open to whoever "
        "reaches that port (only for a host nobody else can reach).",
    )
    executable: str = Field("nginx", description="nginx binary (name or path).")
    superlink_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Loopback port of the SuperLink behind the proxy; 0 picks a free one.",
    )
    max_body_mb: int = Field(
        1024, gt=0, description="Largest request body (a model update in push-object), MiB."
    )
    read_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for the SuperLink's answer to one request."
    )
    run_as_user: str | None = Field(
        None,
        description="User nginx's workers run as when started as root (default: the user "
        "running the server, who can write the proxy's folder in state_dir).",
    )
    startup_timeout_s: float = Field(20.0, gt=0)


@dataclass(frozen=True)
class ProxyTLS:
    """TLS on both sides of the proxy.

    Attributes:
        cert_file: Server certificate devices see (issued by the fleet CA).
        key_file: Its key.
        ca_file: The fleet CA certificate, to verify the SuperLink behind the proxy.
        upstream_name: DNS name the SuperLink's certificate is checked against (in its
            subjectAltName; nginx 1.22 matches DNS names only, not IP addresses).
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    upstream_name: str = "localhost"


def default_template_path() -> Path:
    """The shipped ``deploy/nginx/fleet-proxy.conf.template`` (from ``edgefl/deploy``).

    Raises:
        ConfigError: It is not there (an install without its package data).
    """
    return deploy_path("nginx", "fleet-proxy.conf.template")


def _location(path: str, upstream: str) -> str:
    return (
        f"        location = {path} {{\n"
        "            limit_except POST { deny all; }\n"
        f"            proxy_pass {upstream};\n"
        "        }\n"
    )


def render_proxy_config(
    *,
    prefix: Path,
    listen_host: str,
    listen_port: int,
    upstream_port: int,
    tls: ProxyTLS | None,
    self_registration: bool = False,
    max_body_mb: int = 1024,
    read_timeout_s: float = 300.0,
    user: str | None = None,
    template: Path | None = None,
) -> str:
    """The nginx configuration for one Fleet API proxy.

    Args:
        prefix: nginx's folder (pid, logs, temp files; it must exist).
        listen_host: Address devices dial (an IP, ``0.0.0.0`` or ``::``).
        listen_port: Its port.
        upstream_port: The SuperLink's loopback port.
        tls: Certificates; ``None``: plain HTTP on both sides (an ``insecure`` SuperLink,
            tests only).
        self_registration: Also pass on :data:`SELF_REGISTRATION_ROUTES` (SuperLinks
            without node authentication).
        max_body_mb: ``client_max_body_size`` in MiB.
        read_timeout_s: ``proxy_read_timeout``.
        user: ``user`` directive (only meaningful when nginx starts as root).
        template: The template; the shipped one by default.

    Returns:
        The configuration text.

    Raises:
        ConfigError: The template cannot be read or still has an unfilled field.
    """
    path = template or default_template_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read nginx template {path}: {exc}") from exc
    listen = (
        f"[{listen_host}]:{listen_port}" if ":" in listen_host else f"{listen_host}:{listen_port}"
    )
    upstream = f"{'https' if tls is not None else 'http'}://superlink"
    routes = FLEET_ROUTES + (SELF_REGISTRATION_ROUTES if self_registration else ())
    proxy_common = [
        "        # Keep-alive connections to the SuperLink (HTTP/1.1, no Connection header).",
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        "        proxy_set_header Host $host;",
        "        proxy_set_header X-Forwarded-For $remote_addr;",
        "        proxy_set_header X-Forwarded-Proto $scheme;",
    ]
    if tls is not None:
        tls_lines = [
            f"        ssl_certificate {tls.cert_file};",
            f"        ssl_certificate_key {tls.key_file};",
            "        ssl_protocols TLSv1.2 TLSv1.3;",
            "        ssl_session_cache shared:fleet_tls:1m;",
            "        # The SuperLink behind us keeps TLS (node authentication needs it):",
            "        # verify it is the one the fleet CA issued a certificate to.",
            "        proxy_ssl_verify on;",
            f"        proxy_ssl_trusted_certificate {tls.ca_file};",
            f"        proxy_ssl_name {tls.upstream_name};",
            "        proxy_ssl_session_reuse on;",
        ]
    else:
        tls_lines = []
    values = {
        "user_line": f"user {user};" if user else "# (not started as root: no user directive)",
        "prefix": str(prefix),
        "max_body": f"{max_body_mb}m",
        "read_timeout": f"{max(1, round(read_timeout_s))}s",
        "upstream_host": "127.0.0.1",
        "upstream_port": str(upstream_port),
        "listen": listen,
        "listen_tls": " ssl" if tls is not None else "",
        "tls_block": "\n".join(tls_lines + proxy_common) + "\n",
        "fleet_locations": "".join(_location(r, upstream) for r in routes).rstrip("\n"),
    }
    unknown: list[str] = []

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            unknown.append(key)
            return match.group(0)
        return values[key]

    text = re.sub(r"@@([a-z_]+)@@", fill, text)
    if unknown:
        raise ConfigError(f"nginx template {path} has unknown fields: {', '.join(unknown)}")
    return text


class FleetProxy:
    """One nginx running the Fleet API proxy (see the module docstring).

    Args:
        workdir: nginx's prefix folder: config, pid, logs, temp files.
        config: Binary, limits, user.
        listen_host: Address devices dial (``superlink.host``).
        listen_port: Its port (already chosen: 0 is not allowed here).
        upstream_port: The SuperLink's loopback port.
        tls: Certificates (``None``: plain HTTP, for an insecure SuperLink).
        self_registration: Pass on the self-registration routes (no node authentication).
    """

    def __init__(
        self,
        workdir: Path,
        config: FleetProxyConfig,
        *,
        listen_host: str,
        listen_port: int,
        upstream_port: int,
        tls: ProxyTLS | None,
        self_registration: bool = False,
    ) -> None:
        exe = shutil.which(config.executable)
        if exe is None and config.executable == "nginx" and Path("/usr/sbin/nginx").exists():
            exe = "/usr/sbin/nginx"  # /usr/sbin is not on every user's PATH
        if exe is None:
            raise ConfigError(
                f"nginx binary {config.executable!r} not found",
                hint="install nginx (apt-get install nginx) or set fleet_proxy.executable",
            )
        if listen_port <= 0:
            raise ValueError("listen_port must be chosen before the proxy is made")
        self.exe = exe
        self.config = config
        self.workdir = Path(workdir).resolve()
        for sub in ("tmp/client_body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.listen_host = listen_host
        self.port = listen_port
        self.upstream_port = upstream_port
        self.tls = tls
        self.conf_path = self.workdir / "nginx.conf"
        self.error_log = self.workdir / "error.log"
        self.access_log = self.workdir / "access.log"
        self.stdout_log = self.workdir / "nginx.out"
        user = None
        if os.geteuid() == 0:
            user = config.run_as_user or getpass.getuser()
        text = render_proxy_config(
            prefix=self.workdir,
            listen_host=listen_host,
            listen_port=listen_port,
            upstream_port=upstream_port,
            tls=tls,
            self_registration=self_registration,
            max_body_mb=config.max_body_mb,
            read_timeout_s=config.read_timeout_s,
            user=user,
        )
        write_text_atomic(self.conf_path, text)
        self._proc: ManagedProcess | None = None
        self._cert_stamp = self._tls_stamp()

    @property
    def address(self) -> str:
        """``host:port`` the proxy listens on."""
        return f"{self.listen_host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of nginx's master process."""
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The nginx command line (foreground, prefix and error log in ``workdir``)."""
        return [
            self.exe,
            "-p",
            f"{self.workdir}/",
            "-c",
            str(self.conf_path),
            "-e",
            str(self.error_log),  # before the config is read, too
            "-g",
            "daemon off;",
        ]

    def running(self) -> bool:
        """Whether the master process is alive."""
        return self._proc is not None and self._proc.running()

    def start(self) -> None:
        """Start nginx and wait until it accepts connections.

        Raises:
            FleetProxyError: The port is taken, or nginx exited or did not listen in time
                (the message quotes its error log).
        """
        if self.running():
            return
        dial = dial_host(self.listen_host)
        if port_open(dial, self.port):
            raise FleetProxyError(
                f"fleet proxy port {self.address} is already in use",
                hint="stop what listens there or choose another superlink.port",
            )
        # Its own process group: its workers go with it; Ctrl-C is ours to handle.
        self._proc = ManagedProcess(
            self.command(),
            self.stdout_log,
            name="nginx",
            cwd=self.workdir,
            error_logs=(self.error_log,),
        )
        pid = self._proc.start()
        log.info("started nginx pid %d on %s", pid, self.address)
        self._cert_stamp = self._tls_stamp()
        try:
            self._proc.wait_for_port(dial, self.port, self.config.startup_timeout_s)
        except ProcessNotReadyError as exc:
            raise FleetProxyError(
                exc.message.replace(f"listen on {dial}:{self.port}", f"listen on {self.address}"),
                hint=exc.hint,
            ) from None

    def stop(self) -> None:
        """SIGTERM nginx's process group (fast shutdown), SIGKILL after 10 s; reap it.

        A master killed with -9 leaves its workers running, holding the port: they are
        still in its group, and are killed and waited for too.
        """
        if self._proc is not None:
            self._proc.stop(10.0)

    def reload(self) -> None:
        """SIGHUP: nginx re-reads its config and certificates without dropping connections."""
        if self.running() and self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)
            log.info("nginx pid %d reloads its certificates", self._proc.pid)

    def reload_if_certificates_changed(self) -> bool:
        """Reload when the server certificate or key file changed since start or last reload.

        Returns:
            Whether a reload was sent.
        """
        stamp = self._tls_stamp()
        if stamp == self._cert_stamp:
            return False
        self._cert_stamp = stamp
        if not self.running():
            return False
        self.reload()
        return True

    def _tls_stamp(self) -> tuple[tuple[int, int], ...]:
        if self.tls is None:
            return ()
        out: list[tuple[int, int]] = []
        for path in (self.tls.cert_file, self.tls.key_file):
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_ino))
            except OSError:
                out.append((0, 0))
        return tuple(out)

    def last_error(self) -> str:
        """The last line of nginx's error log (or of its stdout)."""
        return last_log_line(self.error_log, self.stdout_log)
