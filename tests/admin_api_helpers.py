"""A real admin API for tests: fleet CA, admin CA, SQLite registry, uvicorn over HTTPS.

:func:`start_admin_api` builds what ``edgefl server start`` builds for its ``admin:``
section (:func:`edgefl.server.admin_api.server.admin_server_for`) on a fresh state folder,
serves it on a free loopback port, and hands out credentials: API tokens and admin
certificates per role, and a device certificate of the fleet CA.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import Engine, func, select

from edgefl.server import admin_tokens
from edgefl.server.admin_api.server import AdminServer, admin_server_for
from edgefl.server.admin_ca import AdminCA, open_admin_ca, record_issued
from edgefl.server.config import ServerConfig
from edgefl.server.fleet_ca import FleetCA
from edgefl.server.registry import make_engine, session_factory, upgrade
from edgefl.server.registry.models import AuditEntry, Device


@dataclass
class Identity:
    """A client certificate and key on disk."""

    cert: Path
    key: Path


@dataclass
class AdminApi:
    """A running admin API and what a test needs around it."""

    root: Path
    config: ServerConfig
    engine: Engine
    fleet_ca: FleetCA
    admin_ca: AdminCA
    server: AdminServer
    tokens: dict[str, str] = field(default_factory=dict)
    certs: dict[str, Identity] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ca_file(self) -> Path:
        """What clients check the server's certificate against (the fleet CA)."""
        return self.fleet_ca.cert_path

    def context(self, identity: Identity | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if identity is not None:
            ctx.load_cert_chain(str(identity.cert), str(identity.key))
        return ctx

    def client(self, identity: Identity | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.context(identity), timeout=20.0)

    def bearer(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def audit_rows(self) -> list[AuditEntry]:
        with session_factory(self.engine)() as session:
            rows = list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))
            session.expunge_all()
            return rows

    def count(self, model: Any) -> int:
        with session_factory(self.engine)() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)

    def issue_admin(self, name: str, role: str, folder: Path | None = None) -> Identity:
        issued = self.admin_ca.issue_admin_cert(name, role)
        record_issued(self.engine, issued)
        target = folder or self.root / "clients" / name
        return write_identity(target, issued.cert_pem, issued.key_pem)


def write_identity(folder: Path, cert_pem: bytes, key_pem: bytes) -> Identity:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert_pem)
    (folder / "key.pem").write_bytes(key_pem)
    (folder / "key.pem").chmod(0o600)
    return Identity(folder / "cert.pem", folder / "key.pem")


def sign_client_cert(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    cn: str,
    ou: str | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> tuple[x509.Certificate, bytes, bytes]:
    """A clientAuth certificate signed by any key (for forged, expired and foreign certs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if ou is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert, cert.public_bytes(serialization.Encoding.PEM), key_pem


def add_devices(engine: Engine, *device_ids: str, fleet: str = "default") -> None:
    now = dt.datetime.now(dt.UTC)
    with session_factory(engine)() as session, session.begin():
        for i, device_id in enumerate(device_ids):
            session.add(
                Device(
                    device_id=device_id,
                    fleet=fleet,
                    first_seen=now,
                    last_seen=now,
                    online=i % 2 == 0,
                    status_changed_at=now,
                    agent_version="0.1.0",
                    envelope_version=1,
                )
            )


def start_admin_api(root: Path, **admin: Any) -> AdminApi:
    """A fresh server state in ``root`` and its admin API on a free loopback port."""
    config = ServerConfig.model_validate(
        {"state_dir": str(root / "server"), "admin": {"port": 0, **admin}}
    )
    ca = FleetCA.create(config.resolved_ca_dir)
    ca.issue_server_cert(config.hostnames, config.ips)
    upgrade(config.resolved_db_url)
    engine = make_engine(config.resolved_db_url)
    server = admin_server_for(config, config_path=None, engine=engine, children=None)
    server.start()
    api = AdminApi(root, config, engine, ca, open_admin_ca(config.resolved_ca_dir), server)
    for role in ("viewer", "operator", "admin"):
        issued = admin_tokens.create(engine, f"{role}-bot", role, expires_in=dt.timedelta(hours=1))
        api.tokens[role] = issued.token
        api.certs[role] = api.issue_admin(f"{role}-person", role)
    return api


def stop_admin_api(api: AdminApi) -> None:
    api.server.stop()
    api.engine.dispose()
