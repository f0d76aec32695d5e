"""Property tests for the affine quantization math in edgefl.edge_agent.runtimes.quant."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgefl.edge_agent.runtimes import dequantize, quantize

DTYPES = ["int8", "uint8"]

scales = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False)


@st.composite
def quant_params(draw: st.DrawFn) -> tuple[float, int, str]:
    dtype = draw(st.sampled_from(DTYPES))
    info = np.iinfo(dtype)
    zero_point = draw(st.integers(min_value=int(info.min), max_value=int(info.max)))
    return draw(scales), zero_point, dtype


def representable_range(scale: float, zero_point: int, dtype: str) -> tuple[float, float]:
    info = np.iinfo(dtype)
    return (int(info.min) - zero_point) * scale, (int(info.max) - zero_point) * scale


@given(params=quant_params(), data=st.data())
def test_round_trip_within_half_a_step(params: tuple[float, int, str], data: st.DataObject) -> None:
    scale, zero_point, dtype = params
    lo, hi = representable_range(scale, zero_point, dtype)
    assume(lo < hi)
    x = data.draw(
        hnp.arrays(np.float64, st.integers(1, 32), elements=st.floats(lo, hi, allow_nan=False))
    )
    back = dequantize(quantize(x, scale, zero_point, dtype), scale, zero_point)
    assert back.dtype == np.float32
    # Half a step, plus float32 rounding of the dequantized value itself.
    tolerance = scale / 2 + 1e-6 * np.maximum(np.abs(x), scale)
    assert np.all(np.abs(back.astype(np.float64) - x) <= tolerance)


@given(
    params=quant_params(),
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(max_dims=3, max_side=8),
        elements=st.floats(width=32, allow_nan=False),
    ),
)
def test_output_in_range_with_the_right_dtype(
    params: tuple[float, int, str], x: np.ndarray
) -> None:
    scale, zero_point, dtype = params
    q = quantize(x, scale, zero_point, dtype)
    info = np.iinfo(dtype)
    assert q.dtype == np.dtype(dtype)
    assert q.shape == x.shape
    assert np.all(q >= info.min)
    assert np.all(q <= info.max)


@given(
    params=quant_params(),
    x=hnp.arrays(np.float64, st.integers(2, 64), elements=st.floats(-1e6, 1e6, allow_nan=False)),
)
def test_monotonic(params: tuple[float, int, str], x: np.ndarray) -> None:
    scale, zero_point, dtype = params
    ordered = np.sort(x)
    q = quantize(ordered, scale, zero_point, dtype).astype(np.int64)
    assert np.all(np.diff(q) >= 0)


@given(params=quant_params())
def test_zero_maps_to_zero_point(params: tuple[float, int, str]) -> None:
    scale, zero_point, dtype = params
    assert int(quantize(np.zeros(3), scale, zero_point, dtype)[0]) == zero_point
    assert float(dequantize(np.array([zero_point], dtype=dtype), scale, zero_point)[0]) == 0.0


@pytest.mark.parametrize("scale", [0.0, -0.5, math.inf, -math.inf, math.nan])
def test_invalid_scale_rejected(scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        quantize(np.ones(2), scale, 0, "int8")
    with pytest.raises(ValueError, match="scale"):
        dequantize(np.ones(2, dtype=np.int8), scale, 0)


def test_round_half_to_even() -> None:
    q = quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5]), 1.0, 0, "int8")
    assert q.tolist() == [0, 2, 2, 0, -2]


def test_rejects_non_integer_dtype_nan_and_bad_zero_point() -> None:
    with pytest.raises(ValueError, match="integer"):
        quantize(np.ones(2), 0.1, 0, "float32")
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([np.nan]), 0.1, 0, "int8")
    with pytest.raises(ValueError, match="zero point"):
        quantize(np.ones(2), 0.1, 200, "int8")
