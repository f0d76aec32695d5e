"""The device model manager on a real tiny model, real Ed25519 keys and signed releases.

Releases are read from a folder laid out as the server publishes them (the download is
one step behind the ReleaseSource interface); the gRPC path has its own test at the end.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.config import TlsFiles
from edgefl.edge_agent.daemon import AgentConfig
from edgefl.edge_agent.models.health import HealthFailure, HealthPolicy, HealthWindow
from edgefl.edge_agent.models.manager import (
    MODEL_STATUS_FILE,
    FolderSource,
    ModelsConfig,
    read_model_status,
)
from edgefl.manifest import sha256_file
from edgefl.process import ManagedProcess
from edgefl.proto.desired import ReportedState, parse_reported
from edgefl.proto.topics import state_desired_topic, state_reported_topic
from edgefl.releasesign import key_id, public_key_pem
from edgefl.testing import EdgeflProcesses, Mosquitto, edgefl_executable, wait_for

try:
    from tests.delivery_helpers import make_delivery, start_service, tls_of
    from tests.model_release_helpers import (
        DEVICE,
        DEVICE_CLASS,
        FLEET,
        MODEL,
        RUNTIME,
        Built,
        Fleet,
        build_tiny_models,
    )
except ImportError:  # pragma: no cover - run from inside tests/
    from delivery_helpers import (  # type: ignore[import-not-found,no-redef]
        make_delivery,
        start_service,
        tls_of,
    )
    from model_release_helpers import (  # type: ignore[import-not-found,no-redef]
        DEVICE,
        DEVICE_CLASS,
        FLEET,
        MODEL,
        RUNTIME,
        Built,
        Fleet,
        build_tiny_models,
    )


KILL_TRIALS = 6


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_tiny_models(tmp_path_factory)


@pytest.fixture
def fleet(tmp_path: Path, built: Built) -> Fleet:
    return Fleet(tmp_path, built)


class CountingSource(FolderSource):
    """The folder source, counting calls and bytes (to see what is retried)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.manifests = 0
        self.moved = 0

    def fetch_manifest(self, model: str, version: int, variant: str) -> bytes:
        self.manifests += 1
        return super().fetch_manifest(model, version, variant)

    def download(
        self, model: str, version: int, variant: str, dest: Path, *, expected_size: int
    ) -> int:
        moved = super().download(model, version, variant, dest, expected_size=expected_size)
        self.moved += moved
        return moved


def _version(fleet: Fleet, manager: object) -> int | None:
    current = manager.current()  # type: ignore[attr-defined]
    return None if current is None else int(current.installed.version)


def test_a_signed_release_is_installed_and_reported(fleet: Fleet) -> None:
    manager = fleet.manager()
    assert manager.current() is None
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    current = manager.current()
    assert current is not None
    assert (current.installed.version, current.manifest.release.version) == (1, 1)  # type: ignore[union-attr]
    assert current.path.read_bytes() == fleet.built.variants["fp32"][0].read_bytes()
    report = fleet.reports[-1]
    assert (report.state, report.model, report.version, report.sha256) == (
        "running",
        MODEL,
        1,
        v1.artifact_sha256,
    )
    assert report.last_failure is None
    status = read_model_status(fleet.state_dir)
    assert status["reported"]["version"] == 1
    assert status["last_swap"]["to_version"] == 1
    # Staging is emptied once installed.
    assert list((fleet.state_dir / "models" / "staging").iterdir()) == []


def test_an_upgrade_swaps_and_keeps_the_previous_version(fleet: Fleet) -> None:
    manager = fleet.manager()
    manager.handle(fleet.desired(fleet.publish(1, "fp32")))
    fleet.tick()
    v2 = fleet.publish(2, "fp16")
    manager.handle(fleet.desired(v2))
    assert _version(fleet, manager) == 2
    previous = manager.store.previous()
    assert previous is not None
    assert previous.version == 1
    status = read_model_status(fleet.state_dir)
    assert status["last_swap"] == {
        "at": fleet.now(),
        "from_version": 1,
        "to_version": 2,
        "rollback": False,
    }
    # The same desired state again (the broker re-delivers it retained): nothing changes.
    manager.handle(fleet.desired(v2, issued_at=fleet.now()))
    assert _version(fleet, manager) == 2


