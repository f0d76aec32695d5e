"""``edgefl demo`` end to end: a CI-sized run checked against its registry, and a failure.

Both run the real command (server, mosquitto, SuperLink behind nginx, ingest, agents with
their SuperNodes, the release toolkit, the inference service) on loopback. The cloud
model is the inference service's cached one (``~/.cache/edgefl/inference``): a machine
without it trains it first (about a minute).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from edgefl.privacy import epsilon_of
from edgefl.procs import cmdline
from edgefl.server.registry import make_engine
from edgefl.server.registry.models import DeviceState, FlRound, PrivacyLedgerEntry, Record
from edgefl.testing import edgefl_executable

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                line = " ".join(cmdline(int(entry.name)))
            except Exception:
                continue
            if text in line:
                found.append(int(entry.name))
    return found


def _demo(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [edgefl_executable(), "demo", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_ci_sized_demo_matches_its_registry(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _demo(out, "--devices", "3", "--rounds", "2", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary: dict[str, Any] = json.loads(proc.stdout)
    assert (summary["devices"], summary["rounds"]) == (3, 2)
    check_against_registry(out, summary)
    # The commands' logs carry the dashboard's API token: the owner's alone.
    assert (out / "logs").stat().st_mode & 0o077 == 0


def check_against_registry(out: Path, summary: dict[str, Any]) -> None:
    """The summary's figures, checked against the registry the demo left in ``out``."""
    assert all(stage["ok"] for stage in summary["stages"].values()), summary["stages"]
    assert (out / "report.md").is_file()

    engine = make_engine(f"sqlite:///{out / 'server' / 'edgefl.db'}")
    try:
        with engine.connect() as conn:
            rounds = conn.execute(
                sa.select(FlRound.round, FlRound.accuracy)
                .where(FlRound.run_id == summary["run_id"])
                .order_by(FlRound.round)
            ).all()
            ledger = conn.execute(
                sa.select(
                    PrivacyLedgerEntry.device_id,
                    PrivacyLedgerEntry.sigma,
                    PrivacyLedgerEntry.sample_rate,
                    PrivacyLedgerEntry.steps,
                    PrivacyLedgerEntry.delta,
                ).where(PrivacyLedgerEntry.run_id == summary["run_id"])
            ).all()
            stored = conn.execute(sa.select(sa.func.count()).select_from(Record)).scalar_one()
            distinct = conn.execute(
                sa.select(sa.func.count()).select_from(
                    sa.select(Record.device_id, Record.incarnation, Record.seq)
                    .distinct()
                    .subquery()
                )
            ).scalar_one()
            versions = {
                str(device): version
                for device, version in conn.execute(
                    sa.select(DeviceState.device_id, DeviceState.version)
                ).all()
            }
    finally:
        engine.dispose()

    # The server-side accuracy the summary reports is the registry's last round.
    assert [r.round for r in rounds] == [1, 2]
    assert summary["final_accuracy"] == pytest.approx(rounds[-1].accuracy)
    # Each device's ε recomputed from the ledger's (σ, q, steps) rows alone.
    per_device: dict[str, list[list[float]]] = {}
    delta = {}
    for row in ledger:
        per_device.setdefault(row.device_id, []).append(
            [row.sigma, row.sample_rate, float(row.steps)]
        )
        delta[row.device_id] = row.delta
    assert sorted(per_device) == ["dev-01", "dev-02", "dev-03"]
    recomputed = {d: epsilon_of(h, delta[d]) for d, h in per_device.items()}
    assert max(recomputed.values()) == pytest.approx(summary["epsilon_max"], rel=1e-3)
    assert all(0 < eps <= 8.0 + 1e-6 for eps in recomputed.values()), recomputed
    # Records: what the outboxes delivered is what the registry holds, each once.
    records = summary["records"]
    assert records["sent"] == records["stored"] == stored > 0
    assert records["duplicate_rows"] == 0
    assert distinct == stored
    # Every agent runs the release, as it reports and as the registry stored it.
    version = summary["release_version"]
    assert summary["agents_on_release"] == 3
    assert {d: versions.get(d) for d in per_device} == {d: version for d in per_device}
    # Nothing left running.
    assert summary["leftover_processes"] == 0
    assert _processes_mentioning(str(out)) == []


def test_broker_port_taken_fails_clearly_and_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _demo(
            out, "--devices", "2", "--rounds", "1", "--broker-port", str(port), timeout=240
        )
    assert proc.returncode == 9, proc.stderr[-4000:]
    error = proc.stderr
    assert "stage server failed" in error
    assert "broker (mosquitto)" in error
    assert f"full log: {out / 'logs'}" in error
    assert "0 leftover processes" in error
    assert _processes_mentioning(str(out)) == []


_LEFTOVERS = """
import subprocess, sys
from pathlib import Path
from rich.console import Console
from edgefl.demo.run import Board, Demo, DemoOptions
out = Path(sys.argv[1])
child = subprocess.Popen(["sleep", "60"], cwd=out)  # what the demo started: counted
demo = Demo(DemoOptions(out=out), Board(Console(stderr=True), quiet=True))
print(" ".join(str(pid) for pid in demo.leftovers()), flush=True)
print(child.pid, flush=True)
child.kill()
"""


def test_the_leftover_check_counts_only_what_the_demo_can_have_started(
    tmp_path: Path,
) -> None:
    # A user's shell sitting in the output folder (an older process there), and a wrapper
    # naming the folder on its command line above the demo: neither is the demo's to end.
    out = tmp_path / "demo-out"
    out.mkdir()
    older = subprocess.Popen(["sleep", "60"], cwd=out)
    try:
        proc = subprocess.run(
            ["sh", "-c", f'cd "{out}" && "$0" -c "$1" "{out}"', sys.executable, _LEFTOVERS],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        found_line, child_line = proc.stdout.splitlines()
        found = {int(pid) for pid in found_line.split()}
        assert found == {int(child_line)}
        assert older.poll() is None
    finally:
        older.kill()
        older.wait()
