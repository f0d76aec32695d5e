"""Staged rollouts on a real fleet: canaries first, then the rest, or a halt and a rollback.

One fleet for the module (``benchmarks/rollout_fleet.py``): the shipped mosquitto (mutual
TLS, ACL), the real ingest in a child process, SQLite, the real ``Models`` service, and
four ``edgefl agent run`` processes enrolled under their own certificates, each running
the inference loop on a held-out evaluation replay. The releases are the toolkit's real
digits-mlp variants, signed with the server's release key: v1 (fp32) and v2 (fp16) are
good; a *broken* one fails its golden vectors on every device; a *worse* one installs
and answers digits 0-4 wrong. The tests run in file order on that one fleet.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.errors import BadInputError, ExitCode
from edgefl.server.device_states import LastFailure, ReportedModelState
from edgefl.server.registry import make_engine
from edgefl.server.staged_rollout import (
    ModelRef,
    RolloutOptions,
    StagedRollout,
    choose_canaries,
    classify,
    list_rollouts,
    parse_duration,
    parse_share,
    read_rollout,
    results_by_version,
)
from edgefl.testing import Mosquitto, edgefl_executable, mosquitto_executable

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

AGENTS = 4
WAIT_S = 90.0


# --- the pure parts ------------------------------------------------------------------------


def test_options_parse_and_refuse_what_cannot_be_used() -> None:
    assert parse_share("10%", "--canary") == pytest.approx(0.1)
    assert parse_share("0.25", "--canary") == 0.25
    assert parse_duration("30s", "--soak") == 30
    assert parse_duration("2m", "--soak") == 120
    assert parse_duration("90", "--soak") == 90
    assert parse_duration("500ms", "--soak") == 0.5
    for bad in ("abc", "150%", "2", "-1%", "nan"):
        with pytest.raises(BadInputError, match="not a share"):
            parse_share(bad, "--canary")
    for bad in ("soon", "-3s", "2 weeks"):
        with pytest.raises(BadInputError, match="not a duration"):
            parse_duration(bad, "--soak")
    with pytest.raises(BadInputError, match="--canary"):
        RolloutOptions(MODEL, 2, canary=0.0).check()
    with pytest.raises(BadInputError, match="positive integer"):
        RolloutOptions(MODEL, 0).check()
    with pytest.raises(BadInputError, match="device id"):
        RolloutOptions(MODEL, 2, devices=("a/b",)).check()
    with pytest.raises(BadInputError, match="names no device"):
        RolloutOptions(MODEL, 2, devices=()).check()


def test_canaries_are_a_reproducible_share_of_the_online_devices() -> None:
    online = [f"d{i:02d}" for i in range(30)]
    first = choose_canaries("r-1", online, 0.1)
    assert len(first) == 3  # ceil(0.1 x 30), without float noise
    assert first == choose_canaries("r-1", reversed(online), 0.1)
    assert len(choose_canaries("r-1", online[:3], 0.1)) == 1  # at least one
    spread = {tuple(choose_canaries(f"r-{n}", online, 0.1)) for n in range(20)}
    assert len(spread) > 10  # other rollouts, other canaries
    assert choose_canaries("r-1", [], 0.5) == []


def _reported(**kw: Any) -> ReportedModelState:
    base: dict[str, Any] = {
        "device_id": "d",
        "fleet": "f",
        "model": MODEL,
        "version": 1,
        "variant": "fp32",
        "sha256": "1" * 64,
        "state": "running",
        "since": None,
        "rollbacks": 0,
        "last_failure": None,
        "reported_at": datetime.now(UTC),
    }
    base.update(kw)
    return ReportedModelState(**base)


def test_a_devices_report_is_a_verdict_only_about_this_publish() -> None:
    release = ModelRef(MODEL, 2, "fp16", "2" * 64)
    published = datetime.now(UTC)
    assert classify(release, None, published) is None
    assert classify(release, _reported(), published) is None  # still on v1
    running = _reported(version=2, variant="fp16", sha256="2" * 64)
    assert classify(release, running, published) == ("installed", "")
    assert (
        classify(release, _reported(version=2, sha256="2" * 64, state="verifying"), published)
        is None
    )

    def failed(reason: str, state: str, at: datetime) -> ReportedModelState:
        failure = LastFailure(version=2, reason=reason, detail="why", at=None)
        return _reported(state=state, last_failure=failure, reported_at=at)

    assert classify(release, failed("golden_mismatch", "failed", published), published) == (
        "failed",
        "golden_mismatch: why",
    )
    assert classify(release, failed("latency_regression", "rolled_back", published), published) == (
        "rolled_back",
        "latency_regression: why",
    )
    # A download the device retries is no verdict; nor is a failure stored before the publish.
    assert classify(release, failed("download_failed", "failed", published), published) is None
    old = published - timedelta(seconds=5)
    assert classify(release, failed("golden_mismatch", "failed", old), published) is None


def test_the_delivery_docs_rollout_example_parses() -> None:
    """The example in docs/delivery.md uses the command's real options and values."""
    import re
    import shlex

    import click
    import typer

    doc = (Path(__file__).resolve().parents[1] / "docs" / "delivery.md").read_text("utf-8")
    blocks = re.findall(r"^ *```sh\n(.*?)^ *```", doc, re.M | re.S)
    (example,) = [b for b in blocks if "server rollout" in b]
    args = shlex.split(example.replace("\\\n", " "))
    assert args[:3] == ["edgefl", "server", "rollout"]
    server = typer.main.get_command(app).commands["server"]  # type: ignore[attr-defined]
    command = server.commands["rollout"]
    with click.Context(command) as ctx:
        params = command.make_context("rollout", args[3:], parent=ctx).params
    assert params["model"] == "digits-mlp"
    assert parse_share(params["canary"], "--canary") == pytest.approx(0.1)
    assert parse_duration(params["soak"], "--soak") == 120
    assert parse_share(params["min_accuracy"], "--min-accuracy") == 0.85
    assert params["max_accuracy_drop"] == 2


