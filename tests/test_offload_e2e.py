"""The predictor end to end: real LiteRT interpreter, real inference server on port 0, TLS.

The device model is a small net converted to a static-int8 ``.tflite`` (int8 I/O, like the
device artifacts); the server serves the same net in float32 through the real grpc.aio
service, so the tests are about where answers come from and what happens on failures,
not about accuracy. Faults are injected with a slow served model (the server is slower
than the deadline), a stopped server and certificates from another CA.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import Result
from torch import nn
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.config import TlsFiles
from edgefl.edge_agent.offload import (
    CloudError,
    InferenceClient,
    OffloadConfig,
    Predictor,
    find_device_model,
    load_runtime,
)
from edgefl.edge_agent.outbox import Outbox, OutboxPolicy
from edgefl.errors import ArtifactError, BadInputError
from edgefl.proto.serde import decode_envelope
from edgefl.server.fleet_ca import FleetCA
from edgefl.server.inference import (
    InferenceServerConfig,
    RunningServer,
    ServedModel,
    TorchServedModel,
    start_in_thread,
)

pytestmark = pytest.mark.slow

INPUT_SHAPE = (1, 8, 8)
MODEL = "digits"


@dataclass(frozen=True)
class DeviceModel:
    tflite: Path
    net: nn.Sequential
    x: np.ndarray


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> DeviceModel:
    # Imported here: conversion pulls in torch/jax and takes seconds.
    import litert_torch
    from ai_edge_quantizer import quantizer, recipe

    directory = tmp_path_factory.mktemp("device")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    fp32 = directory / "fp32.tflite"
    litert_torch.convert(net, (torch.randn(1, *INPUT_SHAPE),)).export(str(fp32))
    rng = np.random.default_rng(0)
    calibration = rng.random((128, *INPUT_SHAPE)).astype(np.float32)
    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    data = {"serving_default": [{"args_0": s[None]} for s in calibration]}
    int8 = directory / "tiny.int8.tflite"
    qt.quantize(qt.calibrate(data)).export_model(str(int8), overwrite=True)
    fp32.unlink()
    x = rng.random((6, *INPUT_SHAPE)).astype(np.float32)
    return DeviceModel(int8, net, x)


class SlowModel(ServedModel):
    """Fault injection: the served net, but every forward pass takes ``delay_s`` longer."""

    def __init__(self, inner: TorchServedModel, delay_s: float) -> None:
        super().__init__(
            name=inner.name,
            version=inner.version,
            input_shape=inner.input_shape,
            output_shape=inner.output_shape,
        )
        self.inner = inner
        self.delay_s = delay_s

    def forward(self, batch: np.ndarray, should_stop: Callable[[], bool]) -> np.ndarray:
        end = time.monotonic() + self.delay_s
        while time.monotonic() < end and not should_stop():
            time.sleep(0.005)
        return self.inner.forward(batch, should_stop)


def _served(device: DeviceModel) -> TorchServedModel:
    return TorchServedModel(MODEL, device.net, input_shape=INPUT_SHAPE)


@pytest.fixture(scope="module")
def server(device: DeviceModel) -> Iterator[RunningServer]:
    with start_in_thread(InferenceServerConfig(model=MODEL), models=[_served(device)]) as running:
        yield running


def _config(device: DeviceModel, target: str | None, **policy: Any) -> OffloadConfig:
    data: dict[str, Any] = {"model": device.tflite, "budget_ms": 2000.0, **policy}
    if target is not None:
        host, _, port = target.rpartition(":")
        cloud = {
            "target": {"host": host, "port": int(port)},
            "model": MODEL,
            "health_interval_s": 0.2,
        }
        data["cloud"] = {**cloud, **policy.pop("cloud", {})}
        data.update(policy)
    return OffloadConfig.model_validate(data)


def _predictor(device: DeviceModel, target: str | None, **policy: Any) -> Predictor:
    config = _config(device, target, **policy)
    return Predictor(load_runtime(config), config)


# --- where answers come from ------------------------------------------------------------


def test_local_mode_answers_on_the_device(device: DeviceModel, server: RunningServer) -> None:
    before = server.server.completed
    with _predictor(device, server.address, mode="local") as predictor:
        results = predictor.predict(device.x)
    assert [r.source for r in results] == ["local"] * len(device.x)
    assert all(r.label == r.local_label for r in results)
    assert all(r.reason == "mode local" for r in results)
    assert server.server.completed == before  # nothing was sent


def test_cloud_mode_gets_the_server_answer(device: DeviceModel, server: RunningServer) -> None:
    before = server.server.completed
    with _predictor(device, server.address, mode="cloud") as predictor:
        results = predictor.predict(device.x)
        reference = torch.softmax(device.net(torch.from_numpy(device.x)), dim=1).detach().numpy()
    assert [r.source for r in results] == ["cloud"] * len(device.x)
    assert server.server.completed == before + len(device.x)
    for result, expected in zip(results, reference, strict=True):
        assert result.label == int(expected.argmax())
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
        assert result.cloud_ms is not None
        assert result.deadline_met
    assert predictor.estimates.cloud.count == len(device.x)
    assert predictor.estimates.rtt.count >= 1  # seeded by the start-up health check


def test_adaptive_keeps_confident_answers_and_offloads_unsure_ones(
    device: DeviceModel, server: RunningServer
) -> None:
    with _predictor(device, server.address, confidence_threshold=0.0) as predictor:
        kept = predictor.predict(device.x)
    assert {r.source for r in kept} == {"local"}
    assert all("local confidence" in r.reason for r in kept)
    with _predictor(device, server.address, confidence_threshold=1.0) as predictor:
        offloaded = predictor.predict(device.x)
    assert {r.source for r in offloaded} == {"cloud"}
    assert all(r.reason.startswith(("fits", "no estimate yet")) for r in offloaded)


def test_budget_too_small_for_the_cloud_stays_local(
    device: DeviceModel, server: RunningServer
) -> None:
    with _predictor(
        device, server.address, prefer_cloud=True, explore_interval_s=0, fallback_reserve_ms=3.0
    ) as predictor:
        # The RTT estimate is far above what a 3.5 ms budget leaves after the 3 ms reserve.
        for _ in range(20):
            predictor.estimates.observe_rtt(50.0)
        result = predictor.predict_one(device.x[0], budget_ms=40.0)
        tiny = predictor.predict_one(device.x[0], budget_ms=2.0)
    assert result.source == "local"
    assert "does not fit" in result.reason
    assert tiny.source == "local"
    assert tiny.reason.startswith("budget too small")


def test_measured_rtt_decides_whether_the_cloud_fits(
    device: DeviceModel, server: RunningServer
) -> None:
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    netshape = importlib.import_module("netshape")
    policy = {"prefer_cloud": True, "explore_interval_s": 0, "budget_ms": 60.0}
    with (
        netshape.ShapingProxy(server.port, netshape.LinkShape(rtt_ms=100.0)) as slow,
        _predictor(device, slow.address, **policy) as predictor,
    ):
        far = predictor.predict_one(device.x[0])
        rtt = predictor.estimates.rtt.p90
    assert rtt is not None
    assert rtt >= 100.0  # measured by the health checks through the slow link
    assert far.source == "local"
    assert "does not fit" in far.reason
    with _predictor(device, server.address, **policy) as predictor:
        near = predictor.predict_one(device.x[0])
    assert near.source == "cloud"


# --- faults: the budget holds, the local answer is used ---------------------------------


def test_server_slower_than_the_deadline_falls_back_locally(device: DeviceModel) -> None:
    slow = SlowModel(_served(device), delay_s=5.0)
    with (
        start_in_thread(InferenceServerConfig(model=MODEL), models=[slow]) as running,
        _predictor(device, running.address, mode="cloud", budget_ms=300.0) as predictor,
    ):
        result = predictor.predict_one(device.x[0])
    assert result.source == "local_fallback"
    assert "DEADLINE_EXCEEDED" in result.reason
    assert result.label == result.local_label  # the local answer is the one given
    assert result.cloud_ms is not None
    assert result.cloud_ms < 5000.0  # the call was cut by the deadline, not by the server


def test_server_down_falls_back_then_the_breaker_opens(device: DeviceModel) -> None:
    running = start_in_thread(InferenceServerConfig(model=MODEL), models=[_served(device)])
    address = running.address
    running.stop()  # nothing listens on the port any more: connection refused
    with _predictor(
        device,
        address,
        prefer_cloud=True,
        breaker={"failure_threshold": 2, "open_s": 60.0},
        cloud={"health_interval_s": 60.0, "connect_timeout_s": 0},
    ) as predictor:
        results = predictor.predict(device.x)
    # start() ran two failing health checks, which already opened the breaker (threshold 2).
    assert all(r.source in ("local", "local_fallback") for r in results)
    assert all(r.label == r.local_label for r in results)
    assert results[-1].reason == "circuit breaker open"
    assert predictor.breaker.state == "open"


def test_unavailable_service_in_cloud_mode_falls_back_on_every_sample(device: DeviceModel) -> None:
    running = start_in_thread(InferenceServerConfig(model=MODEL), models=[_served(device)])
    address = running.address
    running.stop()
    with _predictor(device, address, mode="cloud", cloud={"connect_timeout_s": 0}) as predictor:
        results = predictor.predict(device.x)
    assert {r.source for r in results} == {"local_fallback"}
    assert all("UNAVAILABLE" in r.reason for r in results)


def test_client_reports_status_codes(device: DeviceModel, server: RunningServer) -> None:
    config = _config(device, server.address)
    assert config.cloud is not None
    with InferenceClient(config.cloud.model_copy(update={"model": "nope"})) as client:
        with pytest.raises(CloudError) as err:
            client.predict(device.x[:1], timeout_s=5.0)
        assert err.value.code == "NOT_FOUND"
        assert client.health(timeout_s=5.0)
    with InferenceClient(config.cloud) as client:
        with pytest.raises(CloudError) as err:
            client.predict(np.zeros((1, 3, 3), np.float32), timeout_s=5.0)
        assert err.value.code == "INVALID_ARGUMENT"
        info = client.model_info(timeout_s=5.0)
        assert info.input_shape == INPUT_SHAPE
        assert info.model == MODEL


def test_cloud_model_that_cannot_take_the_samples_is_not_used(device: DeviceModel) -> None:
    torch.manual_seed(0)
    wide = TorchServedModel(
        "wide", nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), input_shape=(1, 28, 28)
    )
    with start_in_thread(InferenceServerConfig(model=MODEL), models=[wide]) as running:
        for model, reason in [("wide", "takes input (1, 28, 28)"), ("absent", "does not serve")]:
            with _predictor(device, running.address, mode="cloud", cloud={"model": model}) as p:
                result = p.predict_one(device.x[0])
            assert result.source == "local"
            assert reason in result.reason
            assert result.reason.startswith("cloud unusable")
        assert running.server.completed == 0


# --- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(
    device: DeviceModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FleetCA, RunningServer]]:
    ca = FleetCA.create(tmp_path_factory.mktemp("ca"))
    cert = ca.issue_server_cert(["localhost"], ips=["127.0.0.1"])
    assert cert.key_path is not None
    config = InferenceServerConfig(
        model=MODEL,
        tls=TlsFiles(cert_file=cert.cert_path, key_file=cert.key_path, ca_file=ca.cert_path),
        crl=ca.crl_path,
    )
    with start_in_thread(config, models=[_served(device)]) as running:
        yield ca, running


def _tls(ca: FleetCA, device_id: str) -> dict[str, Any]:
    issued = ca.issue_device_cert(device_id)
    return {"ca_file": ca.cert_path, "cert_file": issued.cert_path, "key_file": issued.key_path}


def test_mutual_tls_with_a_fleet_certificate_reaches_the_cloud(
    device: DeviceModel, tls_server: tuple[FleetCA, RunningServer]
) -> None:
    ca, running = tls_server
    with _predictor(
        device, running.address, mode="cloud", cloud={"tls": _tls(ca, "pi-tls-ok")}
    ) as predictor:
        result = predictor.predict_one(device.x[0])
    assert result.source == "cloud"


def test_certificate_from_another_ca_falls_back_locally(
    device: DeviceModel,
    tls_server: tuple[FleetCA, RunningServer],
    tmp_path: Path,
) -> None:
    ca, running = tls_server
    other = FleetCA.create(tmp_path / "other-ca")
    # Trusts the right server CA but presents a device certificate the fleet CA never issued.
    tls = {**_tls(other, "pi-intruder"), "ca_file": ca.cert_path}
    refused_before = sum(running.server.refused.values())
    completed_before = running.server.completed
    with _predictor(
        device, running.address, mode="cloud", cloud={"tls": tls, "connect_timeout_s": 0.5}
    ) as predictor:
        results = predictor.predict(device.x[:3])
    assert {r.source for r in results} == {"local_fallback"}
    assert all(r.label == r.local_label for r in results)
    assert running.server.completed == completed_before
    # Refused in the handshake: the service never saw a call.
    assert sum(running.server.refused.values()) == refused_before


def test_revoked_device_falls_back_locally(
    device: DeviceModel, tls_server: tuple[FleetCA, RunningServer]
) -> None:
    ca, running = tls_server
    issued = ca.issue_device_cert("pi-revoked")
    ca.revoke(issued.serial)
    tls = {"ca_file": ca.cert_path, "cert_file": issued.cert_path, "key_file": issued.key_path}
    with _predictor(device, running.address, mode="cloud", cloud={"tls": tls}) as predictor:
        result = predictor.predict_one(device.x[0])
    assert result.source == "local_fallback"
    assert "UNAUTHENTICATED" in result.reason
    assert result.label == result.local_label


# --- results leave through the outbox ---------------------------------------------------


def test_results_are_committed_to_the_outbox(
    device: DeviceModel, server: RunningServer, tmp_path: Path
) -> None:
    config = _config(device, server.address, mode="cloud")
    with Outbox(tmp_path / "outbox.db", "pi-07", OutboxPolicy()) as outbox:
        with Predictor(
            load_runtime(config), config, outbox=outbox, device_id="pi-07", fleet="lab"
        ) as predictor:
            results = predictor.predict(device.x[:4])
            single = predictor.predict_one(device.x[4])
        records = outbox.next_batch(100)
    assert len(records) == 5
    assert {r.kind for r in records} == {"result"}
    assert {r.topic for r in records} == {"edgefl/lab/pi-07/result/predict"}
    bodies = []
    for record in records:
        envelope = decode_envelope(record.payload)
        assert envelope.kind == "result"
        assert envelope.seq == record.seq
        assert envelope.device_id == "pi-07"
        bodies.append(json.loads(envelope.body))
    expected = [r.to_dict() for r in [*results, single]]
    assert [b["request_id"] for b in bodies] == [e["request_id"] for e in expected]
    assert [b["source"] for b in bodies] == ["cloud"] * 5
    assert [b["label"] for b in bodies] == [e["label"] for e in expected]


# --- input checks -----------------------------------------------------------------------


def test_input_that_does_not_fit_the_model_is_refused(device: DeviceModel) -> None:
    with _predictor(device, None) as predictor:
        assert predictor.predict_one(device.x[0]).source == "local"  # no cloud configured
        for bad, message in [
            (np.zeros((2, 8, 8), np.float32), "does not fit"),
            (np.zeros((0, 1, 8, 8), np.float32), "empty"),
            (np.full(INPUT_SHAPE, np.nan, np.float32), "NaN"),
            (np.array(["a"] * 64).reshape(INPUT_SHAPE), "numbers"),
        ]:
            with pytest.raises(BadInputError, match=message):
                predictor.predict(bad)


def test_device_model_folder_prefers_integer_variants_and_checks_manifests(
    device: DeviceModel, tmp_path: Path
) -> None:
    for variant in ("fp32", "int8", "pruned50-int8"):
        shutil.copy(device.tflite, tmp_path / f"net.{variant}.tflite")
    assert find_device_model(tmp_path).name == "net.pruned50-int8.tflite"
    (tmp_path / "net.pruned50-int8.tflite").unlink()
    assert find_device_model(tmp_path).name == "net.int8.tflite"
    # A manifest beside the artifact is checked: one that does not describe it refuses it.
    manifest = {"size_bytes": 1, "sha256": "0" * 64}
    (tmp_path / "net.int8.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):
        find_device_model(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match=r"no \.tflite"):
        find_device_model(empty)
    with pytest.raises(BadInputError, match="does not exist"):
        find_device_model(tmp_path / "missing.tflite")


# --- CLI --------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a child process (stdout must be only the JSON)."""
    return subprocess.run(
        [sys.executable, "-c", "from edgefl.cli import main; main()", "agent", "predict", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _invoke(*args: str) -> Result:
    """The same command in-process (seconds faster; exit codes and stderr are the same)."""
    return CliRunner().invoke(app, ["agent", "predict", *args])


def test_cli_predict_json_on_a_batch(
    device: DeviceModel, server: RunningServer, tmp_path: Path
) -> None:
    batch = tmp_path / "batch.npy"
    np.save(batch, device.x)
    proc = _cli(
        "--input",
        str(batch),
        "--budget-ms",
        "2000",
        "--mode",
        "cloud",
        "--model-dir",
        str(device.tflite.parent),
        "--cloud",
        server.address,
        "--cloud-model",
        MODEL,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["mode"] == "cloud"
    assert report["budget_ms"] == 2000.0
    assert len(report["results"]) == len(device.x)
    assert report["summary"]["by_source"]["cloud"] == len(device.x)
    assert report["summary"]["offload_fraction"] == 1.0
    assert report["model"]["model"] == str(device.tflite)


def test_cli_predict_one_sample_into_the_agent_outbox(device: DeviceModel, tmp_path: Path) -> None:
    sample = tmp_path / "one.npy"
    np.save(sample, device.x[0])
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"device_id: pi-cli\nstate_dir: {tmp_path / 'state'}\nmqtt: {{host: 127.0.0.1, port: 1}}\n"
        f"offload: {{model: {device.tflite}, mode: local, budget_ms: 50}}\n"
    )
    result = _invoke("--input", str(sample), "--config", str(config), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["source"] for r in report["results"]] == ["local"]
    with Outbox(tmp_path / "state" / "outbox.db", "pi-cli", OutboxPolicy()) as outbox:
        records = outbox.next_batch(10)
    assert [r.kind for r in records] == ["result"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda p: np.save(p, np.zeros((3, 5, 5), np.float32)), "does not fit the model"),
        (lambda p: p.write_bytes(b"not a numpy file"), "not a usable .npy"),
        (lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), "not a usable .npy"),
        (lambda p: None, "does not exist"),
    ],
)
def test_cli_predict_bad_input_exits_4(
    device: DeviceModel, tmp_path: Path, content: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / "bad.npy"
    content(path)
    result = _invoke("--input", str(path), "--budget-ms", "50", "--model-dir", str(device.tflite))
    assert result.exit_code == 4, result.stderr
    assert message in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_predict_bad_mode_is_a_usage_error(device: DeviceModel, tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, device.x[0])
    result = _invoke("--input", str(path), "--mode", "sometimes", "--model-dir", str(device.tflite))
    assert result.exit_code == 2
    assert "sometimes" in result.stderr


def test_health_thread_keeps_feeding_the_rtt_estimate(
    device: DeviceModel, server: RunningServer
) -> None:
    with _predictor(device, server.address, cloud={"health_interval_s": 0.05}) as predictor:
        seeded = predictor.estimates.rtt.count
        deadline = time.monotonic() + 10
        while predictor.estimates.rtt.count < seeded + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert predictor.estimates.rtt.count >= seeded + 3
    assert not any(t.name == "offload-health" for t in threading.enumerate())


def test_cloud_target_text_of_the_older_form_still_loads_with_a_warning(
    device: DeviceModel,
) -> None:
    from edgefl.config import RenamedKeyWarning, config_renames, validate_config

    data = {"model": str(device.tflite), "cloud": {"target": "infer.local:50051", "model": MODEL}}
    with pytest.warns(RenamedKeyWarning, match=r"key cloud\.target is written \{host, port\}"):
        config = validate_config(OffloadConfig, data, source="agent.yaml")
    assert config.cloud is not None
    assert (config.cloud.target.host, config.cloud.target.port) == ("infer.local", 50051)
    assert str(config.cloud.target) == "infer.local:50051"
    assert [r.old for r in config_renames(config)] == ["cloud.target"]
