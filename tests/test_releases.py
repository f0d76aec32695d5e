"""Releases from a real DP federated run: build, verify, sign, record, publish (or refuse).

One short simulation (digits-mlp, 2 devices, 2 rounds, DP-SGD) on Flower's engine feeds
every slow test; its start-up is most of this file's time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.errors import BadInputError

RUN_ID = "release-src"


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["server", *args])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A server state folder with a release-signing key, and a registry holding a DP run."""
    from edgefl.federation import load_plan
    from edgefl.server.fl import run_simulation
    from edgefl.server.fl.ledger import FlStore
    from edgefl.server.release_keys import create_release_key

    root = tmp_path_factory.mktemp("release-server")
    state = root / "state"
    config = root / "server.yaml"
    config.write_text(f"state_dir: {state}\n")
    key_id = create_release_key(state / "ca")
    url = f"sqlite:///{root / 'registry.db'}"
    plan = load_plan(
        {
            "dataset": "digits",
            "model": "digits-mlp",
            "num_devices": 2,
            "dirichlet_alpha": 1.0,
            "rounds": 2,
            "batch_size": 32,
            "lr": 0.1,
            "min_available_nodes": 2,
            "min_train_nodes": 2,
            "node_wait_s": 60,
            "dp": {"target_epsilon": 8.0, "delta": 1e-5},
        }
    )
    result = run_simulation(plan, registry_url=url, run_id=RUN_ID, resume=False)
    assert result.rounds_trained == 2
    store = FlStore(url)
    try:
        ledger = store.ledger(RUN_ID)
    finally:
        store.close()
    return {
        "config": config,
        "state": state,
        "url": url,
        "key_id": key_id,
        "plan": plan,
        "ledger": ledger,
    }


def _trust(server: dict[str, Any], folder: Path) -> Any:
    from edgefl.releasesign import TrustStore
    from edgefl.server.release_keys import trusted_public_keys

    return TrustStore.load(folder, extra_keys=trusted_public_keys(server["state"] / "ca"))


def _release(server: dict[str, Any], *args: str) -> Any:
    return _invoke(
        "release",
        "-c",
        str(server["config"]),
        "--db-url",
        server["url"],
        "--run",
        RUN_ID,
        "--bench-iters",
        "5",
        "--by",
        "ops-tester",
        "--json",
        *args,
    )


@pytest.mark.slow
def test_release_publishes_signed_verified_variants_with_the_privacy_guarantee(
    server: dict[str, Any], tmp_path: Path
) -> None:
    from edgefl.manifest import check_file_against_manifest, read_manifest
    from edgefl.releasesign import ReleaseTrustError, verify

    result = _release(server, "--recipes", "fp32,pruned50-int8")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "published"
    assert (out["model"], out["version"], out["run_id"], out["round"]) == (
        "digits-mlp",
        1,
        RUN_ID,
        2,
    )
    assert out["plan_hash"] == server["plan"].plan_key()
    assert out["key_id"] == server["key_id"]
    assert out["created_by"].startswith("ops-tester (os user ")
    # The guarantee the model carries: the ledger's largest per-device ε, its δ, local DP.
    ledger = server["ledger"]
    assert out["privacy"] == {
        "epsilon_max": pytest.approx(max(r.epsilon_total for r in ledger)),
        "delta": pytest.approx(1e-5),
        "mode": "local",
    }
    assert 0.0 <= out["float_accuracy"] <= 1.0

    folder = server["state"] / "releases" / "digits-mlp" / "1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "fp32.manifest.json",
        "fp32.tflite",
        "pruned50-int8.manifest.json",
        "pruned50-int8.tflite",
    ]
    trust = _trust(server, tmp_path / "device")
    sizes = {}
    for name, variant in out["variants"].items():
        assert variant["passed"]
        assert variant["reasons"] == []
        assert set(variant["latency_us"]) >= {"ai-edge-litert"}
        assert variant["path"] == f"digits-mlp/1/{name}.tflite"
        manifest = read_manifest(folder / f"{name}.manifest.json")
        assert verify(manifest, trust) == server["key_id"]
        check_file_against_manifest(folder / f"{name}.tflite", manifest)
        assert manifest.sha256 == variant["sha256"]
        assert manifest.size_bytes == variant["size_bytes"]
        info = manifest.release
        assert info is not None
        assert (info.model, info.version, info.variant, info.run_id, info.round) == (
            "digits-mlp",
            1,
            name,
            RUN_ID,
            2,
        )
        assert (info.device_class, info.runtime) == ("generic", "ai-edge-litert")
        assert info.privacy.mode == "local"
        assert info.expires_at - info.created_at == 90 * 86400
        sizes[name] = variant["size_bytes"]
        # An edited signed field no longer verifies.
        forged = manifest.model_copy(
            update={"release": info.model_copy(update={"version": info.version + 1})}
        )
        with pytest.raises(ReleaseTrustError) as caught:
            verify(forged, trust)
        assert caught.value.reason == "bad_signature"
    assert sizes["pruned50-int8"] < sizes["fp32"]


