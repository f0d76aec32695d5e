"""``int8-wo``: int8 weights dequantized at run time; ~4x smaller, float compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefl.quantize.recipes._quantizer import run_quantizer
from edgefl.quantize.recipes.base import Recipe, Thresholds


class Int8WeightOnlyRecipe(Recipe):
    """Weight-only int8 (per-channel, symmetric), activations stay float."""

    key = "int8-wo"
    description = "int8 weights, float activations (no calibration needed)"
    thresholds = Thresholds(max_abs_error=5e-2, min_top1_agreement=0.98, max_accuracy_drop=1.0)

    def apply(
        self, fp32_model: Path, out: Path, calibration: npt.NDArray[np.float32] | None
    ) -> None:
        """Quantize weights only."""
        from ai_edge_quantizer import recipe

        run_quantizer(fp32_model, out, recipe.weight_only_wi8_afp32())
