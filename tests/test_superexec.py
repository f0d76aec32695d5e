"""The light ClientApp task loop that stands in for Flower's ``flower-superexec``.

The wire format is checked against Flower's own generated protobuf classes; the loop runs
as the real installed script (``python -IS``) against a Runtime API stand-in that hands
out tasks, with a recording ``flwr-clientapp`` first on ``PATH``. The end-to-end path
(a real SuperNode starting it) is covered by tests/test_warmstart.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from flwr.proto import runtime_pb2, task_pb2

from edgefl.edge_agent.fl import superexec
from edgefl.edge_agent.fl.superexec import (
    decode_acquire_response,
    encode_acquire_request,
    parse_args,
)
from edgefl.testing import wait_for

try:
    from tests.superexec_helpers import RuntimeApi, launched, start_loop
except ImportError:  # run from inside tests/
    from superexec_helpers import (  # type: ignore[import-not-found,no-redef]
        RuntimeApi,
        launched,
        start_loop,
    )

TOKEN = "ab12" * 16


@pytest.fixture
def api() -> Iterator[RuntimeApi]:
    server = RuntimeApi()
    try:
        yield server
    finally:
        server.close()


def test_the_request_is_what_flower_encodes() -> None:
    ours = encode_acquire_request(["flwr-clientapp"])
    parsed = runtime_pb2.AcquireTaskRequest.FromString(ours)
    assert list(parsed.supported_task_types) == ["flwr-clientapp"]
    flower = runtime_pb2.AcquireTaskRequest(supported_task_types=["flwr-clientapp"])
    assert ours == flower.SerializeToString(deterministic=True)


def test_a_flower_response_decodes() -> None:
    task = task_pb2.Task(
        task_id=2**40 + 7, type="flwr-clientapp", run_id=2**63 + 1, fab_hash="f" * 64
    )
    task.status.status = "starting"
    data = runtime_pb2.AcquireTaskResponse(task=task, token=TOKEN).SerializeToString()
    assert decode_acquire_response(data) == (2**40 + 7, "flwr-clientapp", TOKEN)
    assert decode_acquire_response(b"") is None  # no task pending
    assert decode_acquire_response(runtime_pb2.AcquireTaskResponse().SerializeToString()) is None


def test_only_the_supernodes_plain_arguments_are_taken() -> None:
    base = ["--insecure", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "42"]
    assert parse_args(base) == ("127.0.0.1:9094", 42)
    assert parse_args(base[3:] + base[:3]) == ("127.0.0.1:9094", 42)
    assert parse_args(["--insecure", "--runtime-api-address", "[::1]:9094", "--parent-pid", "1"])
    # TLS to the Runtime API, dependency installation or anything unknown: Flower's own.
    for extra in (
        ["--root-certificates", "/ca.pem"],
        ["--allow-runtime-dependency-installation"],
        ["--health-server-address", "127.0.0.1:1"],
        ["--insecure"],
    ):
        assert parse_args([*base, *extra]) is None
    assert parse_args(base[1:]) is None  # not --insecure
    assert parse_args(["--insecure", "--runtime-api-address", "x y:1", "--parent-pid", "2"]) is None
    assert parse_args(["--insecure", "--runtime-api-address", "h:1", "--parent-pid", "-2"]) is None


def test_the_loop_starts_one_clientapp_per_task(tmp_path: Path, api: RuntimeApi) -> None:
    parent = subprocess.Popen(["sleep", "60"])
    api.queue += [api.task(TOKEN), b"", api.task("cd34" * 16, task_id=2)]
    proc, record = start_loop(tmp_path, api.address, parent.pid)
    try:
        wait_for(lambda: len(launched(record)) == 2, 30, "two ClientApps started")
        first, second = launched(record)
        assert first == [
            "--runtime-api-address",
            api.address,
            "--token",
            TOKEN,
            "--insecure",
            "--parent-pid",
            str(proc.pid),
        ]
        assert second[3] == "cd34" * 16
        request = api.requests[0]
        assert request["path"] == "/v1/runtime/acquire-task"
        headers = {k.lower(): v for k, v in request["headers"].items()}  # type: ignore[attr-defined]
        assert headers["content-type"] == "application/protobuf"
        assert headers["flwr-component-name"] == "SuperExec"
        assert headers["flwr-package-version"] == version("flwr")
        asked = runtime_pb2.AcquireTaskRequest.FromString(request["body"])  # type: ignore[arg-type]
        assert list(asked.supported_task_types) == ["flwr-clientapp"]
        # The SuperNode (its parent pid) goes away: the loop ends.
        parent.kill()
        parent.wait()
        assert proc.wait(timeout=10) == 0
    finally:
        parent.kill()
        parent.wait()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_other_arguments_run_flowers_own_superexec(tmp_path: Path) -> None:
    script = superexec.install(tmp_path / "bin")
    out = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert "--executor-config" in out.stdout or "--executor" in out.stdout, out.stdout[-500:]


def test_the_loop_stays_light() -> None:
    """Resident size of the loop against Flower's SuperExec (about 130 MB here)."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {superexec.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(len(sys.modules), open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-IS", "-c", code], capture_output=True, text=True, check=True
    )
    modules, rss_kb = (int(v) for v in out.stdout.split())
    assert modules < 150
    assert rss_kb < 40 * 1024


