"""The device's sample sources, attacked: the endpoint from the network and from local
senders, the watched folder by whoever can write into it.

The attacker holds no key of the device. On the network they are another host (a network
namespace joined by veth); on the device they are a process that can reach the endpoint
or write into the folder, but is not the agent.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from probes.netns import VethNamespace
from pydantic import ValidationError

from edgefl.edge_agent.sources import (
    EndpointConfig,
    EndpointHttp,
    EndpointSource,
    EndpointUnixSocket,
    FolderConfig,
    FolderSource,
)
from edgefl.errors import ConfigError

TOKEN = "a-token-only-the-sensor-has-0123456789"


def _http(port: int, raw: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port; return what comes back until close or timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(raw)
        return _read_answer(sock)


def _read_answer(sock: socket.socket) -> bytes:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return head + b"\r\n\r\n" + rest
    except TimeoutError:
        return data


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def _post(port: int, body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
    raw = (
        f"POST /samples HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    answer = _http(port, raw)
    return _status(answer), json.loads(answer.partition(b"\r\n\r\n")[2] or b"{}")


@pytest.fixture
def endpoint() -> Iterator[EndpointSource]:
    source = EndpointSource(
        EndpointConfig(http=EndpointHttp(port=0), max_body_bytes=4096, queue_size=50)
    )
    try:
        yield source
    finally:
        source.close()


def _port(source: EndpointSource) -> int:
    address = source.http_address
    assert address is not None
    return address[1]


# ---- reachable only from this machine ----------------------------------------------------


def test_a_config_cannot_open_the_endpoint_to_the_network_by_accident() -> None:
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(ValidationError, match="not a loopback address"):
            EndpointHttp(host=host, port=0)
        with pytest.raises(ValidationError, match="needs a token_file"):
            EndpointHttp(host=host, port=0, allow_non_loopback=True)


@pytest.mark.slow
def test_endpoint_is_not_reachable_from_another_host(
    veth_ns: VethNamespace, tmp_path: Path
) -> None:
    loopback = EndpointSource(EndpointConfig(http=EndpointHttp(port=0)))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    # The control: an endpoint deliberately opened on the veth address IS reachable, so
    # the probe can tell; there, only the token lets a sample in.
    opened = EndpointSource(
        EndpointConfig(
            http=EndpointHttp(
                host=veth_ns.host_ip, port=0, allow_non_loopback=True, token_file=token
            )
        )
    )
    try:
        port = _port(loopback)
        assert not veth_ns.can_connect(veth_ns.host_ip, port)
        assert not veth_ns.can_connect("127.0.0.1", port)  # the namespace's own loopback
        open_port = _port(opened)
        assert veth_ns.can_connect(veth_ns.host_ip, open_port)
        url = f"http://{veth_ns.host_ip}:{open_port}/samples"
        curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url]
        data = ["-H", "Content-Type: application/json", "-d", '{"x": [1]}']
        assert veth_ns.run([*curl, *data]).stdout == "401"
        wrong = ["-H", "Authorization: Bearer guessed"]
        assert veth_ns.run([*curl, *data, *wrong]).stdout == "401"
        right = ["-H", f"Authorization: Bearer {TOKEN}"]
        assert veth_ns.run([*curl, *data, *right]).stdout == "202"
        assert opened.rejected == {"unauthorized": 2}
        assert opened.accepted == 1
        assert loopback.accepted == 0
    finally:
        loopback.close()
        opened.close()


@pytest.mark.slow
def test_unix_socket_refuses_other_local_users(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    # The other user runs the system's Python: the project's venv may not be theirs to run.
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 for the other user")
    folder = Path(tempfile.mkdtemp(prefix="efl-sock-", dir="/tmp"))
    try:
        folder.chmod(0o755)  # the folder is open: only the socket's own mode protects it
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    s.connect(sys.argv[1])\n"
            "except PermissionError:\n"
            "    print('refused')\n"
            "else:\n"
            "    print('connected')\n"
        )
        results = {}
        for mode in (0o600, 0o666):  # the default, and a control that lets anyone in
            path = folder / f"s{mode:o}.sock"
            source = EndpointSource(
                EndpointConfig(unix_socket=EndpointUnixSocket(path=path, mode=mode))
            )
            try:
                out = subprocess.run(
                    [python, "-I", "-c", probe, str(path)],
                    user=65534,
                    cwd="/",
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                )
                results[mode] = out.stdout.strip()
            finally:
                source.close()
        assert results == {0o600: "refused", 0o666: "connected"}
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


# ---- bodies it must not read whole ---------------------------------------------------------


def test_oversized_body_is_refused_from_its_headers(endpoint: EndpointSource) -> None:
    port = _port(endpoint)
    head = (
        b"POST /samples HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2147483648\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + b"[" * 1000)  # 2 GiB announced, 1 kB sent: no waiting for it
        started = time.monotonic()
        answer = _read_answer(sock)
        assert time.monotonic() - started < 3
    assert _status(answer) == 413
    assert b'"too_large"' in answer
    assert endpoint.rejected == {"too_large": 1}


def test_oversized_body_with_expect_continue_is_never_invited(endpoint: EndpointSource) -> None:
    raw = (
        b"POST /samples HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = _http(_port(endpoint), raw)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]  # not "100 Continue"
    assert endpoint.rejected == {"too_large": 1}


def test_chunked_or_unannounced_bodies_are_refused(endpoint: EndpointSource) -> None:
    port = _port(endpoint)
    chunked = (
        b"POST /samples HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"ffffff\r\n" + b"[" * 4000
    )
    assert _status(_http(port, chunked)) == 411
    no_length = b"POST /samples HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n"
    assert _status(_http(port, no_length)) == 411
    assert endpoint.rejected == {"no_length": 2}
    assert _post(port, b'{"x": [1]}')[0] == 202


# ---- pickles and lying headers -----------------------------------------------------------


class _Payload:
    """Unpickling this runs a command (what a malicious .npy of objects carries)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _pickled_npy(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    data = buf.getvalue()
    assert b"touch" in data  # the command is really in there
    return data


def test_pickled_npy_is_refused_and_never_unpickled(
    endpoint: EndpointSource, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    status, answer = _post(_port(endpoint), _pickled_npy(marker), "application/x-npy")
    assert (status, answer["error"]) == (400, "pickled")
    assert not marker.exists()
    assert endpoint.rejected == {"pickled": 1}
    # The control: numpy itself, told to trust the file, would have run it.
    np.load(io.BytesIO(_pickled_npy(marker)), allow_pickle=True)
    assert marker.exists()


def test_npy_header_lying_about_its_size_allocates_nothing(endpoint: EndpointSource) -> None:
    port = _port(endpoint)
    for shape in ("(1099511627776,)", "(4611686018427387904, 4611686018427387904)"):
        header = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"
        head = (header + " " * ((-(10 + len(header) + 1)) % 64) + "\n").encode()
        body = b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + b"\0" * 16
        tracemalloc.start()
        try:
            status, answer = _post(port, body, "application/x-npy")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (status, answer["error"]) == (400, "bad_npy"), answer
        assert peak < 1 << 20, peak
    assert endpoint.rejected == {"bad_npy": 2}


# ---- floods --------------------------------------------------------------------------------


def test_a_flood_fills_the_bounded_queue_and_the_rest_is_refused(
    endpoint: EndpointSource,
) -> None:
    port = _port(endpoint)
    body = json.dumps({"x": list(range(256))}).encode()  # ~1 kB per request
    statuses: list[int] = []
    lock = threading.Lock()

    def flood(n: int) -> None:
        for _ in range(n):
            status, _ = _post(port, body)
            with lock:
                statuses.append(status)

    assert _post(port, body)[0] == 202
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        threads = [threading.Thread(target=flood, args=(250,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert statuses.count(202) == 49  # the queue holds 50
    assert statuses.count(429) == 2000 - 49
    assert endpoint.queued == 50
    assert endpoint.rejected == {"queue_full": 2000 - 49}
    # 2 MB were offered; what stays is the queue, not the flood.
    assert after - before < 1 << 20, after - before
    assert len(endpoint.due(0.0)) == 50
    assert _post(port, body)[0] == 202  # drained: it takes samples again


def test_idle_connections_cannot_lock_senders_out() -> None:
    source = EndpointSource(
        EndpointConfig(http=EndpointHttp(port=0), max_connections=4, request_timeout_s=0.5)
    )
    held: list[socket.socket] = []
    try:
        port = _port(source)
        for _ in range(4):  # a slow-loris: connections that never finish their request
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /samples HTTP/1.1\r\n")
            held.append(sock)
        time.sleep(0.1)
        answer = _http(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(answer) == 503  # every slot is taken, and it says so at once
        assert source.rejected.get("busy") == 1
        time.sleep(1.5)  # past request_timeout_s the idle ones are closed
        assert _post(port, b'{"x": [1]}')[0] == 202
        for sock in held:
            assert sock.recv(1024) == b""  # the server hung up on it
    finally:
        for sock in held:
            sock.close()
        source.close()


# ---- the folder ----------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside the folder that the agent could read: it must never be sent."""
    secret = tmp_path / "outside" / "secret.json"
    secret.parent.mkdir()
    secret.write_text('{"x": [42, 42, 42]}')
    return secret


def _folder(path: Path) -> FolderSource:
    return FolderSource(FolderConfig(path=path, poll_interval_s=0.001))


def _poll(source: FolderSource, times: int = 2) -> list[Any]:
    out = []
    for i in range(times):
        out += source.due(time.monotonic() + 10 * (i + 1))
        time.sleep(0.002)
    return out


def test_folder_symlink_to_a_file_outside_is_refused(tmp_path: Path, outside: Path) -> None:
    inbox = tmp_path / "inbox"
    source = _folder(inbox)
    (inbox / "steal.json").symlink_to(outside)
    (inbox / "steal-dir.npy").symlink_to(outside.parent, target_is_directory=True)
    (inbox / "inner.json").write_text('{"x": [1]}')
    (inbox / "alias.json").symlink_to(inbox / "inner.json")  # even one pointing inside
    records = _poll(source)
    source.close()
    assert [json.loads(r.body)["x"] for r in records] == [[1.0]]
    assert source.rejected == {"symlink": 3}
    assert outside.read_text() == '{"x": [42, 42, 42]}'
    assert (inbox / "rejected" / "steal.json").is_symlink()  # the link moved, not its target
    reason = json.loads((inbox / "rejected" / "steal.json.reason.json").read_text())
    assert reason["reason"] == "symlink"


def test_folder_hard_link_to_a_file_outside_is_refused(tmp_path: Path, outside: Path) -> None:
    inbox = tmp_path / "inbox"
    source = _folder(inbox)
    os.link(outside, inbox / "steal.json")
    records = _poll(source)
    source.close()
    assert records == []
    assert source.rejected == {"hardlink": 1}


def test_folder_fifo_does_not_hang_the_agent(tmp_path: Path) -> None:
    source = _folder(tmp_path)
    os.mkfifo(tmp_path / "stuck.npy")
    started = time.monotonic()
    assert _poll(source) == []
    assert time.monotonic() - started < 2
    source.close()
    assert source.rejected == {"not_regular": 1}


def test_done_swapped_for_a_symlink_cannot_redirect_the_move(tmp_path: Path, outside: Path) -> None:
    inbox = tmp_path / "inbox"
    source = _folder(inbox)
    (inbox / "a.json").write_text('{"x": [1]}')
    assert len(source.due(time.monotonic() + 10)) == 1
    # Before the file is filed, done/ is swapped for a link to a folder outside.
    (inbox / "done").rename(inbox / "done.orig")
    (inbox / "done").symlink_to(outside.parent, target_is_directory=True)
    source.due(time.monotonic() + 20)
    source.close()
    assert sorted(p.name for p in outside.parent.iterdir()) == ["secret.json"]
    assert (inbox / "done.orig" / "a.json").exists()  # where done/ was when it started
    with pytest.raises(ConfigError, match="symlink there is refused"):
        _folder(inbox)  # a restart refuses the planted link


def test_planted_reason_file_link_is_not_written_through(tmp_path: Path, outside: Path) -> None:
    inbox = tmp_path / "inbox"
    source = _folder(inbox)
    (inbox / "rejected" / "bad.json.reason.json").symlink_to(outside)
    (inbox / "bad.json").write_text("not json")
    _poll(source)
    source.close()
    assert outside.read_text() == '{"x": [42, 42, 42]}'
    assert source.rejected == {"not_json": 1}
    assert (inbox / "rejected" / "bad.1.json.reason.json").exists()  # under a free name


def test_folder_pickled_npy_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    inbox = tmp_path / "inbox"
    source = _folder(inbox)
    (inbox / "evil.npy").write_bytes(_pickled_npy(marker))
    assert _poll(source) == []
    source.close()
    assert not marker.exists()
    assert source.rejected == {"pickled": 1}
    assert stat.S_ISREG(os.lstat(inbox / "rejected" / "evil.npy").st_mode)


def test_a_body_that_stalls_is_dropped_after_the_timeout(capfd: pytest.CaptureFixture[str]) -> None:
    source = EndpointSource(EndpointConfig(http=EndpointHttp(port=0), request_timeout_s=0.3))
    try:
        head = (
            b"POST /samples HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", _port(source)), timeout=5) as sock:
            sock.sendall(head + b'{"x": [')  # and then nothing more
            assert sock.recv(1024) == b""  # closed, no answer to half a request
        deadline = time.monotonic() + 5
        while source.rejected != {"incomplete": 1} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source.rejected == {"incomplete": 1}
        assert source.queued == 0
        assert _post(_port(source), b'{"x": [1]}')[0] == 202
    finally:
        source.close()
    assert "Traceback" not in capfd.readouterr().err
