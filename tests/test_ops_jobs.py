"""Remote ``release`` / ``rollout`` as background jobs of the server, and the ``job`` op.

A real admin API over HTTPS (its registry holds a real, tiny federated run) releases the
run's checkpoint in a thread of the API's process; the CLI (``--server``) follows the job
through the ``job`` operation and prints what the local command prints.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefl.cli import app as cli_app

try:
    from tests.admin_api_helpers import AdminApi, start_admin_api, stop_admin_api
except ImportError:  # run from inside tests/
    from admin_api_helpers import (  # type: ignore[import-not-found,no-redef]
        AdminApi,
        start_admin_api,
        stop_admin_api,
    )

RUN_ID = "job-src"
RELEASE_ARGS = ["--recipes", "fp32", "--calibration", "none", "--bench-iters", "0"]


def _cli(*args: str) -> Any:
    return CliRunner().invoke(cli_app, ["server", *args])


def _remote(api: AdminApi, role: str = "operator") -> list[str]:
    return ["--server", api.url, "--admin-ca", str(api.ca_file), "--token", api.tokens[role]]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminApi]:
    """An admin API whose registry holds a 1-round run, with a release-signing key.

    The run is recorded through the federation's own store (plan, round, checkpoint of
    digits-mlp's weights), as a finished run is; no round is trained here.
    """
    import io

    import numpy as np

    from edgefl.federation import RoundReport, load_plan
    from edgefl.server.fl.ledger import Checkpoint, FlStore
    from edgefl.server.release_keys import create_release_key
    from edgefl.zoo import build_model

    root = tmp_path_factory.mktemp("ops-jobs")
    api = start_admin_api(root)
    create_release_key(api.config.resolved_ca_dir)
    plan = load_plan({"dataset": "digits", "model": "digits-mlp", "num_devices": 2, "rounds": 1})
    buf = io.BytesIO()
    weights = build_model("digits-mlp", seed=plan.seed).state_dict()
    np.savez(buf, **{k: v.detach().numpy() for k, v in weights.items()})
    store = FlStore(api.config.resolved_db_url)
    try:
        store.start_run(RUN_ID, plan, resume=False)
        checkpoint = Checkpoint(1, buf.getvalue(), b"", {"devices": {}})
        store.commit_round(RUN_ID, RoundReport(1, 0.5, 1.0, num_replies=2), [], checkpoint)
        store.finish(RUN_ID, "completed")
    finally:
        store.close()
    (root / "server.yaml").write_text(f"state_dir: {root / 'server'}\n")
    yield api
    stop_admin_api(api)


def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """A release document without what differs between two releases of the same run."""
    out = {
        k: v
        for k, v in doc.items()
        if k not in ("id", "version", "created_at", "expires_at", "created_by")
    }
    out["path"] = bool(doc["path"])
    out["variants"] = {
        name: {k: v for k, v in variant.items() if k not in ("path", "sha256", "latency_us")}
        for name, variant in doc["variants"].items()
    }
    return out


@pytest.mark.slow
def test_a_remote_release_runs_as_a_job_and_prints_what_the_local_one_prints(
    api: AdminApi,
) -> None:
    res = _cli("release", "--run", RUN_ID, *RELEASE_ARGS, "--json", *_remote(api))
    assert res.exit_code == 0, res.output
    remote_doc = json.loads(res.stdout)
    assert remote_doc["status"] == "published"
    assert (remote_doc["model"], remote_doc["version"], remote_doc["run_id"]) == (
        "digits-mlp",
        1,
        RUN_ID,
    )
    # The job's progress was followed on stderr; the principal is the recorded operator.
    assert "runs on the server as job j-" in res.stderr
    assert f"releasing run {RUN_ID}" in res.stderr
    assert "operator-bot" in remote_doc["created_by"]
    # The registry recorded that release.
    with api.client() as client:
        listed = client.post("/api/v1/ops/releases", json={}, headers=api.bearer("viewer"))
    recorded = listed.json()["result"]["releases"][0]
    assert (recorded["version"], recorded["status"]) == (1, "published")
    assert recorded["variants"]["fp32"]["sha256"] == remote_doc["variants"]["fp32"]["sha256"]
    # The same release made locally (on the server host, no --server) prints the same JSON.
    config = api.root / "server.yaml"
    local = _cli("release", "-c", str(config), "--run", RUN_ID, *RELEASE_ARGS, "--json")
    assert local.exit_code == 0, local.output
    local_doc = json.loads(local.stdout)
    assert local_doc["version"] == 2
    assert _comparable(local_doc) == _comparable(remote_doc)
    # The start is audited as the operator's release of the run.
    rows = [r for r in api.audit_rows() if r.actor == "token:operator-bot"]
    assert [(r.action, r.role, r.outcome, r.target) for r in rows] == [
        ("release", "operator", "ok", RUN_ID)
    ]


@pytest.mark.slow
def test_a_viewer_may_not_start_a_release_and_is_audited(api: AdminApi) -> None:
    with api.client() as client:
        r = client.post("/api/v1/ops/release", json={"run": RUN_ID}, headers=api.bearer("viewer"))
    assert r.status_code == 403, r.text
    last = api.audit_rows()[-1]
    assert (last.action, last.actor, last.outcome) == ("release", "token:viewer-bot", "denied")
    res = _cli("release", "--run", RUN_ID, *RELEASE_ARGS, *_remote(api, "viewer"))
    assert res.exit_code != 0
    assert "needs the operator role" in res.output


@pytest.mark.slow
def test_a_failing_job_reports_failed_with_the_error_and_the_cli_exits_non_zero(
    api: AdminApi,
) -> None:
    res = _cli("release", "--run", "no-such-run", *RELEASE_ARGS, *_remote(api))
    assert res.exit_code == 4, res.output  # BAD_INPUT, as the local command exits
    assert "no-such-run" in res.stderr
    assert "failed" in res.stderr
    # --no-wait prints the id; the job op then reports the failure with its message.
    started = _cli("release", "--run", "no-such-run", *RELEASE_ARGS, "--no-wait", *_remote(api))
    assert started.exit_code == 0, started.output
    job_id = started.stdout.strip()
    assert job_id.startswith("j-")
    shown = _cli("job", job_id, "--wait", "--json", *_remote(api, "viewer"))
    assert shown.exit_code == 4, shown.output
    doc = json.loads(shown.stdout)
    assert (doc["id"], doc["kind"], doc["state"]) == (job_id, "release", "failed")
    assert "no-such-run" in doc["error"]["message"]
    assert doc["finished_at"] is not None
    # Bad arguments are refused before anything starts.
    with api.client() as client:
        r = client.post(
            "/api/v1/ops/release",
            json={"run": RUN_ID, "calibration": "bogus"},
            headers=api.bearer("operator"),
        )
    assert r.status_code == 400, r.text
    assert "bogus" in r.text


@pytest.mark.slow
def test_an_unknown_job_is_404(api: AdminApi) -> None:
    with api.client() as client:
        r = client.post(
            "/api/v1/ops/job", json={"id": "j-000000000000"}, headers=api.bearer("viewer")
        )
    assert r.status_code == 404, r.text
    assert "j-000000000000" in r.text
    res = _cli("job", "j-000000000000", *_remote(api, "viewer"))
    assert res.exit_code != 0
    assert "no job" in res.output


def test_one_job_of_a_kind_per_key_and_a_bounded_history() -> None:
    from edgefl.server.jobs import JobRunningError, Jobs

    jobs = Jobs(max_finished=2)
    release = threading.Event()
    first = jobs.start(
        "release", "run-a", target="run-a", by="x", work=lambda j, r: release.wait(10)
    )
    with pytest.raises(JobRunningError, match=first.id):
        jobs.start("release", "run-a", target="run-a", by="x", work=lambda j, r: None)
    other = jobs.start("release", "run-b", target="run-b", by="x", work=lambda j, r: {"ok": 1})
    release.set()
    for _ in range(3):
        jobs.start("rollout", "m", target="m", by="x", work=_one_line)
        _wait_finished(jobs)
    kept = jobs.list()
    assert len(kept) == 2  # only the newest two finished jobs are kept
    assert first.id not in {d["id"] for d in kept}
    assert other.id not in {d["id"] for d in kept}
    assert all(d["state"] == "succeeded" and d["progress"] == ["line"] for d in kept)
    # Stopping the server asks running jobs to stop and waits for them.
    waiting = jobs.start("rollout", "m2", target="m2", by="x", work=_until_stopped)
    jobs.stop_all(timeout=10)
    doc = jobs.get(waiting.id)
    assert doc is not None
    assert (doc["state"], doc["error"]["exit_code"]) == ("failed", 130)


def _until_stopped(job: Any, _report: Any) -> None:
    from edgefl.server.jobs import JobFailedError

    assert job.stop.wait(10)
    raise JobFailedError("interrupted", exit_code=130)


def _one_line(_job: Any, report: Any) -> int:
    report("line")
    return 1


def _wait_finished(jobs: Any) -> None:
    from edgefl.testing import wait_for

    wait_for(lambda: all(d["state"] != "running" for d in jobs.list()), 10, "jobs to finish")
