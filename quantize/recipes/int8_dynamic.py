"""``int8-dynamic``: dynamic-range int8 (int8 weights, activations quantized on the fly).

Kept on purpose, and not in the default set: ai-edge-quantizer's dynamic recipe writes
an op version that tflite-runtime 2.14 misreads, so the artifact runs there without an
error but gives wrong answers (about 10% accuracy on digits instead of 98%). Verification
on every target runtime is what catches it; this recipe is how we prove that it does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefl.quantize.recipes._quantizer import run_quantizer
from edgefl.quantize.recipes.base import Recipe, Thresholds


class Int8DynamicRecipe(Recipe):
    """Dynamic-range int8 via ai-edge-quantizer ``dynamic_wi8_afp32``."""

    key = "int8-dynamic"
    description = "dynamic-range int8 (known wrong on tflite-runtime 2.14; verify catches it)"
    thresholds = Thresholds(max_abs_error=0.1, min_top1_agreement=0.97, max_accuracy_drop=1.5)

    def apply(
        self, fp32_model: Path, out: Path, calibration: npt.NDArray[np.float32] | None
    ) -> None:
        """Quantize weights to int8 with dynamic activation quantization."""
        from ai_edge_quantizer import recipe

        run_quantizer(fp32_model, out, recipe.dynamic_wi8_afp32())
