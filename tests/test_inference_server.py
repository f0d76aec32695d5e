"""The cloud inference service over real gRPC channels on loopback (port 0)."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import torch
from grpc_health.v1 import health_pb2

from edgefl.config import RenamedKeyWarning, TlsFiles, config_renames, validate_config
from edgefl.datasets import Dataset, load_dataset
from edgefl.errors import ArtifactError, BadInputError, ConfigError, UnknownModelError
from edgefl.proto import inference_pb2
from edgefl.proto.tensors import decode_tensor, encode_tensor
from edgefl.server.fleet_ca import FleetCA, IssuedCert
from edgefl.server.inference import (
    HEAVY_MODELS,
    SERVICE_NAME,
    InferenceServerConfig,
    RunningServer,
    ServedModel,
    TorchServedModel,
    load_or_train,
    start_in_thread,
)
from edgefl.server.inference.models import ComputeCancelledError
from edgefl.server.registry import Device, Enrollment, make_engine, session_factory, upgrade
from edgefl.testing import EdgeflProcesses, first_line, wait_for
from edgefl.training import predict_logits
from edgefl.zoo import state_dict_sha256

FloatArray = npt.NDArray[np.float32]
Code = grpc.StatusCode


# -- helpers -------------------------------------------------------------------------


class Client:
    """The three calls, built on a channel like the agent does (no generated stub)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.predict = channel.unary_unary(
            f"/{SERVICE_NAME}/Predict",
            request_serializer=inference_pb2.PredictRequest.SerializeToString,
            response_deserializer=inference_pb2.PredictResponse.FromString,
        )
        self.stream = channel.stream_stream(
            f"/{SERVICE_NAME}/PredictStream",
            request_serializer=inference_pb2.PredictRequest.SerializeToString,
            response_deserializer=inference_pb2.PredictResponse.FromString,
        )
        self.info = channel.unary_unary(
            f"/{SERVICE_NAME}/GetModelInfo",
            request_serializer=inference_pb2.ModelInfoRequest.SerializeToString,
            response_deserializer=inference_pb2.ModelInfo.FromString,
        )
        self.health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    def ask(
        self, x: FloatArray, *, model: str = "digits", timeout: float = 30.0, **kw: str
    ) -> inference_pb2.PredictResponse:
        return self.predict(
            inference_pb2.PredictRequest(model=model, input=encode_tensor(x), **kw), timeout=timeout
        )

    def status(self, service: str = "") -> int:
        return int(self.health(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def rows(resp: inference_pb2.PredictResponse) -> FloatArray:
    return np.asarray(decode_tensor(resp.output), dtype=np.float32)


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert isinstance(err, grpc.Call)
    return err.code(), err.details() or ""


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights cache with a 1-epoch heavy model (trained once for the module)."""
    folder = tmp_path_factory.mktemp("weights")
    load_or_train("digits", folder, epochs=1)
    assert (folder / "digits.pt").exists()
    return folder


@pytest.fixture(scope="module")
def server(weights_dir: Path) -> Iterator[RunningServer]:
    with start_in_thread(InferenceServerConfig(weights=weights_dir)) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with grpc.insecure_channel(server.address) as channel:
        yield Client(channel)


def reference_logits(weights_dir: Path, x: FloatArray) -> tuple[FloatArray, str]:
    """The same weights evaluated by plain torch, outside the server."""
    module = HEAVY_MODELS["digits"].factory()
    module.load_state_dict(torch.load(weights_dir / "digits.pt", weights_only=True))
    return predict_logits(module, x), state_dict_sha256(module)[:12]


class GatedModel(ServedModel):
    """Wraps a real model; ``forward`` waits for ``gate`` (fault-injection seam)."""

    def __init__(self, inner: ServedModel) -> None:
        super().__init__(
            name=inner.name,
            version=inner.version,
            input_shape=inner.input_shape,
            output_shape=inner.output_shape,
            heldout_accuracy=inner.heldout_accuracy,
        )
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def forward(self, batch: FloatArray, should_stop: Callable[[], bool]) -> FloatArray:
        self.entered.set()
        assert self.gate.wait(30), "test never opened the gate"
        self.batches.append(len(batch))
        return self.inner.forward(batch, should_stop)


class SlowModel(ServedModel):
    """A forward pass that would take ~100 s, checking ``should_stop`` every 10 ms."""

    def __init__(self) -> None:
        super().__init__(name="slow", version="v1", input_shape=(4,), output_shape=(2,))
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.completed = False
        self.steps = 0

    def forward(self, batch: FloatArray, should_stop: Callable[[], bool]) -> FloatArray:
        self.started.set()
        for _ in range(10_000):
            if should_stop():
                self.stopped.set()
                raise ComputeCancelledError
            self.steps += 1
            time.sleep(0.01)
        self.completed = True
        return np.zeros((len(batch), 2), np.float32)


@pytest.fixture(scope="module")
def heavy(weights_dir: Path) -> TorchServedModel:
    return load_or_train("digits", weights_dir)


# -- the happy path ------------------------------------------------------------------


def test_predict_matches_torch_eval_of_the_same_weights(
    client: Client, server: RunningServer, weights_dir: Path, digits: Dataset
) -> None:
    x = digits.x_test[:17]
    expected, version = reference_logits(weights_dir, x)
    resp = client.ask(x, request_id="r-17")
    out = rows(resp)
    assert out.shape == (17, 10)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert resp.model == "digits"
    assert resp.version == version == server.version
    assert resp.request_id == "r-17"
    assert resp.batch_size >= 17
    assert resp.compute_us > 0
    # Pinning the served version works too.
    pinned = client.ask(x[:1], version=version)
    np.testing.assert_allclose(rows(pinned), expected[:1], rtol=1e-5, atol=1e-5)


def test_predict_stream_answers_in_order(
    client: Client, weights_dir: Path, digits: Dataset
) -> None:
    x = digits.x_test[:6]
    expected, _ = reference_logits(weights_dir, x)
    requests = [
        inference_pb2.PredictRequest(
            model="digits", input=encode_tensor(x[i : i + 1]), request_id=f"s{i}"
        )
        for i in range(6)
    ]
    responses = list(client.stream(iter(requests), timeout=30))
    assert [r.request_id for r in responses] == [f"s{i}" for i in range(6)]
    got = np.concatenate([rows(r) for r in responses])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_predict_stream_error_ends_the_stream_with_its_status(client: Client) -> None:
    good = inference_pb2.PredictRequest(
        model="digits", input=encode_tensor(np.zeros((1, 1, 8, 8), np.float32))
    )
    bad = inference_pb2.PredictRequest(model="nope", input=good.input)
    seen: list[inference_pb2.PredictResponse] = []

    def run() -> None:
        seen.extend(client.stream(iter([good, bad, good]), timeout=30))

    code, details = code_of(run)
    assert code == Code.NOT_FOUND
    assert "nope" in details
    assert len(seen) == 1


def test_model_info(client: Client, server: RunningServer) -> None:
    info = client.info(inference_pb2.ModelInfoRequest(model="digits"), timeout=10)
    assert info.model == "digits"
    assert info.version == server.version
    assert info.input_spec.dtype == "float32"
    assert list(info.input_spec.shape) == [1, 8, 8]
    assert list(info.output_spec.shape) == [10]
    assert info.input_spec.data == b""
    assert 0.0 < info.heldout_accuracy <= 1.0
    code, _ = code_of(lambda: client.info(inference_pb2.ModelInfoRequest(model="x"), timeout=10))
    assert code == Code.NOT_FOUND


def test_health_reports_serving_for_both_names(client: Client) -> None:
    assert client.status("") == health_pb2.HealthCheckResponse.SERVING
    assert client.status(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    code, _ = code_of(lambda: client.status("no.such.Service"))
    assert code == Code.NOT_FOUND
    watch = client.channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    updates = watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    assert next(updates).status == health_pb2.HealthCheckResponse.SERVING
    updates.cancel()


# -- bad input, each followed by a good request --------------------------------------


def _ok(client: Client) -> None:
    resp = client.ask(np.zeros((2, 1, 8, 8), np.float32))
    assert rows(resp).shape == (2, 10)


def _tensor(dtype: str, shape: list[int], data: bytes) -> inference_pb2.Tensor:
    return inference_pb2.Tensor(dtype=dtype, shape=shape, data=data)


_GOOD = np.zeros((1, 1, 8, 8), np.float32)
BAD_REQUESTS = {
    "wrong dtype (supported, not the model's)": (
        inference_pb2.PredictRequest(model="digits", input=encode_tensor(_GOOD.astype(np.float16))),
        Code.INVALID_ARGUMENT,
        "dtype",
    ),
    "unsupported dtype": (
        inference_pb2.PredictRequest(
            model="digits", input=_tensor("float64", [1, 1, 8, 8], bytes(512))
        ),
        Code.INVALID_ARGUMENT,
        "float64",
    ),
    "no batch dimension": (
        inference_pb2.PredictRequest(model="digits", input=encode_tensor(_GOOD[0])),
        Code.INVALID_ARGUMENT,
        "shape",
    ),
    "wrong sample shape": (
        inference_pb2.PredictRequest(
            model="digits", input=encode_tensor(np.zeros((1, 1, 8, 9), np.float32))
        ),
        Code.INVALID_ARGUMENT,
        "shape",
    ),
    "truncated tensor": (
        inference_pb2.PredictRequest(
            model="digits", input=_tensor("float32", [1, 1, 8, 8], bytes(256 - 3))
        ),
        Code.INVALID_ARGUMENT,
        "truncated",
    ),
    "empty batch": (
        inference_pb2.PredictRequest(
            model="digits", input=encode_tensor(np.zeros((0, 1, 8, 8), np.float32))
        ),
        Code.INVALID_ARGUMENT,
        "empty",
    ),
    "NaN input": (
        inference_pb2.PredictRequest(
            model="digits", input=encode_tensor(np.full((1, 1, 8, 8), np.nan, np.float32))
        ),
        Code.INVALID_ARGUMENT,
        "NaN",
    ),
    "no model name": (
        inference_pb2.PredictRequest(input=encode_tensor(_GOOD)),
        Code.INVALID_ARGUMENT,
        "names no model",
    ),
    "shape numpy cannot hold (zero-sized)": (
        inference_pb2.PredictRequest(
            model="digits", input=_tensor("float32", [0, 2**62, 2**62], b"")
        ),
        Code.INVALID_ARGUMENT,
        "too large",
    ),
    "negative dimension": (
        inference_pb2.PredictRequest(model="digits", input=_tensor("float32", [-1, 1, 8, 8], b"")),
        Code.INVALID_ARGUMENT,
        "negative",
    ),
    "more samples than max_samples_per_request": (
        inference_pb2.PredictRequest(
            model="digits", input=encode_tensor(np.zeros((257, 1, 8, 8), np.float32))
        ),
        Code.INVALID_ARGUMENT,
        "at most 256 per request",
    ),
    "unknown model": (
        inference_pb2.PredictRequest(model="imagenet", input=encode_tensor(_GOOD)),
        Code.NOT_FOUND,
        "imagenet",
    ),
    "unknown version": (
        inference_pb2.PredictRequest(model="digits", version="0000", input=encode_tensor(_GOOD)),
        Code.NOT_FOUND,
        "0000",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_its_code_and_the_server_keeps_serving(client: Client, case: str) -> None:
    request, want, mentions = BAD_REQUESTS[case]
    code, details = code_of(lambda: client.predict(request, timeout=10))
    assert code == want, details
    assert mentions in details
    _ok(client)


def test_deadline_already_past_on_arrival_computes_nothing(
    client: Client, server: RunningServer
) -> None:
    stats = server.server.batcher_stats("digits")
    before = stats.samples
    marker = np.full((3, 1, 8, 8), 0.5, np.float32)
    code, _ = code_of(lambda: client.ask(marker, timeout=1e-6))
    assert code == Code.DEADLINE_EXCEEDED
    _ok(client)  # 2 samples
    assert stats.samples == before + 2  # the 3 expired samples never reached the model


def test_oversized_message_is_refused_by_grpc(weights_dir: Path) -> None:
    config = InferenceServerConfig(weights=weights_dir, max_message_bytes=64 * 1024)
    with start_in_thread(config) as running, grpc.insecure_channel(running.address) as ch:
        c = Client(ch)
        big = np.zeros((100, 1, 8, 8), np.float32)  # 100 * 256 B = 25.6 KB: fits
        assert decode_tensor(c.ask(big).output).shape == (100, 10)
        huge = np.zeros((300, 1, 8, 8), np.float32)  # 76.8 KB: over the limit
        code, _ = code_of(lambda: c.ask(huge))
        assert code == Code.RESOURCE_EXHAUSTED
        _ok(c)


def test_max_samples_per_request_is_the_configured_cap(heavy: TorchServedModel) -> None:
    config = InferenceServerConfig(max_samples_per_request=4)
    with (
        start_in_thread(config, models=[heavy]) as running,
        grpc.insecure_channel(running.address) as ch,
    ):
        c = Client(ch)
        assert rows(c.ask(np.zeros((4, 1, 8, 8), np.float32))).shape == (4, 10)
        samples_before = running.server.batcher_stats("digits").samples
        code, details = code_of(lambda: c.ask(np.zeros((5, 1, 8, 8), np.float32)))
        assert code == Code.INVALID_ARGUMENT
        assert "5 samples" in details
        assert "at most 4" in details
        # Refused before the model saw it.
        assert running.server.batcher_stats("digits").samples == samples_before


def test_decode_tensor_bounds_the_size_a_shape_describes() -> None:
    from edgefl.proto.tensors import TensorError

    for shape in ([0, 2**62, 2**62], [2**40, 2**40, 0], [2**31, 0], [0, 2**63 - 1]):
        with pytest.raises(TensorError, match="too large"):
            decode_tensor(_tensor("float32", shape, b""))
    assert decode_tensor(_tensor("float32", [0, 1, 8, 8], b"")).shape == (0, 1, 8, 8)
    assert decode_tensor(_tensor("int8", [2**20, 0], b"")).shape == (2**20, 0)


def test_over_concurrency_is_refused_at_once_then_recovers(heavy: TorchServedModel) -> None:
    gated = GatedModel(heavy)
    config = InferenceServerConfig(max_concurrency=2, max_batch=1)
    with (
        start_in_thread(config, models=[gated]) as running,
        grpc.insecure_channel(running.address) as ch,
    ):
        c = Client(ch)
        x = np.zeros((1, 1, 8, 8), np.float32)
        req = inference_pb2.PredictRequest(model="digits", input=encode_tensor(x))
        held = [c.predict.future(req, timeout=30) for _ in range(2)]
        wait_for(lambda: running.server.inflight == 2, 10, "two requests in flight")
        code, details = code_of(lambda: c.predict(req, timeout=30))
        assert code == Code.RESOURCE_EXHAUSTED
        assert "limit of 2" in details
        assert running.server.refused["RESOURCE_EXHAUSTED"] == 1
        gated.gate.set()
        for f in held:
            assert decode_tensor(f.result().output).shape == (1, 10)
        _ok(c)


# -- cancellation --------------------------------------------------------------------


def test_deadline_passing_mid_compute_stops_the_work() -> None:
    slow = SlowModel()
    with (
        start_in_thread(InferenceServerConfig(), models=[slow]) as running,
        grpc.insecure_channel(running.address) as ch,
    ):
        c = Client(ch)
        x = np.zeros((1, 4), np.float32)
        code, _ = code_of(lambda: c.ask(x, model="slow", timeout=0.5))
        assert code == Code.DEADLINE_EXCEEDED
        assert slow.started.is_set()
        # Observed on the server side: the forward pass was told to stop and did.
        assert slow.stopped.wait(20), "the forward pass kept computing after the deadline"
        assert not slow.completed
        wait_for(
            lambda: running.server.batcher_stats("slow").cancelled_in_compute == 1,
            10,
            "the batcher to count the stopped pass",
        )
        # The handler ended either way: cancelled by grpc.aio, or it saw the pass stop first.
        wait_for(
            lambda: (
                running.server.refused["CANCELLED"] + running.server.refused["DEADLINE_EXCEEDED"]
                == 1
            ),
            10,
            "the handler to end",
        )
        assert c.status() == health_pb2.HealthCheckResponse.SERVING


def test_client_cancelling_stops_the_work() -> None:
    slow = SlowModel()
    with (
        start_in_thread(InferenceServerConfig(), models=[slow]) as running,
        grpc.insecure_channel(running.address) as ch,
    ):
        c = Client(ch)
        request = inference_pb2.PredictRequest(
            model="slow", input=encode_tensor(np.zeros((1, 4), np.float32))
        )
        call = c.predict.future(request)  # no deadline: only the cancel can stop it
        assert slow.started.wait(20)
        assert call.cancel()
        assert slow.stopped.wait(20), "the forward pass kept computing after the cancel"
        assert not slow.completed
        wait_for(lambda: running.server.refused["CANCELLED"] == 1, 10, "the handler cancelled")
        assert running.server.batcher_stats("slow").cancelled_in_compute == 1


def test_queued_request_whose_deadline_passes_is_dropped(heavy: TorchServedModel) -> None:
    gated = GatedModel(heavy)
    config = InferenceServerConfig(max_batch=1)
    with (
        start_in_thread(config, models=[gated]) as running,
        grpc.insecure_channel(running.address) as ch,
    ):
        c = Client(ch)
        x = np.zeros((1, 1, 8, 8), np.float32)
        first = c.predict.future(
            inference_pb2.PredictRequest(model="digits", input=encode_tensor(x)), timeout=30
        )
        assert gated.entered.wait(10)
        code, _ = code_of(lambda: c.ask(x, timeout=0.3))  # queued behind the gated one
        assert code == Code.DEADLINE_EXCEEDED
        gated.gate.set()
        first.result()
        stats = running.server.batcher_stats("digits")
        wait_for(lambda: stats.dropped_before_compute == 1, 10, "the expired item to be dropped")
        assert gated.batches == [1]  # only the first request was ever computed
        _ok(c)


# -- micro-batching ------------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [32, 1])
def test_concurrent_requests_share_a_forward_pass(
    heavy: TorchServedModel, weights_dir: Path, digits: Dataset, max_batch: int
) -> None:
    gated = GatedModel(heavy)
    config = InferenceServerConfig(max_batch=max_batch)
    x = digits.x_test[:12]
    expected, _ = reference_logits(weights_dir, x)
    sizes = [1, 2, 3, 1, 2, 3]  # 12 samples in 6 requests
    starts = np.cumsum([0, *sizes[:-1]])
    with (
        start_in_thread(config, models=[gated]) as running,
        grpc.insecure_channel(running.address) as ch,
    ):
        c = Client(ch)
        blocker = c.predict.future(
            inference_pb2.PredictRequest(model="digits", input=encode_tensor(x[:1])), timeout=30
        )
        assert gated.entered.wait(10)  # the worker is busy: the next requests queue up
        futures = [
            c.predict.future(
                inference_pb2.PredictRequest(
                    model="digits", input=encode_tensor(x[s : s + n]), request_id=str(i)
                ),
                timeout=30,
            )
            for i, (s, n) in enumerate(zip(starts, sizes, strict=True))
        ]
        wait_for(lambda: running.server.inflight == 7, 10, "all requests admitted")
        gated.gate.set()
        blocker.result()
        responses = [f.result() for f in futures]
    for resp, s, n in zip(responses, starts, sizes, strict=True):
        np.testing.assert_allclose(rows(resp), expected[s : s + n], rtol=1e-5, atol=1e-5)
    if max_batch == 1:
        assert gated.batches == [1, *sizes]
        assert {r.batch_size for r in responses} == set(sizes)
    else:
        assert gated.batches == [1, 12]  # the six queued requests went in one pass
        assert {r.batch_size for r in responses} == {12}
        assert all(r.queue_us > 0 for r in responses)


def inflight_is(running: RunningServer, n: int) -> Callable[[], bool]:
    return lambda: running.server.inflight == n


def test_batches_respect_max_batch_in_arrival_order(
    heavy: TorchServedModel, weights_dir: Path, digits: Dataset
) -> None:
    gated = GatedModel(heavy)
    sizes = [3, 2, 1, 6, 1]  # 6 is over max_batch: it runs alone
    x = digits.x_test[: sum(sizes)]
    expected, _ = reference_logits(weights_dir, x)
    starts = np.cumsum([0, *sizes[:-1]])
    with (
        start_in_thread(InferenceServerConfig(max_batch=4), models=[gated]) as running,
        grpc.insecure_channel(running.address) as ch,
    ):
        c = Client(ch)
        blocker = c.predict.future(
            inference_pb2.PredictRequest(model="digits", input=encode_tensor(x[:1])), timeout=30
        )
        assert gated.entered.wait(10)
        futures = []
        for s, n in zip(starts, sizes, strict=True):  # one at a time: arrival order is known
            futures.append(
                c.predict.future(
                    inference_pb2.PredictRequest(model="digits", input=encode_tensor(x[s : s + n])),
                    timeout=30,
                )
            )
            wait_for(inflight_is(running, 1 + len(futures)), 10, "the request admitted")
        gated.gate.set()
        blocker.result()
        responses = [f.result() for f in futures]
    assert gated.batches == [1, 3, 3, 6, 1]
    assert [r.batch_size for r in responses] == [3, 3, 3, 6, 1]
    for resp, s, n in zip(responses, starts, sizes, strict=True):
        np.testing.assert_allclose(rows(resp), expected[s : s + n], rtol=1e-5, atol=1e-5)


# -- configuration and the command ---------------------------------------------------


def test_config_refuses_half_tls_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls.cert_file and tls.key_file"):
        validate_config(InferenceServerConfig, {"tls": {"cert_file": str(tmp_path / "c.pem")}})
    with pytest.raises(ConfigError, match=r"crl needs tls.ca_file"):
        validate_config(InferenceServerConfig, {"crl": str(tmp_path / "crl.pem")})
    with pytest.raises(ConfigError, match="max_batch"):
        validate_config(InferenceServerConfig, {"max_batch": 0})


def test_config_accepts_the_old_tls_keys_with_a_warning(tmp_path: Path) -> None:
    old = {"tls_cert": "s.pem", "tls_key": "s.key", "client_ca": "ca.pem"}
    with pytest.warns(RenamedKeyWarning, match="tls_cert is renamed tls.cert_file"):
        config = validate_config(InferenceServerConfig, old, source="server.yaml")
    assert config.tls == TlsFiles(
        cert_file=Path("s.pem"), key_file=Path("s.key"), ca_file=Path("ca.pem")
    )
    assert [r.new for r in config_renames(config)] == [
        "tls.cert_file",
        "tls.key_file",
        "tls.ca_file",
    ]


@pytest.mark.slow
def test_cli_prints_its_address_and_stops_on_sigterm(
    weights_dir: Path, tmp_path: Path, edgefl_procs: EdgeflProcesses
) -> None:
    stdout = tmp_path / "inference.out"
    proc = edgefl_procs.start(
        *("server", "inference", "--model", "digits"),
        *("--weights", str(weights_dir), "--port", "0", "--json"),
        log="inference.log",
        stdout=stdout,
        env={**os.environ, "EDGEFL_LOG_LEVEL": "WARNING"},
    )
    line = first_line(proc, stdout, 120)
    info = json.loads(line)
    assert info["model"] == "digits"
    assert info["port"] > 0
    assert info["address"] == f"127.0.0.1:{info['port']}"
    with grpc.insecure_channel(info["address"]) as ch:
        c = Client(ch)
        assert c.status(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        assert c.ask(np.zeros((1, 1, 8, 8), np.float32)).version == info["version"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert stdout.read_text() == line  # nothing but the one JSON line on stdout


# -- TLS and mutual TLS with the fleet CA --------------------------------------------


@dataclass
class Fleet:
    ca: FleetCA
    server: IssuedCert
    devices: dict[str, IssuedCert]
    stranger: IssuedCert  # a device certificate from another CA


@pytest.fixture
def tls_fleet(tmp_path: Path) -> Fleet:
    ca = FleetCA.create(tmp_path / "ca")
    other = FleetCA.create(tmp_path / "other-ca", common_name="someone else's CA")
    return Fleet(
        ca=ca,
        server=ca.issue_server_cert([], ["127.0.0.1"]),
        devices={d: ca.issue_device_cert(d) for d in ("pi-01", "pi-02")},
        stranger=other.issue_device_cert("pi-01"),
    )


def tls_channel(tls_fleet: Fleet, address: str, device: IssuedCert | None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls_fleet.ca.cert_pem,
        private_key=device.key_pem if device is not None else None,
        certificate_chain=device.cert_pem if device is not None else None,
    )
    return grpc.secure_channel(address, creds)


def mtls_config(tls_fleet: Fleet) -> InferenceServerConfig:
    return InferenceServerConfig(
        tls=TlsFiles(
            cert_file=tls_fleet.server.cert_path,
            key_file=tls_fleet.server.key_path,
            ca_file=tls_fleet.ca.cert_path,
        ),
        crl=tls_fleet.ca.crl_path,
    )


def test_mutual_tls_accepts_fleet_devices_and_refuses_another_ca(
    tls_fleet: Fleet, heavy: TorchServedModel
) -> None:
    with start_in_thread(mtls_config(tls_fleet), models=[heavy]) as running:
        with tls_channel(tls_fleet, running.address, tls_fleet.devices["pi-01"]) as ch:
            c = Client(ch)
            assert c.status(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
            _ok(c)
        with tls_channel(tls_fleet, running.address, tls_fleet.stranger) as ch:
            code, _ = code_of(lambda: _ok(Client(ch)))
            assert code == Code.UNAVAILABLE  # refused in the handshake
        with tls_channel(tls_fleet, running.address, None) as ch:
            code, _ = code_of(lambda: _ok(Client(ch)))
            assert code == Code.UNAVAILABLE  # no client certificate at all
        with grpc.insecure_channel(running.address) as ch:
            code, _ = code_of(lambda: _ok(Client(ch)))
            assert code == Code.UNAVAILABLE  # plaintext to a TLS port
        with tls_channel(tls_fleet, running.address, tls_fleet.devices["pi-02"]) as ch:
            _ok(Client(ch))  # the server kept serving through all of that
        assert running.server.completed == 2


def test_revoked_device_is_refused_on_its_next_call(
    tls_fleet: Fleet, heavy: TorchServedModel, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        start_in_thread(mtls_config(tls_fleet), models=[heavy]) as running,
        tls_channel(tls_fleet, running.address, tls_fleet.devices["pi-01"]) as ch1,
        tls_channel(tls_fleet, running.address, tls_fleet.devices["pi-02"]) as ch2,
    ):
        one, two = Client(ch1), Client(ch2)
        _ok(one)
        _ok(two)
        # A stream opened before the revocation is cut on its next message.
        outbox: queue.Queue[inference_pb2.PredictRequest | None] = queue.Queue()
        request = inference_pb2.PredictRequest(
            model="digits", input=encode_tensor(np.zeros((1, 1, 8, 8), np.float32))
        )
        stream = two.stream(iter(outbox.get, None), timeout=30)
        outbox.put(request)
        assert next(stream).model == "digits"
        tls_fleet.ca.revoke(tls_fleet.devices["pi-02"].serial)  # rewrites crl.pem; no restart
        outbox.put(request)
        code, details = code_of(lambda: next(stream))
        assert code == Code.UNAUTHENTICATED
        outbox.put(None)
        code, details = code_of(lambda: _ok(two))
        assert code == Code.UNAUTHENTICATED
        assert "pi-02" in details
        assert "revoked" in details
        code, _ = code_of(
            lambda: two.info(inference_pb2.ModelInfoRequest(model="digits"), timeout=10)
        )
        assert code == Code.UNAUTHENTICATED
        code, _ = code_of(lambda: two.status(SERVICE_NAME))  # health is refused too
        assert code == Code.UNAUTHENTICATED
        _ok(one)  # other devices are unaffected
        assert one.status(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        assert any(
            "revoked" in r.getMessage() and "pi-02" in r.getMessage() for r in caplog.records
        )
    # A fresh connection after a restart is refused too (the CRL is read at start-up).
    with (
        start_in_thread(mtls_config(tls_fleet), models=[heavy]) as running,
        tls_channel(tls_fleet, running.address, tls_fleet.devices["pi-02"]) as ch,
    ):
        code, _ = code_of(lambda: _ok(Client(ch)))
        assert code == Code.UNAUTHENTICATED


def test_server_only_tls(tls_fleet: Fleet, heavy: TorchServedModel) -> None:
    config = InferenceServerConfig(
        tls=TlsFiles(cert_file=tls_fleet.server.cert_path, key_file=tls_fleet.server.key_path)
    )
    with (
        start_in_thread(config, models=[heavy]) as running,
        tls_channel(tls_fleet, running.address, None) as ch,
    ):
        _ok(Client(ch))


def test_crl_from_another_ca_is_refused_at_start(
    tls_fleet: Fleet, heavy: TorchServedModel, tmp_path: Path
) -> None:
    other = FleetCA.load(tmp_path / "other-ca")
    config = mtls_config(tls_fleet).model_copy(update={"crl": other.crl_path})
    with pytest.raises(ConfigError, match="not signed by the client CA"):
        start_in_thread(config, models=[heavy])


def test_device_missing_from_the_registry_is_refused(
    tls_fleet: Fleet, heavy: TorchServedModel, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    with session_factory(engine)() as session:
        session.add(Device(device_id="pi-01", fleet="f1", first_seen=now, last_seen=now))
        session.commit()
    engine.dispose()
    config = mtls_config(tls_fleet).model_copy(update={"registry_url": url})
    with (
        start_in_thread(config, models=[heavy]) as running,
        tls_channel(tls_fleet, running.address, tls_fleet.devices["pi-01"]) as ch1,
        tls_channel(tls_fleet, running.address, tls_fleet.devices["pi-02"]) as ch2,
    ):
        _ok(Client(ch1))
        code, details = code_of(lambda: _ok(Client(ch2)))
        assert code == Code.PERMISSION_DENIED
        assert "pi-02" in details
        assert "registry" in details
        _ok(Client(ch1))


def test_registry_enrollment_decides_over_the_devices_table(
    tls_fleet: Fleet, heavy: TorchServedModel, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    with session_factory(engine)() as session:
        # pi-01 has published (devices row) but its enrollment was revoked; pi-02 was just
        # admitted and has not published yet.
        session.add(Device(device_id="pi-01", fleet="f1", first_seen=now, last_seen=now))
        for n, (device, status) in enumerate((("pi-01", "revoked"), ("pi-02", "admitted"))):
            session.add(
                Enrollment(
                    device_id=device,
                    fleet="f1",
                    status=status,
                    cert_serial=f"{n + 1:x}",
                    cert_pem="",
                    node_public_key="",
                    node_id=str(n + 1),
                    admitted_at=now,
                    revoked_at=now if status == "revoked" else None,
                )
            )
        session.commit()
    engine.dispose()
    config = mtls_config(tls_fleet).model_copy(update={"registry_url": url})
    with (
        start_in_thread(config, models=[heavy]) as running,
        tls_channel(tls_fleet, running.address, tls_fleet.devices["pi-01"]) as ch1,
        tls_channel(tls_fleet, running.address, tls_fleet.devices["pi-02"]) as ch2,
    ):
        _ok(Client(ch2))
        code, details = code_of(lambda: _ok(Client(ch1)))
        assert code == Code.PERMISSION_DENIED
        assert "pi-01" in details


def test_health_is_not_serving_while_the_model_loads(
    weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgefl.server.inference.service as service

    loading = threading.Event()
    release = threading.Event()
    real = load_or_train

    def slow_load(*args: object, **kwargs: object) -> TorchServedModel:
        loading.set()
        assert release.wait(30)
        return real("digits", weights_dir)

    monkeypatch.setattr(service, "load_or_train", slow_load)
    server = service.InferenceServer(InferenceServerConfig(weights=weights_dir))

    async def run() -> None:
        start = asyncio.ensure_future(server.start())
        while not loading.is_set():
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(server.address) as ch:
            check = ch.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            predict = ch.unary_unary(
                f"/{SERVICE_NAME}/Predict",
                request_serializer=inference_pb2.PredictRequest.SerializeToString,
                response_deserializer=inference_pb2.PredictResponse.FromString,
            )
            request = inference_pb2.PredictRequest(
                model="digits", input=encode_tensor(np.zeros((1, 1, 8, 8), np.float32))
            )
            for name in ("", SERVICE_NAME):
                resp = await check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await predict(request, timeout=10)
            assert info.value.code() == Code.UNAVAILABLE
            assert "loading" in (info.value.details() or "")
            release.set()
            await start
            for name in ("", SERVICE_NAME):
                resp = await check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            assert (await predict(request, timeout=10)).model == "digits"
        await server.stop()

    try:
        asyncio.run(run())
    finally:
        release.set()


def test_start_up_errors_are_clear(
    weights_dir: Path, tmp_path: Path, server: RunningServer
) -> None:
    with pytest.raises(UnknownModelError, match="no heavy model named 'imagenet'"):
        start_in_thread(InferenceServerConfig(model="imagenet", weights=weights_dir))
    with pytest.raises(BadInputError, match="cannot listen"):
        start_in_thread(InferenceServerConfig(weights=weights_dir, port=server.port))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "digits.pt").write_bytes(b"not a state dict")
    with pytest.raises(ArtifactError, match="cannot load cached weights"):
        start_in_thread(InferenceServerConfig(weights=corrupt))
    # The module's server is unaffected.
    with grpc.insecure_channel(server.address) as ch:
        _ok(Client(ch))


@pytest.mark.slow
def test_cli_sigterm_while_training_stops_without_caching(
    tmp_path: Path, edgefl_procs: EdgeflProcesses
) -> None:
    weights = tmp_path / "empty-cache"
    stdout = tmp_path / "inference.out"
    proc = edgefl_procs.start(
        *("server", "inference", "--model", "digits"),
        *("--weights", str(weights), "--train-epochs", "50", "--json"),
        log="inference.log",  # stderr
        stdout=stdout,
    )
    # Fails at once if it exits before training.
    proc.wait_for_log("training digits", 300)  # before epoch 1 ends
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(300) == 0  # at most one epoch later
    assert stdout.read_text() == ""  # never announced an address
    assert not (weights / "digits.pt").exists()
