"""Offload under a network that changes: the relay's trace replay, and the agent's loop through it.

The relay (``benchmarks/netshape.py``) and the loop driver (``benchmarks/trace_run.py``)
are the benchmark's own; the tests run them on real sockets, a real inference server on
port 0 and a real LiteRT interpreter.
"""

from __future__ import annotations

import importlib
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is not a package (and a third-party distribution installs one called
# "benchmarks"), so its modules are imported from the folder, as the scripts do.
_BENCHMARKS = str(ROOT / "benchmarks")
if _BENCHMARKS not in sys.path:
    sys.path.insert(0, _BENCHMARKS)
_netshape = importlib.import_module("netshape")
_trace_run = importlib.import_module("trace_run")
LinkShape = _netshape.LinkShape
NetworkTrace = _netshape.NetworkTrace
ShapingProxy = _netshape.ShapingProxy
TraceError = _netshape.TraceError

SHIPPED = ROOT / "benchmarks" / "traces" / "cellular.json"


# --- the trace file ---------------------------------------------------------------------


def test_the_shipped_trace_changes_every_few_seconds_with_outages_of_5_to_30_s() -> None:
    trace = NetworkTrace.load(SHIPPED)
    assert 120.0 <= trace.duration_s <= 180.0
    outages = trace.outages()
    lengths = sorted(end - start for start, end, _ in outages)
    assert lengths[0] >= 5.0
    assert lengths[-1] <= 30.0
    assert any(reset for *_, reset in outages)  # one ends on another address
    assert any(not reset for *_, reset in outages)  # one the connections survive
    others = [seg for seg in trace.segments if not seg.outage]
    assert max(seg.duration_s for seg in others) <= 12.0
    assert len({seg.shape.rtt_ms for seg in others}) >= 5
    assert "made up" in trace.about.lower()  # and says what it is modelled on
    # The document round-trips through the reader.
    assert NetworkTrace.from_dict(json.loads(SHIPPED.read_text())) == trace
    assert NetworkTrace.from_dict(trace.to_dict()) == trace


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"segments": []}, "non-empty list"),
        ({"segments": [{"duration_s": 1}]}, "segment 0: rtt_ms is required"),
        ({"segments": [{"duration_s": 0, "rtt_ms": 5}]}, "duration_s must be > 0"),
        ({"segments": [{"duration_s": 1, "rtt_ms": 5, "jitter": 2}]}, "unknown keys"),
        ({"segments": [{"duration_s": 1, "rtt_ms": 5, "reset": True}]}, "reset: true only"),
        ({"segments": [{"duration_s": 1, "rtt_ms": 5, "loss": 1.0}]}, "loss must be in"),
        ({"segments": [{"duration_s": 1, "rtt_ms": "fast"}]}, "rtt_ms must be a finite"),
        ({"segments": [{"duration_s": 1, "rtt_ms": 5, "uplink_kbps": 0}]}, "omit it"),
        ({"segment": []}, "unknown keys"),
    ],
)
def test_a_bad_trace_is_refused_with_what_to_fix(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(TraceError, match=message):
        NetworkTrace.from_dict(doc)


def test_an_unreadable_trace_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        NetworkTrace.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TraceError, match="not JSON"):
        NetworkTrace.load(bad)


# --- the relay replaying a trace ---------------------------------------------------------


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server on a free loopback port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(5)
    server.close()


def _trace(*segments: dict[str, Any], rto_ms: float = 50.0) -> Any:
    return NetworkTrace.from_dict({"name": "t", "rto_ms": rto_ms, "segments": list(segments)})


def _echo(sock: socket.socket, message: bytes) -> float:
    """Send ``message``, wait for all of it back; the seconds it took."""
    start = time.monotonic()
    sock.sendall(message)
    got = b""
    while len(got) < len(message):
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        got += chunk
    assert got == message
    return time.monotonic() - start


def test_the_delay_changes_on_schedule(echo_port: int) -> None:
    trace = _trace(
        {"duration_s": 0.8, "rtt_ms": 10},
        {"duration_s": 5, "rtt_ms": 150},
    )
    with (
        ShapingProxy(echo_port, LinkShape(rtt_ms=0.0), trace=trace) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock,
    ):
        before = _echo(sock, b"a")  # the fixed shape until the trace starts
        origin = proxy.start_trace()
        first = _echo(sock, b"b")
        time.sleep(max(0.0, origin + 0.9 - time.monotonic()))
        second = _echo(sock, b"c")
    assert before < 0.05
    assert 0.010 <= first < 0.1
    assert second >= 0.150


