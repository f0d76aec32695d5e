"""``onnx`` and ``onnx-int8``: ONNX artifacts for ONNX Runtime (Jetson-class devices).

The float ``.onnx`` is exported from the torch model (:func:`edgefl.quantize.convert.
convert_to_onnx`); ``onnx`` ships it as it is, ``onnx-int8`` quantizes its weights to int8
with ONNX Runtime's own dynamic quantization (activations are quantized on the fly), which
comes with the ``onnxruntime`` package. Both are verified on the ``onnxruntime`` runtime.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefl.quantize.recipes.base import Recipe, Thresholds

__all__ = ["OnnxInt8DynamicRecipe", "OnnxRecipe"]


class OnnxRecipe(Recipe):
    """The exported float ONNX model, as it is."""

    key = "onnx"
    description = "float32 ONNX for onnxruntime (device class jetson)"
    artifact_format = "onnx"
    thresholds = Thresholds(max_abs_error=1e-3, min_top1_agreement=0.995, max_accuracy_drop=0.5)

    def apply(
        self, fp32_model: Path, out: Path, calibration: npt.NDArray[np.float32] | None
    ) -> None:
        """Copy the exported model."""
        shutil.copyfile(fp32_model, out)


class _DropPreprocessAdvice(logging.Filter):
    """ONNX Runtime's quantizer advises pre-processing on the root logger at every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


class OnnxInt8DynamicRecipe(Recipe):
    """int8 weights, activations quantized at run time (``quantize_dynamic``)."""

    key = "onnx-int8"
    description = "dynamic-range int8 ONNX (onnxruntime's quantize_dynamic)"
    artifact_format = "onnx"
    thresholds = Thresholds(max_abs_error=0.1, min_top1_agreement=0.97, max_accuracy_drop=1.5)

    def apply(
        self, fp32_model: Path, out: Path, calibration: npt.NDArray[np.float32] | None
    ) -> None:
        """Quantize the weights of MatMul/Gemm and Conv nodes to signed int8."""
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quiet = _DropPreprocessAdvice()
        root = logging.getLogger()
        root.addFilter(quiet)
        try:
            quantize_dynamic(fp32_model, out, weight_type=QuantType.QInt8)
        finally:
            root.removeFilter(quiet)
