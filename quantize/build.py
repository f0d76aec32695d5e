"""The build pipeline: trained torch model → verified ``.tflite`` and ``.onnx`` variants.

Each (pruned or unpruned) torch model is converted once per format its variants need:
``.tflite`` with litert-torch, ``.onnx`` with torch's ONNX exporter; a recipe then makes
its variant from that float file, and the variant is verified on every runtime of its
format (:data:`edgefl.quantize.verify.TARGETS_BY_FORMAT`).

Everything is written into a staging folder beside ``out`` and moved in only at the end,
so a failed or interrupted build leaves ``out`` as it was. A variant that fails
verification on any target runtime is refused: it is listed in the report with its
reasons and its file is not published.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from edgefl.datasets import Dataset, load_dataset
from edgefl.errors import BadInputError, CalibrationDataError
from edgefl.quantize.convert import convert_to_onnx, convert_to_tflite
from edgefl.quantize.manifest import (
    GoldenSet,
    Manifest,
    RuntimeVerification,
    SourceModel,
    TensorSpecModel,
    sha256_file,
)
from edgefl.quantize.prune import count_parameters, prune_channels
from edgefl.quantize.recipes import Variant, get_recipe
from edgefl.quantize.verify import resolve_format_targets, verify_on_targets
from edgefl.training import evaluate, predict_logits, train
from edgefl.zoo import ModelSpec, build_model, get_spec, state_dict_sha256

__all__ = ["BuildOptions", "BuildResult", "VariantResult", "build_artifacts", "count_steps"]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
Progress = Callable[[str, int], None]  # (description of the step done, steps done)

GOLDEN_VECTORS = 8
CALIBRATION_SAMPLES = 1000


@dataclass(frozen=True)
class BuildOptions:
    """Inputs of one build; see ``edgefl quantize build --help``."""

    model: str
    variants: Sequence[Variant]
    out: Path
    weights: Path | None = None
    calibration: Path | None = None
    runtimes: Sequence[str] | None = None
    seed: int = 0
    epochs: int | None = None
    finetune_epochs: int | None = None
    bench_iters: int = 200
    # A trained model to build from (a federated run's checkpoint) instead of ``weights``
    # or training; it is not modified.
    base_model: nn.Sequential | None = None
    # The data to calibrate on, fine-tune pruned models on (train part) and verify against
    # (test part); default: the zoo model's dataset split with ``seed``.
    data: Dataset | None = None


@dataclass
class VariantResult:
    """The outcome for one variant: accepted (published) or refused (with reasons)."""

    variant: str
    recipe: str
    prune_ratio: float | None
    accepted: bool
    size_bytes: int
    artifact: str | None
    verified_on: dict[str, RuntimeVerification]
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary for reports."""
        return {
            "variant": self.variant,
            "recipe": self.recipe,
            "prune_ratio": self.prune_ratio,
            "accepted": self.accepted,
            "size_bytes": self.size_bytes,
            "artifact": self.artifact,
            "reasons": self.reasons,
            "runtimes": {k: v.model_dump(mode="json") for k, v in self.verified_on.items()},
        }


@dataclass
class BuildResult:
    """Everything the report shows."""

    model: str
    dataset: str
    out: Path
    targets: list[str]
    torch_accuracy: float
    torch_eager_p50_us: float
    test_samples: int
    variants: list[VariantResult]
    wall_time_s: float

    @property
    def refused(self) -> list[VariantResult]:
        """Variants that failed verification."""
        return [v for v in self.variants if not v.accepted]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, written as ``report.json``."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "out": str(self.out),
            "targets": self.targets,
            "test_samples": self.test_samples,
            "torch": {"accuracy": self.torch_accuracy, "eager_p50_us": self.torch_eager_p50_us},
            "variants": {v.variant: v.to_dict() for v in self.variants},
            "wall_time_s": self.wall_time_s,
        }


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise BadInputError(f"weights file {path} not found") from exc
    except Exception as exc:  # torch raises pickle/zip errors of many kinds
        raise BadInputError(f"weights file {path} is not a torch state dict: {exc}") from exc
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise BadInputError(
            f"weights in {path} do not fit this model: {str(exc).splitlines()[0]}",
            hint="use weights saved from the same zoo model (model.pt in a build folder)",
        ) from exc


