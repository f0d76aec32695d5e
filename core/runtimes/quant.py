"""Affine (scale, zero point) quantization math shared by every runtime.

Pure functions on numpy arrays, kept apart from the stateful interpreters so they can be
property-tested alone. The convention is TFLite's: ``real = (q - zero_point) * scale``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["dequantize", "quantize"]


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"quantization scale must be finite and > 0, got {scale!r}")


def _integer_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    dt = np.dtype(dtype)
    if dt.kind not in "iu":
        raise ValueError(f"quantized dtype must be an integer type, got {dt.name}")
    return dt


def quantize(
    x: npt.ArrayLike, scale: float, zero_point: int, dtype: npt.DTypeLike
) -> npt.NDArray[Any]:
    """Quantize real values to an integer dtype.

    Computes ``clip(round(x / scale) + zero_point)`` with round-half-to-even, clipped to
    the range of ``dtype`` (int8: [-128, 127], uint8: [0, 255]).

    Args:
        x: Real values.
        scale: Step between adjacent quantized values; finite and > 0.
        zero_point: The integer that represents real 0; must lie in the dtype's range.
        dtype: Target integer dtype, e.g. ``"int8"`` or ``np.uint8``.

    Returns:
        An array of ``dtype`` with the shape of ``x``.

    Raises:
        ValueError: If the scale, zero point or dtype is invalid or ``x`` holds NaN.
    """
    _check_scale(scale)
    dt = _integer_dtype(dtype)
    info = np.iinfo(dt)
    if not info.min <= zero_point <= info.max:
        raise ValueError(f"zero point {zero_point} is outside the {dt.name} range")
    # float64 keeps the division exact enough that the round trip error stays within
    # scale/2 for every float32 input; int8/uint8 are far inside its integer range.
    real = np.asarray(x, dtype=np.float64)
    if np.isnan(real).any():
        raise ValueError("cannot quantize NaN")
    q = np.round(real / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dt)


def dequantize(q: npt.ArrayLike, scale: float, zero_point: int) -> npt.NDArray[np.float32]:
    """Map quantized integers back to real values: ``(q - zero_point) * scale``.

    Args:
        q: Quantized integers.
        scale: The scale they were quantized with; finite and > 0.
        zero_point: The zero point they were quantized with.

    Returns:
        A float32 array with the shape of ``q``.

    Raises:
        ValueError: If the scale is invalid.
    """
    _check_scale(scale)
    # int64 so that subtracting the zero point cannot wrap around in the narrow dtype.
    shifted = np.asarray(q).astype(np.int64) - int(zero_point)
    return (shifted.astype(np.float64) * scale).astype(np.float32)
