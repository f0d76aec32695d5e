"""ClientApp warm start: the launcher, the zygote's forked children, fallback and idle exit.

All real processes: the generated ``flwr-clientapp`` launcher, the zygote
(``python -m edgefl.edge_agent.fl.warmstart serve``) and, end to end, a TLS SuperLink
with one SuperNode supervised by the agent's :class:`SuperNodeSupervisor` with
``warm_start`` on, training edgefl's ClientApp on its local data store.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefl.datasets import load_dataset
from edgefl.edge_agent.datastore import LocalDataStore, Sample
from edgefl.edge_agent.fl.clientapp import telemetry_file_name
from edgefl.edge_agent.fl.privacy import FilePrivacyStore, epsilon_of
from edgefl.edge_agent.fl.supernode import TELEMETRY_DIR, SuperNodeSupervisor, TrainingConfig
from edgefl.edge_agent.fl.warmstart import (
    FORK_LOG,
    LOG_FILE,
    PREWARM_ARG,
    SOCKET_NAME,
    install_launcher,
)
from edgefl.edge_agent.identity import prepare_enrollment
from edgefl.federation import FederationPlan
from edgefl.process import ManagedProcess
from edgefl.procs import pid_alive
from edgefl.server.fl.ledger import FlStore
from edgefl.server.fl.superlink import write_run_app
from edgefl.testing import wait_for

try:
    from tests.flower_deploy import Deployment, start_deployment, wait_run_finished
except ImportError:  # run from inside tests/
    from flower_deploy import (  # type: ignore[import-not-found,no-redef]
        Deployment,
        start_deployment,
        wait_run_finished,
    )

pytestmark = pytest.mark.slow

RUN = "warm-run"


def _forks(state: Path) -> list[dict[str, Any]]:
    path = state / FORK_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _zygote_pid(state: Path) -> int:
    for line in (state / LOG_FILE).read_text().splitlines():
        if "serving" in line:
            return int(line.split("warmstart[")[1].split("]")[0])
    raise AssertionError("the zygote never served")


def _launch(bin_dir: Path, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(bin_dir / "flwr-clientapp"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=bin_dir.parent,
        start_new_session=True,
        **kw,
    )


@contextlib.contextmanager
def _cleanup_group(pgids: list[int]) -> Iterator[None]:
    try:
        yield
    finally:
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


def test_first_call_falls_back_later_calls_fork_and_the_zygote_exits_when_idle(
    tmp_path: Path,
) -> None:
    bin_dir = install_launcher(tmp_path, idle_exit_s=3.0, first_wait_s=0.0)
    launcher = bin_dir / "flwr-clientapp"
    assert launcher.read_text().startswith(f"#!{sys.executable} -IS\n")
    # A stale socket file (nobody listening) counts as no zygote.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(tmp_path / SOCKET_NAME))
    stale.close()
    first = _launch(bin_dir, "--help")
    groups = [first.pid]
    with _cleanup_group(groups):
        out, _ = first.communicate(timeout=120)
        assert first.returncode == 0
        assert b"usage: flwr-clientapp" in out
        assert _forks(tmp_path) == []  # the real flwr-clientapp ran it
        # It started a zygote in its process group, which preloads and then serves.
        wait_for(
            lambda: "serving" in (tmp_path / LOG_FILE).read_text(errors="replace"),
            120,
            "the zygote serving",
        )
        zygote = _zygote_pid(tmp_path)
        assert os.getpgid(zygote) == first.pid
        assert (tmp_path / SOCKET_NAME).stat().st_mode & 0o777 == 0o600
        bad = _launch(bin_dir, "--no-such-option")
        _, err = bad.communicate(timeout=30)
        assert bad.returncode == 2, err  # argparse's exit code, from the forked child
        assert b"--token" in err  # its stderr is the caller's
        forks = _forks(tmp_path)
        assert [f["event"] for f in forks] == ["fork", "exit"]
        assert forks[0]["zygote"] == zygote
        assert forks[1]["code"] == 2
        # No request for --idle-exit-s: it exits and removes its socket.
        wait_for(lambda: not pid_alive(zygote), 30, "the zygote's idle exit")
        assert not (tmp_path / SOCKET_NAME).exists()
        assert "idle for 3 s; exiting after 1 forks" in (tmp_path / LOG_FILE).read_text()
        # With the zygote gone, the next call is a cold start again.
        again = _launch(bin_dir, "--help")
        groups.append(again.pid)
        out, _ = again.communicate(timeout=120)
        assert again.returncode == 0
        assert b"usage: flwr-clientapp" in out
        assert len(_forks(tmp_path)) == 2


def test_first_call_waits_for_the_zygote_it_started(tmp_path: Path) -> None:
    bin_dir = install_launcher(tmp_path, idle_exit_s=3.0)
    first = _launch(bin_dir, "--help")
    with _cleanup_group([first.pid]):
        out, _ = first.communicate(timeout=120)
        assert first.returncode == 0
        assert b"usage: flwr-clientapp" in out
        # Served by a child of the zygote it started, not by a second cold import.
        assert [f["event"] for f in _forks(tmp_path)] == ["fork", "exit"]
        assert _forks(tmp_path)[0]["zygote"] == _zygote_pid(tmp_path)


def test_prewarm_starts_the_zygote_before_any_message(tmp_path: Path) -> None:
    """``flwr-clientapp --edgefl-prewarm`` (run by the light SuperExec at the SuperNode's
    start with training.warm_start_prewarm) starts the zygote and returns; the zygote
    serves before any message and still exits when idle."""
    bin_dir = install_launcher(tmp_path, idle_exit_s=3.0)
    pre = _launch(bin_dir, PREWARM_ARG)
    with _cleanup_group([pre.pid]):
        pre.communicate(timeout=60)
        assert pre.returncode == 0
        log = tmp_path / LOG_FILE
        wait_for(lambda: log.exists() and "serving" in log.read_text(), 180, "a serving zygote")
        assert _forks(tmp_path) == []  # no message was run
        zygote = _zygote_pid(tmp_path)
        wait_for(lambda: not pid_alive(zygote), 60, "the idle zygote's exit")


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A served zygote (started as a launcher would) and its launcher's bin dir."""
    state = tmp_path_factory.mktemp("zygote")
    bin_dir = install_launcher(state, idle_exit_s=300.0)
    proc = ManagedProcess(
        [
            sys.executable,
            "-m",
            "edgefl.edge_agent.fl.warmstart",
            "serve",
            "--socket",
            str(state / SOCKET_NAME),
            "--idle-exit-s",
            "300",
        ],
        state / LOG_FILE,
        name="warm-start zygote",
    )
    proc.start()
    try:
        proc.wait_for_log("serving", 120)
        yield bin_dir
    finally:
        proc.kill()


