"""The benchmark's shaping relay: bytes intact and in order whatever it does to timing."""

from __future__ import annotations

import importlib
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# benchmarks/ is not a package (and a third-party distribution installs one called
# "benchmarks"), so the relay is imported from its folder, as the benchmark script does.
_BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if _BENCHMARKS not in sys.path:
    sys.path.insert(0, _BENCHMARKS)
_netshape = importlib.import_module("netshape")
LinkShape = _netshape.LinkShape
ShapingProxy = _netshape.ShapingProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server on a free loopback port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

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


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        assert chunk, "connection closed early"
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def test_lossy_rate_limited_delayed_link_delivers_every_byte_in_order(echo_port: int) -> None:
    shape = LinkShape(rtt_ms=2.0, uplink_bps=50e6, loss=0.3, rto_ms=5.0)
    with (
        ShapingProxy(echo_port, shape, seed=3) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock,
    ):
        sent = b""
        for i in range(60):
            message = bytes([i]) * (100 + 37 * i)
            sock.sendall(message)
            assert _recv_exactly(sock, len(message)) == message
            sent += message
        assert proxy.chunks >= 120  # at least one chunk per message each way
        assert proxy.held_chunks > 0  # some were "lost" and still arrived, in order


def test_refused_upstream_closes_the_client_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        closed_port = int(placeholder.getsockname()[1])
    with (
        ShapingProxy(closed_port, LinkShape(rtt_ms=1.0)) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock,
    ):
        try:
            data = sock.recv(1)
        except ConnectionResetError:
            data = b""
        assert data == b""


def test_link_shape_refuses_impossible_values() -> None:
    with pytest.raises(ValueError, match="loss"):
        LinkShape(loss=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        LinkShape(rtt_ms=-1)
    with pytest.raises(ValueError, match="rate"):
        LinkShape(uplink_bps=0)
