"""The agent's data sources with real sockets and files: endpoint, folder, plugin, replay.

Valid samples come out as records with their source, a running index, the model input and
the label; bad ones are refused with the right counter, and the source goes on serving.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from edgefl.config import validate_config
from edgefl.edge_agent.daemon import AgentConfig
from edgefl.edge_agent.sources import (
    DatasetReplayConfig,
    DatasetReplaySource,
    EndpointConfig,
    EndpointHttp,
    EndpointSource,
    EndpointUnixSocket,
    FolderConfig,
    FolderSource,
    InputSpec,
    PluginConfig,
    PushSource,
    RawSample,
    SampleError,
    SourceRecord,
    build_source,
)
from edgefl.edge_agent.sources._samples import conform, read_json, read_npy, split_batch
from edgefl.errors import ConfigError
from edgefl.proto.serde import decode_envelope
from edgefl.testing import EdgeflProcesses, Mosquitto, wait_for

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / "examples" / "source_plugin"


# ---- helpers ---------------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (what ``curl --unix-socket`` does)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def npy(arr: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def request(
    conn: http.client.HTTPConnection,
    body: bytes,
    content_type: str = "application/json",
    *,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    path: str = "/samples",
) -> tuple[int, dict[str, Any]]:
    conn.request(method, path, body=body, headers={"Content-Type": content_type, **(headers or {})})
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def post_json(conn: http.client.HTTPConnection, doc: Any) -> tuple[int, dict[str, Any]]:
    return request(conn, json.dumps(doc).encode())


@pytest.fixture
def endpoint() -> Iterator[EndpointSource]:
    source = EndpointSource(EndpointConfig(name="sensor", http=EndpointHttp(port=0), shape=[4]))
    try:
        yield source
    finally:
        source.close()


def connect(source: EndpointSource) -> http.client.HTTPConnection:
    address = source.http_address
    assert address is not None
    return http.client.HTTPConnection(address[0], address[1], timeout=10)


# ---- records and specs -----------------------------------------------------------------


def test_a_record_built_the_old_way_still_works() -> None:
    record = SourceRecord(stream="s", kind="data", content_type="application/json", body=b"{}")
    assert (record.source, record.index, record.inputs, record.label) == ("", -1, None, None)
    assert record.evaluation is False


def test_input_spec_normalises_and_refuses_nonsense() -> None:
    spec = InputSpec([8, 8, 1], "f4")  # type: ignore[arg-type]
    assert spec == InputSpec((8, 8, 1), "float32")
    assert spec.size == 64
    for shape, dtype in [((), "float32"), ((0, 4), "float32"), ((4,), "str"), ((4,), "bool")]:
        with pytest.raises(ValueError, match=r"shape|dtype"):
            InputSpec(shape, dtype)


# ---- checking samples ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "shapes", "dtypes", "reason"),
    [
        ([1, 2, 3], [(4,)], [], "bad_shape"),
        ([[1, 2], [3]], [], [], "bad_shape"),  # ragged
        (5, [], [], "bad_shape"),  # a scalar
        ([], [], [], "bad_shape"),
        (["1", "2"], [], [], "bad_dtype"),
        ([True, False], [], [], "bad_dtype"),
        ([None, 1], [], [], "bad_dtype"),
        ([1.0, float("nan")], [], [], "not_finite"),
        ([1.0, float("inf")], [], [], "not_finite"),
        ([1e300], [], [], "out_of_range"),  # does not fit float32
        ([1.5, 2], [], ["int8"], "bad_dtype"),
        ([1, 200], [], ["int8"], "out_of_range"),
        ([-1, 2], [], ["uint8"], "out_of_range"),
    ],
)
def test_bad_samples_get_their_reason(
    x: Any, shapes: list[tuple[int, ...]], dtypes: list[str], reason: str
) -> None:
    def check() -> None:
        sample = RawSample.of(x)
        conform(sample.x, shapes, dtypes, typed=sample.typed)

    with pytest.raises(SampleError) as caught:
        check()
    assert caught.value.reason == reason, caught.value


def test_a_flat_sample_is_reshaped_to_the_model_input() -> None:
    out = conform(np.arange(64), [(64,), (8, 8, 1)], ["float32"], typed=False)
    assert out.shape == (8, 8, 1)
    assert out.dtype == np.float32
    assert conform(np.ones((8, 8, 1)), [(8, 8, 1)], [], typed=True).shape == (8, 8, 1)


def test_npy_dtype_must_cast_to_the_expected_one() -> None:
    ok = read_npy(npy(np.ones(4, dtype=np.float64)))
    assert conform(ok, [(4,)], ["float32"], typed=True).dtype == np.float32
    as_int = read_npy(npy(np.ones(4, dtype=np.int16)))
    conform(as_int, [(4,)], ["float32"], typed=True)  # int -> float: same kind is fine
    floats_for_int8 = read_npy(npy(np.ones(4, dtype=np.float32)))
    with pytest.raises(SampleError, match="expected int8") as caught:
        conform(floats_for_int8, [(4,)], ["int8"], typed=True)
    assert caught.value.reason == "bad_dtype"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "not_json"),
        (b"[1, 2]", "bad_format"),
        (b'{"y": 1}', "bad_format"),
        (b'{"x": [1], "z": 1}', "bad_format"),
        (b'{"samples": {"x": [1]}}', "bad_format"),
        (b'{"samples": [{"x": [1]}], "y": 1}', "bad_format"),
        (b'{"x": [1], "y": true}', "bad_label"),
        (b'{"x": [1], "y": -1}', "bad_label"),
        (b'{"x": [1], "y": 1.5}', "bad_label"),
        (b'{"samples": [{"x": [1]}, {"x": [2]}, {"x": [3]}]}', "too_many"),
        (b"[" * 100_000, "not_json"),  # deeper than the parser recurses
    ],
)
def test_json_bodies_that_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(SampleError) as caught:
        read_json(body, max_samples=2)
    assert caught.value.reason == reason


def test_npy_in_every_byte_order_and_layout() -> None:
    data = np.arange(12, dtype=">f4").reshape(3, 4)
    assert np.array_equal(read_npy(npy(data)), data)
    fortran = np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4))
    assert np.array_equal(read_npy(npy(fortran)), fortran)
    rows = split_batch(read_npy(npy(data)), [(4,)], max_samples=10)
    assert [r.x.tolist() for r in rows] == data.tolist()
    assert len(split_batch(read_npy(npy(data.ravel())), [(12,)], max_samples=10)) == 1
    assert len(split_batch(read_npy(npy(data)), [], max_samples=10)) == 3
    with pytest.raises(SampleError) as caught:
        split_batch(read_npy(npy(data)), [(5,)], max_samples=10)
    assert caught.value.reason == "bad_shape"
    with pytest.raises(SampleError) as caught:
        split_batch(read_npy(npy(data)), [(4,)], max_samples=2)
    assert caught.value.reason == "too_many"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not an npy at all", "bad_npy"),
        (npy(np.ones(8))[:-3], "bad_npy"),  # truncated
        (npy(np.ones(8)) + b"\0" * 4, "bad_npy"),  # padded
        (npy(np.array(["a", "b"])), "bad_dtype"),
        (npy(np.array([True])), "bad_dtype"),
        (npy(np.zeros(2, dtype=[("a", "f4")])), "bad_dtype"),
        (npy(np.ones(2, dtype=np.complex64)), "bad_dtype"),
    ],
)
def test_npy_bodies_that_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(SampleError) as caught:
        read_npy(body)
    assert caught.value.reason == reason


# ---- PushSource ------------------------------------------------------------------------


def test_push_source_queues_all_or_nothing_and_counts_each_refusal() -> None:
    source = PushSource("p", queue_size=3, shape=[2])
    assert source.offer([RawSample.of([1, 2], 0), RawSample.of([3, 4])]) == 0
    with pytest.raises(SampleError, match="samples waiting"):
        source.offer([RawSample.of([1, 2]), RawSample.of([1, 2])])
    with pytest.raises(SampleError):
        source.offer([RawSample.of([1, 2]), RawSample.of([1, 2, 3])])  # one bad: none in
    assert source.offer_one([5, 6], 1) == 2
    records = source.due(0.0)
    assert [(r.index, r.label, r.inputs.tolist()) for r in records if r.inputs is not None] == [
        (0, 0, [1.0, 2.0]),
        (1, None, [3.0, 4.0]),
        (2, 1, [5.0, 6.0]),
    ]
    assert records[0].sample == ([1.0, 2.0], 0)
    assert records[1].sample is None  # no label: nothing to train on
    assert json.loads(records[0].body) == {"i": 0, "x": [1.0, 2.0], "y": 0, "source": "p"}
    assert source.rejected == {"queue_full": 1, "bad_shape": 1}
    assert source.due(0.0) == []


def test_evaluation_records_are_never_training_samples() -> None:
    source = PushSource("held-out", evaluation=True)
    source.offer_one([1.0, 2.0], 3)
    (record,) = source.due(0.0)
    assert record.evaluation is True
    assert record.label == 3
    assert record.sample is None


def test_the_model_spec_is_checked_when_given_and_can_change() -> None:
    source = PushSource("p")
    source.offer_one(np.ones(3, dtype=np.float32))  # no spec: anything numeric
    source.expect(InputSpec((2, 2), "float32"))
    source.offer_one([1, 2, 3, 4])
    assert source.due(0.0)[-1].inputs.shape == (2, 2)  # type: ignore[union-attr]
    with pytest.raises(SampleError):
        source.offer_one([1, 2, 3])
    source.expect(None)
    source.offer_one([1, 2, 3])
    assert source.rejected == {"bad_shape": 1}


# ---- endpoint: HTTP ----------------------------------------------------------------------


def test_endpoint_takes_json_and_npy_with_running_indices(endpoint: EndpointSource) -> None:
    conn = connect(endpoint)
    assert post_json(conn, {"x": [1, 2, 3, 4], "y": 7}) == (
        202,
        {"accepted": 1, "first_index": 0, "queued": 1},
    )
    status, answer = post_json(conn, {"samples": [{"x": [0.5] * 4}, {"x": [2] * 4, "y": 1}]})
    assert (status, answer["accepted"], answer["first_index"]) == (202, 2, 1)
    status, answer = request(conn, npy(np.ones((3, 4), np.float32)), "application/x-npy")
    assert (status, answer["accepted"], answer["first_index"]) == (202, 3, 3)
    records = endpoint.due(time.monotonic())
    assert [r.index for r in records] == list(range(6))
    assert {r.source for r in records} == {"sensor"}
    assert [r.label for r in records] == [7, None, 1, None, None, None]
    assert records[0].inputs is not None
    assert records[0].inputs.tolist() == [1, 2, 3, 4]
    assert json.loads(records[0].body)["x"] == [1, 2, 3, 4]
    assert endpoint.rejected == {}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b'{"x": [1, 2, 3]}', "application/json", 400, "bad_shape"),
        (b'{"x": [1, 2, "3", 4]}', "application/json", 400, "bad_dtype"),
        (b'{"x": [1, 2, NaN, 4]}', "application/json", 400, "not_finite"),
        (b'{"x": [1, 2, 3, 4], "y": "cat"}', "application/json", 400, "bad_label"),
        (b"x=1,2,3,4", "application/json", 400, "not_json"),
        (b"x=1,2,3,4", "application/x-www-form-urlencoded", 415, "unsupported_type"),
        (b"\x93NUMPY garbage", "application/x-npy", 400, "bad_npy"),
        (npy(np.ones((2, 5))), "application/x-npy", 400, "bad_shape"),
    ],
)
def test_endpoint_refuses_bad_input_with_a_reason_and_goes_on(
    endpoint: EndpointSource, body: bytes, content_type: str, status: int, reason: str
) -> None:
    conn = connect(endpoint)
    got, answer = request(conn, body, content_type)
    assert (got, answer["error"]) == (status, reason), answer
    assert answer["detail"]
    assert endpoint.rejected == {reason: 1}
    fresh = connect(endpoint)  # the refused request's connection may be closed
    assert post_json(fresh, {"x": [1, 2, 3, 4]})[0] == 202
    assert [r.index for r in endpoint.due(0.0)] == [0]


def test_endpoint_keeps_a_connection_alive_between_requests(endpoint: EndpointSource) -> None:
    conn = connect(endpoint)
    for _ in range(5):
        assert post_json(conn, {"x": [1, 2, 3, 4]})[0] == 202
    assert endpoint.accepted == 5


def test_endpoint_full_queue_answers_429_until_drained() -> None:
    source = EndpointSource(EndpointConfig(http=EndpointHttp(port=0), queue_size=3))
    try:
        conn = connect(source)
        assert post_json(conn, {"samples": [{"x": [1]}] * 3})[0] == 202
        conn.request(
            "POST", "/samples", body=b'{"x": [1]}', headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        assert response.status == 429
        assert response.getheader("Retry-After") == "1"
        assert json.loads(response.read())["error"] == "queue_full"
        assert post_json(conn, {"samples": [{"x": [1]}] * 4})[1]["error"] == "too_many"
        assert len(source.due(0.0)) == 3
        assert post_json(conn, {"x": [1]}) == (202, {"accepted": 1, "first_index": 3, "queued": 1})
        assert source.rejected == {"queue_full": 1, "too_many": 1}
    finally:
        source.close()


def test_endpoint_describes_itself_and_follows_the_model_spec(endpoint: EndpointSource) -> None:
    conn = connect(endpoint)
    status, doc = request(conn, b"", method="GET", path="/")
    assert status == 200
    assert doc["expects"] == {"shape": [4], "dtypes": []}
    endpoint.expect(InputSpec((2, 2), "int8"))
    status, doc = request(conn, b"", method="GET", path="/")
    assert doc["expects"] == {"shape": [2, 2], "dtypes": ["int8"]}
    assert post_json(conn, {"x": [1, 2, 3, 4]})[0] == 202
    assert post_json(conn, {"x": [1, 2, 3, 400]})[1]["error"] == "out_of_range"
    assert endpoint.due(0.0)[0].inputs.shape == (2, 2)  # type: ignore[union-attr]
    assert request(conn, b"{}", path="/other")[0] == 404


def test_endpoint_bearer_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    token.chmod(0o644)
    config = EndpointConfig(http=EndpointHttp(port=0, token_file=token))
    with pytest.raises(ConfigError, match="chmod 600"):
        EndpointSource(config)
    token.chmod(0o600)
    source = EndpointSource(config)
    try:
        body = b'{"x": [1]}'
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            status, answer = request(connect(source), body, headers=headers)
            assert (status, answer["error"]) == (401, "unauthorized")
        auth = {"Authorization": "Bearer s3cret-token-0123456789"}
        assert request(connect(source), body, headers=auth)[0] == 202
        assert source.rejected == {"unauthorized": 3}
    finally:
        source.close()


def test_endpoint_config_listens_somewhere_and_on_loopback_only() -> None:
    with pytest.raises(ValidationError, match="listens somewhere"):
        EndpointConfig()
    for host in ("0.0.0.0", "192.168.1.10", "::", "sensor.local"):
        with pytest.raises(ValidationError, match=r"loopback|not an IP"):
            EndpointHttp(host=host, port=0)
    with pytest.raises(ValidationError, match="token_file"):
        EndpointHttp(host="0.0.0.0", port=0, allow_non_loopback=True)
    assert EndpointHttp(host="::1", port=0).host == "::1"


def test_endpoint_port_in_use_is_a_config_error(endpoint: EndpointSource) -> None:
    address = endpoint.http_address
    assert address is not None
    with pytest.raises(ConfigError, match="cannot listen"):
        EndpointSource(EndpointConfig(http=EndpointHttp(port=address[1])))


def test_endpoint_on_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        source = EndpointSource(EndpointConfig(http=EndpointHttp(host="::1", port=0)))
    except ConfigError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        host, port = source.http_address  # type: ignore[misc]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        assert post_json(conn, {"x": [1]})[0] == 202
    finally:
        source.close()


# ---- endpoint: Unix socket ---------------------------------------------------------------


def test_endpoint_unix_socket_is_private_and_cleaned_up(tmp_path: Path) -> None:
    path = tmp_path / "samples.sock"
    source = EndpointSource(EndpointConfig(unix_socket=EndpointUnixSocket(path=path)))
    try:
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert [p.name for p in tmp_path.iterdir()] == ["samples.sock"]  # no staging left
        conn = UnixHTTPConnection(path)
        assert post_json(conn, {"x": [1, 2], "y": 0})[0] == 202
        assert request(conn, npy(np.ones(2)), "application/x-npy")[0] == 202
        assert [r.index for r in source.due(0.0)] == [0, 1]
        with pytest.raises(ConfigError, match="another process listens"):
            EndpointSource(EndpointConfig(unix_socket=EndpointUnixSocket(path=path)))
    finally:
        source.close()
    assert not path.exists()


def test_endpoint_unix_socket_mode_and_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as a killed agent leaves it
    source = EndpointSource(
        EndpointConfig.model_validate({"unix_socket": {"path": str(path), "mode": "0660"}})
    )
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    finally:
        source.close()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        EndpointSource(EndpointConfig(unix_socket=EndpointUnixSocket(path=path)))
    assert path.read_text() == "not a socket"


# ---- folder ------------------------------------------------------------------------------


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.rename(path)


_tick = [time.monotonic()]


def later() -> float:
    """A monotonic time past every earlier one by more than any poll interval here."""
    _tick[0] = max(_tick[0], time.monotonic()) + 1.0
    return _tick[0]


def folder_source(path: Path, **kwargs: Any) -> FolderSource:
    return FolderSource(FolderConfig(path=path, poll_interval_s=0.01, **kwargs))


def test_folder_reads_each_file_once_and_files_it(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    source = folder_source(inbox, shape=[3], name="drop")
    write_atomically(inbox / "a.npy", npy(np.arange(6, dtype=np.float32).reshape(2, 3)))
    write_atomically(inbox / "b.json", json.dumps({"x": [1, 2, 3], "y": 2}).encode())
    (inbox / "c.json.tmp").write_text('{"x": [1, 2, 3]}')  # still being written
    (inbox / ".d.npy").write_bytes(npy(np.ones(3)))  # a dotfile: someone's staging
    (inbox / "notes.txt").write_text("not ours")
    records = source.due(later())
    assert [(r.index, r.source, r.label) for r in records] == [
        (0, "drop", None),
        (1, "drop", None),
        (2, "drop", 2),
    ]
    assert records[1].inputs is not None
    assert records[1].inputs.tolist() == [3, 4, 5]
    assert (inbox / "a.npy").exists()  # moved only on the next poll, once handed out
    assert source.due(later()) == []
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.npy", "b.json"]
    assert sorted(p.name for p in inbox.iterdir()) == [
        ".d.npy",
        "c.json.tmp",
        "done",
        "notes.txt",
        "rejected",
    ]
    source.close()


def test_folder_rejects_bad_files_with_a_reason_file(tmp_path: Path) -> None:
    source = folder_source(tmp_path, shape=[3])
    write_atomically(tmp_path / "short.json", b'{"x": [1, 2]}')
    write_atomically(tmp_path / "text.npy", b"hello")
    write_atomically(tmp_path / "nan.json", b'{"samples": [{"x": [1, 2, 3]}, {"x": [1, NaN, 3]}]}')
    write_atomically(tmp_path / "ok.json", b'{"x": [1, 2, 3]}')
    records = source.due(later())
    assert len(records) == 1  # nan.json is refused whole: its good sample is not taken
    assert source.rejected == {"bad_shape": 1, "bad_npy": 1, "not_finite": 1}
    rejected = tmp_path / "rejected"
    reason = json.loads((rejected / "short.json.reason.json").read_text())
    assert reason["reason"] == "bad_shape"
    assert "expected (3,)" in reason["detail"]
    assert (rejected / "short.json").read_bytes() == b'{"x": [1, 2]}'  # kept as it came
    assert {p.name for p in rejected.iterdir()} >= {"text.npy", "nan.json"}
    source.close()
    assert (tmp_path / "done" / "ok.json").exists()


def test_folder_restart_never_reads_a_filed_file_again(tmp_path: Path) -> None:
    first = folder_source(tmp_path)
    for i in range(3):
        write_atomically(tmp_path / f"{i}.json", json.dumps({"x": [i, i]}).encode())
    assert len(first.due(later())) == 3
    first.close()  # a clean stop files what was handed out
    second = folder_source(tmp_path)
    assert second.due(later()) == []
    write_atomically(tmp_path / "3.json", b'{"x": [3, 3]}')
    (record,) = second.due(later())
    assert json.loads(record.body)["x"] == [3.0, 3.0]
    second.close()
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == [
        "0.json",
        "1.json",
        "2.json",
        "3.json",
    ]


def test_folder_agent_killed_before_filing_reads_the_file_again(tmp_path: Path) -> None:
    """After a crash a file may come twice, never zero times (the documented contract)."""
    crashed = folder_source(tmp_path)
    write_atomically(tmp_path / "a.json", b'{"x": [1]}')
    assert len(crashed.due(later())) == 1
    # No close() and no second poll: the process died before filing a.json.
    again = folder_source(tmp_path)
    assert len(again.due(later())) == 1
    again.close()
    assert (tmp_path / "done" / "a.json").exists()


@pytest.mark.slow
def test_folder_source_killed_with_sigkill_loses_no_file(tmp_path: Path) -> None:
    """A real process reading a folder is killed -9 mid-way; a restart finishes the rest."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(200):
        write_atomically(inbox / f"{i:04d}.json", json.dumps({"x": [i]}).encode())
    code = (
        "import sys, time, json\n"
        "from pathlib import Path\n"
        "from edgefl.edge_agent.sources import FolderConfig, FolderSource\n"
        "s = FolderSource(FolderConfig(path=Path(sys.argv[1]), poll_interval_s=0.001,"
        " max_files_per_poll=5))\n"
        "while True:\n"
        "    for r in s.due(time.monotonic()):\n"
        "        print(int(json.loads(r.body)['x'][0]), flush=True)\n"
        "    time.sleep(0.002)\n"
    )
    seen: list[int] = []
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(inbox)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(int(line))
            if len(seen) >= 60:
                break
    finally:
        proc.kill()
        proc.wait(10)
    done_before = {int(p.stem) for p in (inbox / "done").iterdir()}
    assert done_before <= set(seen)  # filed only after being handed out
    rest = folder_source(inbox, max_files_per_poll=1000)
    after = [int(json.loads(r.body)["x"][0]) for r in rest.due(later())]
    rest.close()
    assert set(seen) | set(after) == set(range(200))  # nothing lost
    assert not set(after) & done_before  # nothing filed comes again
    assert len(list((inbox / "done").iterdir())) == 200


