"""Desired-state publishing on a real mosquitto (shipped config and ACL, mutual TLS).

The server signs the desired state with its release key and publishes it retained as
``edgefl-rollout``; a device subscribing afterwards with its own certificate receives it
retained on its own topic, and it verifies against the keys the device pins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefl.errors import BadInputError
from edgefl.proto.desired import parse_desired
from edgefl.proto.topics import state_desired_topic
from edgefl.releasesign import ReleaseTrustError, TrustStore, verify
from edgefl.server.release_keys import create_release_key, trusted_public_keys
from edgefl.server.rollout import publish_desired
from edgefl.testing import mosquitto_executable

try:
    from tests.delivery_helpers import (
        MODEL,
        VARIANT,
        VERSION,
        Delivery,
        TlsBroker,
        make_delivery,
        record_release,
        retained_on,
        tls_of,
        write_release,
    )
except ImportError:  # run from inside tests/
    from delivery_helpers import (  # type: ignore[import-not-found,no-redef]
        MODEL,
        VARIANT,
        VERSION,
        Delivery,
        TlsBroker,
        make_delivery,
        record_release,
        retained_on,
        tls_of,
        write_release,
    )

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_executable() is None, reason="mosquitto is not installed"),
]


@pytest.fixture
def delivery(tmp_path: Path) -> Delivery:
    return make_delivery(tmp_path / "d", size=50_000)


def _publish(delivery: Delivery, broker: TlsBroker, **kw: object) -> object:
    return publish_desired(
        ca_dir=delivery.ca.directory,
        db_url=delivery.db_url,
        releases_dir=delivery.releases,
        broker_host="127.0.0.1",
        broker_port=broker.port,
        model=MODEL,
        **kw,  # type: ignore[arg-type]
    )


def test_desired_state_lands_retained_and_signed_on_the_devices_topic(
    delivery: Delivery, tmp_path: Path
) -> None:
    kid = create_release_key(delivery.ca.directory)
    trust = TrustStore.load(tmp_path / "pi-01-identity", trusted_public_keys(delivery.ca.directory))
    with TlsBroker(tmp_path / "broker", delivery, {"pi-01": "f1", "pi-02": "f1"}) as broker:
        deployment = _publish(delivery, broker, version=VERSION, device="pi-01")
        topic = state_desired_topic("f1", "pi-01")
        got = retained_on(broker, tls_of(delivery, delivery.devices["pi-01"]), topic)
        assert got is not None, "no desired state arrived"
        payload, retained = got
        assert retained
        state = parse_desired(payload)
        assert state.device == "pi-01"
        assert state.fleet == "f1"
        assert state.model is not None
        assert state.model.version == VERSION
        assert state.model.variant == VARIANT
        assert state.model.size_bytes == len(delivery.artifact)
        assert not state.model.rollback
        assert state.expires_at - state.issued_at == 30 * 86400
        assert trust.accept_desired(state, fleet="f1", device="pi-01") == kid
        assert deployment.key_id == kid  # type: ignore[attr-defined]
        # Nothing for pi-02 yet: its topic holds no desired state.
        assert (
            retained_on(
                broker,
                tls_of(delivery, delivery.devices["pi-02"]),
                state_desired_topic("f1", "pi-02"),
                timeout=1.0,
            )
            is None
        )
        # An edited field breaks the signature.
        doc = json.loads(payload)
        doc["model"]["version"] = VERSION + 1
        with pytest.raises(ReleaseTrustError) as exc:
            verify(parse_desired(json.dumps(doc)), trust)
        assert exc.value.reason == "bad_signature"


def test_fleet_wide_rollback_goes_to_every_admitted_device(
    delivery: Delivery, tmp_path: Path
) -> None:
    create_release_key(delivery.ca.directory)
    write_release(delivery.releases, size=40_000, version=VERSION - 1, db_url=delivery.db_url)
    trusted = trusted_public_keys(delivery.ca.directory)
    with TlsBroker(tmp_path / "broker", delivery, {"pi-01": "f1", "pi-02": "f1"}) as broker:
        _publish(delivery, broker, version=VERSION, device="pi-01")
        _publish(delivery, broker, version=VERSION - 1, rollback=True)
        for device in ("pi-01", "pi-02"):
            got = retained_on(
                broker,
                tls_of(delivery, delivery.devices[device]),
                state_desired_topic("f1", device),
            )
            assert got is not None, device
            state = parse_desired(got[0])
            assert state.device == "*"
            assert state.model is not None
            assert state.model.version == VERSION - 1
            assert state.model.rollback
            trust = TrustStore.load(tmp_path / f"{device}-identity", trusted)
            trust.accept_desired(state, fleet="f1", device=device)
        # pi-03 holds a fleet certificate but was never admitted: nothing was sent to it.
        assert (
            retained_on(
                broker,
                tls_of(delivery, delivery.devices["pi-03"]),
                state_desired_topic("f1", "pi-03"),
                timeout=1.0,
            )
            is None
        )


def test_unknown_device_release_or_variant_is_refused_before_publishing(
    delivery: Delivery, tmp_path: Path
) -> None:
    create_release_key(delivery.ca.directory)
    common = {
        "ca_dir": delivery.ca.directory,
        "db_url": delivery.db_url,
        "releases_dir": delivery.releases,
        "broker_host": "127.0.0.1",
        "broker_port": 1,  # never dialled: every case fails first
        "model": MODEL,
    }
    cases: list[tuple[dict[str, object], str]] = [
        ({"version": VERSION, "device": "pi-03"}, "not an admitted device"),
        ({"version": VERSION + 7, "device": "pi-01"}, "no release"),
        ({"version": VERSION, "variant": "fp16", "device": "pi-01"}, "no variant"),
        ({"version": VERSION, "variant": "../x", "device": "pi-01"}, "variant"),
        ({"version": VERSION, "device": "a/b"}, "device id"),
    ]
    for extra, message in cases:
        with pytest.raises(BadInputError, match=message):
            publish_desired(**common, **extra)  # type: ignore[arg-type]
    # A release whose artifact no longer matches its manifest is never deployed.
    delivery.artifact_path.write_bytes(b"tampered")
    with pytest.raises(BadInputError, match="does not match its manifest"):
        publish_desired(**common, version=VERSION, device="pi-01")  # type: ignore[arg-type]


def test_only_a_published_release_is_deployed(delivery: Delivery, tmp_path: Path) -> None:
    """Files on disk are not a release: the registry's row must say published."""
    import hashlib

    from edgefl.server.models_service import release_paths

    create_release_key(delivery.ca.directory)
    common = {
        "ca_dir": delivery.ca.directory,
        "db_url": delivery.db_url,
        "releases_dir": delivery.releases,
        "broker_host": "127.0.0.1",
        "broker_port": 1,  # never dialled: every case fails before publishing
        "model": MODEL,
        "device": "pi-01",
    }
    # A crash after the release folder's rename, before its row said published: the files
    # are all there and match their manifest, but the row still says failed.
    version = VERSION + 1
    artifact = write_release(delivery.releases, size=20_000, version=version)
    sha = hashlib.sha256(artifact).hexdigest()
    record_release(
        delivery.db_url,
        version,
        {VARIANT: (sha, len(artifact))},
        status="failed",
        reasons=["interrupted before its files were published"],
    )
    with pytest.raises(BadInputError) as caught:
        publish_desired(**common, version=version)  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"release {MODEL} {version} is 'failed', not published" in message
    assert "interrupted before its files were published" in message
    assert "server release" in (caught.value.hint or "")

    # Files with no release recorded at all (a registry reset, or copied in by hand).
    stray = VERSION + 2
    write_release(delivery.releases, size=20_000, version=stray)
    with pytest.raises(BadInputError, match=f"the registry has no release {MODEL} {stray}"):
        publish_desired(**common, version=stray)  # type: ignore[arg-type]

    # A variant the accuracy gate left out is named with its reason, even if a file of that
    # name is put beside the published ones afterwards.
    gated = VERSION + 3
    good = write_release(delivery.releases, size=20_000, version=gated)
    why = "accuracy_drop: 3.10 points below the float model (85.0% against 88.1%)"
    record_release(
        delivery.db_url,
        gated,
        {VARIANT: (hashlib.sha256(good).hexdigest(), len(good))},
        left_out={"fp16": why},
    )
    art, man = release_paths(delivery.releases, MODEL, gated, "fp16")
    art.write_bytes(good)
    man.write_text(release_paths(delivery.releases, MODEL, gated, VARIANT)[1].read_text())
    with pytest.raises(BadInputError, match=r"variant 'fp16' .* was not published: accuracy_drop"):
        publish_desired(**common, version=gated, variant="fp16")  # type: ignore[arg-type]

    # A published variant whose files were replaced after publishing (a new artifact with a
    # manifest to match) is not the one the registry recorded.
    other = write_release(delivery.releases, size=20_000, version=gated)
    assert other != good
    with pytest.raises(BadInputError, match="is not the one the registry recorded"):
        publish_desired(**common, version=gated, variant=VARIANT)  # type: ignore[arg-type]


