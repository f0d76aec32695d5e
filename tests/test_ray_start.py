"""A simulation survives a Ray start that timed out (a loaded machine), and cleans it up.

Ray's head node gives its GCS server a fixed 30 s to write its port file, and then its
raylet a fixed 30 s to register with the GCS; on two busy cores either can pass, and the run
failed before its first round. The fault is injected where Ray raises it: the first
``ray.init`` leaves a Ray process running and raises Ray's own error; the run must end that
process (and nothing that was running before), start Ray again and train.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgefl.federation import load_plan
from edgefl.procs import pid_alive

SESSION = "session_2026-01-01_00-00-00_000000_4242"
SLEEP = "import time; time.sleep(600)"


@pytest.mark.slow
def test_a_ray_start_that_timed_out_is_ended_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from edgefl.server.fl import run_simulation

    real_init = ray.init
    left: list[subprocess.Popen[bytes]] = []

    def init_that_times_out_once(*args: Any, **kwargs: Any) -> Any:
        if not left:
            # What a GCS server that did not come up in time leaves: a child of this
            # process named by its session.
            left.append(
                subprocess.Popen([sys.executable, "-c", SLEEP, f"/tmp/ray/{SESSION}/gcs_server"])
            )
            raise RuntimeError(
                f"Timed out waiting for file /tmp/ray/{SESSION}/gcs_server_port_0123abcd"
            )
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", init_that_times_out_once)
    plan = load_plan(
        {
            "dataset": "digits",
            "model": "digits-mlp",
            "num_devices": 1,
            "rounds": 1,
            "lr": 0.3,
            "min_available_nodes": 1,
            "min_train_nodes": 1,
            "fraction_evaluate": 0.0,
            "node_wait_s": 60,
            "dp": {"enabled": False},
        }
    )
    try:
        result = run_simulation(
            plan, registry_url=f"sqlite:///{tmp_path / 'registry.db'}", run_id="retry"
        )
        assert [r.round for r in result.rounds] == [1]
        assert len(left) == 1
        left[0].wait(timeout=5)  # reaped: it was killed, not left to run
        assert not pid_alive(left[0].pid)
    finally:
        for proc in left:
            proc.kill()
            proc.wait()


def _fake_ray(monkeypatch: pytest.MonkeyPatch, init: Callable[..., Any]) -> None:
    """Ray with ``init`` as its ``ray.init`` and no running instance (no real Ray)."""
    import ray

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    # _start_ray exports PYTHONPATH as Flower's backend does (run_simulation restores it);
    # monkeypatch restores it here.
    monkeypatch.setenv("PYTHONPATH", "")


def test_other_ray_start_failures_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefl.server.fl import simulation

    calls: list[int] = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise RuntimeError("some other Ray failure")

    _fake_ray(monkeypatch, broken)
    with pytest.raises(RuntimeError, match="some other"):
        simulation._start_ray({})
    assert calls == [1]


def test_a_raylet_that_did_not_register_in_time_is_retried_and_only_its_processes_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgefl.server.fl import simulation

    # A Ray-looking process that was running before the start: not the failed start's.
    older = subprocess.Popen([sys.executable, "-c", SLEEP, "/site-packages/ray/raylet"])
    left: list[subprocess.Popen[bytes]] = []

    def raylet_times_out_once(*args: Any, **kwargs: Any) -> None:
        if not left:
            left.append(
                subprocess.Popen([sys.executable, "-c", SLEEP, "/site-packages/ray/raylet"])
            )
            # Ray 2.55's own words (ray/_private/node.py), raised as a bare Exception.
            raise Exception(
                "The current node timed out during startup. This could happen because some "
                "of the raylet failed to startup or the GCS has become overloaded."
            )
        left.append(left[0])

    _fake_ray(monkeypatch, raylet_times_out_once)
    try:
        simulation._start_ray({})
        assert len(left) == 2  # tried again, and that start succeeded
        left[0].wait(timeout=5)
        assert not pid_alive(left[0].pid)
        assert older.poll() is None  # running before the start: left alone
    finally:
        for proc in [older, *left[:1]]:
            proc.kill()
            proc.wait()


def test_a_start_that_keeps_timing_out_fails_after_the_last_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgefl.server.fl import simulation

    calls: list[int] = []

    def always_late(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise Exception("The current node timed out during startup.")

    _fake_ray(monkeypatch, always_late)
    with pytest.raises(Exception, match="timed out during startup"):
        simulation._start_ray({})
    assert len(calls) == simulation._RAY_START_ATTEMPTS
