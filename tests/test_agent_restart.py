"""An agent killed with ``-9`` while training is on: its restart ends the orphaned SuperNode.

Real processes: a TLS SuperLink with node authentication, and ``edgefl agent run`` twice on
the same state dir (the device's node key registered on the SuperLink).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefl.config import load_config
from edgefl.edge_agent.daemon import AgentConfig, read_status
from edgefl.edge_agent.fl.supernode import RUNTIME_FILE
from edgefl.edge_agent.identity import prepare_enrollment
from edgefl.process import ManagedProcess
from edgefl.procs import cmdline, pid_alive
from edgefl.testing import free_port, wait_for

try:
    from tests.flower_deploy import Deployment, start_deployment
except ImportError:  # run from inside tests/
    from flower_deploy import Deployment, start_deployment  # type: ignore[import-not-found,no-redef]


EDGEFL = Path(sys.executable).parent / "edgefl"
PATIENCE_S = 60.0
"""The SuperLink's heartbeat patience (30 s x 2): the issue's bound for the restart."""


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    dep = start_deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop()


def _agent(config: Path, log: Path) -> ManagedProcess:
    """``edgefl agent run`` in its own process group (its SuperNode has a group of its own)."""
    proc = ManagedProcess([str(EDGEFL), "agent", "run", "--config", str(config)], log)
    proc.start()
    return proc


@pytest.mark.slow
def test_a_restarted_agent_ends_the_supernode_its_killed_predecessor_left(
    deployment: Deployment, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    paths = prepare_enrollment("pi-09", "lab", state).paths
    paths.ca.write_bytes(deployment.ca.cert_pem)
    node_id = deployment.admin.register_node(paths.node_public_key, name="pi-09")
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "device_id": "pi-09",
                "fleet": "lab",
                "state_dir": str(state),
                "mqtt": {"port": free_port()},  # no broker: training does not need it here
                "sources": [{"type": "dataset-replay", "rate_hz": 50}],
                "status_interval_s": 0.5,
                "training": {
                    "superlink": deployment.superlink.address,
                    "min_samples": 5,
                    "require_connected": False,
                },
            }
        )
    )
    cfg = load_config(AgentConfig, config_path)
    log = tmp_path / "agent.log"

    def supernode() -> dict[str, Any]:
        return dict((read_status(cfg).get("training") or {}).get("supernode") or {})

    def online() -> bool:
        return any(
            n.node_id == node_id and n.status == "online" for n in deployment.admin.list_nodes()
        )

    first = _agent(config_path, log)
    second: ManagedProcess | None = None
    orphan = 0
    try:
        wait_for(lambda: supernode().get("node_id") == node_id, 120, "the first SuperNode active")
        orphan = int(supernode()["pid"])
        first.kill()  # kill -9: the agent cannot stop its SuperNode
        time.sleep(1.0)
        # The precondition the issue found: the SuperNode outlives its agent, node online.
        assert pid_alive(orphan)
        assert any("flower-supernode" in a for a in cmdline(orphan))
        assert online()
        restarted = time.monotonic()
        second = _agent(config_path, log)
        wait_for(
            lambda: supernode().get("node_id") == node_id and supernode().get("pid") != orphan,
            PATIENCE_S,
            "the restarted agent's SuperNode active",
        )
        took = time.monotonic() - restarted
        assert not pid_alive(orphan)
        assert online()
        new_pid = int(supernode()["pid"])
        assert pid_alive(new_pid)
        assert (state / RUNTIME_FILE).read_text().count(str(new_pid)) == 1
        text = log.read_text(errors="replace")
        assert f"ending flower-supernode (pid {orphan})" in text
        # Ended with SIGTERM, the orphan signed its node off: no refused activation.
        assert "Failed to activate SuperNode" not in text
        assert took < PATIENCE_S
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
        assert not pid_alive(new_pid)
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
        if orphan:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(orphan, signal.SIGKILL)


def _stand_in(cwd: Path, *marks: str) -> ManagedProcess:
    """A sleeping process whose command line carries ``marks`` (a leftover's stand-in)."""
    argv = [sys.executable, "-c", "import time; time.sleep(120)", *marks]
    proc = ManagedProcess(argv, cwd.parent / f"stand-in-{cwd.name}.log", cwd=cwd)
    proc.start()
    return proc


def test_leftovers_are_ended_by_state_dir_and_the_refusal_names_the_cause(
    tmp_path: Path,
) -> None:
    from edgefl.edge_agent.fl.supernode import SuperNodeSupervisor, TrainingConfig

    state = tmp_path / "state"
    other = tmp_path / "other"
    state.mkdir()
    other.mkdir()
    config = TrainingConfig.model_validate({"superlink": "127.0.0.1:9", "insecure": True})
    leftover = _stand_in(state, "flower-supernode")
    elsewhere = _stand_in(other, "flower-supernode")  # another device's SuperNode
    unrelated = _stand_in(state)  # works in the state dir, but is not one of ours
    procs = [leftover, elsewhere, unrelated]
    try:
        # The runtime file names a PID that now belongs to something else: left alone.
        (state / RUNTIME_FILE).write_text(f'{{"pid": {unrelated.pid}, "node_id": 42}}')
        sup = SuperNodeSupervisor(
            config, device_id="d", state_dir=state, data_store=state / "samples.db"
        )
        assert "no longer accepts" in sup._activation_cause(0.0)
        assert "node 42" in sup._activation_cause(0.0)
        assert sup.end_leftovers() == [leftover.pid]
        assert leftover.wait(10) == -signal.SIGTERM
        assert elsewhere.poll() is None
        assert unrelated.poll() is None
        cause = sup._activation_cause(sup._clock())
        assert "still counts node 42 as online" in cause
        assert "a minute of missed heartbeats" in cause
        fresh = SuperNodeSupervisor(
            config, device_id="d", state_dir=other, data_store=other / "samples.db"
        )
        assert "not registered" in fresh._activation_cause(0.0)
        assert "edgefl server admit" in fresh._activation_cause(0.0)
    finally:
        for proc in procs:
            proc.kill()
