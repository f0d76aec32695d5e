"""numpy ↔ ``edgefl.v1.Tensor`` for the inference contract (``proto/inference.proto``).

:func:`decode_tensor` validates everything a peer controls (dtype name, rank, shape and
its size, exact byte length) and raises :class:`TensorError` with the reason, so a server
can map it to ``INVALID_ARGUMENT`` without ever handing numpy a buffer of the wrong size.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt

from edgefl.errors import BadInputError
from edgefl.proto import inference_pb2

__all__ = ["SUPPORTED_DTYPES", "TensorError", "decode_tensor", "encode_tensor"]

SUPPORTED_DTYPES: Final = frozenset({"float32", "float16", "int8", "uint8", "int32", "int64"})
"""dtype names the contract allows; anything else is refused."""

_MAX_RANK: Final = 8
# Most bytes a shape may describe. It is checked with every zero dimension counted as 1,
# so a shape such as [0, 2**62, 2**62] (0 bytes of body, but dimensions numpy refuses
# with an unexpected error) is refused here; far above any gRPC message edgefl accepts.
_MAX_TENSOR_BYTES: Final = 2**31


class TensorError(BadInputError):
    """A tensor message is malformed: unknown dtype, bad shape or wrong byte length."""


def encode_tensor(array: npt.NDArray[np.generic]) -> inference_pb2.Tensor:
    """Encode a numpy array (any layout) as a little-endian, C-order ``Tensor``."""
    name = array.dtype.name
    if name not in SUPPORTED_DTYPES:
        raise TensorError(f"dtype {name!r} is not supported; use one of {sorted(SUPPORTED_DTYPES)}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return inference_pb2.Tensor(dtype=name, shape=list(array.shape), data=data)


def decode_tensor(tensor: inference_pb2.Tensor) -> npt.NDArray[np.generic]:
    """Decode and validate a ``Tensor``; the result is a read-only view of its bytes."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TensorError(
            f"dtype {tensor.dtype!r} is not supported; use one of {sorted(SUPPORTED_DTYPES)}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > _MAX_RANK:
        raise TensorError(f"rank {len(shape)} is over the limit of {_MAX_RANK}")
    if any(d < 0 for d in shape):
        raise TensorError(f"shape {list(shape)} has a negative dimension")
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize > _MAX_TENSOR_BYTES:
        raise TensorError(
            f"shape {list(shape)} is too large: its non-zero dimensions alone describe "
            f"more than {_MAX_TENSOR_BYTES} bytes of {tensor.dtype}"
        )
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(
            f"tensor body is {len(tensor.data)} bytes but dtype {tensor.dtype} and shape "
            f"{list(shape)} need {expected} (truncated or padded)"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
