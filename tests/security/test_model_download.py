"""Attacks on the model delivery service, from the attacker's position.

The attacker holds a device certificate (revoked, or never admitted), or a certificate
from a CA of its own with a real device's name, or a service or operator certificate,
and asks the real ``Models`` service (port 0, mutual TLS, a real fleet CA and registry)
for artifacts, or for files outside the releases folder.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from edgefl.edge_agent.models.download import (
    DownloadError,
    download_artifact,
    fetch_manifest_text,
)
from edgefl.proto import models_pb2
from edgefl.server.fleet_ca import FleetCA, IssuedCert

try:
    from tests.delivery_helpers import (
        MODEL,
        VARIANT,
        VERSION,
        Delivery,
        address,
        make_delivery,
        start_service,
        tls_of,
    )
except ImportError:  # pragma: no cover - run from inside tests/
    from delivery_helpers import (  # type: ignore[import-not-found,no-redef]
        MODEL,
        VARIANT,
        VERSION,
        Delivery,
        address,
        make_delivery,
        start_service,
        tls_of,
    )

pytestmark = pytest.mark.slow


@pytest.fixture
def delivery(tmp_path: Path) -> Delivery:
    # pi-01 and pi-02 are admitted, pi-03 has a fleet certificate but no admission.
    return make_delivery(tmp_path, size=300 * 1024)


def _download(delivery: Delivery, port: int, cert: IssuedCert, dest: Path, **kw: object) -> str:
    """The status code name of a download attempt (``OK`` if it completed)."""
    ca = kw.pop("ca", None)
    assert ca is None or isinstance(ca, FleetCA)
    try:
        download_artifact(
            address(port), tls_of(delivery, cert, ca), MODEL, VERSION, VARIANT, dest, timeout_s=20
        )
    except DownloadError as exc:
        return f"{exc.code}: {exc}"
    return "OK"


def test_revoked_device_cannot_download(delivery: Delivery, tmp_path: Path) -> None:
    pi01 = delivery.devices["pi-01"]
    with start_service(delivery) as service:
        assert _download(delivery, service.port, pi01, tmp_path / "a").startswith("OK")
        delivery.ca.revoke(pi01.serial)  # what `edgefl server revoke` does to the CA
        outcome = _download(delivery, service.port, pi01, tmp_path / "b")
        assert outcome.startswith("UNAUTHENTICATED"), outcome
        assert "revoked" in outcome
        with pytest.raises(DownloadError) as exc:
            fetch_manifest_text(address(service.port), tls_of(delivery, pi01), MODEL, 3, VARIANT)
        assert exc.value.code == "UNAUTHENTICATED"
    assert not (tmp_path / "b").exists() or (tmp_path / "b").stat().st_size == 0


def test_device_whose_enrollment_was_revoked_cannot_download(
    delivery: Delivery, tmp_path: Path
) -> None:
    # Revoked in the registry, its certificate not yet on the CRL (another server's CA copy).
    delivery.set_enrollment("pi-02", "revoked")
    with start_service(delivery) as service:
        outcome = _download(delivery, service.port, delivery.devices["pi-02"], tmp_path / "a")
    assert outcome.startswith("PERMISSION_DENIED"), outcome
    assert "pi-02" in outcome


def test_fleet_certificate_of_a_device_not_admitted_is_refused(
    delivery: Delivery, tmp_path: Path
) -> None:
    with start_service(delivery) as service:
        outcome = _download(delivery, service.port, delivery.devices["pi-03"], tmp_path / "a")
        assert outcome.startswith("PERMISSION_DENIED"), outcome
        assert "not an admitted device" in outcome
        # Service and operator identities are not devices either.
        for cert in (
            delivery.ca.issue_service_cert("edgefl-ingest"),
            delivery.ca.issue_operator_cert("alice"),
        ):
            outcome = _download(delivery, service.port, cert, tmp_path / "b")
            assert outcome.startswith("PERMISSION_DENIED"), outcome
        assert service.downloads == 0
        assert service.bytes_sent == 0


def test_a_device_listed_in_the_devices_table_but_never_admitted_is_refused(
    delivery: Delivery, tmp_path: Path
) -> None:
    # pi-03 holds a fleet certificate and has published telemetry, so ingest listed it in
    # the devices table; it has no enrollment. The inference service accepts such a
    # device, the delivery service must not: only an admitted enrollment downloads.
    from datetime import UTC, datetime

    from edgefl.server.registry import Device, make_engine, session_factory

    engine = make_engine(delivery.db_url)
    now = datetime.now(UTC)
    try:
        with session_factory(engine)() as session:
            session.add(Device(device_id="pi-03", fleet="f1", first_seen=now, last_seen=now))
            session.commit()
    finally:
        engine.dispose()
    with start_service(delivery) as service:
        outcome = _download(delivery, service.port, delivery.devices["pi-03"], tmp_path / "a")
        assert outcome.startswith("PERMISSION_DENIED"), outcome
        assert "not an admitted device" in outcome
        with pytest.raises(DownloadError) as exc:
            fetch_manifest_text(
                address(service.port),
                tls_of(delivery, delivery.devices["pi-03"]),
                MODEL,
                VERSION,
                VARIANT,
            )
        assert exc.value.code == "PERMISSION_DENIED"
        assert service.bytes_sent == 0
        # An admitted device of the same registry still downloads.
        assert _download(delivery, service.port, delivery.devices["pi-01"], tmp_path / "b") == "OK"


def test_certificate_from_an_attackers_ca_is_refused_in_the_handshake(
    delivery: Delivery, tmp_path: Path
) -> None:
    attacker = FleetCA.create(tmp_path / "attacker-ca", common_name="edgefl fleet CA")
    forged = attacker.issue_device_cert("pi-01")  # a real, admitted device's name
    with start_service(delivery) as service:
        # Trusting the real CA for the server, presenting the forged client certificate.
        outcome = _download(delivery, service.port, forged, tmp_path / "a")
        assert outcome.startswith("UNAVAILABLE"), outcome
        # The handshake refused it: no handler ever saw the call.
        assert sum(service.refused.values()) == 0
        assert service.bytes_sent == 0


def _raw_call(
    delivery: Delivery, port: int, request: models_pb2.DownloadRequest
) -> tuple[grpc.StatusCode, str, int]:
    """Send a raw Download request as pi-01; (status, details, data bytes received)."""
    cert = delivery.devices["pi-01"]
    assert cert.key_pem is not None
    creds = grpc.ssl_channel_credentials(
        root_certificates=delivery.ca.cert_pem,
        private_key=cert.key_pem,
        certificate_chain=cert.cert_pem,
    )
    got = 0
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        call = channel.unary_stream(
            "/edgefl.models.v1.Models/Download",
            request_serializer=models_pb2.DownloadRequest.SerializeToString,
            response_deserializer=models_pb2.Chunk.FromString,
        )
        try:
            for chunk in call(request, timeout=20):
                got += len(chunk.data)
        except grpc.RpcError as exc:
            if not isinstance(exc, grpc.Call):
                raise
            return exc.code(), exc.details() or "", got
    return grpc.StatusCode.OK, "", got


def test_path_traversal_and_bad_offsets_are_invalid_arguments(delivery: Delivery) -> None:
    size = len(delivery.artifact)
    bad: list[dict[str, str | int]] = [
        {"model": "../ca", "variant": VARIANT},
        {"model": "..", "variant": VARIANT},
        {"model": "/etc/passwd", "variant": VARIANT},
        {"model": MODEL, "variant": "../../../ca/ca"},
        {"model": MODEL, "variant": "int8/../../x"},
        {"model": MODEL, "variant": "a/b"},
        {"model": MODEL, "variant": "int8\x00"},
        {"model": MODEL, "variant": ""},
        {"model": "", "variant": VARIANT},
        {"model": MODEL, "variant": VARIANT, "version": 0},
        {"model": MODEL, "variant": VARIANT, "version": -3},
        {"model": MODEL, "variant": VARIANT, "offset": -1},
        {"model": MODEL, "variant": VARIANT, "offset": -(2**63)},
        {"model": MODEL, "variant": VARIANT, "offset": size + 1},
        {"model": MODEL, "variant": VARIANT, "offset": 2**63 - 1},
    ]
    with start_service(delivery) as service:
        for fields in bad:
            request = models_pb2.DownloadRequest(**{"version": VERSION, **fields})  # type: ignore[arg-type]
            code, details, got = _raw_call(delivery, service.port, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (fields, code, details)
            assert got == 0
            assert details
        # The end of the file is a valid offset: an empty, successful stream.
        end = models_pb2.DownloadRequest(model=MODEL, version=VERSION, variant=VARIANT, offset=size)
        assert _raw_call(delivery, service.port, end) == (grpc.StatusCode.OK, "", 0)
        assert service.bytes_sent == 0


def test_a_symlink_out_of_the_releases_folder_is_not_served(delivery: Delivery) -> None:
    # An operator's mistake or a planted link: releases/<model>/<v>/evil.tflite -> the CA key.
    folder = delivery.artifact_path.parent
    (folder / "evil.tflite").symlink_to(delivery.ca.directory / "ca.key")
    (folder / "evil.manifest.json").symlink_to(delivery.ca.directory / "state.json")
    outside = delivery.root / "outside"
    (outside / "1").mkdir(parents=True)
    (outside / "1" / "secret.tflite").write_bytes(b"not a release")
    (delivery.releases / "escape").symlink_to(outside, target_is_directory=True)
    with start_service(delivery) as service:
        request = models_pb2.DownloadRequest(model=MODEL, version=VERSION, variant="evil")
        code, details, got = _raw_call(delivery, service.port, request)
        assert code == grpc.StatusCode.NOT_FOUND, details
        assert got == 0
        assert str(delivery.ca.directory) not in details
        request = models_pb2.DownloadRequest(model="escape", version=1, variant="secret")
        code, _, got = _raw_call(delivery, service.port, request)
        assert code == grpc.StatusCode.NOT_FOUND
        assert got == 0
        with pytest.raises(DownloadError) as exc:
            fetch_manifest_text(
                address(service.port),
                tls_of(delivery, delivery.devices["pi-01"]),
                MODEL,
                VERSION,
                "evil",
            )
        assert exc.value.code == "NOT_FOUND"
        assert service.bytes_sent == 0


def test_a_device_revoked_while_downloading_is_stopped(tmp_path: Path) -> None:
    big = make_delivery(tmp_path / "big", size=8 * 1024 * 1024)
    pi01 = big.devices["pi-01"]
    assert pi01.key_pem is not None
    creds = grpc.ssl_channel_credentials(
        root_certificates=big.ca.cert_pem, private_key=pi01.key_pem, certificate_chain=pi01.cert_pem
    )
    got = 0
    code = grpc.StatusCode.OK

    def on_chunk(size: int) -> None:
        nonlocal got
        got += size
        if got == 64 * 1024:
            big.ca.revoke(pi01.serial)  # what `edgefl server revoke` does to the CA

    # No BDP probing: the stream's window stays small, so the server is never far ahead.
    options = [("grpc.http2.bdp_probe", 0)]
    with (
        start_service(big) as service,
        grpc.secure_channel(f"127.0.0.1:{service.port}", creds, options=options) as channel,
    ):
        call = channel.unary_stream(
            "/edgefl.models.v1.Models/Download",
            request_serializer=models_pb2.DownloadRequest.SerializeToString,
            response_deserializer=models_pb2.Chunk.FromString,
        )
        request = models_pb2.DownloadRequest(model=MODEL, version=VERSION, variant=VARIANT)
        try:
            for chunk in call(request, timeout=30):
                on_chunk(len(chunk.data))
        except grpc.RpcError as exc:
            if not isinstance(exc, grpc.Call):
                raise
            code = exc.code()
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert got < len(big.artifact) // 2
    print(f"revoked mid-download: {got} of {len(big.artifact)} bytes received")