def test_an_outage_holds_every_byte_until_tcp_retransmits_after_it(echo_port: int) -> None:
    trace = _trace(
        {"duration_s": 0.3, "rtt_ms": 2},
        {"duration_s": 1.0, "outage": True},
        {"duration_s": 5, "rtt_ms": 2},
        rto_ms=50.0,
    )
    with (
        ShapingProxy(echo_port, LinkShape(rtt_ms=2.0), trace=trace) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock,
    ):
        origin = proxy.start_trace()
        time.sleep(max(0.0, origin + 0.4 - time.monotonic()))
        sent_at = time.monotonic() - origin
        messages = [bytes([i]) * (500 + i) for i in range(5)]
        for message in messages:
            sock.sendall(message)
        got = b""
        while len(got) < sum(map(len, messages)):
            chunk = sock.recv(65536)
            assert chunk
            got += chunk
        back_at = time.monotonic() - origin
        lost = proxy.outage_lost_chunks
    assert got == b"".join(messages)  # intact and in order
    # Sent 0.1 s into the outage: retransmitted after 50, 150, 350, 750 ms, 1.55 s; the
    # first retransmission after the end (1.3 s) is the one at sent + 1.55 s.
    assert back_at >= 1.3
    assert back_at >= sent_at + 1.5
    assert back_at < sent_at + 3.0
    assert lost >= 1


def test_an_outage_with_reset_resets_the_old_connections(echo_port: int) -> None:
    trace = _trace(
        {"duration_s": 0.2, "rtt_ms": 2},
        {"duration_s": 0.5, "outage": True, "reset": True},
        {"duration_s": 5, "rtt_ms": 2},
    )
    with ShapingProxy(echo_port, LinkShape(rtt_ms=2.0), trace=trace) as proxy:
        old = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        _echo(old, b"before")
        origin = proxy.start_trace()
        time.sleep(max(0.0, origin + 0.8 - time.monotonic()))
        with pytest.raises(ConnectionResetError):  # RST, not FIN (recv would return b"")
            old.recv(1)
        old.close()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as new:
            assert _echo(new, b"after") < 0.5
        assert proxy.resets == 1


def test_a_connection_opened_in_an_outage_waits_for_the_syn_retry(echo_port: int) -> None:
    trace = _trace({"duration_s": 0.5, "outage": True}, {"duration_s": 5, "rtt_ms": 2})
    with ShapingProxy(echo_port, LinkShape(rtt_ms=2.0), trace=trace) as proxy:
        origin = proxy.start_trace()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            _echo(sock, b"hello")
            through = time.monotonic() - origin
        assert proxy.syn_delayed == 1
    # The SYN is retried one second after the first: the first retry after the outage.
    assert 0.95 <= through < 2.0


# --- the offload client over a slow or silent link ---------------------------------------

MODEL = "digits"
INPUT_SHAPE = (1, 8, 8)


def _net() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


@pytest.fixture(scope="module")
def tls_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Any]]:
    """A real inference server with mutual TLS; yields (server, ca, device cert)."""
    from edgefl.config import TlsFiles
    from edgefl.server.fleet_ca import FleetCA
    from edgefl.server.inference import InferenceServerConfig, TorchServedModel, start_in_thread

    ca = FleetCA.create(tmp_path_factory.mktemp("ca"))
    cert = ca.issue_server_cert(["localhost"], ips=["127.0.0.1"])
    assert cert.key_path is not None
    config = InferenceServerConfig(
        model=MODEL,
        tls=TlsFiles(cert_file=cert.cert_path, key_file=cert.key_path, ca_file=ca.cert_path),
        crl=ca.crl_path,
    )
    served = TorchServedModel(MODEL, _net(), input_shape=INPUT_SHAPE)
    with start_in_thread(config, models=[served]) as running:
        yield running, ca, ca.issue_device_cert("pi-slow-link")


@pytest.fixture(scope="module")
def cloud() -> Iterator[Any]:
    """A real inference server, plaintext, serving the tiny net."""
    from edgefl.server.inference import InferenceServerConfig, TorchServedModel, start_in_thread

    served = TorchServedModel(MODEL, _net(), input_shape=INPUT_SHAPE)
    with start_in_thread(InferenceServerConfig(model=MODEL), models=[served]) as running:
        yield running


