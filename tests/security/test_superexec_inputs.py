"""Attack: hostile Runtime API answers to the light ClientApp task loop.

The loop (edgefl.edge_agent.fl.superexec, standing in for Flower's ``flower-superexec``)
turns what the SuperNode's Runtime API answers into a command line. Whatever answers on
that port (a SuperNode with a bug, a process that took the port) must not be able to
start anything but ``flwr-clientapp``, add options to its command line, or stop the loop:
garbage, truncated or oversized messages, a token that is an option or has spaces, a
task of another type and HTTP errors are all refused, and a well-formed task after them
still starts exactly one ClientApp with its own token.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.proto import runtime_pb2, task_pb2

from edgefl.edge_agent.fl.superexec import ProtocolError, decode_acquire_response
from edgefl.testing import wait_for

try:
    from tests.superexec_helpers import RuntimeApi, launched, start_loop
except ImportError:  # run from inside tests/
    from superexec_helpers import (  # type: ignore[import-not-found,no-redef]
        RuntimeApi,
        launched,
        start_loop,
    )

GOOD = "0f" * 32


def _response(token: str, task_type: str = "flwr-clientapp") -> bytes:
    task = task_pb2.Task(task_id=9, type=task_type, run_id=1)
    return runtime_pb2.AcquireTaskResponse(task=task, token=token).SerializeToString()


HOSTILE = {
    "garbage": b"\xff\xff\xff\xff",
    "truncated length": b"\x0a\xff\xff\xff\xff\x0f",
    "huge varint": b"\x08" + b"\xff" * 11,
    "wire type 7": b"\x0f",
    "field number 0": b"\x02\x00",
    "token is an option": _response("--root-certificates=/tmp/evil.pem"),
    "token with spaces": _response("abcdef12 --insecure"),
    "token with a newline": _response("abcdef12\n--insecure"),
    "token not ascii": _response("abcdéf1234"),
    "short token": _response("ab"),
    "agent app task": _response(GOOD.replace("0f", "1e"), "flwr-agentapp"),
    "connector task": _response(GOOD.replace("0f", "2d"), "flwr-connector"),
    "oversized": _response(GOOD.replace("0f", "3c")) + b"\x1a" + b"\x80\x80\x80\x01" + b"x" * 2**21,
}


@pytest.mark.parametrize("name", [n for n in HOSTILE if not n.endswith(("task", "oversized"))])
def test_malformed_answers_are_refused(name: str) -> None:
    with pytest.raises(ProtocolError):
        decode_acquire_response(HOSTILE[name])


@pytest.fixture
def api() -> Iterator[RuntimeApi]:
    server = RuntimeApi()
    try:
        yield server
    finally:
        server.close()


def test_hostile_answers_start_nothing_and_a_good_task_still_runs(
    tmp_path: Path, api: RuntimeApi
) -> None:
    parent = subprocess.Popen(["sleep", "120"])
    api.queue += [*list(HOSTILE.values()), _response(GOOD)]
    proc, record = start_loop(tmp_path, api.address, parent.pid)
    try:
        wait_for(lambda: len(launched(record)) >= 1, 60, "the good task's ClientApp started")
        wait_for(lambda: not api.queue, 30, "every answer was read")
        assert proc.poll() is None, "a hostile answer stopped the loop"
        runs = launched(record)
        assert len(runs) == 1, runs
        assert runs[0][runs[0].index("--token") + 1] == GOOD
        assert runs[0].count("--insecure") == 1
        assert len(runs[0]) == 7
    finally:
        parent.kill()
        parent.wait()
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        log = proc.stderr.read()
        proc.stderr.close()
    assert "not starting task 9 of type 'flwr-agentapp'" in log