def test_server_deploy_refuses_a_failed_release_with_its_status(
    delivery: Delivery, tmp_path: Path
) -> None:
    import hashlib

    from typer.testing import CliRunner

    from edgefl.cli import app
    from edgefl.errors import ExitCode

    create_release_key(delivery.ca.directory)
    version = VERSION + 1
    artifact = write_release(delivery.releases, size=10_000, version=version)
    record_release(
        delivery.db_url,
        version,
        {VARIANT: (hashlib.sha256(artifact).hexdigest(), len(artifact))},
        status="failed",
        reasons=["interrupted before its files were published"],
    )
    config = tmp_path / "server.yaml"
    config.write_text(
        json.dumps(
            {
                "state_dir": str(tmp_path / "state"),
                "ca_dir": str(delivery.ca.directory),
                "db_url": delivery.db_url,
                "broker": {"port": 1},
                "models": {"releases_dir": str(delivery.releases)},
            }
        ),
        encoding="utf-8",
    )
    res = CliRunner().invoke(
        app, ["server", "deploy", MODEL, str(version), "--device", "pi-01", "-c", str(config)]
    )
    assert res.exit_code == ExitCode.BAD_INPUT, res.output
    assert "is 'failed', not published" in res.stderr
    assert "edgefl server release --run run-1" in res.stderr


