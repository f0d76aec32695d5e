"""Shared glue for recipes built on ai-edge-quantizer (imported only when one runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefl.errors import CalibrationDataError, EdgeflError

__all__ = ["run_quantizer"]


def run_quantizer(
    fp32_model: Path,
    out: Path,
    recipe: Any,
    calibration: npt.NDArray[np.float32] | None = None,
) -> None:
    """Apply an ai-edge-quantizer recipe, calibrating first when data is given."""
    from ai_edge_quantizer import quantizer

    qt = quantizer.Quantizer(str(fp32_model))
    qt.load_quantization_recipe(recipe)
    try:
        if calibration is not None:
            signatures = qt.get_signature_list() if hasattr(qt, "get_signature_list") else None
            sig = next(iter(signatures)) if signatures else "serving_default"
            samples = [{"args_0": np.ascontiguousarray(x[None])} for x in calibration]
            result = qt.quantize(qt.calibrate({sig: samples}))
        else:
            if qt.need_calibration:
                raise CalibrationDataError("this recipe needs calibration data")
            result = qt.quantize()
        result.export_model(str(out), overwrite=True)
    except EdgeflError:
        raise
    except Exception as exc:  # the quantizer raises bare ValueError/RuntimeError
        raise EdgeflError(f"ai-edge-quantizer failed on {fp32_model.name}: {exc}") from exc
