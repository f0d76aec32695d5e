"""``int8``: static, calibrated full-integer quantization with int8 input and output.

Integer-only accelerators (Edge TPU, many NPUs/DSPs) need this form: every activation,
including the model's input and output tensors, is int8 with a scale and zero point that
calibration fixes from representative data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefl.errors import CalibrationDataError
from edgefl.quantize.recipes._quantizer import run_quantizer
from edgefl.quantize.recipes.base import Recipe, Thresholds

MIN_CALIBRATION_SAMPLES = 8


class Int8StaticRecipe(Recipe):
    """int8 weights and activations, int8 I/O, calibrated (ai-edge-quantizer static_wi8_ai8)."""

    key = "int8"
    description = "static int8 weights+activations, int8 I/O, calibrated"
    needs_calibration = True
    integer_io = True
    # A sample on the decision boundary may legitimately flip under int8, and then its
    # probabilities move by ~0.5; how often that may happen is bounded by the agreement.
    thresholds = Thresholds(max_abs_error=0.6, min_top1_agreement=0.97, max_accuracy_drop=1.5)

    def apply(
        self, fp32_model: Path, out: Path, calibration: npt.NDArray[np.float32] | None
    ) -> None:
        """Calibrate on ``calibration`` and write the full-integer model."""
        if calibration is None or len(calibration) < MIN_CALIBRATION_SAMPLES:
            have = 0 if calibration is None else len(calibration)
            raise CalibrationDataError(
                f"static int8 needs at least {MIN_CALIBRATION_SAMPLES} calibration samples, "
                f"got {have}",
                hint="pass --calibration FILE.npy with representative inputs",
            )
        from ai_edge_quantizer import recipe

        run_quantizer(fp32_model, out, recipe.static_wi8_ai8(), calibration)
