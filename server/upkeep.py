"""Upkeep of the fleet CA by the running server: its own certificates and the CRL.

:class:`CAUpkeep` is what ``edgefl server start`` does with the CA besides using it:

- at start-up, create the CA (first start) or load it, issue a server certificate that
  names exactly the configured host names and IPs, re-issue the server's own
  certificates that are missing or due (``cert_renew_days``), and re-sign the CRL if it
  is due: a server that was down past the CRL's nextUpdate must not start a broker that
  refuses every device;
- while running, re-sign the CRL before it expires (``crl_refresh_days``), notice when an
  admin command rewrote it (:meth:`CAUpkeep.crl_changed`), and re-issue the server's own
  certificates when due (:meth:`CAUpkeep.renew_due`).

Restarting what uses a renewed certificate or a new CRL is the server's job
(:class:`edgefl.server.serve.Server`): this module only writes to the CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import time
from pathlib import Path

from cryptography import x509

from edgefl.errors import EdgeflError
from edgefl.server.config import ServerConfig
from edgefl.server.fleet_ca import CERTS_IDENTITY, SERVER_IDENTITY, FleetCA

__all__ = ["LOOPBACK_NAME", "CAUpkeep"]

log = logging.getLogger(__name__)

LOOPBACK_NAME = "localhost"
"""DNS name in the server certificate the proxy checks the loopback SuperLink by (nginx
1.22 matches only DNS names of an upstream certificate, not IP addresses)."""


class CAUpkeep:
    """The server's upkeep of the CA in ``ca_dir`` (see the module docstring).

    Args:
        config: The server's settings (host names, IPs, renewal windows).
        ca_dir: The CA folder.
    """

    def __init__(self, config: ServerConfig, ca_dir: Path) -> None:
        self.config = config
        self.ca_dir = ca_dir
        self.crl_due_at = 0.0
        """Wall-clock time the CRL is due for re-signing."""
        self.crl_stamp: tuple[int, int] | None = None
        """``crl.pem`` as the broker last read it (mtime, inode)."""

    def prepare(self) -> tuple[FleetCA, list[str]]:
        """Create or load the CA, issue what is missing or due, refresh the CRL.

        Returns:
            The CA, and what was re-issued (see :meth:`renew_due`).
        """
        if (self.ca_dir / "ca.pem").exists():
            ca = FleetCA.load(self.ca_dir)
        else:
            ca = FleetCA.create(self.ca_dir)
        if not self.server_cert_matches():
            ca.issue_server_cert(*self.server_cert_names())
        renewed = self.renew_due(ca)
        # A server that was down past the CRL's nextUpdate must not start a broker that
        # refuses every device.
        self.refresh_crl(ca)
        return ca, renewed

    # -- CRL --------------------------------------------------------------------------

    def refresh_crl(self, ca: FleetCA) -> None:
        """Re-sign the CRL if it is due (see ``crl_refresh_days``); note when it is next due."""
        before = dt.timedelta(days=self.config.crl_refresh_days)
        next_update = ca.refresh_crl(before=before) or ca.crl_next_update()
        if next_update is None:  # unreadable right after signing: try again in a minute
            self.crl_due_at = time.time() + 60.0
        else:
            self.crl_due_at = (next_update - before).timestamp()

    def crl_state(self) -> tuple[int, int] | None:
        """``crl.pem``'s (mtime, inode), ``None`` if it cannot be read."""
        try:
            st = (self.ca_dir / "crl.pem").stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def crl_changed(self, ca: FleetCA) -> bool:
        """Re-sign the CRL when an admin command changed it or it is due; whether it changed.

        ``True`` once per change of ``crl.pem`` since :attr:`crl_stamp` (which is updated):
        the broker must then be restarted to read it.
        """
        stamp = self.crl_state()
        if stamp != self.crl_stamp or time.time() >= self.crl_due_at:
            # Changed by an admin command (it may have signed a short one), or due.
            try:
                self.refresh_crl(ca)
            except (EdgeflError, OSError) as exc:
                log.error("cannot refresh the CRL in %s: %s", self.ca_dir, exc)
                self.crl_due_at = time.time() + 60.0
            stamp = self.crl_state()
        if stamp == self.crl_stamp:
            return False
        self.crl_stamp = stamp
        return True

    # -- own certificates (cert_renew_days) -------------------------------------------

    def cert_due(self, folder: Path) -> bool:
        """Whether ``folder``'s cert.pem/key.pem is missing, unreadable or due for renewal."""
        try:
            cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
        except (OSError, ValueError):
            return True
        if not (folder / "key.pem").exists():
            return True
        left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
        return left < dt.timedelta(days=self.config.cert_renew_days)

    def renew_due(self, ca: FleetCA) -> list[str]:
        """Re-issue the server's own certificates that are missing or due.

        Returns:
            What was re-issued: ``server``, and the service CNs.
        """
        renewed: list[str] = []
        if self.cert_due(self.ca_dir / "server"):
            ca.issue_server_cert(*self.server_cert_names())
            renewed.append("server")
        for name in (SERVER_IDENTITY, CERTS_IDENTITY):
            if self.cert_due(self.ca_dir / "services" / name):
                ca.issue_service_cert(name)
                renewed.append(name)
        if renewed:
            log.warning("re-issued the server's own certificates: %s", ", ".join(renewed))
        return renewed

    def server_cert_matches(self) -> bool:
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
        hostnames, wanted = self.server_cert_names()
        wanted_ips = {str(ipaddress.ip_address(ip)) for ip in wanted}
        return dns == set(hostnames) and ips == wanted_ips

    def server_cert_names(self) -> tuple[list[str], list[str]]:
        """DNS names and IPs for the server certificate.

        The configured ones, plus the loopback names the Fleet API proxy and the admin
        commands check the SuperLink by.
        """
        hostnames = list(self.config.hostnames)
        ips = list(self.config.ips)
        if self.config.fleet_proxy.enabled:
            if LOOPBACK_NAME not in hostnames:
                hostnames.append(LOOPBACK_NAME)
            if "127.0.0.1" not in ips:
                ips.append("127.0.0.1")
        return hostnames, ips
