"""The device runtime interface: :class:`TensorSpec` and the abstract :class:`Runtime`.

Every backend wraps a TFLite-style interpreter (``ai_edge_litert``, ``tflite_runtime``;
the ONNX Runtime backend adapts its session to the same small interface); they differ
only in where the interpreter comes from and which delegates it loads, so the tensor
bookkeeping, int8 conversion and error translation live here once and a backend
implements three small hooks (and :meth:`Runtime._check_file` when its files are not
TFLite).
"""

from __future__ import annotations

import ctypes
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from edgefl.errors import ArtifactError, BadInputError, RuntimeUnavailableError

from .quant import dequantize, quantize

__all__ = ["InterpreterLike", "Runtime", "TensorSpec"]

# A .tflite file is a FlatBuffer whose 4-byte file identifier sits at offset 4.
_TFLITE_IDENTIFIER = b"TFL3"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a model as the interpreter sees it.

    Attributes:
        name: Tensor name in the model.
        index: Interpreter tensor index, for ``set_tensor`` / ``get_tensor``.
        shape: Static shape, batch first.
        dtype: numpy dtype name, e.g. ``"float32"`` or ``"int8"``.
        scale: Quantization scale, ``0.0`` when the tensor is not quantized.
        zero_point: Quantization zero point, ``0`` when the tensor is not quantized.
    """

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        """Whether the tensor carries (per-tensor) quantization parameters."""
        return self.scale > 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (shape as a list)."""
        return {
            "name": self.name,
            "index": self.index,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        """Rebuild a spec from :meth:`to_dict` output.

        Raises:
            KeyError: If a field is missing.
        """
        return cls(
            name=str(data["name"]),
            index=int(data["index"]),
            shape=tuple(int(d) for d in data["shape"]),
            dtype=str(data["dtype"]),
            scale=float(data["scale"]),
            zero_point=int(data["zero_point"]),
        )

    @classmethod
    def from_details(cls, details: Mapping[str, Any]) -> TensorSpec:
        """Build a spec from one entry of ``Interpreter.get_input_details()``."""
        scale, zero_point = details.get("quantization", (0.0, 0))
        return cls(
            name=str(details["name"]),
            index=int(details["index"]),
            shape=tuple(int(d) for d in details["shape"]),
            dtype=np.dtype(details["dtype"]).name,
            scale=float(scale),
            zero_point=int(zero_point),
        )


class InterpreterLike(Protocol):
    """The part of the TFLite ``Interpreter`` API that runtimes use."""

    def allocate_tensors(self) -> None:
        """Allocate tensor memory; fails on a model the interpreter cannot run."""

    def get_input_details(self) -> list[dict[str, Any]]:
        """Describe the input tensors."""

    def get_output_details(self) -> list[dict[str, Any]]:
        """Describe the output tensors."""

    def set_tensor(self, tensor_index: int, value: npt.NDArray[Any]) -> None:
        """Copy ``value`` into a tensor."""

    def invoke(self) -> None:
        """Run the model once."""

    def get_tensor(self, tensor_index: int) -> npt.NDArray[Any]:
        """Return a copy of a tensor."""


class Runtime(ABC):
    """A loaded model on one device runtime, run one sample at a time.

    Models have a single input and a single output whose batch dimension is 1, which is
    how edgefl exports them; :meth:`run` loops over a batch. One interpreter is not safe
    to use from several threads at once, so calls are serialised by a lock.

    Subclasses set :attr:`key`, implement :meth:`version`, :meth:`_load_delegate` and
    :meth:`_new_interpreter`, and register with
    :func:`edgefl.runtimes.register_runtime`.

    Args:
        model_path: The ``.tflite`` file.
        threads: CPU threads for the interpreter (``num_threads``); at least 1.
        delegates: Shared libraries of TFLite delegates to load, in order.

    Raises:
        ArtifactError: The file is missing, truncated, not a TFLite model, or not a
            single-input single-output model with batch 1.
        RuntimeUnavailableError: The runtime or a delegate cannot be loaded here.
        BadInputError: ``threads`` is less than 1.
    """

    key: ClassVar[str]
    #: What to do when the runtime is unavailable; shown as the error's hint.
    install_hint: ClassVar[str] = ""

    @classmethod
    @abstractmethod
    def version(cls) -> str:
        """Return the installed version of the runtime package."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Say why this runtime cannot run here, or ``None`` when it can.

        A backend module that imported is usable unless it overrides this (the Edge TPU
        also needs its delegate library).
        """
        return None

    @classmethod
    def is_available(cls) -> bool:
        """Whether this runtime can run models here."""
        return cls.unavailable_reason() is None

    @abstractmethod
    def _load_delegate(self, library: str) -> object:
        """Load one delegate with the backend's ``load_delegate``."""

    @abstractmethod
    def _new_interpreter(
        self, model_path: str, threads: int, delegates: Sequence[object]
    ) -> InterpreterLike:
        """Construct the backend's interpreter (without allocating tensors)."""

    def _delegate_libraries(self, requested: Sequence[str]) -> list[str]:
        """Delegate libraries to load; a backend may add its own."""
        return list(requested)

    @classmethod
    def _check_file(cls, path: Path) -> None:
        """Refuse a file this backend plainly cannot load, before the interpreter sees it.

        The default is for ``.tflite`` models: missing, unreadable, or without the TFLite
        file identifier.

        Raises:
            ArtifactError: With a message naming the file.
        """
        _check_model_file(path)

    def details(self) -> dict[str, Any]:
        """Backend-specific facts for :meth:`describe` (an execution provider, say)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What runs the model, for status output and reports (JSON-able).

        Keys: ``runtime``, ``version``, ``model``, ``threads``, ``inputs``, ``outputs``
        and whatever :meth:`details` adds.
        """
        return {
            "runtime": self.key,
            "version": self.version(),
            "model": str(self._model_path),
            "threads": self._threads,
            "inputs": [spec.to_dict() for spec in self._inputs],
            "outputs": [spec.to_dict() for spec in self._outputs],
            **self.details(),
        }

    def __init__(
        self, model_path: Path, *, threads: int = 1, delegates: Sequence[str] = ()
    ) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise RuntimeUnavailableError(
                f"runtime {self.key!r} is not available: {reason}", hint=self.install_hint
            )
        if threads < 1:
            raise BadInputError(f"threads must be at least 1, got {threads}")
        self._model_path = Path(model_path)
        self._threads = threads
        self._check_file(self._model_path)
        loaded = [self._checked_delegate(lib) for lib in self._delegate_libraries(delegates)]
        try:
            interpreter = self._new_interpreter(str(self._model_path), threads, loaded)
            interpreter.allocate_tensors()
            inputs = [TensorSpec.from_details(d) for d in interpreter.get_input_details()]
            outputs = [TensorSpec.from_details(d) for d in interpreter.get_output_details()]
        except (ValueError, RuntimeError) as exc:
            # The interpreters report every unreadable model as ValueError/RuntimeError
            # (UnicodeDecodeError included) with terse messages; name file and runtime.
            raise ArtifactError(
                f"{self._model_path} cannot be loaded by {self.key}: {exc}".rstrip()
            ) from exc
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactError(
                f"{self._model_path} has {len(inputs)} inputs and {len(outputs)} outputs; "
                "edgefl runtimes run single-input, single-output models"
            )
        for spec in (*inputs, *outputs):
            if not spec.shape or spec.shape[0] != 1:
                raise ArtifactError(
                    f"{self._model_path}: tensor {spec.name!r} has shape {spec.shape}; "
                    "edgefl models are exported with batch dimension 1"
                )
        self._interpreter = interpreter
        self._inputs = inputs
        self._outputs = outputs
        self._lock = threading.Lock()

    def _checked_delegate(self, library: str) -> object:
        # Probing with ctypes first: a failed load_delegate leaves a half-built Delegate
        # whose __del__ prints a spurious AttributeError traceback.
        try:
            ctypes.CDLL(library)
        except OSError as exc:
            raise RuntimeUnavailableError(
                f"delegate library {library!r} cannot be loaded: {exc}",
                hint="install the delegate's runtime library or drop the delegate",
            ) from exc
        try:
            return self._load_delegate(library)
        except (ValueError, RuntimeError, OSError) as exc:
            raise RuntimeUnavailableError(
                f"delegate {library!r} failed to initialise: {exc}",
                hint="check that the accelerator is attached and its driver is installed",
            ) from exc

    @property
    def model_path(self) -> Path:
        """The loaded model file."""
        return self._model_path

    @property
    def threads(self) -> int:
        """CPU threads given to the interpreter."""
        return self._threads

    @property
    def inputs(self) -> list[TensorSpec]:
        """Input tensor specs (exactly one)."""
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        """Output tensor specs (exactly one)."""
        return list(self._outputs)

    def run(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Run a batch of float samples one at a time.

        Quantized integer inputs are quantized with the input tensor's scale and zero
        point; quantized integer outputs are dequantized.

        Args:
            x: Float array of shape ``(N, *input_shape[1:])``.

        Returns:
            float32 array of shape ``(N, *output_shape[1:])``.

        Raises:
            BadInputError: The shape does not match, or the input tensor is neither
                float nor quantized (use :meth:`run_raw`).
        """
        spec_in, spec_out = self._inputs[0], self._outputs[0]
        batch = np.asarray(x, dtype=np.float32)
        if batch.shape[1:] != spec_in.shape[1:] or batch.ndim != len(spec_in.shape):
            raise BadInputError(
                f"input of shape {batch.shape} does not match the model input "
                f"(N, {', '.join(map(str, spec_in.shape[1:]))})"
            )
        feed = np.ascontiguousarray(_to_tensor(batch, spec_in))
        raw = np.empty((batch.shape[0], *spec_out.shape[1:]), dtype=np.dtype(spec_out.dtype))
        with self._lock:
            for i in range(batch.shape[0]):
                self._interpreter.set_tensor(spec_in.index, feed[i : i + 1])
                self._interpreter.invoke()
                raw[i] = self._interpreter.get_tensor(spec_out.index)[0]
        if spec_out.quantized and raw.dtype.kind in "iu":
            return dequantize(raw, spec_out.scale, spec_out.zero_point)
        return raw.astype(np.float32)

    def run_raw(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Run one sample exactly as given: no quantization, no dtype conversion.

        Args:
            x: One sample with the input tensor's dtype, shaped like the input tensor
                (batch 1) or without the batch dimension.

        Returns:
            The output tensor as the interpreter produced it (batch 1, tensor dtype).

        Raises:
            BadInputError: The dtype or shape does not match the input tensor.
        """
        spec_in, spec_out = self._inputs[0], self._outputs[0]
        sample = np.asarray(x)
        if sample.dtype != np.dtype(spec_in.dtype):
            raise BadInputError(
                f"run_raw needs {spec_in.dtype} input, got {sample.dtype}; use run() to convert"
            )
        if sample.shape == spec_in.shape[1:]:
            sample = sample[None]
        if sample.shape != spec_in.shape:
            raise BadInputError(
                f"run_raw input of shape {sample.shape} does not match {spec_in.shape}"
            )
        with self._lock:
            self._interpreter.set_tensor(spec_in.index, np.ascontiguousarray(sample))
            self._interpreter.invoke()
            return self._interpreter.get_tensor(spec_out.index)

    def bench(self, x: npt.ArrayLike, iters: int, *, warmup: int = 20) -> list[float]:
        """Time ``iters`` single-sample inferences, in microseconds.

        Samples are converted to the input tensor's dtype first, so the figure is the
        runtime's own cost (set input, invoke, read output) and comparable across float
        and integer models; :meth:`run`'s quantize/dequantize step is not included.

        Args:
            x: Float samples, ``(N, *input_shape[1:])``, cycled through as needed.
            iters: Timed runs; 0 returns an empty list.
            warmup: Untimed runs first, so caches and lazy allocations settle.

        Raises:
            BadInputError: ``x`` is empty or has the wrong shape.
        """
        if iters <= 0:
            return []
        batch = np.asarray(x, dtype=np.float32)
        spec_in = self._inputs[0]
        if len(batch) == 0 or batch.shape[1:] != spec_in.shape[1:]:
            raise BadInputError(
                f"bench needs samples of shape (N>=1, {', '.join(map(str, spec_in.shape[1:]))}),"
                f" got {batch.shape}"
            )
        feed = np.ascontiguousarray(_to_tensor(batch, spec_in))
        samples = [feed[i % len(feed)][None] for i in range(max(iters, warmup))]
        for sample in samples[:warmup]:
            self.run_raw(sample)
        latencies = []
        for sample in samples[:iters]:
            start = time.perf_counter_ns()
            self.run_raw(sample)
            latencies.append((time.perf_counter_ns() - start) / 1000.0)
        return latencies

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r}, model={str(self._model_path)!r})"


def _check_model_file(path: Path) -> None:
    """Refuse files that are missing or plainly not TFLite, with a clearer message."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ArtifactError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if len(head) < 8 or head[4:8] != _TFLITE_IDENTIFIER:
        raise ArtifactError(
            f"{path} is not a TFLite model (no {_TFLITE_IDENTIFIER.decode()} file identifier)"
        )


def _to_tensor(batch: npt.NDArray[np.float32], spec: TensorSpec) -> npt.NDArray[Any]:
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return batch.astype(dtype, copy=False)
    if dtype.kind in "iu" and spec.quantized:
        return quantize(batch, spec.scale, spec.zero_point, dtype)
    raise BadInputError(
        f"input tensor {spec.name!r} is {spec.dtype} without quantization parameters; "
        "run() cannot convert float input to it, use run_raw()"
    )
