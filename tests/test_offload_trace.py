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
