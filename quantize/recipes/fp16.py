"""``fp16``: weights stored as float16 and cast back at load; half the size, same math."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefl.quantize.recipes._quantizer import run_quantizer
from edgefl.quantize.recipes.base import Recipe, Thresholds


class Fp16Recipe(Recipe):
    """Float16 weights (ai-edge-quantizer FLOAT_CASTING), float32 compute."""

    key = "fp16"
    description = "float16 weights, float32 compute (2x smaller, GPU-delegate friendly)"
    thresholds = Thresholds(max_abs_error=2e-2, min_top1_agreement=0.99, max_accuracy_drop=0.5)

    def apply(
        self, fp32_model: Path, out: Path, calibration: npt.NDArray[np.float32] | None
    ) -> None:
        """Cast every supported op's weights to float16."""
        from ai_edge_quantizer import qtyping, recipe_manager
        from ai_edge_quantizer.algorithm_manager import AlgorithmName

        manager = recipe_manager.RecipeManager()
        manager.add_weight_only_config(
            regex=".*",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            num_bits=16,
            algorithm_key=AlgorithmName.FLOAT_CASTING,
        )
        run_quantizer(fp32_model, out, manager.get_quantization_recipe())