@pytest.mark.parametrize("wait_s", [0.2])
def test_sigterm_ends_the_loop(tmp_path: Path, api: RuntimeApi, wait_s: float) -> None:
    parent = subprocess.Popen(["sleep", "60"])
    proc, _ = start_loop(tmp_path, api.address, parent.pid)
    try:
        wait_for(lambda: len(api.requests) >= 2, 30, "the loop polls")
        time.sleep(wait_s)
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        parent.kill()
        parent.wait()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_prewarm_asks_the_launcher_for_its_zygote_first(tmp_path: Path, api: RuntimeApi) -> None:
    parent = subprocess.Popen(["sleep", "60"])
    proc, record = start_loop(tmp_path, api.address, parent.pid, {superexec.PREWARM_ENV: "1"})
    try:
        wait_for(lambda: launched(record) != [], 30, "the launcher run")
        assert launched(record) == [["--edgefl-prewarm"]]
    finally:
        parent.kill()
        parent.wait()
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_the_prewarm_signal_starts_the_launchers_zygote_at_once(
    tmp_path: Path, api: RuntimeApi
) -> None:
    from edgefl.procs import handles_signal

    parent = subprocess.Popen(["sleep", "60"])
    proc, record = start_loop(tmp_path, api.address, parent.pid)
    try:
        wait_for(lambda: len(api.requests) >= 2, 30, "the loop polls")
        assert launched(record) == []  # no prewarm without being asked
        assert handles_signal(proc.pid, superexec.PREWARM_SIGNAL)
        proc.send_signal(superexec.PREWARM_SIGNAL)
        wait_for(lambda: launched(record) != [], 30, "the launcher run")
        proc.send_signal(superexec.PREWARM_SIGNAL)  # again: the launcher decides, not the loop
        wait_for(lambda: len(launched(record)) == 2, 30, "the second launcher run")
        assert launched(record) == [["--edgefl-prewarm"]] * 2
        assert proc.poll() is None  # still polling
        n = len(api.requests)
        wait_for(lambda: len(api.requests) > n, 30, "the loop polls after the signal")
    finally:
        parent.kill()
        parent.wait()
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_handles_signal_tells_a_handler_from_the_default_action() -> None:
    import signal

    from edgefl.procs import handles_signal

    code = "import signal, sys, time; {}; print('ready', flush=True); time.sleep(60)"
    plain = subprocess.Popen(
        [sys.executable, "-c", code.format("pass")], stdout=subprocess.PIPE, text=True
    )
    handled = subprocess.Popen(
        [sys.executable, "-c", code.format("signal.signal(signal.SIGUSR1, lambda *a: None)")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for proc in (plain, handled):
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        assert not handles_signal(plain.pid, signal.SIGUSR1)
        assert handles_signal(handled.pid, signal.SIGUSR1)
        assert handles_signal(handled.pid, signal.SIGINT)  # Python's own handler
        assert not handles_signal(2**22 + 12345, signal.SIGUSR1)  # no such process
    finally:
        for proc in (plain, handled):
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
