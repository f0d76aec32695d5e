"""``edgefl agent status`` shows the device's lifetime ε and its cap (human and --json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from edgefl.edge_agent.cli import app
from edgefl.edge_agent.fl.privacy import LIFETIME_FILE, write_lifetime
from edgefl.privacy import compose, epsilon_of

RUN_A = [[1.1, 0.02, 250]]
RUN_B = [[0.9, 0.03, 100], [0.9, 0.03, 100]]


def _config(tmp_path: Path, privacy: dict[str, Any] | None) -> Path:
    doc: dict[str, Any] = {
        "device_id": "pi-07",
        "fleet": "lab",
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"port": 1},
        "sources": [],
        "training": {
            "superlink": {"host": "127.0.0.1", "port": 1},
            **({"privacy": privacy} if privacy else {}),
        },
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _accountant(state: Path) -> None:
    state.mkdir(parents=True, exist_ok=True)
    runs = {
        rid: {
            "run_id": rid,
            "plan_key": "k",
            "sigma": h[0][0],
            "sample_rate": h[0][1],
            "steps_per_round": 100,
            "history": h,
        }
        for rid, h in (("run-a", RUN_A), ("run-b", RUN_B))
    }
    (state / "fl_privacy.json").write_text(json.dumps(runs))


def _status(config: Path) -> tuple[dict[str, Any], str]:
    runner = CliRunner()
    doc = runner.invoke(app, ["status", "--config", str(config), "--json"])
    assert doc.exit_code == 0, doc.output
    human = runner.invoke(app, ["status", "--config", str(config)])
    assert human.exit_code == 0, human.output
    return json.loads(doc.output)["privacy"], human.output


@pytest.mark.slow  # the recomputation imports Opacus and torch
def test_status_shows_lifetime_epsilon_and_cap(tmp_path: Path) -> None:
    config = _config(tmp_path, {"lifetime_epsilon": 12.0, "lifetime_delta": 1e-5})
    state = tmp_path / "state"
    assert _status(config)[0] is None  # never trained: nothing to show

    # An accountant without the recorded figure (an older agent): recomputed, exactly.
    _accountant(state)
    expected = epsilon_of(compose([RUN_A, RUN_B]), 1e-5)
    privacy, human = _status(config)
    assert privacy["lifetime_epsilon"] == expected
    assert privacy["lifetime_cap"] == 12.0
    assert privacy["lifetime_remaining"] == 12.0 - expected
    assert privacy["runs"] == 2
    assert privacy["source"] == "recomputed"
    assert f"privacy: lifetime ε {expected:.2f} of cap 12 ({12.0 - expected:.2f} left" in human

    # After a round the ClientApp records it; status reads that (no Opacus import).
    write_lifetime(state, 11.5, 1e-5, 12.0, 3)
    privacy, human = _status(config)
    assert privacy["lifetime_epsilon"] == 11.5
    assert privacy["runs"] == 3
    assert privacy["source"] == "last round"
    assert privacy["lifetime_remaining"] == 0.5
    assert "lifetime ε 11.50 of cap 12 (0.50 left, δ=1e-05) over 3 runs" in human

    # Recorded at another δ than the config's now: recomputed at the config's δ.
    (state / LIFETIME_FILE).write_text(
        json.dumps({"lifetime_epsilon": 1.0, "lifetime_delta": 1e-6})
    )
    privacy, _ = _status(config)
    assert privacy["lifetime_epsilon"] == expected


@pytest.mark.slow
def test_status_without_a_cap_and_with_a_damaged_accountant(tmp_path: Path) -> None:
    config = _config(tmp_path, {"lifetime_epsilon": None})
    state = tmp_path / "state"
    _accountant(state)
    privacy, human = _status(config)
    assert privacy["lifetime_cap"] is None
    assert privacy["lifetime_remaining"] is None
    assert "of no cap (δ=1e-05) over 2 runs" in human
    (state / "fl_privacy.json").write_text('{"run-a": 5}')
    privacy, human = _status(config)
    assert "run-a" in privacy["error"]
    assert "privacy: lifetime ε UNREADABLE" in human