@pytest.mark.slow
def test_versions_grow_and_a_failed_verification_publishes_nothing(
    server: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefl.quantize import recipes
    from edgefl.quantize.recipes import Thresholds
    from edgefl.quantize.recipes.fp32 import Fp32Recipe

    def listed() -> list[dict[str, Any]]:
        result = _invoke(
            "releases", "-c", str(server["config"]), "--db-url", server["url"], "--json"
        )
        assert result.exit_code == 0, result.output
        rows: list[dict[str, Any]] = json.loads(result.stdout)["releases"]
        return rows

    before = len(listed())  # the other test's release, when it ran first
    # No calibration data: only recipes that need none, verified on generated inputs.
    second = _release(server, "--recipes", "int8-wo", "--round", "1", "--calibration", "none")
    assert second.exit_code == 0, second.output
    out = json.loads(second.stdout)
    assert (out["version"], out["round"], out["status"]) == (before + 1, 1, "published")
    assert out["float_accuracy"] is None
    assert out["variants"]["int8-wo"]["accuracy"] is None
    assert any("no calibration data" in note for note in out["notes"])

    class NeverAgrees(Fp32Recipe):
        """The fp32 copy held to a tolerance nothing meets: verification must refuse it."""

        key = "never-agrees"
        thresholds = Thresholds(max_abs_error=-1.0, min_top1_agreement=1.0, max_accuracy_drop=0)

    monkeypatch.setitem(recipes._REGISTRY, NeverAgrees.key, NeverAgrees)
    failed = _release(server, "--recipes", "fp32,never-agrees")
    assert failed.exit_code == 6, failed.output
    record = json.loads(failed.stdout)
    assert record["status"] == "failed"
    assert record["version"] == before + 2
    assert any(r.startswith("never-agrees: ") for r in record["reasons"])
    assert record["variants"]["fp32"]["passed"]
    assert not record["variants"]["never-agrees"]["passed"]
    assert "is not published" in failed.stderr
    published = {p.name for p in (server["state"] / "releases" / "digits-mlp").iterdir()}
    assert str(before + 1) in published
    assert str(before + 2) not in published

    rows = listed()[before:]
    assert [(r["version"], r["status"]) for r in rows] == [
        (before + 1, "published"),
        (before + 2, "failed"),
    ]
    for row in rows:
        assert row["privacy"]["mode"] == "local"
        assert row["privacy"]["delta"] == pytest.approx(1e-5)
        assert row["privacy"]["epsilon_max"] > 0
    # Round 1's model carries a smaller ε than round 2's.
    assert rows[0]["privacy"]["epsilon_max"] < rows[1]["privacy"]["epsilon_max"]
    table = _invoke("releases", "-c", str(server["config"]), "--db-url", server["url"])
    assert table.exit_code == 0
    assert "failed" in table.stdout


@pytest.mark.slow
def test_the_accuracy_gate_leaves_out_a_variant_that_loses_too_much(
    server: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import edgefl.quantize.build as build

    # The fault: pruning whose fine-tuning does nothing. The pruned variant still verifies
    # against its own (pruned) torch reference, but it is far below the float model.
    monkeypatch.setattr(build, "train", lambda *args, **kwargs: None)
    result = _release(server, "--recipes", "fp32,pruned90-fp32")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "published"
    assert out["max_accuracy_drop"] == 1.5  # the default
    gated = out["variants"]["pruned90-fp32"]
    assert gated["passed"], gated["reasons"]  # verification alone would have published it
    assert gated["status"] == "accuracy_drop"
    assert gated["path"] is None
    assert gated["accuracy_drop"] > 1.5
    drop = (out["float_accuracy"] - gated["accuracy"]) * 100
    assert gated["accuracy_drop"] == pytest.approx(drop, abs=1e-3)
    assert gated["reasons"][0].startswith("accuracy_drop: ")
    assert any(
        n.startswith("accuracy gate (--max-accuracy-drop 1.5 points") and "left out pruned90" in n
        for n in out["notes"]
    )
    fp32 = out["variants"]["fp32"]
    assert fp32["status"] == "published"
    assert abs(fp32["accuracy_drop"]) <= 1.5
    folder = Path(out["path"])
    assert sorted(p.name for p in folder.iterdir()) == ["fp32.manifest.json", "fp32.tflite"]

    # The registry keeps the left-out variant, with its reason; the table shows it.
    listed = _invoke("releases", "-c", str(server["config"]), "--db-url", server["url"], "--json")
    (row,) = [r for r in json.loads(listed.stdout)["releases"] if r["version"] == out["version"]]
    assert row["status"] == "published"
    assert row["variants"]["pruned90-fp32"]["status"] == "accuracy_drop"
    assert row["variants"]["pruned90-fp32"]["reasons"] == gated["reasons"]
    assert row["variants"]["fp32"]["status"] == "published"
    table = _invoke("releases", "-c", str(server["config"]), "--db-url", server["url"])
    assert "left out: accuracy_drop" in table.stdout

    # Every variant left out: nothing is published, exit 6 with the reasons.
    alone = _release(server, "--recipes", "pruned90-fp32")
    assert alone.exit_code == 6, alone.output
    refused = json.loads(alone.stdout)
    assert refused["status"] == "failed"
    assert refused["reasons"][0].startswith("pruned90-fp32: accuracy_drop: ")
    assert refused["variants"]["pruned90-fp32"]["status"] == "accuracy_drop"
    assert "accuracy_drop" in alone.stderr
    assert not (folder.parent / str(refused["version"])).exists()

    # A larger limit in server.yaml (models.max_accuracy_drop) publishes it; the flag wins.
    relaxed_config = tmp_path / "server.yaml"
    relaxed_config.write_text(f"state_dir: {server['state']}\nmodels:\n  max_accuracy_drop: 100\n")
    args = ["--db-url", server["url"], "--run", RUN_ID, "--bench-iters", "5", "--json"]
    relaxed = _invoke("release", "-c", str(relaxed_config), *args, "--recipes", "pruned90-fp32")
    assert relaxed.exit_code == 0, relaxed.output
    published = json.loads(relaxed.stdout)
    assert published["max_accuracy_drop"] == 100
    assert published["variants"]["pruned90-fp32"]["status"] == "published"
    flag = _invoke(
        "release",
        "-c",
        str(relaxed_config),
        *args,
        "--recipes",
        "pruned90-fp32",
        "--max-accuracy-drop",
        "1.5",
    )
    assert flag.exit_code == 6, flag.output


def test_the_gate_measures_against_the_float_model_and_keeps_fp32() -> None:
    from edgefl.manifest import RuntimeVerification
    from edgefl.quantize.build import VariantResult
    from edgefl.server.releases import accuracy_gate

    def variant(
        name: str, *accuracies: float, accepted: bool = True, prune: float | None = None
    ) -> VariantResult:
        checks = {
            f"rt{i}": RuntimeVerification(
                runtime=f"rt{i}",
                version="1",
                samples=200,
                max_abs_error=0.0,
                top1_agreement=1.0,
                accuracy=acc,
                reference_accuracy=acc,  # its own reference: verification sees no loss
                passed=accepted,
            )
            for i, acc in enumerate(accuracies)
        }
        return VariantResult(name, name, prune, accepted, 100, f"{name}.tflite", checks)

    gated = accuracy_gate(
        [
            variant("fp32", 0.70),  # the float model converted: always kept
            variant("int8", 0.885),  # 1.5 points below: within the limit
            variant("fp16", 0.9, 0.884),  # its lowest runtime is 1.6 below
            variant("pruned50-int8", 0.86, prune=0.5),
            variant("int8-wo", 0.10, accepted=False),  # refused already: not the gate's
        ],
        float_accuracy=0.9,
        limit=1.5,
    )
    assert sorted(gated) == ["fp16", "pruned50-int8"]
    assert gated["pruned50-int8"].startswith("accuracy_drop: 4.00 points below")
    assert "the limit is 1.5" in gated["fp16"]
    assert accuracy_gate([variant("int8", 0.5)], float_accuracy=0.9, limit=100) == {}


def test_an_unknown_run_is_bad_input(tmp_path: Path) -> None:
    from edgefl.server.release_keys import create_release_key

    config = tmp_path / "server.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    create_release_key(tmp_path / "state" / "ca")
    result = _invoke("release", "-c", str(config), "--run", "no-such-run")
    assert result.exit_code == 4, result.output
    assert "no federated run 'no-such-run'" in result.stderr
    assert not (tmp_path / "state" / "releases" / "digits-mlp").exists()


def test_release_without_a_signing_key_says_how_to_make_one(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    result = _invoke("release", "-c", str(config), "--run", "any")
    assert result.exit_code == 3, result.output
    assert "release-key" in result.stderr


def test_the_data_decides_which_variants_are_offered() -> None:
    from edgefl.quantize.recipes import Variant
    from edgefl.server.releases import select_variants

    def names(variants: list[Variant]) -> list[str]:
        return [v.name for v in variants]

    held, notes = select_variants(None, "held-out")
    assert names(held) == ["fp32", "int8", "pruned50-int8", "onnx"]
    assert notes == []
    none, notes = select_variants(None, "none")
    assert names(none) == ["fp32", "onnx"]
    assert any("int8 left out" in n for n in notes)
    assert any("only recipes that need none" in n for n in notes)
    synthetic, _ = select_variants(None, "synthetic")
    assert names(synthetic) == ["fp32", "int8", "onnx"]
    assert names(select_variants(["fp16", "int8-wo"], "none")[0]) == ["fp16", "int8-wo"]
    with pytest.raises(BadInputError, match="needs calibration data"):
        select_variants(["int8"], "none")
    with pytest.raises(BadInputError, match="pruning is fine-tuned on labelled data"):
        select_variants(["pruned50-int8"], "synthetic")


def test_bad_calibration_is_a_usage_error() -> None:
    result = _invoke("release", "--run", "r", "--calibration", "public")
    assert result.exit_code == 2
    assert "held-out" in result.output


def _round_row(run_id: str, rnd: int, central: float | None) -> Any:
    from datetime import UTC, datetime

    from edgefl.server.registry.models import FlRound

    return FlRound(
        run_id=run_id,
        round=rnd,
        accuracy=0.5,
        loss=1.0,
        federated_accuracy=None,
        federated_loss=None,
        train_loss=None,
        num_selected=2,
        num_replies=2,
        num_failures=0,
        num_rejected=0,
        num_refused=0,
        num_flagged=0,
        epsilon_max=0.0,
        central_epsilon=central,
        wall_s=1.0,
        detail_json="{}",
        at=datetime.now(UTC),
    )


def test_the_guarantee_follows_the_plan_local_central_or_none(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from edgefl.federation import load_plan
    from edgefl.server.registry import make_engine, session_factory, upgrade
    from edgefl.server.registry.models import FlRun
    from edgefl.server.releases import _privacy

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    engine = make_engine(url)
    base = {"dataset": "digits", "model": "digits-mlp", "num_devices": 10}
    central = load_plan(
        {**base, "dp": {"enabled": False}, "central_dp": {"enabled": True, "delta": 1e-6}}
    )
    plain = load_plan({**base, "dp": {"enabled": False}})
    try:
        with session_factory(engine)() as session:
            now = datetime.now(UTC)
            session.add(
                FlRun(
                    run_id="r",
                    plan_json=central.model_dump_json(),
                    plan_key=central.plan_key(),
                    status="completed",
                    stop_reason="",
                    rounds_done=2,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.flush()
            session.add_all([_round_row("r", 1, 0.7), _round_row("r", 2, 1.1)])
            session.flush()
            got = _privacy(session, "r", 1, central)
            assert (got.mode, got.epsilon_max, got.delta) == ("central", 0.7, 1e-6)
            got = _privacy(session, "r", 2, plain)
            assert (got.mode, got.epsilon_max, got.delta) == ("none", None, None)
            session.rollback()
    finally:
        engine.dispose()