# --- which model version computed each stored result --------------------------------------


@pytest.mark.slow
def test_the_ingest_records_the_model_version_of_each_result(
    broker: Mosquitto, db_url: str
) -> None:
    """A result's body names its model: stored beside it; anything else leaves NULL."""
    import uuid

    import sqlalchemy as sa

    from edgefl.proto.topics import record_topic
    from edgefl.server.ingest import Ingest
    from edgefl.server.registry import Record, upgrade

    try:
        from tests.test_ingest import Publisher, _config, envelope
    except ImportError:  # pragma: no cover - run from inside tests/
        from test_ingest import (  # type: ignore[import-not-found,no-redef]
            Publisher,
            _config,
            envelope,
        )

    upgrade(db_url)
    fleet_name = f"f{uuid.uuid4().hex[:8]}"
    answer = {"model": MODEL, "version": 7, "variant": "int8", "prediction": 3}
    cases: list[tuple[str, dict[str, Any] | list[int], str]] = [
        ("result", answer, "int8"),
        ("result", {**answer, "variant": "x" * 65}, "long variant"),
        ("result", {**answer, "version": "7"}, "version as text"),
        ("result", {**answer, "version": 2**63}, "version beyond int64"),
        ("result", {**answer, "model": "a/b"}, "model not an id"),
        ("result", [1, 2], "not an object"),
        ("telemetry", answer, "not a result"),
    ]
    ingest = Ingest(_config(broker, db_url, fleet_name))
    ingest.start()
    publisher = Publisher(broker)
    engine = make_engine(db_url)
    try:
        assert ingest.wait_ready(30), "ingest did not subscribe"
        for seq, (kind, body, _) in enumerate(cases, start=1):
            topic = record_topic(fleet_name, "dev-r", kind, "inference")
            publisher.publish(topic, envelope("dev-r", seq, body=body, kind=kind))

        def stored() -> list[Any]:
            with engine.connect() as conn:
                return list(
                    conn.execute(
                        sa.select(
                            Record.seq, Record.model, Record.model_version, Record.model_variant
                        ).order_by(Record.seq)
                    )
                )

        deadline = time.monotonic() + 30
        while len(stored()) < len(cases) and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = {seq: (m, v, var) for seq, m, v, var in stored()}
        assert len(rows) == len(cases)  # every record is stored, whatever its body says
        assert rows[1] == (MODEL, 7, "int8")
        assert rows[2] == (MODEL, 7, None)
        for seq in range(3, len(cases) + 1):
            assert rows[seq] == (None, None, None), cases[seq - 1][2]
        by_version = results_by_version(engine, model=MODEL)
        assert {(r["device_id"], r["version"], r["variant"], r["results"]) for r in by_version} == {
            ("dev-r", 7, "int8", 1),
            ("dev-r", 7, None, 1),
        }
    finally:
        engine.dispose()
        publisher.close()
        ingest.stop()