def test_a_signed_rollback_reinstalls_the_older_version(fleet: Fleet) -> None:
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    fleet.tick()
    manager.handle(fleet.desired(fleet.publish(2, "fp16")))
    fleet.tick()
    manager.handle(fleet.desired(v1.model_copy(update={"rollback": True})))
    assert _version(fleet, manager) == 1
    assert fleet.reports[-1].last_failure is None
    assert read_model_status(fleet.state_dir)["last_swap"]["rollback"] is True


def test_the_previous_slots_file_re_released_under_a_newer_version_is_installed(
    fleet: Fleet,
) -> None:
    # v1's file published again as v3 (a revert released forward): the same sha256 as the
    # previous slot, but a newer release with its own manifest, so an upgrade, not a replay.
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    fleet.tick()
    manager.handle(fleet.desired(fleet.publish(2, "fp16")))
    fleet.tick()
    v3 = fleet.publish(3, "fp32")
    assert v3.artifact_sha256 == v1.artifact_sha256
    manager.handle(fleet.desired(v3))
    assert _version(fleet, manager) == 3
    assert fleet.reports[-1].last_failure is None
    current = manager.current()
    assert current is not None
    assert current.manifest.release.version == 3  # type: ignore[union-attr]


def test_a_refused_version_is_not_retried_until_a_new_desired_state(fleet: Fleet) -> None:
    manager = fleet.manager()
    manager.handle(fleet.desired(fleet.publish(1, "fp32")))
    source = CountingSource(fleet.releases)
    manager.source = source
    fleet.tick()
    # v2's artifact is damaged on the server.
    good = fleet.built.variants["fp16"][0].read_bytes()
    bad = bytes([good[0] ^ 1]) + good[1:]
    v2 = fleet.publish(2, "fp16", artifact=bad)
    desired = fleet.desired(v2)
    manager.handle(desired)
    assert fleet.reports[-1].last_failure is not None
    assert fleet.reports[-1].last_failure.reason == "sha256_mismatch"
    assert _version(fleet, manager) == 1
    assert source.manifests == 1
    manager.handle(desired)  # re-delivered: not tried again
    assert source.manifests == 1
    # ... nor after a restart.
    restarted = fleet.manager()
    restarted.source = source
    restarted.step()  # it re-reads the desired state it had
    assert source.manifests == 1
    assert _version(fleet, restarted) == 1
    # A new desired state (the server fixed the file) is tried.
    fleet.publish(2, "fp16")
    fleet.tick()
    restarted.handle(fleet.desired(v2))
    assert source.manifests == 2
    assert _version(fleet, restarted) == 2
    assert fleet.reports[-1].state == "running"


def test_unsigned_and_stale_desired_states_are_not_acted_on(fleet: Fleet) -> None:
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1, signed=False))
    assert manager.current() is None
    assert fleet.reports[-1].last_failure.reason == "unsigned"  # type: ignore[union-attr]
    old = fleet.desired(v1)
    fleet.tick(10)
    manager.handle(fleet.desired(v1))
    assert _version(fleet, manager) == 1
    fleet.tick()
    manager.handle(fleet.desired(fleet.publish(2, "fp16")))
    manager.handle(old)  # a replay of an older signed state
    assert fleet.reports[-1].last_failure.reason == "stale_desired_state"  # type: ignore[union-attr]
    assert _version(fleet, manager) == 2


def test_revoked_keys_apply_from_a_verified_desired_state(fleet: Fleet) -> None:
    second = Ed25519PrivateKey.generate()
    fleet.pin(fleet.key, second)
    manager = fleet.manager()
    manager.handle(fleet.desired(fleet.publish(1, "fp32", key=second)))
    assert _version(fleet, manager) == 1
    fleet.tick()
    revoking = fleet.desired(None, revoked_keys=[key_id(second.public_key())])
    manager.handle(revoking)
    assert key_id(second.public_key()) in manager.trust.revoked
    fleet.tick()
    manager.handle(fleet.desired(fleet.publish(2, "fp16", key=second)))
    assert fleet.reports[-1].last_failure.reason == "revoked_key"  # type: ignore[union-attr]
    assert _version(fleet, manager) == 1
    # A desired state signed by the revoked key itself is refused (and revokes nothing).
    fleet.tick()
    manager.handle(fleet.desired(None, key=second, revoked_keys=[key_id(fleet.key.public_key())]))
    assert fleet.reports[-1].last_failure.reason == "revoked_key"  # type: ignore[union-attr]
    assert key_id(fleet.key.public_key()) not in manager.trust.revoked