def _calibration(opts: BuildOptions, spec: ModelSpec, data: Dataset) -> FloatArray:
    if opts.calibration is None:
        rng = np.random.default_rng(opts.seed)
        pick = rng.permutation(len(data.x_train))[:CALIBRATION_SAMPLES]
        return data.x_train[pick]
    try:
        arr = np.load(opts.calibration, allow_pickle=False)
    except FileNotFoundError as exc:
        raise CalibrationDataError(f"calibration file {opts.calibration} not found") from exc
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(
            f"calibration file {opts.calibration} is not a .npy array: {exc}"
        ) from exc
    if arr.ndim == len(spec.input_shape):
        arr = arr[None]
    if tuple(arr.shape[1:]) != spec.input_shape or len(arr) == 0:
        raise CalibrationDataError(
            f"calibration data has shape {arr.shape}; {spec.name} needs (N, "
            f"{', '.join(map(str, spec.input_shape))}) with N >= 1"
        )
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise CalibrationDataError("calibration data must be finite numbers")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _torch_p50_us(model: nn.Module, x: FloatArray, iters: int) -> float:
    model.eval()
    samples = [torch.from_numpy(x[i % len(x)][None]) for i in range(max(iters, 20))]
    times = []
    with torch.inference_mode():
        for s in samples[:20]:
            model(s)
        for s in samples[:iters]:
            start = time.perf_counter_ns()
            model(s)
            times.append((time.perf_counter_ns() - start) / 1e3)
    return float(np.median(times)) if times else float("nan")


def _golden(
    x: FloatArray, y: npt.NDArray[np.int64], reference: FloatArray, count: int
) -> GoldenSet:
    # The clearest correctly-classified samples: a correct artifact must agree on every
    # one of them, so a single re-check on the device is decisive.
    top2 = np.sort(reference, axis=1)[:, -2:]
    margin = np.where(reference.argmax(1) == y, top2[:, 1] - top2[:, 0], -np.inf)
    pick = np.argsort(-margin, kind="stable")[:count]
    return GoldenSet(
        inputs=[x[i].reshape(-1).tolist() for i in pick],
        input_shape=list(x.shape[1:]),
        reference_outputs=[reference[i].tolist() for i in pick],
        labels=[int(y[i]) for i in pick],
    )


def _spec_models(specs: Sequence[Any]) -> list[TensorSpecModel]:
    return [TensorSpecModel.model_validate(s.to_dict()) for s in specs]


