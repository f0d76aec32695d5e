"""``fp32``: the converted float model as it is; the baseline every variant is judged by."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefl.quantize.recipes.base import Recipe, Thresholds


class Fp32Recipe(Recipe):
    """No quantization."""

    key = "fp32"
    description = "float32 weights and activations (baseline)"
    thresholds = Thresholds(max_abs_error=1e-3, min_top1_agreement=0.995, max_accuracy_drop=0.5)

    def apply(
        self, fp32_model: Path, out: Path, calibration: npt.NDArray[np.float32] | None
    ) -> None:
        """Copy the converted model."""
        shutil.copyfile(fp32_model, out)