def test_server_deploy_command(delivery: Delivery, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgefl.cli import app
    from edgefl.errors import ExitCode
    from edgefl.server.runtime import RUNTIME_FILE

    kid = create_release_key(delivery.ca.directory)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = tmp_path / "server.yaml"
    config.write_text(
        json.dumps(
            {
                "state_dir": str(state_dir),
                "ca_dir": str(delivery.ca.directory),
                "db_url": delivery.db_url,
                "models": {"releases_dir": str(delivery.releases)},
            }
        ),
        encoding="utf-8",
    )
    runner = CliRunner()
    with TlsBroker(tmp_path / "broker", delivery, {"pi-01": "f1", "pi-02": "f1"}) as broker:
        # The running server's server.json says where its broker is.
        (state_dir / RUNTIME_FILE).write_text(
            json.dumps({"broker": {"host": "127.0.0.1", "port": broker.port}}), encoding="utf-8"
        )
        res = runner.invoke(
            app, ["server", "deploy", MODEL, str(VERSION), "--fleet", "-c", str(config), "--json"]
        )
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        assert out["key_id"] == kid
        assert out["targets"] == ["f1/*"]
        assert out["topics"] == [state_desired_topic("f1", d) for d in ("pi-01", "pi-02")]
        assert out["variant"] == VARIANT
        got = retained_on(
            broker,
            tls_of(delivery, delivery.devices["pi-02"]),
            state_desired_topic("f1", "pi-02"),
        )
        assert got is not None
        assert parse_desired(got[0]).model is not None
        res = runner.invoke(app, ["server", "deploy", MODEL, "3", "-c", str(config)])
        assert res.exit_code == ExitCode.BAD_INPUT
        assert "exactly one of --device D and --fleet" in res.output


def test_the_fleet_contract_examples_are_valid_state_documents() -> None:
    import re

    from edgefl.proto.desired import parse_reported

    doc = (Path(__file__).resolve().parent.parent / "docs" / "fleet-contract.md").read_text(
        encoding="utf-8"
    )
    blocks = [json.loads(b) for b in re.findall(r"^```json\n(.*?)^```", doc, re.M | re.S)]
    desired = [b for b in blocks if "issued_at" in b]
    reported = [b for b in blocks if "state" in b and "device" in b and "issued_at" not in b]
    assert len(desired) == 1
    assert len(reported) == 1
    state = parse_desired(json.dumps(desired[0]))
    assert state.signature is not None
    assert state.model is not None
    assert state.model.artifact_sha256 == reported[0]["sha256"]
    assert parse_reported(json.dumps(reported[0])).state == "running"


def test_the_delivery_doc_models_section_is_a_valid_server_config() -> None:
    import re

    import yaml

    from edgefl.config import validate_config
    from edgefl.server.config import ModelServiceConfig, ServerConfig

    doc = (Path(__file__).resolve().parent.parent / "docs" / "delivery.md").read_text(
        encoding="utf-8"
    )
    (block,) = re.findall(r"^```yaml\n(.*?)^```", doc, re.M | re.S)
    models = validate_config(ServerConfig, yaml.safe_load(block), source="docs/delivery.md").models
    assert models == ModelServiceConfig()  # the doc shows the defaults
