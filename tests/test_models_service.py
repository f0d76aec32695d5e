"""The model delivery service and the device's download client, for real.

A real fleet CA in a temporary folder, a SQLite registry that admits the devices, the
``Models`` gRPC service on port 0 with mutual TLS, and the device client with a device's
certificate. The cut is placed exactly by a relay that resets the connection after a set
number of bytes (:class:`tests.delivery_helpers.CuttingRelay`).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefl.config import Address, TlsFiles, validate_config
from edgefl.edge_agent.models.download import (
    DownloadError,
    download_artifact,
    fetch_manifest,
    fetch_manifest_text,
)
from edgefl.server.config import ServerConfig
from edgefl.server.models_service import resolve_settings

try:
    from tests.delivery_helpers import (
        MODEL,
        VARIANT,
        VERSION,
        CuttingRelay,
        Delivery,
        address,
        admit,
        make_delivery,
        start_service,
        tls_of,
        write_release,
    )
except ImportError:  # run from inside tests/
    from delivery_helpers import (  # type: ignore[import-not-found,no-redef]
        MODEL,
        VARIANT,
        VERSION,
        CuttingRelay,
        Delivery,
        address,
        admit,
        make_delivery,
        start_service,
        tls_of,
        write_release,
    )

pytestmark = pytest.mark.slow


@pytest.fixture
def delivery(tmp_path: Path) -> Delivery:
    return make_delivery(tmp_path)


def test_download_whole_artifact_and_manifest(delivery: Delivery, tmp_path: Path) -> None:
    tls = tls_of(delivery, delivery.devices["pi-01"])
    dest = tmp_path / "staging" / "int8.tflite.part"
    seen: list[tuple[int, int]] = []
    with start_service(delivery) as service:
        target = address(service.port)
        text = fetch_manifest_text(target, tls, MODEL, VERSION, VARIANT)
        assert text == delivery.manifest_text
        manifest = fetch_manifest(target, tls, MODEL, VERSION, VARIANT)
        assert manifest.size_bytes == len(delivery.artifact)
        moved = download_artifact(
            target,
            tls,
            MODEL,
            VERSION,
            VARIANT,
            dest,
            timeout_s=60,
            progress=lambda done, total: seen.append((done, total)),
        )
        # Complete already: no call, nothing moved.
        again = download_artifact(
            target, tls, MODEL, VERSION, VARIANT, dest, expected_size=len(delivery.artifact)
        )
    assert moved == len(delivery.artifact)
    assert again == 0
    assert dest.read_bytes() == delivery.artifact
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == manifest.sha256
    assert seen[-1] == (len(delivery.artifact), len(delivery.artifact))
    # ~64 KiB chunks, each with the total size.
    assert len(seen) == -(-len(delivery.artifact) // (64 * 1024))
    assert service.downloads == 1
    assert service.bytes_sent == len(delivery.artifact)


def test_resume_after_a_cut_moves_the_artifact_about_once(
    delivery: Delivery, tmp_path: Path
) -> None:
    size = len(delivery.artifact)
    tls = tls_of(delivery, delivery.devices["pi-01"])
    dest = tmp_path / "staging" / "int8.tflite.part"
    with (
        start_service(delivery) as service,
        CuttingRelay(service.port, cut_after=size // 2) as relay,
    ):
        target = address(relay.port)
        with pytest.raises(DownloadError) as cut:
            download_artifact(target, tls, MODEL, VERSION, VARIANT, dest, timeout_s=60)
        assert cut.value.code == "UNAVAILABLE"
        assert cut.value.reason == "download_failed"
        first = cut.value.moved
        assert 0 < first < size
        assert dest.stat().st_size == first  # everything that arrived was kept
        second = download_artifact(target, tls, MODEL, VERSION, VARIANT, dest, timeout_s=60)
    assert relay.cuts == 1
    assert dest.read_bytes() == delivery.artifact
    assert first + second == size
    # What crossed the link to the device, TLS and HTTP/2 included, over both connections.
    print(f"resume: artifact {size} bytes, link carried {relay.downstream} bytes")
    assert relay.downstream <= 1.1 * size


def test_a_partial_file_longer_than_the_artifact_is_started_again(
    delivery: Delivery, tmp_path: Path
) -> None:
    tls = tls_of(delivery, delivery.devices["pi-02"])
    dest = tmp_path / "part"
    dest.write_bytes(b"x" * (len(delivery.artifact) + 5))
    with start_service(delivery) as service:
        target = address(service.port)
        with pytest.raises(DownloadError) as exc:
            download_artifact(target, tls, MODEL, VERSION, VARIANT, dest)
        assert exc.value.code == "INVALID_ARGUMENT"
        assert "past the end" in str(exc.value)
        moved = download_artifact(
            target, tls, MODEL, VERSION, VARIANT, dest, expected_size=len(delivery.artifact)
        )
    assert moved == len(delivery.artifact)
    assert dest.read_bytes() == delivery.artifact


def test_unknown_release_is_not_found(delivery: Delivery, tmp_path: Path) -> None:
    tls = tls_of(delivery, delivery.devices["pi-01"])
    with start_service(delivery) as service:
        target = address(service.port)
        for model, version, variant in ((MODEL, VERSION + 1, VARIANT), (MODEL, VERSION, "fp16")):
            with pytest.raises(DownloadError) as exc:
                download_artifact(target, tls, model, version, variant, tmp_path / "x")
            assert exc.value.code == "NOT_FOUND"
            with pytest.raises(DownloadError) as exc:
                fetch_manifest_text(target, tls, model, version, variant)
            assert exc.value.code == "NOT_FOUND"


def test_models_section_defaults_to_the_servers_ca_registry_and_releases(tmp_path: Path) -> None:
    cfg = validate_config(
        ServerConfig,
        {"state_dir": str(tmp_path / "s"), "models": {"port": 0, "chunk_bytes": 32768}},
    )
    settings = resolve_settings(cfg)
    ca = cfg.resolved_ca_dir
    assert settings.tls.ca_file == ca / "ca.pem"
    assert settings.tls.cert_file == ca / "server" / "cert.pem"
    assert settings.crl == ca / "crl.pem"
    assert settings.registry_url == cfg.resolved_db_url
    assert settings.releases_dir == cfg.resolved_state_dir / "releases"
    assert settings.chunk_bytes == 32768
    assert settings.enabled


def test_server_start_runs_the_service_and_names_it_in_server_json(tmp_path: Path) -> None:
    import json

    from edgefl.server.serve import RUNTIME_FILE, Server

    config = ServerConfig.model_validate(
        {
            "state_dir": str(tmp_path / "server"),
            "superlink": {"port": 0},
            "broker": {"enabled": False, "port": 1},
            "ingest": {"enabled": False},
            "cert_service": False,
            "models": {"port": 0},
        }
    )
    server = Server(config)
    server.start()
    try:
        info = json.loads((server.state_dir / RUNTIME_FILE).read_text(encoding="utf-8"))
        assert info["models"] == server.models_address
        assert server.models is not None
        host, port = info["models"].rsplit(":", 1)
        device = server.ca.issue_device_cert("pi-07")
        admit(server.db_url, {"pi-07": device})
        artifact = write_release(server.state_dir / "releases", size=100_000)
        tls = TlsFiles(
            ca_file=server.ca_dir / "ca.pem", cert_file=device.cert_path, key_file=device.key_path
        )
        dest = tmp_path / "dl"
        target = Address(host=host, port=int(port))
        # Admitted after the service read the registry: known within about a second.
        deadline = time.monotonic() + 10
        while True:
            try:
                download_artifact(target, tls, MODEL, VERSION, VARIANT, dest)
                break
            except DownloadError as exc:
                if exc.code != "PERMISSION_DENIED" or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert dest.read_bytes() == artifact
    finally:
        server.stop()
    assert server.models is None


def test_validate_config_masks_the_models_registry_password(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from edgefl.cli import app

    config = tmp_path / "server.yaml"
    config.write_text(
        "models:\n  registry_url: postgresql://edgefl:hunter2@db/edgefl\n  port: 7443\n",
        encoding="utf-8",
    )
    res = CliRunner().invoke(app, ["server", "validate-config", "-c", str(config), "--json"])
    assert res.exit_code == 0, res.output
    assert "hunter2" not in res.stdout
    models = json.loads(res.stdout)["config"]["models"]
    assert models["port"] == 7443
    assert models["registry_url"] == "postgresql://edgefl:***@db/edgefl"


def test_importing_the_service_does_not_import_torch() -> None:
    """The service runs in a ``.[server]`` install, which has no torch."""
    code = "import edgefl.server.models_service, sys; assert 'torch' not in sys.modules"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