def test_folder_same_name_twice_keeps_both(tmp_path: Path) -> None:
    source = folder_source(tmp_path)
    for _ in range(2):
        write_atomically(tmp_path / "reading.json", b'{"x": [1]}')
        assert len(source.due(later())) == 1
        source.due(later())
    source.close()
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == [
        "reading.1.json",
        "reading.json",
    ]


def test_folder_limits_files_per_poll_and_file_size(tmp_path: Path) -> None:
    source = folder_source(tmp_path, max_files_per_poll=2, max_file_bytes=1024)
    for i in range(5):
        write_atomically(tmp_path / f"{i}.json", b'{"x": [1]}')
    write_atomically(tmp_path / "big.npy", npy(np.ones(1000)))
    os.utime(tmp_path / "big.npy", (0, 0))  # the oldest: read first
    counts = [len(source.due(later())) for _ in range(4)]
    assert counts == [1, 2, 2, 0]
    assert source.rejected == {"too_large": 1}
    source.close()


# ---- plugin --------------------------------------------------------------------------------


def _fake_install(target: Path, entry_points: str, name: str = "edgefl-csv-source") -> None:
    """A .dist-info next to the example's source: what pip would leave, minus the copy."""
    info = target / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = tmp_path / "site"
    _fake_install(
        site,
        "[edgefl.sources]\ncsv-tail = edgefl_csv_source:CsvTailSource\n"
        "not-a-source = edgefl_csv_source:CsvTailOptions\n"
        "broken = edgefl_csv_source_missing:Nothing\n",
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(PLUGIN_DIR / "src"))
    yield site
    sys.modules.pop("edgefl_csv_source", None)


