"""The build pipeline end to end: real training, litert-torch, quantizer and runtimes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgefl.datasets import load_dataset
from edgefl.edge_agent.runtimes import create_runtime, find_tflite_python
from edgefl.errors import (
    ArtifactError,
    BadInputError,
    CalibrationDataError,
    ManifestMismatchError,
    UnknownRecipeError,
)
from edgefl.quantize.build import BuildOptions, BuildResult, build_artifacts
from edgefl.quantize.convert import convert_to_tflite
from edgefl.quantize.manifest import (
    check_file_against_manifest,
    manifest_path_for,
    read_manifest,
    sha256_file,
)
from edgefl.quantize.recipes import get_recipe, parse_variants
from edgefl.quantize.verify import compare_outputs, resolve_targets, reverify
from edgefl.zoo import build_model, state_dict_sha256

pytestmark = pytest.mark.slow

VARIANTS = "fp32,int8,int8-dynamic,pruned50-int8"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    out = tmp_path_factory.mktemp("build") / "digits"
    opts = BuildOptions(
        model="digits-cnn", variants=parse_variants(VARIANTS), out=out, bench_iters=5
    )
    return build_artifacts(opts)


def _artifact(result: BuildResult, variant: str) -> Path:
    return result.out / f"{result.model}.{variant}.tflite"


def test_accepted_variants_are_published_with_manifests(built: BuildResult) -> None:
    accepted = {v.variant for v in built.variants if v.accepted}
    assert {"fp32", "int8", "pruned50-int8"} <= accepted
    for variant in accepted:
        artifact = _artifact(built, variant)
        manifest = read_manifest(manifest_path_for(artifact))
        assert manifest.sha256 == sha256_file(artifact)
        assert manifest.size_bytes == artifact.stat().st_size
        assert manifest.variant == variant
        assert manifest.signature is None
        assert len(manifest.golden.inputs) == 8
        assert manifest.golden.input_shape == [1, 8, 8]
        assert set(manifest.verified_on) == set(built.targets)
        assert all(v.passed for v in manifest.verified_on.values())
    # Reports and the reference weights are published too; no staging folder remains.
    for name in ("report.json", "report.md", "size_latency_accuracy.png", "model.pt"):
        assert (built.out / name).is_file()
    assert (built.out / "size_latency_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in built.out.parent.iterdir() if "staging" in p.name]
    report = json.loads((built.out / "report.json").read_text())
    assert set(report["variants"]) == set(VARIANTS.split(","))


def test_static_int8_has_integer_io_and_smaller_file(built: BuildResult) -> None:
    manifest = read_manifest(manifest_path_for(_artifact(built, "int8")))
    for spec in [*manifest.inputs, *manifest.outputs]:
        assert spec.dtype == "int8"
        assert spec.scale > 0
    fp32 = read_manifest(manifest_path_for(_artifact(built, "fp32")))
    assert fp32.inputs[0].dtype == "float32"
    assert fp32.size_bytes / manifest.size_bytes > 3.0


def test_pruned_variant_records_its_own_reference(built: BuildResult) -> None:
    pruned = read_manifest(manifest_path_for(_artifact(built, "pruned50-int8")))
    fp32 = read_manifest(manifest_path_for(_artifact(built, "fp32")))
    assert pruned.prune_ratio == 0.5
    assert pruned.source_model.base_sha256 == fp32.source_model.sha256
    assert pruned.source_model.sha256 != fp32.source_model.sha256
    assert pruned.source_model.parameters < fp32.source_model.parameters / 3
    base = build_model("digits-cnn")
    base.load_state_dict(torch.load(built.out / "model.pt", weights_only=True))
    assert state_dict_sha256(base) == fp32.source_model.sha256


@pytest.mark.tflite_runtime
def test_dynamic_int8_trap_is_refused_on_tflite_runtime(built: BuildResult) -> None:
    if find_tflite_python() is None:
        pytest.skip("needs .venv-tflite (scripts/setup)")
    dynamic = next(v for v in built.variants if v.variant == "int8-dynamic")
    assert not dynamic.accepted
    assert not _artifact(built, "int8-dynamic").exists()
    assert not manifest_path_for(_artifact(built, "int8-dynamic")).exists()
    # Right on LiteRT, silently wrong on tflite-runtime 2.14: only per-runtime checks see it.
    assert dynamic.verified_on["ai-edge-litert"].passed
    legacy = dynamic.verified_on["tflite-runtime"]
    assert not legacy.passed
    assert legacy.version == "2.14.0"
    assert legacy.accuracy < 0.5
    assert any(r.startswith("tflite-runtime: ") for r in dynamic.reasons)


def test_reverify_passes_on_a_good_artifact(built: BuildResult) -> None:
    artifact = _artifact(built, "int8")
    results = reverify(artifact, read_manifest(manifest_path_for(artifact)), built.targets)
    assert results
    assert all(r.passed and r.top1_agreement == 1.0 for r in results.values())


def test_corrupted_and_truncated_artifacts_fail_the_hash(
    built: BuildResult, tmp_path: Path
) -> None:
    artifact = _artifact(built, "fp32")
    manifest = read_manifest(manifest_path_for(artifact))
    flipped = tmp_path / "flipped.tflite"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(ManifestMismatchError, match="sha256"):
        check_file_against_manifest(flipped, manifest)
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(artifact.read_bytes()[:1000])
    with pytest.raises(ManifestMismatchError, match="bytes"):
        reverify(truncated, manifest, built.targets)
    with pytest.raises(ArtifactError):
        check_file_against_manifest(tmp_path / "missing.tflite", manifest)


def test_a_truncated_file_is_refused_by_every_runtime(built: BuildResult, tmp_path: Path) -> None:
    truncated = tmp_path / "t.tflite"
    truncated.write_bytes(_artifact(built, "fp32").read_bytes()[:5000])
    with pytest.raises(ArtifactError):
        create_runtime("ai-edge-litert", truncated)


def test_verification_catches_a_deliberately_wrong_artifact(
    built: BuildResult, tmp_path: Path
) -> None:
    """An untrained model dressed up with a valid-looking manifest must be refused."""
    good = _artifact(built, "fp32")
    manifest = read_manifest(manifest_path_for(good))
    wrong = tmp_path / "wrong.tflite"
    convert_to_tflite(build_model("digits-cnn", seed=123), (1, 8, 8), wrong)
    forged = manifest.model_copy(
        update={"sha256": sha256_file(wrong), "size_bytes": wrong.stat().st_size}
    )
    results = reverify(wrong, forged, built.targets)
    for check in results.values():
        assert not check.passed
        assert check.top1_agreement < 0.5
        assert any("probability error" in r for r in check.reasons)


def test_compare_outputs_thresholds() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50, 10)).astype(np.float32) * 5
    labels = reference.argmax(1).astype(np.int64)
    thresholds = get_recipe("fp32").thresholds
    _, agreement, accuracy, _, reasons = compare_outputs(
        reference.copy(), reference, labels, thresholds
    )
    assert (agreement, accuracy, reasons) == (1.0, 1.0, [])
    shuffled = reference[::-1].copy()
    max_abs, agreement, _, _, reasons = compare_outputs(shuffled, reference, labels, thresholds)
    assert max_abs > 0.1
    assert agreement < 0.5
    assert len(reasons) == 3
    _, _, _, _, reasons = compare_outputs(reference[:, :5], reference, labels, thresholds)
    assert "shape" in reasons[0]


def test_bad_inputs_leave_the_output_folder_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    bad_calibration = tmp_path / "calib.npy"
    np.save(bad_calibration, np.zeros((4, 3), dtype=np.float32))
    cases: list[tuple[BuildOptions, type[Exception]]] = [
        (
            BuildOptions(
                "cancer-mlp", parse_variants("int8"), out, calibration=tmp_path / "no.npy"
            ),
            CalibrationDataError,
        ),
        (
            BuildOptions("cancer-mlp", parse_variants("int8"), out, calibration=bad_calibration),
            CalibrationDataError,
        ),
        (
            BuildOptions("cancer-mlp", parse_variants("fp32"), out, weights=tmp_path / "none.pt"),
            BadInputError,
        ),
    ]
    for opts, error in cases:
        with pytest.raises(error):
            build_artifacts(opts)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    torch.save(build_model("digits-cnn").state_dict(), weights)
    with pytest.raises(BadInputError, match="do not fit"):
        build_artifacts(
            BuildOptions("cancer-mlp", parse_variants("fp32"), tmp_path / "o", weights=weights)
        )
    assert not (tmp_path / "o").exists()


def test_given_weights_and_calibration_are_used(tmp_path: Path) -> None:
    data = load_dataset("breast-cancer")
    model = build_model("cancer-mlp", seed=5)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    calibration = tmp_path / "c.npy"
    np.save(calibration, data.x_train[:64])
    result = build_artifacts(
        BuildOptions(
            "cancer-mlp",
            parse_variants("fp32,int8"),
            tmp_path / "o",
            weights=weights,
            calibration=calibration,
            bench_iters=0,
        )
    )
    manifest = read_manifest(tmp_path / "o" / "cancer-mlp.fp32.manifest.json")
    assert manifest.source_model.sha256 == state_dict_sha256(model)
    assert result.variants[0].verified_on["ai-edge-litert"].p50_us is None


@pytest.mark.parametrize(
    "text", ["", "fp32,fp32", "bogus", "pruned0-int8", "pruned96-int8", "Pruned50-int8"]
)
def test_bad_variant_names(text: str) -> None:
    with pytest.raises(UnknownRecipeError):
        parse_variants(text)


def test_variant_parsing() -> None:
    variants = parse_variants("fp32, pruned25-int8-wo")
    assert [(v.recipe, v.prune_ratio) for v in variants] == [("fp32", None), ("int8-wo", 0.25)]


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(BadInputError):
        resolve_targets(["coral-magic"])
