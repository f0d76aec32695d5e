"""Verification: run an artifact on every device runtime and compare with torch.

A device may run ai-edge-litert or the older tflite-runtime 2.14 (``.tflite`` artifacts),
or onnxruntime (``.onnx`` artifacts, a Jetson-class device). The latter needs
numpy<2, so it cannot live beside torch; when it is not importable here it runs in its
own environment through the out-of-process worker (``find_tflite_python``).

An artifact passes on a runtime only if, on the golden set, its outputs stay within the
recipe's tolerance of the torch reference, its top-1 answers agree, and its accuracy
does not drop by more than allowed. Any failure is a refusal, with the reasons.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefl.errors import (
    BadInputError,
    ManifestMismatchError,
    RuntimeUnavailableError,
    UnknownRecipeError,
)
from edgefl.quantize.manifest import (
    Manifest,
    RuntimeVerification,
    TensorSpecModel,
    check_file_against_manifest,
)
from edgefl.quantize.recipes import Thresholds, get_recipe
from edgefl.runtimes import (
    TensorSpec,
    available_runtimes,
    create_runtime,
    runtime_keys,
)
from edgefl.runtimes.golden import compare_outputs, golden_arrays
from edgefl.runtimes.remote import RemoteRuntime, find_tflite_python

__all__ = [
    "ONNX_TARGETS",
    "TARGETS_BY_FORMAT",
    "VERIFY_TARGETS",
    "RunOutcome",
    "artifact_format_of",
    "compare_outputs",
    "resolve_format_targets",
    "resolve_targets",
    "reverify",
    "run_on_target",
    "verify_on_targets",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

# Runtimes an artifact is verified on, by its format; the Edge TPU needs a compiled model
# and a device.
VERIFY_TARGETS = ("ai-edge-litert", "tflite-runtime")
ONNX_TARGETS = ("onnxruntime",)
TARGETS_BY_FORMAT: dict[str, tuple[str, ...]] = {"tflite": VERIFY_TARGETS, "onnx": ONNX_TARGETS}


@dataclass(frozen=True)
class RunOutcome:
    """What one runtime produced for one artifact."""

    runtime: str
    version: str
    outputs: FloatArray
    input_specs: list[TensorSpec]
    output_specs: list[TensorSpec]
    latency_us: list[float]


def _in_process(key: str) -> bool:
    return key in available_runtimes()


def _install_hint(artifact_format: str) -> str:
    if artifact_format == "onnx":
        return "pip install 'edgefl[quantize]' (it brings onnxruntime)"
    return (
        "for tflite-runtime run scripts/setup (it creates .venv-tflite) or set EDGEFL_TFLITE_PYTHON"
    )


def _other_format_keys(artifact_format: str) -> set[str]:
    return {k for f, keys in TARGETS_BY_FORMAT.items() if f != artifact_format for k in keys}


def resolve_targets(
    requested: Sequence[str] | None = None, *, artifact_format: str = "tflite"
) -> list[str]:
    """The verification runtimes to use: the requested ones, or every one available.

    Args:
        requested: Runtime keys; None: every available runtime of the format.
        artifact_format: ``"tflite"`` (default) or ``"onnx"``: which runtimes qualify.

    Raises:
        BadInputError: A requested key is unknown, or does not run this format.
        RuntimeUnavailableError: A requested runtime cannot run here, or none can.
    """
    known = set(runtime_keys())
    candidates = TARGETS_BY_FORMAT.get(artifact_format)
    if candidates is None:
        raise BadInputError(
            f"unknown artifact format {artifact_format!r}",
            hint=f"formats: {', '.join(TARGETS_BY_FORMAT)}",
        )
    usable = [
        key
        for key in candidates
        if _in_process(key) or (key == "tflite-runtime" and find_tflite_python() is not None)
    ]
    if requested:
        for key in requested:
            if key not in known:
                raise BadInputError(
                    f"unknown runtime {key!r}", hint=f"runtimes: {', '.join(sorted(known))}"
                )
            if key not in candidates and key in _other_format_keys(artifact_format):
                raise BadInputError(
                    f"runtime {key!r} does not run {artifact_format} artifacts",
                    hint=f"{artifact_format} runtimes: {', '.join(candidates)}",
                )
            if key not in usable:
                raise RuntimeUnavailableError(
                    f"runtime {key!r} is not available here", hint=_install_hint(artifact_format)
                )
        return list(dict.fromkeys(requested))
    if not usable:
        raise RuntimeUnavailableError(
            f"no device runtime for {artifact_format} artifacts is available here "
            f"({', '.join(candidates)})",
            hint="pip install 'edgefl[device]'"
            if artifact_format == "tflite"
            else _install_hint(artifact_format),
        )
    for key in candidates:
        if key not in usable:
            logger.warning("runtime %s unavailable: artifacts are not verified on it", key)
    return usable


def artifact_format_of(manifest: Manifest) -> str:
    """The format of a manifest's artifact: its recipe's, else its file name's suffix."""
    try:
        return get_recipe(manifest.recipe).artifact_format
    except UnknownRecipeError:
        return "onnx" if manifest.artifact.endswith(".onnx") else "tflite"