def test_plugin_example_follows_a_csv_file(plugin_on_path: Path, tmp_path: Path) -> None:
    csv = tmp_path / "vibration.csv"
    csv.write_text("a,b,c,label\n9,9,9,0\n")
    source = build_source(
        PluginConfig(
            name="vibration",
            entry_point="csv-tail",
            options={"path": str(csv), "shape": [3], "label_column": "last", "header": True},
        )
    )
    try:
        assert source.due(0.0) == []  # rows already there are not new
        with csv.open("a") as fh:
            fh.write("1,2,3,1\n4,5,6,0\nx,y,z,1\n1,2,3,4,5\n7,8")  # the last is incomplete
        records = source.due(0.0)
        assert [(r.source, r.index, r.label) for r in records] == [
            ("vibration", 0, 1),
            ("vibration", 1, 0),
        ]
        assert source.rejected == {"bad_format": 1, "bad_shape": 1}
        with csv.open("a") as fh:
            fh.write(",9,2\n")
        (record,) = source.due(0.0)
        assert record.inputs is not None
        assert record.inputs.tolist() == [7, 8, 9]
        csv.write_text("")  # truncated (log rotation): read from the start again
        csv.write_text("a,b,c,label\n1,1,1,1\n")
        assert [r.label for r in source.due(0.0)] == [1]
    finally:
        source.close()


