"""Shadow rollouts on a real fleet: the release runs beside the canaries' model, never serving.

One fleet for the module (``benchmarks/rollout_fleet.py``, as ``test_staged_rollout.py``
uses it, with three agents): the shipped mosquitto (mutual TLS, ACL), the real ingest in a
child process, SQLite, the real ``Models`` service, and ``edgefl agent run`` processes
enrolled under their own certificates, each answering a held-out evaluation replay and
reporting per model version (and per shadow version) as ``telemetry/inference``. Every
agent runs v1 (fp32) first. A *worse* v2 (digits 0-4 answered wrong, its golden vectors
made from it, so every check on the device passes) must halt in the shadow stage with no
answer ever served by it; a good v3 (fp16) must pass the shadow stage and reach every
device. The tests run in file order on that one fleet.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.errors import BadInputError, ExitCode
from edgefl.proto.desired import DesiredState
from edgefl.server.registry import Record
from edgefl.server.staged_rollout import RolloutOptions, StagedRollout
from edgefl.testing import edgefl_executable, mosquitto_executable

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(_BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(_BENCHMARKS))

from rollout_fleet import RolloutFleet, rollout_fleet  # noqa: E402

try:
    from tests.model_release_helpers import MODEL, Built, build_tiny_models
except ImportError:  # pragma: no cover - run from inside tests/
    from model_release_helpers import (  # type: ignore[import-not-found,no-redef]
        MODEL,
        Built,
        build_tiny_models,
    )

AGENTS = 3
WAIT_S = 90.0


def test_min_agreement_needs_shadow_and_a_share() -> None:
    with pytest.raises(BadInputError, match="add --shadow"):
        RolloutOptions(MODEL, 2, min_agreement=0.9).check()
    with pytest.raises(BadInputError, match="--min-agreement must be between 0 and 1"):
        RolloutOptions(MODEL, 2, shadow=True, min_agreement=1.5).check()
    RolloutOptions(MODEL, 2, shadow=True, min_agreement=0.9).check()
    runner = CliRunner()
    res = runner.invoke(app, ["server", "rollout", MODEL, "2", "--min-agreement", "90%"])
    assert res.exit_code == ExitCode.BAD_INPUT, res.output
    assert "--min-agreement judges a shadow: add --shadow" in res.stderr
    res = runner.invoke(app, ["server", "rollout", MODEL, "2", "--shadow", "--min-agreement", "x"])
    assert res.exit_code == ExitCode.BAD_INPUT, res.output
    assert "--min-agreement 'x' is not a share" in res.stderr


def test_an_agent_that_predates_shadows_fails_the_shadow_stage_with_a_reason() -> None:
    """Version skew, as the controller sees it: the desired state refused as malformed
    (its reported state), or inference reports without a shadow section."""
    from edgefl.server.device_states import LastFailure, ReportedModelState
    from edgefl.server.staged_rollout import ModelRef, _shadow_refusal, _Target

    release = ModelRef(MODEL, 2, "fp32", "2" * 64)
    previous = ModelRef(MODEL, 1, "fp32", "1" * 64)
    at = datetime.now(UTC)
    target = _Target(device="pi-01", fleet="lab", online=True, previous=previous)
    target.current, target.shadow_at = previous, at
    refused = ReportedModelState(
        device_id="pi-01",
        fleet="lab",
        model=MODEL,
        version=1,
        variant="fp32",
        sha256="1" * 64,
        state="failed",
        since=None,
        rollbacks=0,
        last_failure=LastFailure(
            version=0,
            reason="unsigned",
            detail="malformed desired state at shadow: Extra inputs are not permitted",
            at=None,
        ),
        reported_at=at,
    )
    why = _shadow_refusal(target, release, refused, None, None)
    assert why is not None
    assert why.startswith("desired_state_refused: unsigned")
    assert "older than shadow evaluation" in why
    old_report = {"versions": [], "answered": 10}
    why = _shadow_refusal(target, release, None, old_report, None)
    assert why is not None
    assert why.startswith("no_shadow_support")
    # A current agent that has not installed the shadow yet: no verdict.
    section: dict[str, Any] = {"model": None, "state": "downloading", "versions": []}
    assert _shadow_refusal(target, release, None, {"shadow": section}, section) is None


def test_a_shadow_the_device_found_too_slow_is_no_evidence_and_says_why() -> None:
    from edgefl.server.staged_rollout import ModelRef, _shadow_failure, _shadow_figures, _Target

    release = ModelRef(MODEL, 2, "fp32", "2" * 64)
    entry = {"model": MODEL, "version": 2, "variant": "fp32", "compared": 0, "agreed": 0}
    entry |= {"evaluated": 0, "correct": 0, "served_correct": 0, "errors": 0}
    entry |= {"skipped": 400, "too_slow": 380}
    target = _Target(device="pi-01", fleet="lab", online=True, previous=None)
    target.shadow = _shadow_figures({"versions": [entry]}, release)
    assert target.shadow is not None
    why = _shadow_failure(target, release, RolloutOptions(MODEL, 2, shadow=True))
    assert why is not None
    assert why.startswith("no_shadow_evidence: 0 sample(s)")
    assert "skipped 380 as too slow" in why
    assert "inference.shadow_max_delay_ms" in why


# --- the fleet -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, built: Built) -> Iterator[RolloutFleet]:
    if mosquitto_executable() is None:
        pytest.skip("mosquitto is not installed")
    with rollout_fleet(tmp_path_factory.mktemp("shadow"), built, agents=AGENTS) as running:
        running.publish(1, "fp32")
        for name in running.names:
            running.start_agent(name)
        running.wait(
            lambda: all(running.online().get(n) for n in running.names), WAIT_S, "agents online"
        )
        running.deploy(1, "fp32")
        running.wait(lambda: running.running(running.names, 1), WAIT_S, "v1 on every agent")
        try:
            yield running
        except BaseException:
            print(running.log_tails())
            raise


def _results(fleet: RolloutFleet) -> list[tuple[str, int | None, dict[str, Any], datetime]]:
    """Every result record the ingest stored: device, model version, body, received."""
    with fleet.engine.connect() as conn:
        rows = conn.execute(
            sa.select(Record.device_id, Record.model_version, Record.body, Record.received_at)
            .where(Record.kind == "result")
            .order_by(Record.id)
        )
        return [
            (str(d), v, json.loads(bytes(b)), r if r.tzinfo else r.replace(tzinfo=UTC))
            for d, v, b, r in rows
        ]


def _config(fleet: RolloutFleet, name: str) -> Path:
    """The agent config file the fleet wrote when it started ``name``."""
    return fleet.workdir / f"{name}.json"


def _agent_status(fleet: RolloutFleet, name: str) -> dict[str, Any]:
    out = subprocess.run(
        [edgefl_executable(), "agent", "status", "--config", str(_config(fleet, name)), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


@pytest.mark.slow
def test_a_shadow_of_a_worse_model_halts_with_no_answer_ever_served_by_it(
    fleet: RolloutFleet,
) -> None:
    worse = fleet.publish_worse(2)
    before = fleet.retained_desired()
    during: dict[str, DesiredState] = {}

    def on_event(message: str) -> None:
        print(message)
        if message.startswith("every canary runs the shadow"):
            during.update(fleet.retained_desired())

    controller = StagedRollout(
        RolloutOptions(
            MODEL,
            2,
            variant="fp32",
            fleet=fleet.fleet,
            canary=0.5,
            soak_s=1.0,
            shadow=True,
            min_agreement=0.9,
            min_accuracy=0.6,
            max_accuracy_drop=20.0,
            min_evaluated=30,
            install_timeout_s=60.0,
        ),
        ca_dir=fleet.ca_dir,
        db_url=fleet.db_url,
        releases_dir=fleet.releases_dir,
        broker_host="127.0.0.1",
        broker_port=fleet.broker_port,
        poll_s=0.2,
        on_event=on_event,
    )
    status = controller.run()
    assert status["state"] == "halted", status["reason"]
    assert status["shadow"] is True
    assert status["phase"] == "remove-shadow"
    assert "shadow_disagreement" in status["reason"]
    assert "before any answer changed" in status["reason"]
    devices = {d["device_id"]: d for d in status["devices"]}
    canaries = sorted(d for d, doc in devices.items() if doc["cohort"] == "canary")
    rest = sorted(set(fleet.names) - set(canaries))
    assert len(canaries) == 2
    # While the shadow ran, each canary's signed desired state named v1 to serve and v2
    # beside it; the rest were never sent anything.
    for name in canaries:
        state = during[name]
        assert state.model is not None
        assert state.shadow is not None
        assert (state.model.version, state.shadow.version) == (1, 2)
        assert state.shadow.artifact_sha256 == worse.artifact_sha256
        assert state.signature is not None
    # The canaries' telemetry showed the shadow's low agreement and accuracy, each on the
    # same evaluation samples as the served answers.
    for name in canaries:
        doc = devices[name]
        shadow = doc["shadow"]
        assert shadow["verdict"].startswith("shadow_disagreement"), shadow
        assert shadow["compared"] >= 30
        assert shadow["agreement"] < 0.9
        assert shadow["accuracy"] < shadow["served_accuracy"] - 0.2
        assert shadow["errors"] == 0
        assert doc["state"] == "restored", json.dumps(doc)
        assert "never served an answer" in doc["reason"]
        assert doc["published_at"] is None
        assert doc["accuracy"] == pytest.approx(shadow["accuracy"])
        assert doc["previous_accuracy"] == pytest.approx(shadow["served_accuracy"])
        assert (doc["now"]["version"], doc["now"]["state"]) == (1, "running")
    for name in rest:
        assert devices[name]["state"] == "pending"
        assert devices[name]["shadow"] is None
    # The shadow is removed: the canaries' retained state names v1 alone, the rest's is
    # the same signed document as before.
    after = fleet.retained_desired()
    for name in canaries:
        model = after[name].model
        assert model is not None
        assert (model.version, after[name].shadow) == (1, None)
    for name in rest:
        assert after[name] == before[name]
    assert status["evidence"]["devices_ran_release"] == []
    assert fleet.running(fleet.names, 1)
    # What an operator sees on a canary: the shadow gone, its figures kept.
    canary_status = _agent_status(fleet, canaries[0])["inference"]["shadow"]
    assert canary_status["model"] is None
    assert canary_status["state"] == "none"
    (figures,) = canary_status["versions"]
    assert (figures["version"], figures["errors"]) == (2, 0)
    assert figures["compared"] >= 30
    text = subprocess.run(
        [edgefl_executable(), "agent", "status", "--config", str(_config(fleet, canaries[0]))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "shadow v2 (fp32):" in text
    # Zero answers were ever served by v2: every result the fleet published and the ingest
    # stored (waiting until each canary's answers after the halt are in) was v1's.
    finished = datetime.fromisoformat(status["finished_at"])
    fleet.wait(
        lambda: all(
            any(d == name and received > finished for d, _, _, received in _results(fleet))
            for name in canaries
        ),
        WAIT_S,
        "the canaries' results after the halt",
    )
    results = _results(fleet)
    assert len(results) > 100
    assert {v for _, v, _, _ in results} == {1}
    assert {(b["model"], b["version"], b["variant"]) for _, _, b, _ in results} == {
        (MODEL, 1, "fp32")
    }


@pytest.mark.slow
def test_a_shadow_of_a_good_model_passes_then_reaches_every_device(fleet: RolloutFleet) -> None:
    fleet.publish(3, "fp16")
    res = subprocess.run(
        [
            edgefl_executable(),
            "server",
            "rollout",
            MODEL,
            "3",
            "--fleet",
            fleet.fleet,
            "--shadow",
            "--min-agreement",
            "90%",
            "--max-accuracy-drop",
            "5",
            "--min-evaluated",
            "30",
            "--canary",
            "50%",
            "--soak",
            "1s",
            "--install-timeout",
            "60s",
            "--json",
            "-c",
            str(fleet.server_config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["state"] == "completed", status["reason"]
    assert "the shadow passed on the canaries" in res.stderr
    assert "published current model 1 with shadow 3" in res.stderr
    devices = {d["device_id"]: d for d in status["devices"]}
    canaries = sorted(d for d, doc in devices.items() if doc["cohort"] == "canary")
    assert len(canaries) == 2
    for name in canaries:
        shadow = devices[name]["shadow"]
        assert shadow["verdict"] == "passed"
        assert shadow["agreement"] >= 0.9
        assert shadow["compared"] >= 30
    for name in fleet.names:
        assert devices[name]["state"] == "installed", json.dumps(devices[name])
    assert fleet.running(fleet.names, 3)
    # The release's desired state carries no shadow: it was removed where it ran.
    after = fleet.retained_desired()
    assert all(after[n].shadow is None for n in fleet.names)
    fleet.wait(
        lambda: all(
            _agent_status(fleet, n)["inference"]["shadow"]["model"] is None for n in canaries
        ),
        WAIT_S,
        "the shadow removed from the canaries",
    )
    config = str(fleet.server_config)
    text = subprocess.run(
        [edgefl_executable(), "server", "rollout-status", status["id"], "-c", config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 0, text.stderr
    assert "shadow first (min agreement 90.0%)" in text.stdout
    assert "agree/" in text.stdout
