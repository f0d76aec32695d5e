"""Reading samples from JSON and ``.npy`` bytes, and checking them against an input spec.

Shared by the endpoint and folder sources (and open to plugins through
:meth:`PushSource.offer <edgefl.edge_agent.sources.PushSource.offer>`). Every refusal is
a :class:`SampleError` whose ``reason`` is one short word the sources count by:

``not_json``, ``bad_format``, ``bad_npy``, ``pickled``, ``bad_shape``, ``bad_dtype``,
``not_finite``, ``out_of_range``, ``bad_label``, ``too_many`` (and, from the sources
themselves, ``too_large``, ``queue_full``, ``unsupported_type``, ...).

An ``.npy`` is never unpickled: its header is read first, anything but a plain numeric
array (object arrays, which need pickle; structured or string dtypes) is refused, and
the data is mapped with :func:`numpy.frombuffer` only when its length matches the header
exactly, so a header that lies about its size allocates nothing.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_LABEL",
    "RawSample",
    "SampleError",
    "conform",
    "read_json",
    "read_npy",
    "split_batch",
]

MAX_LABEL = 2**31 - 1
"""Largest label accepted (labels are class indices: 0 to this)."""

_NUMERIC = "iuf"


class SampleError(ValueError):
    """A sample (or a group of them) was refused; ``reason`` is the counter's key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def prefixed(self, where: str) -> SampleError:
        """The same refusal, its message starting with ``where`` (e.g. ``samples[3]``)."""
        return SampleError(self.reason, f"{where}: {self.message}")


@dataclass(frozen=True)
class RawSample:
    """A sample as received, not checked yet.

    Attributes:
        x: The values as received.
        y: The label, when given.
        typed: ``x`` carries a real dtype (from an ``.npy``), not one numpy guessed from
            JSON numbers: its dtype must then cast to the expected one.
        what: Where it came from, for messages (``x``, ``samples[2].x``, ``row 5``).
    """

    x: npt.NDArray[Any]
    y: int | None = None
    typed: bool = False
    what: str = "x"

    @classmethod
    def of(cls, x: npt.ArrayLike, y: int | None = None, *, what: str = "x") -> RawSample:
        """A sample from an array (its dtype is kept) or nested lists of numbers.

        Raises:
            SampleError: ``x`` is not a rectangular array (``bad_shape``), or ``y`` not a
                label (``bad_label``).
        """
        typed = isinstance(x, np.ndarray)
        return cls(_as_array(x, what), check_label(y, what), typed=typed, what=what)


def check_label(y: Any, what: str = "y") -> int | None:
    """``y`` as a label: ``None``, or an integer from 0 to :data:`MAX_LABEL`."""
    if y is None:
        return None
    if isinstance(y, np.integer):
        y = int(y)
    if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y <= MAX_LABEL:
        raise SampleError(
            "bad_label", f"{what}: a label is a class index (an integer >= 0), got {y!r}"
        )
    return y


def _as_array(x: Any, what: str) -> npt.NDArray[Any]:
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError, OverflowError) as exc:
        raise SampleError(
            "bad_shape", f"{what} must be a rectangular array of numbers ({exc})"
        ) from None
    return arr


def conform(
    x: npt.NDArray[Any],
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[str],
    *,
    typed: bool,
    what: str = "x",
) -> npt.NDArray[np.float32]:
    """Check one sample against every shape and dtype given; return it as float32 input.

    A sample fits a shape when it has exactly that shape, or is flat with as many values
    (it is then reshaped). It fits a dtype when every value is representable in it: an
    ``.npy`` sample's dtype must also cast to it (``same_kind``: float64 to float32 is
    fine, float to int8 is not); JSON numbers for an integer dtype must be whole. Values
    must be finite and fit float32. The result has the last shape given (the model's, when
    there is one), or the sample's own.

    Raises:
        SampleError: ``bad_dtype``, ``bad_shape``, ``not_finite`` or ``out_of_range``.
    """
    if x.dtype.kind not in _NUMERIC or x.dtype.names is not None:
        raise SampleError(
            "bad_dtype", f"{what} must hold numbers only, got {_dtype_text(x.dtype)} values"
        )
    if x.ndim == 0 or x.size == 0:
        raise SampleError(
            "bad_shape", f"{what} must be a non-empty array, got shape {tuple(x.shape)}"
        )
    for shape in shapes:
        if tuple(x.shape) != shape and not (x.ndim == 1 and x.size == math.prod(shape)):
            raise SampleError(
                "bad_shape",
                f"{what} has shape {tuple(x.shape)}; expected {shape}"
                + (f" (or {math.prod(shape)} values flat)" if len(shape) > 1 else ""),
            )
    if x.dtype.kind == "f" and not bool(np.isfinite(x).all()):
        raise SampleError("not_finite", f"{what} holds NaN or infinite values")
    for name in dtypes:
        _check_dtype(x, np.dtype(name), typed=typed, what=what)
    _check_range(x, np.dtype(np.float32), what)
    out = x.astype(np.float32)
    return out.reshape(shapes[-1]) if shapes else out


def _dtype_text(dtype: np.dtype[Any]) -> str:
    return {"U": "text", "S": "bytes", "O": "mixed or non-numeric", "b": "boolean"}.get(
        dtype.kind, dtype.name
    )


def _check_dtype(x: npt.NDArray[Any], target: np.dtype[Any], *, typed: bool, what: str) -> None:
    if typed and not np.can_cast(x.dtype, target, casting="same_kind"):
        raise SampleError(
            "bad_dtype",
            f"{what} is {x.dtype.name}; expected {target.name} (or a type that "
            "casts to it without losing its kind)",
        )
    if target.kind in "iu" and x.dtype.kind == "f" and not bool((np.floor(x) == x).all()):
        raise SampleError(
            "bad_dtype", f"{what} has fractional values; expected whole numbers ({target.name})"
        )
    _check_range(x, target, what)


