"""Helpers for the model delivery tests: a fleet CA, a registry, a release and a cutting relay.

Not a test module. :func:`make_delivery` builds, in a temporary folder, a real fleet CA
(server certificate for 127.0.0.1, device certificates), a SQLite registry whose
``enrollments`` admit the given devices and whose ``releases`` record the release as
published, and a releases folder holding one artifact of random bytes with a manifest;
:func:`start_service` runs the real ``Models`` service on port 0 with mutual TLS.
:class:`CuttingRelay` (from :mod:`edgefl.testing`, which the benchmarks use too) is a
loopback TCP relay that counts the bytes it carries towards the client and resets the
connection once a set number of them has passed: a network cut in the middle of a
stream, placed exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from edgefl.config import Address, TlsFiles
from edgefl.process import ManagedProcess
from edgefl.server.config import ModelServiceConfig
from edgefl.server.fleet_ca import FleetCA, IssuedCert
from edgefl.server.models_service import ModelService, release_paths
from edgefl.server.registry import Enrollment, make_engine, session_factory, upgrade
from edgefl.testing import CuttingRelay

__all__ = [
    "CuttingRelay",
    "Delivery",
    "TlsBroker",
    "admit",
    "make_delivery",
    "record_release",
    "retained_on",
    "start_service",
    "tls_of",
    "write_release",
]

MODEL = "digits-mlp"
VERSION = 3
VARIANT = "int8"


@dataclass
class Delivery:
    """Everything a delivery test needs, in ``root``."""

    root: Path
    ca: FleetCA
    server: IssuedCert
    devices: dict[str, IssuedCert]
    db_url: str
    releases: Path
    artifact: bytes
    manifest_text: str
    extra: dict[str, IssuedCert] = field(default_factory=dict)

    @property
    def artifact_path(self) -> Path:
        return release_paths(self.releases, MODEL, VERSION, VARIANT)[0]

    def settings(self, **update: object) -> ModelServiceConfig:
        assert self.server.key_path is not None
        config = ModelServiceConfig(
            host="127.0.0.1",
            port=0,
            tls=TlsFiles(
                ca_file=self.ca.cert_path,
                cert_file=self.server.cert_path,
                key_file=self.server.key_path,
            ),
            crl=self.ca.crl_path,
            registry_url=self.db_url,
            registry_ttl_s=0.0,
            releases_dir=self.releases,
        )
        return config.model_copy(update=update)

    def set_enrollment(self, device: str, status: str) -> None:
        engine = make_engine(self.db_url)
        try:
            with session_factory(engine)() as session:
                row = session.get(Enrollment, device)
                assert row is not None
                row.status = status
                session.commit()
        finally:
            engine.dispose()


def admit(db_url: str, admitted: dict[str, IssuedCert]) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    now = datetime.now(UTC)
    try:
        with session_factory(engine)() as session:
            for n, (device, cert) in enumerate(sorted(admitted.items())):
                session.add(
                    Enrollment(
                        device_id=device,
                        fleet="f1",
                        status="admitted",
                        cert_serial=f"{cert.serial:x}",
                        cert_pem=cert.cert_pem.decode(),
                        node_public_key="",
                        node_id=str(n + 1),
                        admitted_at=now,
                        revoked_at=None,
                    )
                )
            session.commit()
    finally:
        engine.dispose()


def manifest_for(artifact: bytes, variant: str = VARIANT) -> str:
    """A valid (unsigned) manifest JSON for ``artifact``."""
    from edgefl.manifest import GoldenSet, Manifest, SourceModel

    manifest = Manifest(
        artifact=f"{variant}.tflite",
        variant=variant,
        recipe=variant,
        prune_ratio=None,
        sha256=hashlib.sha256(artifact).hexdigest(),
        size_bytes=len(artifact),
        created_at="2026-12-06T00:00:00Z",
        inputs=[],
        outputs=[],
        source_model=SourceModel(
            name=MODEL, dataset="digits", sha256="0" * 64, base_sha256="0" * 64, parameters=1
        ),
        thresholds={},
        golden=GoldenSet(inputs=[], input_shape=[], reference_outputs=[], labels=[]),
        verified_on={},
    )
    return manifest.to_json()


def make_delivery(root: Path, *, size: int = 2 * 1024 * 1024, admitted: int = 2) -> Delivery:
    """A CA, registry and release in ``root``; devices ``pi-01``.. the first ``admitted``."""
    ca = FleetCA.create(root / "ca")
    server = ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    devices = {d: ca.issue_device_cert(d) for d in ("pi-01", "pi-02", "pi-03")}
    db_url = f"sqlite:///{root / 'registry.db'}"
    admit(db_url, dict(sorted(devices.items())[:admitted]))
    releases = root / "releases"
    artifact = write_release(releases, size=size, db_url=db_url)
    text = release_paths(releases, MODEL, VERSION, VARIANT)[1].read_text(encoding="utf-8")
    return Delivery(root, ca, server, devices, db_url, releases, artifact, text)


def write_release(
    releases: Path, *, size: int, version: int = VERSION, db_url: str | None = None
) -> bytes:
    """Publish a random artifact and its manifest as MODEL ``version`` VARIANT; its bytes.

    With ``db_url``, the release is also recorded there as published (what deploying it
    needs), as ``edgefl server release`` records it.
    """
    artifact = os.urandom(size)
    art_path, man_path = release_paths(releases, MODEL, version, VARIANT)
    art_path.parent.mkdir(parents=True, exist_ok=True)
    art_path.write_bytes(artifact)
    man_path.write_text(manifest_for(artifact), encoding="utf-8")
    if db_url is not None:
        record_release(db_url, version, {VARIANT: (hashlib.sha256(artifact).hexdigest(), size)})
    return artifact


def record_release(
    db_url: str,
    version: int,
    variants: dict[str, tuple[str, int]],
    *,
    status: str = "published",
    reasons: list[str] | None = None,
    left_out: dict[str, str] | None = None,
) -> None:
    """Record release MODEL ``version`` in the registry, as ``edgefl server release`` does.

    ``variants``: variant -> (sha256, size), with their path when ``status`` is
    ``published``; ``left_out``: variant -> reason, recorded without a path.
    """
    import json

    from edgefl.server.registry.models import Release, ReleaseVariant

    upgrade(db_url)
    engine = make_engine(db_url)
    now = datetime.now(UTC)
    try:
        with session_factory(engine).begin() as session:
            release = Release(
                model=MODEL,
                version=version,
                run_id="run-1",
                round=1,
                plan_hash="0" * 16,
                epsilon_max=None,
                delta=None,
                dp_mode="none",
                calibration="held-out",
                float_accuracy=0.9,
                device_class="generic",
                key_id=None,
                created_by="tests",
                created_at=now,
                expires_at=now,
                status=status,
                reasons_json=json.dumps(reasons or []),
            )
            session.add(release)
            session.flush()
            rows: dict[str, tuple[str, int, str | None]] = {
                name: (sha, size, None) for name, (sha, size) in variants.items()
            }
            rows.update({name: ("", 0, why) for name, why in (left_out or {}).items()})
            for name, (sha, size, why) in rows.items():
                published = status == "published" and why is None
                session.add(
                    ReleaseVariant(
                        release_id=release.id,
                        variant=name,
                        recipe=name,
                        prune_ratio=None,
                        sha256=sha,
                        size_bytes=size,
                        accuracy=0.9,
                        float_accuracy=0.9,
                        latency_json="{}",
                        device_class="generic",
                        runtime="ai-edge-litert",
                        path=f"{MODEL}/{version}/{name}.tflite" if published else None,
                        passed=True,
                        reasons_json=json.dumps([why] if why else []),
                    )
                )
    finally:
        engine.dispose()


@contextlib.contextmanager
def start_service(delivery: Delivery, **update: object) -> Iterator[ModelService]:
    """The real service on port 0 (mutual TLS), stopped on exit."""
    service = ModelService(delivery.settings(**update))
    service.start()
    try:
        yield service
    finally:
        service.stop()


def tls_of(delivery: Delivery, cert: IssuedCert, ca: FleetCA | None = None) -> TlsFiles:
    """A device's enrolled identity as the agent holds it."""
    return TlsFiles(
        ca_file=(ca or delivery.ca).cert_path, cert_file=cert.cert_path, key_file=cert.key_path
    )