# --- the fleet -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, built: Built) -> Iterator[RolloutFleet]:
    if mosquitto_executable() is None:
        pytest.skip("mosquitto is not installed")
    with rollout_fleet(tmp_path_factory.mktemp("rollout"), built, agents=AGENTS) as running:
        running.publish(1, "fp32")
        running.publish(2, "fp16")
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


def _cli(fleet: RolloutFleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [edgefl_executable(), "server", *args, "-c", str(fleet.server_config)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _controller(fleet: RolloutFleet, options: RolloutOptions) -> StagedRollout:
    return StagedRollout(
        options,
        ca_dir=fleet.ca_dir,
        db_url=fleet.db_url,
        releases_dir=fleet.releases_dir,
        broker_host="127.0.0.1",
        broker_port=fleet.broker_port,
        poll_s=0.2,
        on_event=print,
    )


def _rollouts(fleet: RolloutFleet) -> list[dict[str, Any]]:
    engine = make_engine(fleet.db_url)
    try:
        return list_rollouts(engine)
    finally:
        engine.dispose()


def _status(fleet: RolloutFleet, rollout_id: str) -> dict[str, Any]:
    engine = make_engine(fleet.db_url)
    try:
        return read_rollout(engine, rollout_id)
    finally:
        engine.dispose()


def _results(fleet: RolloutFleet, version: int) -> dict[str, int]:
    engine = make_engine(fleet.db_url)
    try:
        rows = results_by_version(engine, model=MODEL, version=version)
    finally:
        engine.dispose()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["device_id"]] = counts.get(row["device_id"], 0) + row["results"]
    return counts


def _versions(fleet: RolloutFleet) -> dict[str, int | None]:
    """The version each device reports running (None: something else than running)."""
    return {
        name: state.version if state.state == "running" else None
        for name, state in fleet.states().items()
    }


@pytest.mark.slow
def test_unknown_release_variant_device_or_fleet_is_refused_and_nothing_is_published(
    fleet: RolloutFleet,
) -> None:
    before = fleet.retained_desired()
    assert set(before) == set(fleet.names)
    runner = CliRunner()
    config = ["-c", str(fleet.server_config)]
    cases = [
        (["99"], "no release digits-mlp 99"),
        (["2", "--variant", "int8"], "no variant 'int8' of release digits-mlp 2"),
        (["2", "--devices", "dev-00,pi-77"], "not admitted device(s) of the registry: pi-77"),
        (["2", "--fleet", "nowhere"], "no admitted device in fleet 'nowhere'"),
        (["2", "--canary", "lots"], "--canary 'lots' is not a share"),
        (["2", "--soak", "a while"], "--soak 'a while' is not a duration"),
        (["2", "--max-failures", "100%"], "--max-failures must be below 100%"),
        (["2", "--min-accuracy", "2"], "--min-accuracy '2' is not a share"),
    ]
    for args, message in cases:
        res = runner.invoke(app, ["server", "rollout", MODEL, *args, *config])
        assert res.exit_code == ExitCode.BAD_INPUT, (args, res.output)
        assert message in res.stderr, (args, res.stderr)
    # Nothing was recorded and nothing published: every retained desired state is the
    # same signed document as before.
    assert _rollouts(fleet) == []
    assert fleet.retained_desired() == before


@pytest.mark.slow
def test_a_good_rollout_reaches_every_online_agent_and_an_offline_one_on_reconnect(
    fleet: RolloutFleet,
) -> None:
    offline = fleet.names[-1]
    online = fleet.names[:-1]
    fleet.stop_agent(offline)
    fleet.wait(lambda: not fleet.online().get(offline), WAIT_S, f"{offline} offline")
    res = _cli(
        fleet,
        "rollout",
        MODEL,
        "2",
        "--variant",
        "fp16",
        "--fleet",
        fleet.fleet,
        "--canary",
        "25%",
        "--soak",
        "2s",
        "--min-accuracy",
        "60%",
        "--max-accuracy-drop",
        "20",
        "--min-evaluated",
        "20",
        "--install-timeout",
        "60s",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["state"] == "completed", status["reason"]
    devices = {d["device_id"]: d for d in status["devices"]}
    canaries = [d for d, doc in devices.items() if doc["cohort"] == "canary"]
    assert len(canaries) == 1  # ceil(25% of 3 online)
    assert offline not in canaries
    for name in online:
        assert devices[name]["state"] == "installed", json.dumps(devices[name])
        assert devices[name]["previous"]["version"] == 1
    (canary,) = canaries
    assert devices[canary]["accuracy"] >= 0.6
    assert devices[canary]["evaluated"] >= 20
    assert devices[canary]["previous_accuracy"] is not None
    assert devices[offline]["state"] == "offline"
    assert "reconnect" in devices[offline]["reason"]
    assert fleet.running(online, 2)
    assert "canaries passed" in res.stderr
    # The offline agent gets the retained desired state when it comes back.
    fleet.start_agent(offline)
    fleet.wait(lambda: fleet.running([offline], 2), WAIT_S, f"{offline} on v2 after reconnect")
    later = _status(fleet, status["id"])
    now = {d["device_id"]: d["now"] for d in later["devices"]}
    assert now[offline] is not None
    assert (now[offline]["version"], now[offline]["state"]) == (2, "running")
    # The registry knows which version computed each stored result.
    fleet.wait(lambda: all(_results(fleet, 2).get(n) for n in fleet.names), WAIT_S, "v2 results")
    listing = _cli(fleet, "rollouts", "--json")
    assert listing.returncode == 0, listing.stderr
    (row,) = [r for r in json.loads(listing.stdout)["rollouts"] if r["id"] == status["id"]]
    assert row["device_states"] == {"installed": AGENTS - 1, "offline": 1}
    text = _cli(fleet, "rollout-status", status["id"])
    assert text.returncode == 0, text.stderr
    assert "COMPLETED" in text.stdout
    assert "v2 (fp16) running" in text.stdout


@pytest.mark.slow
def test_a_release_that_fails_on_the_devices_halts_after_the_canaries(
    fleet: RolloutFleet,
) -> None:
    broken = fleet.publish_broken(3)
    before = fleet.retained_desired()
    ran = _versions(fleet)
    controller = _controller(
        fleet,
        RolloutOptions(
            MODEL,
            3,
            variant="fp32",
            fleet=fleet.fleet,
            canary=0.5,
            soak_s=1.0,
            install_timeout_s=60.0,
        ),
    )
    status = controller.run()
    assert status["state"] == "halted", status["reason"]
    assert "golden_mismatch" in status["reason"]
    devices = {d["device_id"]: d for d in status["devices"]}
    canaries = sorted(d for d, doc in devices.items() if doc["cohort"] == "canary")
    assert len(canaries) == 2
    # Every canary is back (one may have been halted before it said anything of v3).
    assert any("golden_mismatch" in devices[name]["reason"] for name in canaries)
    for name in canaries:
        assert devices[name]["state"] == "restored", json.dumps(devices[name])
        assert devices[name]["previous"]["version"] == ran[name]
        assert (devices[name]["now"]["version"], devices[name]["now"]["state"]) == (
            ran[name],
            "running",
        )
    rest = [d for d in fleet.names if d not in canaries]
    for name in rest:
        assert devices[name]["state"] == "pending"
        assert devices[name]["published_at"] is None
    # The rest were never sent v3; the canaries' retained state is now the signed rollback.
    after = fleet.retained_desired()
    for name in rest:
        assert after[name] == before[name]
    for name in canaries:
        model = after[name].model
        assert model is not None
        assert (model.version, model.rollback) == (ran[name], True)
    assert _versions(fleet) == ran
    assert status["evidence"]["devices_ran_release"] == []
    assert _results(fleet, 3) == {}
    assert broken.version == 3


@pytest.mark.slow
def test_a_worse_model_halts_on_accuracy_and_the_canaries_roll_back(fleet: RolloutFleet) -> None:
    fleet.publish_worse(4)
    ran = _versions(fleet)
    controller = _controller(
        fleet,
        RolloutOptions(
            MODEL,
            4,
            variant="fp32",
            fleet=fleet.fleet,
            canary=0.5,
            soak_s=1.0,
            min_accuracy=0.6,
            max_accuracy_drop=20.0,
            min_evaluated=30,
            install_timeout_s=60.0,
        ),
    )
    status = controller.run()
    assert status["state"] == "halted", status["reason"]
    assert "accuracy" in status["reason"]
    devices = {d["device_id"]: d for d in status["devices"]}
    canaries = sorted(d for d, doc in devices.items() if doc["cohort"] == "canary")
    assert len(canaries) == 2
    for name in canaries:
        doc = devices[name]
        assert doc["state"] == "restored", json.dumps(doc)
        assert doc["accuracy"] < 0.6 <= doc["previous_accuracy"], doc
        assert doc["evaluated"] >= 30
        assert (doc["now"]["version"], doc["now"]["state"]) == (ran[name], "running")
    assert _versions(fleet) == ran
    # At most the canaries ever ran v4: its stored results come from them alone.
    assert sorted(status["evidence"]["devices_ran_release"]) == canaries
    fleet.wait(lambda: bool(_results(fleet, 4)), WAIT_S, "v4 results stored")
    assert set(_results(fleet, 4)) <= set(canaries)


@pytest.mark.slow
def test_sigterm_leaves_the_devices_as_they_are_and_says_how_to_go_on(
    fleet: RolloutFleet,
) -> None:
    fleet.publish_worse(5, order=(0, 1, 2, 3, 4, 5, 6, 7, 9, 8))  # 8 and 9 swapped
    ran = _versions(fleet)
    proc = subprocess.Popen(
        [
            edgefl_executable(),
            "server",
            "rollout",
            MODEL,
            "5",
            "--canary",
            "25%",
            "--soak",
            "10m",
            "-c",
            str(fleet.server_config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def canary_installed() -> bool:
            rows = _rollouts(fleet)
            if not rows or rows[0]["version"] != 5:
                return False
            devices = _status(fleet, rows[0]["id"])["devices"]
            return any(d["cohort"] == "canary" and d["state"] == "installed" for d in devices)

        fleet.wait(canary_installed, WAIT_S, "the v5 canary installed")
        # A second rollout cannot take devices a running one holds.
        again = CliRunner().invoke(
            app, ["server", "rollout", MODEL, "5", "-c", str(fleet.server_config)]
        )
        assert again.exit_code == ExitCode.BAD_INPUT, again.output
        assert "another rollout is running on r-" in again.stderr
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    rollout = _rollouts(fleet)[0]
    assert rollout["state"] == "interrupted"
    assert "published to 1 device(s)" in rollout["reason"]
    status = _status(fleet, rollout["id"])
    (canary,) = [d for d in status["devices"] if d["cohort"] == "canary"]
    assert canary["now"]["version"] == 5  # left as it was
    previous = canary["previous"]
    rollback = (
        f"edgefl server deploy {MODEL} {previous['version']} --variant {previous['variant']} "
        f"--device {canary['device_id']} --rollback"
    )
    assert rollback in err
    assert "to continue, start it again: edgefl server rollout" in err
    # The hint works: the canary goes back to v2.
    res = _cli(fleet, *rollback.split()[2:])
    assert res.returncode == 0, res.stderr
    fleet.wait(lambda: _versions(fleet) == ran, WAIT_S, "every agent back where it was")