def _check_range(x: npt.NDArray[Any], target: np.dtype[Any], what: str) -> None:
    if target.kind == "f":
        top = float(np.finfo(target).max)
        low: float = -top
    else:
        info = np.iinfo(target)
        low, top = float(info.min), float(info.max)
    lo, hi = float(x.min()), float(x.max())
    if lo < low or hi > top:
        raise SampleError(
            "out_of_range",
            f"{what} has values from {lo:g} to {hi:g}; {target.name} holds {low:g} to {top:g}",
        )


def read_json(body: bytes, *, max_samples: int) -> list[RawSample]:
    """Samples from ``{"x": [...], "y": label?}`` or ``{"samples": [{"x", "y"?}, ...]}``.

    Raises:
        SampleError: ``not_json``, ``bad_format``, ``too_many``, ``bad_shape``,
            ``bad_label``.
    """
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SampleError("not_json", f"the body is not UTF-8 JSON ({_short(exc)})") from None
    usage = 'send {"x": [...], "y": optional label} or {"samples": [{"x": [...]}, ...]}'
    if not isinstance(doc, dict):
        raise SampleError("bad_format", f"a JSON {type(doc).__name__}, not an object: {usage}")
    if "samples" in doc:
        if set(doc) != {"samples"}:
            raise SampleError("bad_format", f"a samples object has no other keys: {usage}")
        items = doc["samples"]
        if not isinstance(items, list):
            raise SampleError("bad_format", f"samples must be a list: {usage}")
        if len(items) > max_samples:
            raise SampleError("too_many", f"{len(items)} samples; at most {max_samples} in one go")
        return [_json_item(item, f"samples[{i}]", usage) for i, item in enumerate(items)]
    return [_json_item(doc, "", usage)]


def _json_item(item: Any, where: str, usage: str) -> RawSample:
    prefix = f"{where}." if where else ""
    if not isinstance(item, dict) or "x" not in item or not set(item) <= {"x", "y"}:
        keys = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise SampleError("bad_format", f"{where or 'the object'} has {keys}: {usage}")
    return RawSample.of(item["x"], check_label(item.get("y"), f"{prefix}y"), what=f"{prefix}x")


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def read_npy(body: bytes) -> npt.NDArray[Any]:
    """The array an ``.npy`` holds, read without pickle and without trusting its header.

    Raises:
        SampleError: ``bad_npy`` (not an ``.npy``, or its length disagrees with its
            header), ``pickled`` (an object array) or ``bad_dtype``.
    """
    fmt = np.lib.format
    stream = io.BytesIO(body)
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(stream)
        else:
            raise ValueError(f"format version {version} is not read here; use numpy.save")
    except (ValueError, TypeError, SyntaxError, EOFError) as exc:
        raise SampleError("bad_npy", f"not a readable .npy file ({_short(exc)})") from None
    if dtype.hasobject:
        raise SampleError(
            "pickled",
            "an object array (it would need pickle, which is never loaded); save a numeric array",
        )
    if dtype.kind not in _NUMERIC or dtype.names is not None or dtype.subdtype is not None:
        raise SampleError(
            "bad_dtype", f"the array holds {_dtype_text(dtype)} values; save numbers only"
        )
    count = math.prod(shape)
    offset = stream.tell()
    if len(body) - offset != count * dtype.itemsize:
        raise SampleError(
            "bad_npy",
            f"the header says {shape} {dtype.name} ({count * dtype.itemsize} bytes) but "
            f"{len(body) - offset} bytes follow it (a truncated or padded file)",
        )
    flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def split_batch(
    arr: npt.NDArray[Any], shapes: Sequence[tuple[int, ...]], *, max_samples: int
) -> list[RawSample]:
    """An ``.npy`` array as one sample or a batch, by the expected shape.

    With an expected shape ``S``: an array of shape ``S`` (or flat with as many values) is
    one sample, ``(n, *S)`` (or ``(n, size)``) is ``n``. Without one, a 1-D array is one
    sample and anything with more dimensions a batch along its first.

    Raises:
        SampleError: ``bad_shape`` (fits neither), ``too_many`` (a batch of more than
            ``max_samples``) or ``bad_format`` (an empty batch).
    """
    if arr.ndim == 0:
        raise SampleError("bad_shape", "the array is a scalar; save one sample or a batch")
    if shapes:
        shape = shapes[-1]
        size = math.prod(shape)
        if tuple(arr.shape) == shape or (arr.ndim == 1 and arr.size == size):
            batch = False
        elif tuple(arr.shape[1:]) == shape or (arr.ndim == 2 and arr.shape[1] == size):
            batch = True
        else:
            raise SampleError(
                "bad_shape",
                f"the array has shape {tuple(arr.shape)}; expected one sample {shape} or a "
                f"batch (n, {', '.join(map(str, shape))})",
            )
    else:
        batch = arr.ndim > 1
    if batch and len(arr) > max_samples:
        raise SampleError("too_many", f"a batch of {len(arr)} samples; at most {max_samples}")
    rows = list(arr) if batch else [arr]
    if not rows:
        raise SampleError("bad_format", "the batch is empty; save at least one sample")
    return [
        RawSample(np.asarray(row), typed=True, what="the array" if len(rows) == 1 else f"row {i}")
        for i, row in enumerate(rows)
    ]