def _client(port: int, tls: dict[str, Any] | None = None) -> Any:
    from edgefl.edge_agent.offload import InferenceClient
    from edgefl.edge_agent.offload.config import CloudConfig

    return InferenceClient(
        CloudConfig.model_validate(
            {"target": {"host": "127.0.0.1", "port": port}, "model": MODEL, "tls": tls}
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("rtt_ms", [300.0, 700.0])
def test_the_offload_client_connects_with_tls_over_a_slow_link(
    tls_cloud: tuple[Any, Any, Any], rtt_ms: float
) -> None:
    """A handshake of a few round trips fits in one attempt (it took 3 at 300 ms, and at
    700 ms none ever completed, when the connect timeout was 200 ms)."""
    running, ca, device = tls_cloud
    tls = {"ca_file": ca.cert_path, "cert_file": device.cert_path, "key_file": device.key_path}
    with ShapingProxy(running.port, LinkShape(rtt_ms=rtt_ms)) as proxy:
        client = _client(proxy.port, tls)
        try:
            start = time.monotonic()
            assert client.wait_connected(15.0)
            took = time.monotonic() - start
            assert client.health(timeout_s=5.0)
            attempts = proxy.connections
        finally:
            client.close()
    assert attempts == 1, f"{attempts} connection attempts"
    assert took < 5 * rtt_ms / 1000.0


@pytest.mark.slow
def test_a_connection_silenced_by_an_outage_is_replaced_after_it(cloud: Any) -> None:
    """After 13.5 s of silence TCP's next retransmission is about 12 s away; keepalive
    drops the dead connection during the outage, so the health check passes within a
    few seconds of the outage's end on a new one."""
    trace = _trace(
        {"duration_s": 0.5, "rtt_ms": 20},
        {"duration_s": 13.5, "outage": True},
        {"duration_s": 60, "rtt_ms": 20},
        rto_ms=200.0,
    )
    from edgefl.edge_agent.offload import CloudError

    with ShapingProxy(cloud.port, LinkShape(rtt_ms=20.0), trace=trace) as proxy:
        client = _client(proxy.port)
        try:
            assert client.wait_connected(5.0)
            assert client.health(timeout_s=1.0)
            origin = proxy.start_trace()
            end = origin + 14.0
            back: float | None = None
            while back is None and time.monotonic() < end + 20.0:
                try:  # the predictor's health loop: every 0.5 s, 1 s deadline
                    if client.health(timeout_s=1.0) and time.monotonic() > end:
                        back = time.monotonic() - end
                except CloudError:
                    pass
                time.sleep(0.5)
        finally:
            client.close()
        connections = proxy.connections
    assert back is not None
    assert back < 5.0
    assert connections >= 2  # a new connection, not the old one retransmitting


# --- the agent's loop through a trace ---------------------------------------------------


@pytest.fixture(scope="module")
def device_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny net as an ONNX file for ONNX Runtime; returns (path, runtime key).

    Its answers are unsure, so the policy wants the cloud for every sample. ONNX rather
    than .tflite only because converting to .tflite imports litert-torch (20 s here).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    linear = _net()[1]
    weight = linear.weight.detach().numpy()
    bias = linear.bias.detach().numpy()
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "w", "b"], ["y"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    path = tmp_path_factory.mktemp("device") / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path, "onnxruntime"


@pytest.mark.slow
def test_the_loop_keeps_the_budget_through_an_outage_and_offloads_again_after_it(
    cloud: Any, device_model: tuple[Path, str]
) -> None:
    from edgefl.edge_agent.inference.config import InferenceConfig
    from edgefl.edge_agent.sources import DatasetReplayConfig, DatasetReplaySource

    budget_ms, rate_hz = 80.0, 20.0
    trace = _trace(
        {"label": "lte", "duration_s": 6, "rtt_ms": 20},
        {"label": "tunnel", "duration_s": 5, "outage": True},
        {"label": "reattach", "duration_s": 2, "rtt_ms": 150},
        {"label": "lte", "duration_s": 10, "rtt_ms": 20},
        rto_ms=200.0,
    )
    replay = DatasetReplayConfig(
        name="eval", split="test", rate_hz=rate_hz, stream="eval", evaluation=True
    )
    with ShapingProxy(cloud.port, LinkShape(rtt_ms=20.0), trace=trace) as proxy:
        config = InferenceConfig.model_validate(
            {
                "enabled": True,
                "mode": "adaptive",
                "budget_ms": budget_ms,
                "cloud": {"target": {"host": "127.0.0.1", "port": proxy.port}, "model": MODEL},
            }
        )
        run = _trace_run.run_through_trace(
            config,
            model=_trace_run.FixedModel(device_model[0], model="tiny"),
            runtime_key=device_model[1],
            make_source=lambda: DatasetReplaySource(replay),
            source_name=replay.name,
            start_trace=proxy.start_trace,
            duration_s=trace.duration_s,
            rate_hz=rate_hz,
        )
    answers = run.answers
    expected = int(trace.duration_s * rate_hz)
    assert run.status["dropped"] == 0
    # The source starts once it is made, a few samples' time after the trace.
    assert len(answers) >= expected - 5
    assert not run.model_errors

    # The budget holds whatever the network does: the deadline bounds every cloud call.
    late = [a for a in answers if a.latency_ms > budget_ms + 15.0]
    assert not late, f"{len(late)} answers later than the budget: {late[:3]}"

    def offloaded(lo: float, hi: float) -> float:
        inside = [a for a in answers if lo <= a.t_s < hi]
        assert inside
        return float(sum(a.where == "cloud" for a in inside) / len(inside))

    assert offloaded(1.0, 6.0) >= 0.8  # every sample is unsure, and the cloud fits
    assert offloaded(6.5, 11.0) == 0.0  # nothing gets through an outage
    assert offloaded(11.0, 13.0) <= 0.2  # 150 ms round trips do not fit 80 ms
    assert offloaded(18.0, 23.0) >= 0.8  # back, although the p90 remembers 150 ms
    found = _trace_run.recovery(answers, trace, window_s=5.0)
    assert len(found) == 1
    assert found[0]["pre_level"] >= 0.8
    assert found[0]["during"] <= 0.05
    assert found[0]["recovered"]
    assert found[0]["recovery_s"] <= 10.0