def address(port: int) -> Address:
    return Address(host="127.0.0.1", port=port)


class TlsBroker:
    """mosquitto with the shipped config and ACL (mutual TLS), the given devices admitted."""

    def __init__(self, workdir: Path, delivery: Delivery, devices: dict[str, str]) -> None:
        import getpass
        import shutil

        from edgefl.netutil import free_port
        from edgefl.server.broker_config import render_acl, render_mosquitto_config

        self.port = free_port()
        data = workdir / "broker-data"
        data.mkdir(parents=True)
        acl = workdir / "acl"
        acl.write_text(render_acl(devices=devices), encoding="utf-8")
        assert delivery.server.key_path is not None
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            render_mosquitto_config(
                port=self.port,
                cafile=delivery.ca.cert_path,
                certfile=delivery.server.cert_path,
                keyfile=delivery.server.key_path,
                crlfile=delivery.ca.crl_path,
                data_dir=data,
                acl_file=acl,
                bind_address="127.0.0.1",
                run_as_user=getpass.getuser(),
            ),
            encoding="utf-8",
        )
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.log = workdir / "mosquitto.log"
        self.proc: ManagedProcess | None = None

    def __enter__(self) -> TlsBroker:
        self.proc = ManagedProcess([self.exe, "-c", str(self.conf)], self.log)
        self.proc.start()
        self.proc.wait_for_port("127.0.0.1", self.port, 10.0, interval=0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None:
            self.proc.stop(10.0)
            self.proc = None


def retained_on(
    broker: TlsBroker, tls: TlsFiles, topic: str, timeout: float = 10.0
) -> tuple[bytes, bool] | None:
    """Subscribe as ``tls``'s identity; the first message on ``topic`` and its retain flag."""
    import queue
    from typing import Any

    from edgefl.mqtt_client import build_client

    got: queue.Queue[tuple[bytes, bool]] = queue.Queue()
    client = build_client(f"t-{os.getpid()}-{threading.get_ident()}", tls=tls)

    def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            c.subscribe(topic, qos=1)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got.put((bytes(msg.payload), bool(msg.retain)))

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect("127.0.0.1", broker.port, keepalive=30)
    client.loop_start()
    try:
        return got.get(timeout=timeout)
    except queue.Empty:
        return None
    finally:
        client.disconnect()
        client.loop_stop()
