"""Kill -9 the server process after a checkpoint, start it again: the run continues.

The server (a real Flower simulation, SQLite registry) runs in a subprocess. Its
``on_round`` callback blocks after round 1 is committed, and the test kills the whole
process group there. The second start resumes from the checkpoint: rounds continue at 2,
the ledger has exactly one row per device and round, and ε keeps growing from the ledger
(the restarted simulated devices lost their state; the ledger floor restores it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from edgefl.process import ManagedProcess
from edgefl.server.fl.ledger import FlStore

pytestmark = pytest.mark.slow

PLAN = {
    "dataset": "digits",
    "num_devices": 3,
    "rounds": 2,
    "batch_size": 32,
    "lr": 0.05,
    "min_available_nodes": 3,
    "min_train_nodes": 3,
    "dp": {"target_epsilon": 4.0},
}

SCRIPT = """
import json, sys, time
from edgefl.federation import load_plan
from edgefl.server.fl import run_simulation

url, log_path, hang = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
plan = load_plan(json.loads(sys.argv[4]))

def on_round(report):
    with open(log_path, "a") as f:
        f.write(f"{report.round}\\n")
    if hang and report.round == 1:
        time.sleep(600)  # the test kills the process here

result = run_simulation(plan, registry_url=url, run_id="resume-test", on_round=on_round)
print(json.dumps(result.to_dict()))
"""


def _rounds_logged(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_killed_server_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [url, "", "", json.dumps(PLAN)]

    proc = ManagedProcess(
        [sys.executable, str(script), args[0], str(first_log), "1", args[3]],
        tmp_path / "first.out",
        env=env,
    )
    proc.start()
    try:
        deadline = time.monotonic() + 300
        while not _rounds_logged(first_log):
            assert proc.poll() is None, "the server exited before round 1"
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.5)
    finally:
        proc.kill()
    assert _rounds_logged(first_log) == [1]

    store = FlStore(url)
    try:
        assert store.result("resume-test").status == "running"
        assert {r.round for r in store.ledger("resume-test")} == {1}
    finally:
        store.close()

    done = subprocess.run(
        [sys.executable, str(script), args[0], str(second_log), "0", args[3]],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _rounds_logged(second_log) == [2]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "completed"
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert all(r["num_flagged"] == 0 and r["num_rejected"] == 0 for r in result["rounds"])

    from opacus.accountants import RDPAccountant

    store = FlStore(url)
    try:
        ledger = store.ledger("resume-test")
    finally:
        store.close()
    keys = [(r.device_id, r.round) for r in ledger]
    assert len(keys) == len(set(keys)) == 3 * 2
    by_device = defaultdict(list)
    for row in ledger:
        by_device[row.device_id].append(row)
    for device, rows in by_device.items():
        accountant = RDPAccountant()
        for row in sorted(rows, key=lambda r: r.round):
            for _ in range(row.steps):
                accountant.step(noise_multiplier=row.sigma, sample_rate=row.sample_rate)
            assert row.epsilon_total == pytest.approx(accountant.get_epsilon(1e-5), rel=0.01)
            assert row.epsilon_spent > 0, (device, row.round)
        assert result["epsilon_per_device"][device] == pytest.approx(rows[-1].epsilon_total)