def test_plugin_errors_name_what_to_do(plugin_on_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no source plugin 'nope'.*installed: .*csv-tail"):
        build_source(PluginConfig(entry_point="nope"))
    with pytest.raises(ConfigError, match="not a DataSource subclass"):
        build_source(PluginConfig(entry_point="not-a-source"))
    with pytest.raises(ConfigError, match="failed to load: ModuleNotFoundError"):
        build_source(PluginConfig(entry_point="broken"))
    with pytest.raises(ConfigError, match=r"sources\[p\]\.options.*\n.*colour: unknown key"):
        build_source(
            PluginConfig(name="p", entry_point="csv-tail", options={"path": "/x", "colour": 1})
        )


def test_two_packages_claiming_one_plugin_name_are_refused(
    plugin_on_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other-site"
    _fake_install(other, "[edgefl.sources]\ncsv-tail = another_pkg:Source\n", "another-pkg")
    monkeypatch.syspath_prepend(str(other))
    with pytest.raises(ConfigError, match="claimed by 2 entry points"):
        build_source(PluginConfig(entry_point="csv-tail", options={"path": "/x"}))


@pytest.mark.slow
def test_plugin_example_installs_with_pip_and_runs(tmp_path: Path) -> None:
    """The example package as pip installs it (into a target folder, never the venv)."""
    work = tmp_path / "src"
    shutil.copytree(PLUGIN_DIR, work)  # pip builds in the tree: keep the checkout clean
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(work),
        ],
        check=True,
        timeout=300,
    )
    entry_points = next(target.glob("edgefl_csv_source-*.dist-info")) / "entry_points.txt"
    assert "csv-tail = edgefl_csv_source:CsvTailSource" in entry_points.read_text()
    csv = tmp_path / "rows.csv"
    csv.write_text("1,2\n3,4\n")
    code = (
        "import json, sys\n"
        "from edgefl.edge_agent.sources import PluginConfig, build_source\n"
        "s = build_source(PluginConfig(entry_point='csv-tail',"
        " options={'path': sys.argv[1], 'from_start': True}))\n"
        "print(json.dumps([r.inputs.tolist() for r in s.due(0.0)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(csv)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout) == [[1.0, 2.0], [3.0, 4.0]]


# ---- replay ------------------------------------------------------------------------------


def test_replay_records_carry_source_index_inputs_and_label() -> None:
    clock = [0.0]
    source = DatasetReplaySource(
        DatasetReplayConfig(name="digits", rate_hz=10, limit=5), clock=lambda: clock[0]
    )
    records = source.due(10.0)
    assert [r.index for r in records] == [0, 1, 2, 3, 4]
    assert {r.source for r in records} == {"digits"}
    first = records[0]
    assert first.inputs is not None
    assert first.inputs.shape == (64,)
    assert first.label == json.loads(first.body)["y"]
    assert first.sample is not None
    assert first.evaluation is False


def test_replay_evaluation_is_the_held_out_split_and_never_trained_on() -> None:
    with pytest.raises(ValidationError, match="split: test"):
        DatasetReplayConfig(evaluation=True)
    source = DatasetReplaySource(
        DatasetReplayConfig(split="test", evaluation=True, rate_hz=100, limit=3)
    )
    records = source.due(time.monotonic() + 1)
    assert len(records) == 3
    assert all(r.evaluation and r.sample is None and r.label is not None for r in records)


def test_replay_checks_samples_against_the_model_spec() -> None:
    source = DatasetReplaySource(DatasetReplayConfig(rate_hz=100, limit=4))
    source.expect(InputSpec((8, 8, 1)))
    records = source.due(time.monotonic() + 1)
    assert [r.inputs.shape for r in records if r.inputs is not None] == [(8, 8, 1)] * 4
    other = DatasetReplaySource(DatasetReplayConfig(rate_hz=100, limit=4))
    other.expect(InputSpec((30,)))  # a model for another dataset
    assert other.due(time.monotonic() + 1) == []
    assert other.rejected == {"bad_shape": 4}


# ---- the agent config and a device without scikit-learn ------------------------------------


def test_every_source_type_validates_in_an_agent_config(tmp_path: Path) -> None:
    data = {
        "device_id": "dev-a",
        "state_dir": str(tmp_path),
        "mqtt": {"port": 1883},
        "sources": [
            {"type": "dataset-replay", "split": "test", "evaluation": True},
            {"type": "endpoint", "http": {"port": 8181}, "shape": [64], "dtype": "float32"},
            {"type": "endpoint", "name": "sock", "unix_socket": {"path": "/run/s.sock"}},
            {"type": "folder", "path": str(tmp_path / "in"), "poll_interval_s": 1},
            {"type": "plugin", "entry_point": "csv-tail", "options": {"path": "/x.csv"}},
        ],
    }
    config = validate_config(AgentConfig, data)
    assert [s.type for s in config.sources] == [
        "dataset-replay",
        "endpoint",
        "endpoint",
        "folder",
        "plugin",
    ]
    data["sources"] = [{"type": "endpoint", "http": {"host": "0.0.0.0", "port": 1}}]
    with pytest.raises(ConfigError, match=r"sources\.0\.endpoint\.http.*loopback"):
        validate_config(AgentConfig, data)


@pytest.mark.slow
def test_endpoint_and_folder_sources_never_import_scikit_learn(tmp_path: Path) -> None:
    """What the device extra installs is enough: no scikit-learn, SciPy or torch."""
    code = (
        "import sys, json, time, http.client, socket\n"
        "from pathlib import Path\n"
        "import edgefl.edge_agent.daemon\n"
        "from edgefl.edge_agent.sources import *\n"
        "tmp = Path(sys.argv[1])\n"
        "e = build_source(EndpointConfig(http=EndpointHttp(port=0)))\n"
        "c = http.client.HTTPConnection(*e.http_address)\n"
        "c.request('POST', '/samples', b'{\"x\": [1, 2]}', {'Content-Type': 'application/json'})\n"
        "assert c.getresponse().status == 202\n"
        "f = build_source(FolderConfig(path=tmp / 'in'))\n"
        "(tmp / 'in' / 'a.json').write_text('{\"x\": [1, 2]}')\n"
        "n = len(e.due(0.0)) + len(f.due(time.monotonic() + 1))\n"
        "e.close(); f.close()\n"
        "heavy = sorted(m for m in ('sklearn', 'scipy', 'torch', 'mlxtend') if m in sys.modules)\n"
        "print(json.dumps({'records': n, 'heavy': heavy}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout) == {"records": 2, "heavy": []}


# ---- the docs ------------------------------------------------------------------------------


def _doc_blocks(language: str) -> list[str]:
    text = (ROOT / "docs" / "sources.md").read_text(encoding="utf-8")
    return [part.split("```", 1)[0] for part in text.split(f"```{language}\n")[1:]]


def test_docs_config_examples_are_valid_agent_configs(tmp_path: Path) -> None:
    blocks = _doc_blocks("yaml")
    assert len(blocks) >= 4
    for block in blocks:
        doc = yaml.safe_load(block)
        data = {"device_id": "d", "state_dir": str(tmp_path), "mqtt": {"port": 1883}, **doc}
        validate_config(AgentConfig, data, source="docs/sources.md")


def test_readme_sources_example_is_a_valid_agent_config(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Data sources: the device's own samples", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    data = {"device_id": "d", "state_dir": str(tmp_path), "mqtt": {"port": 1883}}
    config = validate_config(AgentConfig, {**data, **yaml.safe_load(example)}, source="README")
    assert [s.type for s in config.sources] == ["endpoint", "folder", "plugin", "dataset-replay"]
    curl = section.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert curl in (ROOT / "docs" / "sources.md").read_text(encoding="utf-8")  # run there


@pytest.mark.slow
def test_docs_endpoint_examples_run_against_a_live_endpoint(tmp_path: Path) -> None:
    """Every ``curl`` line and the Python sensor of docs/sources.md, against an endpoint."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    sock = tmp_path / "samples.sock"
    source = EndpointSource(
        EndpointConfig(
            http=EndpointHttp(port=0), unix_socket=EndpointUnixSocket(path=sock), shape=[4]
        )
    )
    try:
        address = source.http_address
        assert address is not None
        np.save(tmp_path / "batch.npy", np.ones((3, 4), np.float32))
        lines = [
            line.strip()
            for block in _doc_blocks("bash")
            for line in block.splitlines()
            if line.strip().startswith("curl")
        ]
        assert len(lines) == 4
        for line in lines:
            command = (
                line.replace("127.0.0.1:8181", f"127.0.0.1:{address[1]}")
                .replace("/run/edgefl/samples.sock", str(sock))
                .replace("batch.npy", str(tmp_path / "batch.npy"))
            )
            out = subprocess.run(
                ["bash", "-c", command + " -s -o /dev/null -w '%{http_code}'"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.stdout == "202", (line, out.stdout, out.stderr)
        (script,) = _doc_blocks("python")
        script = script.replace("127.0.0.1:8181", f"127.0.0.1:{address[1]}")
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        assert "'accepted': 8" in out.stdout, out.stderr
        assert source.rejected == {}
        assert source.accepted == 1 + 2 + 3 + 1 + 8  # the four curl lines, the script
    finally:
        source.close()


def test_threads_pushing_into_one_source_get_distinct_indices() -> None:
    source = PushSource("p", queue_size=10_000)
    firsts: list[int] = []
    lock = threading.Lock()

    def push() -> None:
        for _ in range(100):
            first = source.offer([RawSample.of([1.0]), RawSample.of([2.0])])
            with lock:
                firsts.append(first)

    threads = [threading.Thread(target=push) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = source.due(0.0)
    assert [r.index for r in records] == list(range(1600))
    assert sorted(firsts) == list(range(0, 1600, 2))
    # A group's samples stay together, in order.
    assert all(json.loads(records[i].body)["x"] == [1.0] for i in range(0, 1600, 2))


# ---- a real agent process fed by a sensor ----------------------------------------------------


@pytest.mark.slow
def test_agent_process_takes_a_sensors_samples_without_scikit_learn(
    tmp_path: Path, broker: Mosquitto, edgefl_procs: EdgeflProcesses
) -> None:
    """`edgefl agent run` with an endpoint (Unix socket) and a folder: what a sensor sends
    reaches the broker, with each source's name and index; the agent maps no scikit-learn,
    SciPy or torch."""
    sock, inbox = tmp_path / "samples.sock", tmp_path / "inbox"
    fleet = f"s{os.getpid()}"
    config = {
        "device_id": "dev-s",
        "fleet": fleet,
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "sources": [
            {"type": "endpoint", "name": "sensor", "unix_socket": {"path": str(sock)}},
            {"type": "folder", "name": "drop", "path": str(inbox), "poll_interval_s": 0.1},
        ],
        "status_interval_s": 0.2,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    bodies: list[dict[str, Any]] = []
    lock = threading.Lock()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with lock:
            bodies.append(json.loads(decode_envelope(bytes(msg.payload)).body))

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"c-{fleet}")
    client.on_message = on_message
    client.connect("127.0.0.1", broker.port)
    client.subscribe(f"edgefl/{fleet}/dev-s/data/#", qos=1)
    client.loop_start()
    agent = edgefl_procs.start("agent", "run", "--config", str(path), log="agent.log")
    try:
        wait_for(sock.exists, 30, "the endpoint's socket")
        conn = UnixHTTPConnection(sock)
        assert post_json(conn, {"samples": [{"x": [1, 2], "y": 1}, {"x": [3, 4]}]})[0] == 202
        assert post_json(conn, {"x": [1, "two"]})[0] == 400
        assert post_json(conn, {"x": [5, 6], "y": 0})[0] == 202
        write_atomically(inbox / "a.npy", npy(np.ones((2, 2))))
        write_atomically(inbox / "b.json", b'{"x": [7, 8]}')

        wait_for(lambda: len(bodies) == 6, 30, "all 6 samples at the broker")
        with lock:
            got = sorted((b["source"], b["i"]) for b in bodies)
        assert got == [(name, i) for name in ("drop", "sensor") for i in range(3)]
        pid = agent.pid
        assert pid is not None
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert not [m for m in ("sklearn", "scipy", "torch") if f"/{m}/" in maps]
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
        client.loop_stop()
        client.disconnect()
    assert not sock.exists()  # the agent removed its socket
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.npy", "b.json"]