def _hanging_clientapp(bin_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A launcher whose forked ClientApp retries a Runtime API nobody serves."""
    before = len(_forks(bin_dir.parent))
    proc = _launch(bin_dir, "--runtime-api-address", "127.0.0.1:9", "--token", "ab" * 32)
    wait_for(lambda: len(_forks(bin_dir.parent)) > before, 30, "a fork")
    child = int(_forks(bin_dir.parent)[before]["pid"])
    time.sleep(1.0)
    assert pid_alive(child)
    assert proc.poll() is None
    return proc, child


def test_sigterm_to_the_launcher_reaches_its_child(zygote: Path) -> None:
    proc, child = _hanging_clientapp(zygote)
    with _cleanup_group([proc.pid]):
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert not pid_alive(child)
        last = _forks(zygote.parent)[-1]
        assert last["event"] == "exit"
        assert last["pid"] == child


def test_a_killed_launcher_takes_its_child_with_it(zygote: Path) -> None:
    proc, child = _hanging_clientapp(zygote)
    with _cleanup_group([proc.pid]):
        proc.kill()
        proc.wait(10)
        wait_for(lambda: not pid_alive(child), 15, "the orphaned child killed")


# ---------------------------------------------------------------------- end to end


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    dep = start_deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop()


def _fill_store(path: Path, n: int = 200) -> None:
    data = load_dataset("digits", seed=0)
    x = data.x_train.reshape(len(data.x_train), -1)[:n]
    with LocalDataStore(path) as store:
        store.add_many(
            Sample(x=row, y=int(label), stream="samples")
            for row, label in zip(x, data.y_train[:n], strict=True)
        )


def test_round_two_runs_in_a_forked_child_and_the_ledger_matches_the_device(
    deployment: Deployment, tmp_path: Path
) -> None:
    state = tmp_path / "device"
    paths = prepare_enrollment("dev-w", "lab", state).paths
    deployment.admin.register_node(paths.node_public_key, name="dev-w")
    paths.ca.write_bytes(deployment.ca.cert_pem)
    _fill_store(state / "samples.db")
    config = TrainingConfig.model_validate(
        {"superlink": deployment.superlink.address, "min_samples": 10, "warm_start": True}
    )
    sup = SuperNodeSupervisor(
        config, device_id="dev-w", state_dir=state, data_store=state / "samples.db"
    )
    stop = threading.Event()

    def supervise() -> None:
        while not stop.wait(0.5):
            sup.poll(connected=True, samples=200)

    thread = threading.Thread(target=supervise, daemon=True)
    thread.start()
    try:
        wait_for(lambda: sup.node_id is not None, 120, "the SuperNode connected")
        plan = FederationPlan.model_validate(
            {
                "dataset": "digits",
                "model": "digits-mlp",
                "num_devices": 1,
                "rounds": 2,
                "lr": 0.3,
                "min_train_nodes": 1,
                "min_available_nodes": 1,
                "node_wait_s": 60,
                "round_timeout_s": 240,
                "select_by_capability": False,
                "dp": {"target_epsilon": 8.0},
            }
        )
        url = f"sqlite:///{tmp_path / 'registry.db'}"
        app = write_run_app(tmp_path / "app", plan, registry_url=url, run_id=RUN)
        flower_run = deployment.admin.submit_run(app)
        status = wait_run_finished(deployment.admin, flower_run, timeout=480)
        assert status == "finished:completed", status
    finally:
        stop.set()
        thread.join()
        sup.close()
    store = FlStore(url)
    try:
        result = store.result(RUN)
        ledger = store.ledger(RUN)
        stored_plan = store.plan(RUN)
    finally:
        store.close()
    assert result.status == "completed"
    assert [r.round for r in result.rounds] == [1, 2]
    assert [r.num_replies for r in result.rounds] == [1, 1]
    assert all(r.aggregated for r in result.rounds)
    assert sorted((r.device_id, r.round) for r in ledger) == [("dev-w", 1), ("dev-w", 2)]
    own = FilePrivacyStore(state).load(RUN)
    assert own is not None
    last = max(ledger, key=lambda r: r.round)
    assert last.epsilon_total == pytest.approx(epsilon_of(own.history, stored_plan.dp.delta))
    # Round 1 was the run's first message: its launcher started the zygote and waited for
    # it; both rounds' ClientApps were children forked by the zygote, which exited cleanly
    # and wrote their telemetry while they ran.
    forks = _forks(state)
    started = [f for f in forks if f["event"] == "fork"]
    assert len(started) == 2, forks
    zygote_log = (state / LOG_FILE).read_text()
    for rnd, fork in enumerate(started, start=1):
        done = next(f for f in forks if f["event"] == "exit" and f["pid"] == fork["pid"])
        assert done["code"] == 0
        assert f"warmstart[{fork['zygote']}] preloaded" in zygote_log
        written = (state / TELEMETRY_DIR / telemetry_file_name(RUN, rnd)).stat().st_mtime
        assert fork["time"] <= written <= done["time"]
    assert not pid_alive(int(fork["zygote"]))  # the supervisor's killpg took it at close
