"""Golden vectors: does an artifact still answer like the torch model it was made from?

Every manifest carries a few inputs with the torch reference's outputs and the tolerances
the artifact was held to (:class:`edgefl.manifest.GoldenSet`, ``thresholds``). The model
toolkit checks them on every runtime before it publishes (``edgefl.quantize.verify``), and
a device checks them again on its own runtime before it swaps a new model in and while the
model is on probation: the same comparison, so it lives here, below both.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edgefl.manifest import GoldenSet

from .base import Runtime

__all__ = [
    "GoldenCheck",
    "GoldenThresholds",
    "ThresholdsLike",
    "check_golden",
    "compare_outputs",
    "golden_arrays",
]

FloatArray = npt.NDArray[np.float32]


class ThresholdsLike(Protocol):
    """The three tolerances :func:`compare_outputs` applies (a recipe's ``Thresholds``)."""

    @property
    def max_abs_error(self) -> float:
        """Largest |artifact - reference| over the class probabilities."""

    @property
    def min_top1_agreement(self) -> float:
        """Share of samples whose arg-max must match the reference."""

    @property
    def max_accuracy_drop(self) -> float:
        """Largest allowed accuracy loss vs the reference, in points."""


@dataclass(frozen=True)
class GoldenThresholds:
    """Tolerances read from a manifest's ``thresholds`` mapping."""

    max_abs_error: float
    min_top1_agreement: float
    max_accuracy_drop: float

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> GoldenThresholds:
        """From ``manifest.thresholds``.

        Raises:
            KeyError: A tolerance is missing.
        """
        return cls(
            max_abs_error=float(values["max_abs_error"]),
            min_top1_agreement=float(values["min_top1_agreement"]),
            max_accuracy_drop=float(values["max_accuracy_drop"]),
        )


def _softmax(logits: FloatArray) -> npt.NDArray[np.float64]:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def compare_outputs(
    outputs: FloatArray,
    reference: FloatArray,
    labels: npt.NDArray[np.int64],
    thresholds: ThresholdsLike,
) -> tuple[float, float, float, float, list[str]]:
    """Compare artifact outputs with the torch reference.

    Returns:
        (max abs error between the softmax probabilities of artifact and reference,
        top-1 agreement,
        accuracy, reference accuracy, reasons for refusal — empty when it passes).
    """
    if outputs.shape != reference.shape:
        return (
            float("inf"),
            0.0,
            0.0,
            float((reference.argmax(1) == labels).mean()),
            [f"output shape {outputs.shape} differs from the reference {reference.shape}"],
        )
    max_abs = float(np.max(np.abs(_softmax(outputs) - _softmax(reference))))
    if not np.isfinite(max_abs):
        max_abs = float("inf")
    pred, ref_pred = outputs.argmax(1), reference.argmax(1)
    agreement = float((pred == ref_pred).mean())
    accuracy = float((pred == labels).mean())
    ref_accuracy = float((ref_pred == labels).mean())
    reasons: list[str] = []
    if max_abs > thresholds.max_abs_error:
        reasons.append(
            f"max abs probability error {max_abs:.4g} exceeds {thresholds.max_abs_error:g}"
        )
    if agreement < thresholds.min_top1_agreement:
        reasons.append(
            f"top-1 agreement {agreement:.1%} is below {thresholds.min_top1_agreement:.1%}"
        )
    drop = (ref_accuracy - accuracy) * 100
    if drop > thresholds.max_accuracy_drop:
        reasons.append(
            f"accuracy {accuracy:.1%} is {drop:.1f} points below the reference "
            f"{ref_accuracy:.1%} (allowed {thresholds.max_accuracy_drop:g})"
        )
    return max_abs, agreement, accuracy, ref_accuracy, reasons


def golden_arrays(golden: GoldenSet) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """The golden set as arrays: inputs ``(N, *input_shape)``, reference outputs, labels."""
    x = np.asarray(golden.inputs, dtype=np.float32).reshape(-1, *golden.input_shape)
    reference = np.asarray(golden.reference_outputs, dtype=np.float32)
    labels = np.asarray(golden.labels, dtype=np.int64)
    return x, reference, labels


@dataclass(frozen=True)
class GoldenCheck:
    """One run of the golden vectors on a loaded model.

    Attributes:
        passed: Within every tolerance.
        reasons: Why not, empty when it passed.
        max_abs_error: Largest probability error against the reference.
        top1_agreement: Share of arg-max answers equal to the reference's.
        p50_us: Median latency of one sample, microseconds.
    """

    passed: bool
    reasons: list[str]
    max_abs_error: float
    top1_agreement: float
    p50_us: float


def check_golden(
    runtime: Runtime, golden: GoldenSet, thresholds: ThresholdsLike, *, repeats: int = 3
) -> GoldenCheck:
    """Run the golden inputs on ``runtime`` and hold the outputs to ``thresholds``.

    The golden set is run ``repeats`` times (at least once); the latency is the median
    per sample over all runs, the outputs those of the last run.

    Raises:
        BadInputError: The golden inputs do not fit the model's input.
    """
    x, reference, labels = golden_arrays(golden)
    per_sample: list[float] = []
    outputs = reference
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        outputs = runtime.run(x)
        per_sample.append((time.perf_counter() - start) * 1e6 / max(1, len(x)))
    max_abs, agreement, _acc, _ref_acc, reasons = compare_outputs(
        outputs, reference, labels, thresholds
    )
    return GoldenCheck(
        passed=not reasons,
        reasons=reasons,
        max_abs_error=max_abs,
        top1_agreement=agreement,
        p50_us=float(np.median(per_sample)),
    )
