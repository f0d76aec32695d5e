"""Shared glue for recipes built on ai-edge-quantizer (imported only when one runs)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefl.errors import CalibrationDataError, EdgeflError

__all__ = ["run_quantizer"]

logger = logging.getLogger(__name__)


def run_quantizer(
    fp32_model: Path,
    out: Path,
    recipe: Any,
    calibration: npt.NDArray[np.float32] | None = None,
) -> None:
    """Apply an ai-edge-quantizer recipe, calibrating first when data is given."""
    from ai_edge_quantizer import quantizer

    # The quantizer prints size summaries on stdout and a tqdm bar on stderr; stdout
    # belongs to our --json output, so both go to the debug log instead.
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            _quantize(quantizer.Quantizer(str(fp32_model)), recipe, calibration, out)
    except EdgeflError:
        raise
    except Exception as exc:  # the quantizer raises bare ValueError/RuntimeError
        raise EdgeflError(f"ai-edge-quantizer failed on {fp32_model.name}: {exc}") from exc
    finally:
        logger.debug("ai-edge-quantizer output:\n%s", chatter.getvalue())


def _quantize(qt: Any, recipe: Any, calibration: npt.NDArray[np.float32] | None, out: Path) -> None:
    qt.load_quantization_recipe(recipe)
    if calibration is not None:
        # The converted model has one signature, "serving_default", whose input is args_0.
        samples = [{"args_0": np.ascontiguousarray(x[None])} for x in calibration]
        result = qt.quantize(qt.calibrate({"serving_default": samples}))
    elif qt.need_calibration:
        raise CalibrationDataError("this recipe needs calibration data")
    else:
        result = qt.quantize()
    result.export_model(str(out), overwrite=True)