def _format_of(key: str) -> str:
    """The artifact format a runtime key verifies (``tflite`` for any other key)."""
    return next((f for f, keys in TARGETS_BY_FORMAT.items() if key in keys), "tflite")


def resolve_format_targets(
    requested: Sequence[str] | None, formats: Sequence[str]
) -> dict[str, list[str]]:
    """The verification runtimes of each artifact format a build makes.

    The requested keys are shared out by the format each runs; a format none of them
    runs is verified on every runtime of it available here.

    Raises:
        BadInputError: A requested key is unknown or runs none of ``formats``.
        RuntimeUnavailableError: A format has no runtime available here.
    """
    wanted = list(requested or [])
    known = set(runtime_keys())
    for key in wanted:
        if key not in known:
            raise BadInputError(
                f"unknown runtime {key!r}", hint=f"runtimes: {', '.join(sorted(known))}"
            )
        if _format_of(key) not in formats:
            raise BadInputError(
                f"runtime {key!r} runs none of the artifacts being built ({', '.join(formats)})",
                hint="runtimes for them: "
                + ", ".join(k for f in formats for k in TARGETS_BY_FORMAT.get(f, ())),
            )
    return {
        f: resolve_targets([k for k in wanted if _format_of(k) == f] or None, artifact_format=f)
        for f in formats
    }


def run_on_target(
    key: str, artifact: Path, x: FloatArray, *, threads: int = 1, bench_iters: int = 0
) -> RunOutcome:
    """Run ``artifact`` over ``x`` on runtime ``key``, in this process or in its own env.

    Raises:
        ArtifactError: The runtime cannot load the file.
        RuntimeUnavailableError: The runtime cannot run here.
    """
    if _in_process(key):
        runtime = create_runtime(key, artifact, threads=threads)
        outputs = runtime.run(x)
        latency = runtime.bench(x, bench_iters)
        return RunOutcome(key, runtime.version(), outputs, runtime.inputs, runtime.outputs, latency)
    python = find_tflite_python() if key == "tflite-runtime" else None
    if python is None:
        raise RuntimeUnavailableError(f"runtime {key!r} is not available here")
    result = RemoteRuntime(python, key).run(artifact, x, threads=threads, bench_iters=bench_iters)
    return RunOutcome(
        key,
        result.version,
        result.outputs,
        result.input_specs,
        result.output_specs,
        result.latency_us,
    )


def verify_on_targets(
    artifact: Path,
    x: FloatArray,
    labels: npt.NDArray[np.int64],
    reference: FloatArray,
    thresholds: Thresholds,
    targets: Sequence[str],
    *,
    bench_iters: int = 0,
) -> tuple[dict[str, RuntimeVerification], RunOutcome]:
    """Verify one artifact on each target runtime.

    Returns:
        The verification per runtime, and the first runtime's outcome (tensor specs).
    """
    results: dict[str, RuntimeVerification] = {}
    first: RunOutcome | None = None
    for key in targets:
        outcome = run_on_target(key, artifact, x, bench_iters=bench_iters)
        first = first or outcome
        max_abs, agreement, accuracy, ref_acc, reasons = compare_outputs(
            outcome.outputs, reference, labels, thresholds
        )
        results[key] = RuntimeVerification(
            runtime=key,
            version=outcome.version,
            samples=len(x),
            max_abs_error=max_abs,
            top1_agreement=agreement,
            accuracy=accuracy,
            reference_accuracy=ref_acc,
            p50_us=float(np.median(outcome.latency_us)) if outcome.latency_us else None,
            passed=not reasons,
            reasons=reasons,
        )
        log = logger.info if not reasons else logger.warning
        log("%s on %s: %s", artifact.name, key, "pass" if not reasons else "; ".join(reasons))
    assert first is not None, "targets must not be empty"
    return results, first


def reverify(
    artifact: Path, manifest: Manifest, targets: Sequence[str]
) -> dict[str, RuntimeVerification]:
    """Re-check a published artifact against its manifest on each target runtime.

    The file's size and hash must match, its tensor specs must be the recorded ones, and
    its outputs on the golden vectors must stay within the recorded thresholds.

    Raises:
        ManifestMismatchError: Size, hash or tensor specs differ from the manifest.
        ArtifactError: A runtime cannot load the file.
    """
    check_file_against_manifest(artifact, manifest)
    x, reference, labels = golden_arrays(manifest.golden)
    thresholds = Thresholds(**manifest.thresholds)
    results, outcome = verify_on_targets(artifact, x, labels, reference, thresholds, targets)
    for recorded, actual in (
        (manifest.inputs, outcome.input_specs),
        (manifest.outputs, outcome.output_specs),
    ):
        got = [TensorSpecModel.model_validate(t.to_dict()) for t in actual]
        if got != recorded:
            raise ManifestMismatchError(
                f"{artifact.name}: tensor specs {[t.model_dump() for t in got]} differ from "
                f"the manifest's {[t.model_dump() for t in recorded]}"
            )
    return results
