"""``prewarm-training``: a command that makes the agent send a signal, attacked.

``edgefl server train`` tells the admitted online devices that a run is starting, and
each agent signals its SuperNode's light task loop (SIGUSR1) to start the ClientApp's warm
zygote. Only the server's commands identity may publish commands (the broker's ACL, tested
with the fleet's topics), so the attacker here is whoever gets a command through, or a
process on the device that looks like the loop. SIGUSR1's default action ends a process,
so the agent must signal only its own loop, and only once that loop handles the signal:
never another process named ``flower-superexec``, never a loop still starting. A command
with arguments is refused and runs nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from edgefl.edge_agent.commands import CommandError, prewarm_handler
from edgefl.edge_agent.fl import superexec
from edgefl.edge_agent.fl.supernode import SuperNodeSupervisor, TrainingConfig
from edgefl.edge_agent.fl.warmstart import BIN_DIR
from edgefl.process import ManagedProcess
from edgefl.procs import cmdline, descendants, pid_alive
from edgefl.testing import wait_for

# A stand-in for the loop: with HANDLE it installs the SIGUSR1 handler (writing MARK),
# without it SIGUSR1 would end it.
LOOP = """#!{python} -I
import signal, sys, time
if {handle!r}:
    signal.signal(signal.SIGUSR1, lambda *a: open({mark!r}, "a").write("prewarm\\n"))
open({ready!r}, "w").write("ready")
time.sleep(60)
"""


def _loop_script(path: Path, mark: Path, ready: Path, *, handle: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        LOOP.format(python=sys.executable, handle=handle, mark=str(mark), ready=str(ready))
    )
    path.chmod(0o700)
    return path


def _supervisor(state_dir: Path, **training: object) -> SuperNodeSupervisor:
    config = TrainingConfig.model_validate({"superlink": "127.0.0.1:9", **training})
    return SuperNodeSupervisor(
        config, device_id="dev-a", state_dir=state_dir, data_store=state_dir / "samples.db"
    )


def _supernode_running(sup: SuperNodeSupervisor, scripts: list[Path], log: Path) -> None:
    """A stand-in SuperNode (its own process group, as the real one) running ``scripts``."""
    code = (
        "import subprocess, sys, time\n"
        f"children = [subprocess.Popen([p]) for p in {[str(s) for s in scripts]!r}]\n"
        "time.sleep(60)\n"
    )
    proc = ManagedProcess([sys.executable, "-c", code], log, name="flower-supernode")
    proc.start()
    sup._proc = proc


def test_the_command_takes_no_arguments_and_runs_nothing_with_them() -> None:
    calls: list[int] = []

    def prewarm() -> dict[str, object]:
        calls.append(1)
        return {"prewarmed": True}

    handler = prewarm_handler(prewarm)
    with pytest.raises(CommandError, match="takes none"):
        handler({"path": "/bin/sh"})
    assert calls == []
    assert handler({}) == {"prewarmed": True}
    assert calls == [1]


@pytest.mark.parametrize(
    ("training", "reason"),
    [
        ({"warm_start": False}, "warm_start is off"),
        ({"light_superexec": False}, "light_superexec is off"),
        ({}, "SuperNode is not running"),
    ],
)
def test_a_device_that_cannot_prewarm_says_why(
    tmp_path: Path, training: dict[str, object], reason: str
) -> None:
    answer = _supervisor(tmp_path, **training).prewarm()
    assert answer["prewarmed"] is False
    assert reason in str(answer["reason"])


def test_only_its_own_loop_and_only_once_it_handles_the_signal(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    own = tmp_path / BIN_DIR / superexec.EXECUTABLE
    mark, ready = tmp_path / "own.mark", tmp_path / "own.ready"
    # Another process of the SuperNode's tree that is named like the loop, elsewhere, and
    # handles the signal: never the agent's to signal.
    other_mark, other_ready = tmp_path / "other.mark", tmp_path / "other.ready"
    other = _loop_script(
        tmp_path / "elsewhere" / superexec.EXECUTABLE, other_mark, other_ready, handle=True
    )
    # The agent's own loop, still starting: no handler yet.
    _loop_script(own, mark, ready, handle=False)
    _supernode_running(sup, [own, other], tmp_path / "supernode.log")
    try:
        wait_for(lambda: ready.exists() and other_ready.exists(), 30, "both scripts running")
        answer = sup.prewarm()
        assert answer == {
            "prewarmed": False,
            "reason": "the SuperNode's ClientApp task loop is not running yet",
        }
        time.sleep(0.5)
        assert not other_mark.exists()
        root = sup._proc.pid if sup._proc is not None else None
        assert root is not None
        loops = [p for p in descendants(root) if str(own) in cmdline(p)]
        assert loops
        assert all(pid_alive(p) for p in loops)  # not ended by a default-action signal
    finally:
        assert sup._proc is not None
        sup._proc.stop(2.0)


def test_its_own_running_loop_is_asked(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    own = tmp_path / BIN_DIR / superexec.EXECUTABLE
    mark, ready = tmp_path / "own.mark", tmp_path / "own.ready"
    _loop_script(own, mark, ready, handle=True)
    _supernode_running(sup, [own], tmp_path / "supernode.log")
    try:
        wait_for(ready.exists, 30, "the loop running")
        assert sup.prewarm() == {"prewarmed": True}
        wait_for(mark.exists, 10, "the loop got the signal")
        assert mark.read_text() == "prewarm\n"
    finally:
        assert sup._proc is not None
        sup._proc.stop(2.0)