def test_a_cut_download_resumes_from_the_staged_bytes(fleet: Fleet) -> None:
    manager = fleet.manager()
    source = CountingSource(fleet.releases)
    manager.source = source
    v1 = fleet.publish(1, "fp32")
    data = fleet.built.variants["fp32"][0].read_bytes()
    staged = manager.store.staging_file(MODEL, 1, "fp32", ".tflite")
    staged.write_bytes(data[: len(data) // 2])
    manager.handle(fleet.desired(v1))
    assert _version(fleet, manager) == 1
    assert source.moved == len(data) - len(data) // 2


def test_a_failing_download_is_retried_with_backoff(fleet: Fleet) -> None:
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    (fleet.releases / MODEL / "1" / "fp32.tflite").rename(fleet.root / "away")
    manager.handle(fleet.desired(v1))
    assert fleet.reports[-1].last_failure.reason == "download_failed"  # type: ignore[union-attr]
    assert manager.current() is None
    (fleet.root / "away").rename(fleet.releases / MODEL / "1" / "fp32.tflite")
    deadline = time.monotonic() + 5
    while manager.current() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        manager.step()
    assert _version(fleet, manager) == 1


def _window(manager: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while manager._window is not None and time.monotonic() < deadline:  # type: ignore[attr-defined]
        manager.step()  # type: ignore[attr-defined]
        time.sleep(0.02)


def test_a_model_that_fails_its_health_window_is_rolled_back(fleet: Fleet) -> None:
    manager = fleet.manager(health_window_s=30, health_check_interval_s=0.05)
    manager.handle(fleet.desired(fleet.publish(1, "fp32")))
    fleet.tick()
    v2 = fleet.publish(2, "fp16")
    desired = fleet.desired(v2)
    manager.handle(desired)
    assert _version(fleet, manager) == 2
    assert manager._window is not None  # on probation
    manager.record_inference(error="interpreter raised: tensor allocation failed")
    manager.step()
    assert _version(fleet, manager) == 1
    report = fleet.reports[-1]
    assert report.state == "rolled_back"
    assert report.rollbacks == 1
    assert report.last_failure is not None
    assert (report.last_failure.version, report.last_failure.reason) == (2, "inference_error")
    status = read_model_status(fleet.state_dir)
    assert status["last_swap"]["rollback"] is True
    # Not retried on the same desired state.
    manager.handle(desired)
    assert _version(fleet, manager) == 1


def test_a_healthy_model_leaves_probation(fleet: Fleet) -> None:
    manager = fleet.manager(health_window_s=0.3, health_check_interval_s=0.1)
    manager.handle(fleet.desired(fleet.publish(1, "fp32")))
    assert manager._window is not None
    _window(manager)
    assert manager._window is None
    assert _version(fleet, manager) == 1
    assert fleet.reports[-1].state == "running"


def test_the_worker_thread_installs_from_a_payload(fleet: Fleet) -> None:
    manager = fleet.manager()
    manager.start()
    try:
        manager.submit(fleet.desired(fleet.publish(1, "fp32")).to_json())
        deadline = time.monotonic() + 20
        while manager.current() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _version(fleet, manager) == 1
        manager.submit(b"{not json")
        deadline = time.monotonic() + 5
        while fleet.reports[-1].last_failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _version(fleet, manager) == 1
    finally:
        manager.stop()


def test_config_defaults_keep_models_off() -> None:
    config = ModelsConfig()
    assert config.enabled is False
    assert (config.health_window_s, config.max_latency_ratio) == (60.0, 3.0)
    with pytest.raises(ValueError, match=r"models\.server"):
        ModelsConfig(enabled=True)


def test_status_file_is_json(fleet: Fleet) -> None:
    manager = fleet.manager()
    manager.handle(fleet.desired(fleet.publish(1, "fp32")))
    doc = json.loads((fleet.state_dir / MODEL_STATUS_FILE).read_text())
    assert doc["reported"]["state"] == "running"


# --- end to end: broker, the gRPC Models service, `edgefl agent run` ------------------------


@pytest.mark.slow
def test_agent_follows_the_desired_state_over_mqtt_and_grpc(
    tmp_path: Path, built: Built, broker: Mosquitto, edgefl_procs: EdgeflProcesses
) -> None:
    delivery = make_delivery(tmp_path, size=4096)
    fleet = Fleet(tmp_path, built)  # publishes into delivery.releases (tmp_path/releases)
    v1 = fleet.publish(1, "fp32")
    state_dir = tmp_path / "device"
    tls = tls_of(delivery, delivery.devices[DEVICE])
    reported: list[ReportedState] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)
    watcher.on_message = lambda c, u, msg: reported.append(parse_reported(bytes(msg.payload)))
    watcher.connect("127.0.0.1", broker.port)
    watcher.subscribe(state_reported_topic(FLEET, DEVICE), qos=1)
    watcher.loop_start()
    with start_service(delivery) as service:
        config = {
            "device_id": DEVICE,
            "fleet": FLEET,
            "state_dir": str(state_dir),
            "mqtt": {"port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "status_interval_s": 0.2,
            "models": {
                "enabled": True,
                "server": {"host": "127.0.0.1", "port": service.port},
                "tls": {k: str(v) for k, v in tls.model_dump().items()},
                "device_class": DEVICE_CLASS,
                "runtime": RUNTIME,
                "release_signing_keys": [public_key_pem(fleet.key.public_key())],
                "health_window_s": 2,
                "health_check_interval_s": 0.5,
            },
        }
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(config))
        edgefl_procs.start("agent", "run", "--config", str(path), log="agent.log")
        # The server's rollout identity publishes the signed desired state, retained.
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rollout")
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        fleet.clock = time.time()
        publisher.publish(
            state_desired_topic(FLEET, DEVICE), fleet.desired(v1).to_json(), qos=1, retain=True
        ).wait_for_publish(5)

        def running(version: int) -> bool:
            return any(r.state == "running" and r.version == version for r in reported)

        wait_for(lambda: running(1), 60, "the agent to report v1 running")
        pointer = json.loads((state_dir / "models" / "current").read_text())
        assert (pointer["version"], pointer["sha256"]) == (1, v1.artifact_sha256)
        # A tampered v2 (one flipped bit) is refused; v1 keeps serving.
        good = built.variants["fp16"][0].read_bytes()
        v2 = fleet.publish(2, "fp16", artifact=bytes([good[0] ^ 1]) + good[1:])
        fleet.clock = time.time() + 1
        publisher.publish(
            state_desired_topic(FLEET, DEVICE), fleet.desired(v2).to_json(), qos=1, retain=True
        ).wait_for_publish(5)
        wait_for(
            lambda: any(r.last_failure and r.last_failure.version == 2 for r in reported),
            60,
            "the refusal of the tampered v2",
        )
        failure = reported[-1].last_failure
        assert failure is not None
        assert failure.reason == "sha256_mismatch"
        assert reported[-1].version == 1
        publisher.loop_stop()
        publisher.disconnect()
    watcher.loop_stop()
    watcher.disconnect()
    status = subprocess.run(
        [edgefl_executable(), "agent", "status", "--config", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    models = json.loads(status.stdout)["models"]
    assert models["reported"]["version"] == 1
    assert models["reported"]["last_failure"]["reason"] == "sha256_mismatch"
    text = subprocess.run(
        [edgefl_executable(), "agent", "status", "--config", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "model: digits-mlp v1 (fp32)" in text
    assert "sha256_mismatch" in text


def test_readme_models_example_is_a_valid_agent_config(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Model updates on the device", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    data = {
        "device_id": DEVICE,
        "state_dir": str(tmp_path),
        "mqtt": {"port": 1883},
        **yaml.safe_load(example),
    }
    config = AgentConfig.model_validate(data)
    assert config.models.enabled
    assert config.models.server is not None
    assert (config.models.health_window_s, config.models.max_latency_ratio) == (60, 3.0)
    assert AgentConfig.model_validate({**data, "models": {}}).models.enabled is False


@pytest.mark.slow
def test_kill_9_mid_update_then_restart_runs_one_whole_model_then_the_desired(
    fleet: Fleet,
) -> None:
    """The manager killed at random instants of an update (download, checks, swap)."""
    manager = fleet.manager()
    manager.handle(fleet.desired(fleet.publish(1, "fp32")))
    fleet.tick()
    v2 = fleet.publish(2, "fp16")
    desired = fleet.root / "desired.json"
    desired.write_bytes(fleet.desired(v2).to_json())
    pristine = fleet.root / "pristine"
    shutil.copytree(fleet.state_dir, pristine)
    helper = Path(__file__).with_name("model_release_helpers.py")
    rng = random.Random(7)
    outcomes = {1: 0, 2: 0}
    update_s = 0.0  # how long one whole update takes here (the first trial runs it all)
    for trial in range(KILL_TRIALS + 1):
        shutil.rmtree(fleet.state_dir)
        shutil.copytree(pristine, fleet.state_dir)
        log = fleet.root / f"child-{trial}.log"
        child = ManagedProcess(
            [sys.executable, str(helper), str(fleet.state_dir), str(fleet.releases), str(desired)],
            log,
        )
        child.start()
        wait_for(lambda: "start" in log.read_text(), 30, "the child to start")  # noqa: B023
        if trial == 0:
            began = time.monotonic()
            wait_for(lambda: "done" in log.read_text(), 30, "the update to finish")  # noqa: B023
            update_s = time.monotonic() - began
        else:
            # Anywhere in the update: download, checks, swap.
            time.sleep(rng.uniform(0.0, update_s))
        child.kill()
        restarted = fleet.manager()
        current = restarted.current()
        assert current is not None, trial
        assert current.installed.version in (1, 2)
        assert sha256_file(current.path) == current.installed.sha256
        if trial:
            outcomes[current.installed.version] += 1
        restarted.step()  # resumes the desired state it had accepted, if it had
        restarted.handle(fleet.desired(v2, issued_at=fleet.now()))
        final = restarted.current()
        assert final is not None
        assert final.installed.version == 2
        assert sha256_file(final.path) == v2.artifact_sha256
    print("kill -9 outcomes (version serving after restart):", outcomes)
    # Kills landed before the swap at least once.
    assert outcomes[1] > 0, outcomes


# --- the health window's probes -------------------------------------------------------


def test_health_probe_reasons(built: Built, tmp_path: Path) -> None:
    artifact, manifest = built.variants["fp32"]
    policy = HealthPolicy(window_s=10, check_interval_s=0, golden_repeats=2, latency_slack_us=0)
    healthy = HealthWindow(artifact, manifest, RUNTIME, None, policy)
    assert healthy.probe() is None
    assert healthy.last_p50_us is not None
    # Slower than allowed against the previous model's median.
    slow = HealthWindow(artifact, manifest, RUNTIME, healthy.last_p50_us / 100, policy)
    failure = slow.poll()
    assert isinstance(failure, HealthFailure)
    assert failure.reason == "latency_regression"
    # The same ratio within the default slack (microseconds on a tiny model) is noise.
    default = HealthPolicy(window_s=10, check_interval_s=0, golden_repeats=2)
    noisy = HealthWindow(artifact, manifest, RUNTIME, healthy.last_p50_us / 100, default)
    assert noisy.probe() is None
    # A file the runtime cannot load.
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(artifact.read_bytes()[:100])
    failure = HealthWindow(broken, manifest, RUNTIME, None, policy).poll()
    assert isinstance(failure, HealthFailure)
    assert failure.reason == "load_failed"
    # Outputs outside the manifest's tolerances.
    golden = manifest.golden
    rolled = [row[1:] + row[:1] for row in golden.reference_outputs]
    shifted = manifest.model_copy(
        update={"golden": golden.model_copy(update={"reference_outputs": rolled})}
    )
    failure = HealthWindow(artifact, shifted, RUNTIME, None, policy).poll()
    assert isinstance(failure, HealthFailure)
    assert failure.reason == "golden_mismatch"
    # An error the serving loop reports.
    reported = HealthWindow(artifact, manifest, RUNTIME, None, policy)
    reported.record(error="invoke failed")
    failure = reported.poll()
    assert isinstance(failure, HealthFailure)
    assert failure.reason == "inference_error"
    # A window that ends without failure.
    short = HealthWindow(artifact, manifest, RUNTIME, None, HealthPolicy(window_s=0))
    assert short.poll() is True


def _agent_config(tmp_path: Path, fleet: Fleet, tls: TlsFiles, broker_port: int, port: int) -> Path:
    config = {
        "device_id": DEVICE,
        "fleet": FLEET,
        "state_dir": str(fleet.state_dir),
        "mqtt": {"port": broker_port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "status_interval_s": 0.2,
        "models": {
            "enabled": True,
            "server": {"host": "127.0.0.1", "port": port},
            "tls": {k: str(v) for k, v in tls.model_dump().items()},
            "device_class": DEVICE_CLASS,
            "runtime": RUNTIME,
            "release_signing_keys": [public_key_pem(fleet.key.public_key())],
            "health_window_s": 0,
        },
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _runs(state_dir: Path, version: int) -> bool:
    reported = read_model_status(state_dir).get("reported") or {}
    return bool(reported.get("state") == "running" and reported.get("version") == version)


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.0, 0.15, 0.3])
def test_agent_killed_mid_update_restarts_on_one_model_then_the_desired(
    tmp_path: Path,
    built: Built,
    broker: Mosquitto,
    edgefl_procs: EdgeflProcesses,
    delay_s: float,
) -> None:
    delivery = make_delivery(tmp_path, size=4096)
    fleet = Fleet(tmp_path, built)
    v1 = fleet.publish(1, "fp32")
    v2 = fleet.publish(2, "fp16")
    topic = state_desired_topic(FLEET, DEVICE)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rollout")
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    try:
        with start_service(delivery) as service:
            tls = tls_of(delivery, delivery.devices[DEVICE])
            path = _agent_config(tmp_path, fleet, tls, broker.port, service.port)
            agent = edgefl_procs.start("agent", "run", "--config", str(path), log="agent.log")
            fleet.clock = time.time()
            publisher.publish(topic, fleet.desired(v1).to_json(), qos=1, retain=True)
            wait_for(lambda: _runs(fleet.state_dir, 1), 60, "v1 running")
            fleet.clock = time.time() + 1
            publisher.publish(
                topic, fleet.desired(v2).to_json(), qos=1, retain=True
            ).wait_for_publish(5)
            time.sleep(delay_s)
            agent.kill()
            pointer = json.loads((fleet.state_dir / "models" / "current").read_text())
            assert pointer["version"] in (1, 2)
            slot = fleet.state_dir / "models" / pointer["slot"]
            assert sha256_file(slot / "model.tflite") == pointer["sha256"]
            assert pointer["sha256"] == (v1 if pointer["version"] == 1 else v2).artifact_sha256
            edgefl_procs.start("agent", "run", "--config", str(path), log="agent-2.log")
            wait_for(lambda: _runs(fleet.state_dir, 2), 60, "v2 running after the restart")
            pointer = json.loads((fleet.state_dir / "models" / "current").read_text())
            assert (pointer["version"], pointer["sha256"]) == (2, v2.artifact_sha256)
    finally:
        publisher.loop_stop()
        publisher.disconnect()


def test_the_retained_state_redelivered_after_it_expired_is_no_failure(fleet: Fleet) -> None:
    manager = fleet.manager()
    desired = fleet.desired(fleet.publish(1, "fp32"))
    manager.handle(desired)
    fleet.tick(2 * 86_400)  # the desired state expired meanwhile
    manager.handle(desired)  # a reconnect re-delivers it
    restarted = fleet.manager()
    restarted.step()  # a restart re-reads it
    assert fleet.reports[-1].last_failure is None
    assert fleet.reports[-1].state == "running"
    # A different desired state that has expired is refused.
    restarted.handle(fleet.desired(None, issued_at=fleet.now() - 2 * 86_400))
    assert fleet.reports[-1].last_failure is not None
    assert fleet.reports[-1].last_failure.reason in ("expired", "stale_desired_state")