def build_artifacts(opts: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """Build, verify and publish every variant in ``opts``.

    Raises:
        EdgeflError: Bad input (unknown model, weights or calibration data), conversion
            failure or no runtime; nothing is written to ``opts.out`` then.
    """
    started = time.perf_counter()
    steps = 0

    def step(what: str) -> None:
        nonlocal steps
        steps += 1
        logger.info("%s", what)
        if progress is not None:
            progress(what, steps)

    spec = get_spec(opts.model)
    recipes = {v.recipe: get_recipe(v.recipe) for v in opts.variants}
    formats = list(dict.fromkeys(recipes[v.recipe].artifact_format for v in opts.variants))
    targets_by_format = resolve_format_targets(opts.runtimes, formats)
    targets = list(dict.fromkeys(k for keys in targets_by_format.values() for k in keys))
    data = opts.data if opts.data is not None else load_dataset(spec.dataset, seed=opts.seed)
    calibration = (
        _calibration(opts, spec, data)
        if any(r.needs_calibration for r in recipes.values())
        else None
    )
    base = build_model(spec.name, seed=opts.seed)
    if opts.base_model is not None:
        base.load_state_dict(opts.base_model.state_dict())
        step(f"loaded the given {spec.name} weights")
    elif opts.weights is not None:
        _load_weights(base, opts.weights)
        step(f"loaded weights {opts.weights.name}")
    else:
        train(
            base,
            data.x_train,
            data.y_train,
            epochs=opts.epochs or spec.epochs,
            lr=spec.lr,
            batch_size=spec.batch_size,
            seed=opts.seed,
        )
        step(f"trained {spec.name}")
    base.eval()
    base_hash = state_dict_sha256(base)

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.staging-", dir=opts.out.parent))
    try:
        torch.save(base.state_dict(), staging / "model.pt")
        references: dict[float | None, nn.Sequential] = {None: base}
        ratios = sorted({v.prune_ratio for v in opts.variants if v.prune_ratio is not None})
        for prune_ratio in ratios:
            pruned = prune_channels(base, prune_ratio)
            train(
                pruned,
                data.x_train,
                data.y_train,
                epochs=opts.finetune_epochs or max(3, spec.epochs // 2),
                lr=spec.lr / 2,
                batch_size=spec.batch_size,
                seed=opts.seed + 1,
            )
            references[prune_ratio] = pruned
            step(f"pruned {prune_ratio:.0%} of channels and fine-tuned")

        fp32_files: dict[tuple[float | None, str], Path] = {}
        for ratio, fmt in _conversions(opts.variants):
            path = staging / f".fp32-{ratio}.{fmt}"
            if fmt == "onnx":
                convert_to_onnx(references[ratio], spec.input_shape, path)
            else:
                convert_to_tflite(references[ratio], spec.input_shape, path)
            fp32_files[ratio, fmt] = path
            step(f"converted to .{fmt}" + (f" (pruned {ratio:.0%})" if ratio else ""))

        # Variants made from the same (pruned or unpruned) model share its reference outputs.
        reference_logits = {
            ratio: predict_logits(model, data.x_test) for ratio, model in references.items()
        }
        results: list[VariantResult] = []
        for variant in opts.variants:
            recipe = recipes[variant.recipe]
            reference_model = references[variant.prune_ratio]
            reference = reference_logits[variant.prune_ratio]
            fmt = recipe.artifact_format
            name = f"{spec.name}.{variant.name}.{fmt}"
            artifact = staging / name
            recipe.apply(fp32_files[variant.prune_ratio, fmt], artifact, calibration)
            verified, outcome = verify_on_targets(
                artifact,
                data.x_test,
                data.y_test,
                reference,
                recipe.thresholds,
                targets_by_format[fmt],
                bench_iters=opts.bench_iters,
            )
            reasons = [f"{k}: {r}" for k, v in verified.items() for r in v.reasons]
            if recipe.integer_io:
                for t in [*outcome.input_specs, *outcome.output_specs]:
                    if t.dtype not in ("int8", "uint8"):
                        reasons.append(f"tensor {t.name} is {t.dtype}, integer I/O is required")
            size = artifact.stat().st_size
            if reasons:
                artifact.unlink()
                results.append(
                    VariantResult(
                        variant.name,
                        variant.recipe,
                        variant.prune_ratio,
                        False,
                        size,
                        None,
                        verified,
                        reasons,
                    )
                )
                step(f"REFUSED {variant.name}")
                continue
            manifest = Manifest(
                artifact=name,
                variant=variant.name,
                recipe=variant.recipe,
                prune_ratio=variant.prune_ratio,
                sha256=sha256_file(artifact),
                size_bytes=size,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                inputs=_spec_models(outcome.input_specs),
                outputs=_spec_models(outcome.output_specs),
                source_model=SourceModel(
                    name=spec.name,
                    dataset=spec.dataset,
                    sha256=state_dict_sha256(reference_model),
                    base_sha256=base_hash,
                    parameters=count_parameters(reference_model),
                ),
                thresholds=recipe.thresholds.to_dict(),
                golden=_golden(data.x_test, data.y_test, reference, GOLDEN_VECTORS),
                verified_on=verified,
            )
            artifact.with_suffix(".manifest.json").write_text(manifest.to_json())
            results.append(
                VariantResult(
                    variant.name, variant.recipe, variant.prune_ratio, True, size, name, verified
                )
            )
            step(f"verified {variant.name}")

        for path in fp32_files.values():
            path.unlink()
        result = BuildResult(
            model=spec.name,
            dataset=spec.dataset,
            out=opts.out,
            targets=targets,
            torch_accuracy=evaluate(base, data.x_test, data.y_test).accuracy,
            torch_eager_p50_us=_torch_p50_us(base, data.x_test, opts.bench_iters),
            test_samples=len(data.x_test),
            variants=results,
            wall_time_s=time.perf_counter() - started,
        )
        from edgefl.quantize.report import write_reports

        write_reports(result, staging)
        _publish(staging, opts.out)
        step("published")
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path) -> None:
    """Move finished files from staging into ``out`` (same filesystem: atomic renames)."""
    out.mkdir(parents=True, exist_ok=True)
    # Artifacts before their manifests, and reports last, so a reader never sees a
    # manifest whose artifact is not there yet.
    files = sorted(
        staging.iterdir(),
        key=lambda p: (p.name.endswith(".manifest.json"), p.name.startswith("report")),
    )
    for path in files:
        os.replace(path, out / path.name)


def _conversions(variants: Sequence[Variant]) -> list[tuple[float | None, str]]:
    """Each (pruning ratio, format) whose float model the variants are made from."""
    return list(
        dict.fromkeys((v.prune_ratio, get_recipe(v.recipe).artifact_format) for v in variants)
    )


def count_steps(variants: Sequence[Variant]) -> int:
    """How many progress steps a build of ``variants`` reports."""
    ratios = {v.prune_ratio for v in variants}
    pruned = len([r for r in ratios if r is not None])
    return 1 + pruned + len(_conversions(variants)) + len(variants) + 1
