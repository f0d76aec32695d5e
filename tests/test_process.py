"""The process toolkit: start, readiness, stop by group, log-line picking, restart backoff."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from edgefl.netutil import free_port
from edgefl.process import (
    ManagedProcess,
    ProcessNotReadyError,
    last_log_line,
    last_meaningful_line,
    wait_until,
)
from edgefl.procs import pid_alive
from edgefl.supervise import RestartBackoff, Supervisor


def _py(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", code]


def test_a_boxed_error_yields_its_text_not_its_frame() -> None:
    boxed = (
        "Usage: edgefl [OPTIONS] COMMAND [ARGS]...\n"
        "╭─ Error ─────────────────────────────╮\n"
        "│ No such command 'no-such-command'. │\n"
        "╰─────────────────────────────────────╯\n"
    )
    assert last_meaningful_line(boxed) == "No such command 'no-such-command'."


def test_last_meaningful_line_prefers_causes_then_levels_then_last() -> None:
    text = "\x1b[31mINFO start\x1b[0m\nERROR: bad thing\n\nWARNING later\nbye\n"
    assert last_meaningful_line(text) == "bye"
    assert last_meaningful_line(text, causes=("bad",)) == "ERROR: bad thing"
    assert last_meaningful_line(text, causes=re.compile("nothing"), levels=("ERROR",)) == (
        "ERROR: bad thing"
    )
    assert last_meaningful_line(text, noise=("bye",)) == "WARNING later"
    assert last_meaningful_line(text, skip=("later", "bye")) == "ERROR: bad thing"
    assert last_meaningful_line("\n \n") == ""


def test_last_log_line_reads_the_first_log_with_a_line(tmp_path: Path) -> None:
    empty, full = tmp_path / "a.log", tmp_path / "b.log"
    empty.write_text("\n")
    full.write_text("one\ntwo\n")
    assert last_log_line(tmp_path / "missing", empty, full) == "two"


def test_wait_until_times_out_and_passes_exceptions_on() -> None:
    with pytest.raises(TimeoutError, match="the thing"):
        wait_until(lambda: False, 0.2, "the thing")

    def boom() -> bool:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        wait_until(boom, 5.0, "x")


def test_ready_by_port_and_stop_ends_the_whole_group(tmp_path: Path) -> None:
    port = free_port()
    code = (
        "import socket, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
        "print('child up', flush=True); time.sleep(60)\n"
    )
    proc = ManagedProcess(_py(code), tmp_path / "p.log", name="listener")
    proc.start()
    proc.wait_for_port("127.0.0.1", port, 20.0)
    pid = proc.pid
    assert pid is not None
    assert proc.running()
    proc.stop(grace=5.0)
    assert not proc.running()
    assert not pid_alive(pid)
    # The grandchild (same group) is gone too.
    assert proc.returncode is not None


def test_ready_by_log_line_and_exit_names_the_last_line(tmp_path: Path) -> None:
    proc = ManagedProcess(
        _py("print('ready at 42', flush=True); import time; time.sleep(60)"), tmp_path / "p.log"
    )
    proc.start()
    match = proc.wait_for_log(r"ready at (\d+)", 20.0)
    assert match.group(1) == "42"
    proc.kill()

    failing = ManagedProcess(
        _py("print('Error: no config'); raise SystemExit(3)"), tmp_path / "f.log", name="failing"
    )
    failing.start()
    with pytest.raises(ProcessNotReadyError) as info:
        failing.wait_for_log("never", 20.0)
    assert info.value.exit_code == 3
    assert str(info.value) == "failing exited with code 3 at start-up: Error: no config"
    assert info.value.hint == f"see {tmp_path / 'f.log'}"


def test_not_ready_in_time_is_killed(tmp_path: Path) -> None:
    proc = ManagedProcess(_py("import time; time.sleep(60)"), tmp_path / "p.log", name="slow")
    proc.start()
    start = time.monotonic()
    with pytest.raises(
        ProcessNotReadyError, match=r"slow did not listen on 127\.0\.0\.1:1 within 0\.3 s"
    ):
        proc.wait_for_port("127.0.0.1", 1, 0.3)
    assert time.monotonic() - start < 10
    assert not proc.running()


def test_a_stubborn_process_is_killed_after_the_grace(tmp_path: Path) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring', flush=True); time.sleep(60)\n"
    )
    proc = ManagedProcess(_py(code), tmp_path / "p.log")
    proc.start()
    proc.wait_for_log("ignoring", 20.0)
    assert proc.stop(grace=0.5) == -9


def test_restart_backoff_grows_resets_when_stable_and_counts() -> None:
    b = RestartBackoff(1.0, 8.0, 30.0, rng=lambda: 1.0)
    b.started(0.0)
    assert [b.schedule(0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert not b.due(0.0)
    assert b.due(8.0)
    b.started(100.0)
    b.note_running(110.0)
    assert b.attempt == 5
    b.note_running(130.0)
    assert b.attempt == 0
    b.count_restart()
    assert b.state()["restarts"] == 1


class _FakeChild:
    def __init__(self) -> None:
        self.alive = True
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return 1234

    def running(self) -> bool:
        return self.alive

    def start(self) -> None:
        self.starts += 1
        self.alive = True

    def stop(self) -> None:
        self.alive = False


def test_supervisor_restarts_a_dead_child_after_the_delay() -> None:
    restarted: list[str] = []
    sup = Supervisor(1.0, 4.0, 30.0, on_restart=lambda s: restarted.append(s.name))
    child = _FakeChild()
    sup.add("broker", child, now=0.0)
    child.alive = False
    sup.check(10.0)  # scheduled
    assert child.starts == 0
    sup.check(10.0 + 0.4)
    assert child.starts == 0  # at least min_s / 2
    sup.check(11.1)
    assert child.starts == 1
    assert restarted == ["broker"]
    assert sup.restarts() == {"broker": 1}
    assert sup.pids() == {"broker": 1234}
