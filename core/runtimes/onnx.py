"""The ``onnxruntime`` runtime: ONNX models on ONNX Runtime (the Jetson path).

A device of class ``jetson`` runs the release's ``onnx`` variant here. The execution
providers are probed, never required: TensorRT, then CUDA, then the CPU, in that order,
each used only when ``onnxruntime.get_available_providers()`` lists it (the
``onnxruntime-gpu`` builds for Jetson list the first two; the PyPI ``onnxruntime`` wheel
lists only the CPU). ONNX Runtime itself falls back to the CPU when a GPU provider fails
to start, so the provider a loaded model really runs on is read back from the session and
reported by :meth:`OnnxRuntime.describe` (``execution_provider``).
``EDGEFL_ONNX_PROVIDERS`` (comma-separated provider names) narrows the choice, e.g. to
``CPUExecutionProvider`` while a TensorRT setup is being diagnosed; naming one that is not
available is an error that lists those that are.

What was run where: on x86-64 with the CPU provider only. The TensorRT and CUDA providers
have never been exercised by edgefl's tests (there is no Jetson or NVIDIA GPU on the
machines they run on); their order and the fallback are the code above, not a measurement.

A model is loaded from a private copy alone in a fresh folder (mode 0700, removed once the
session is built), so a model that points at external data files cannot be loaded: ONNX
Runtime confines external data to the model's folder, which holds nothing else. An edgefl
artifact is one self-contained file whose sha256 covers everything that runs, and a model
must not read files beside it or, as ONNX Runtime does for a model given as bytes, in the
process's working directory (an agent's state folder holds its key). Like the
TFLite backends, a session runs one sample at a time (batch 1; the exported batch axis is
dynamic and reported as 1), serialised by a lock, with ``threads`` intra-op threads that do
not spin between samples.

Importing this module fails where ``onnxruntime`` is not installed; the registry takes
that as "unavailable".
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from edgefl.errors import ArtifactError, BadInputError, RuntimeUnavailableError

from ._registry import register_runtime
from .base import InterpreterLike, Runtime

__all__ = [
    "PROVIDERS_ENV",
    "PROVIDER_PREFERENCE",
    "OnnxRuntime",
    "choose_providers",
    "usable_providers",
]

PROVIDER_PREFERENCE: Final = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
"""Execution providers edgefl uses, most preferred first, each only when available."""
PROVIDERS_ENV: Final = "EDGEFL_ONNX_PROVIDERS"
"""Comma-separated provider names that narrow :data:`PROVIDER_PREFERENCE`."""

# ONNX Runtime's errors derive from Exception, not RuntimeError: catch them by name.
_ORT_ERRORS: Final = tuple(
    value
    for value in vars(_ort_state).values()
    if isinstance(value, type) and issubclass(value, Exception)
)

# ONNX element types (``NodeArg.type``) and the numpy dtypes runtimes speak.
_DTYPES: Final = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}

_TFLITE_IDENTIFIER = b"TFL3"


def choose_providers(available: Sequence[str], requested: Sequence[str] | None = None) -> list[str]:
    """The execution providers to ask for, in preference order.

    Args:
        available: What ``onnxruntime.get_available_providers()`` lists.
        requested: Names to narrow the choice to (``EDGEFL_ONNX_PROVIDERS``); None: all.

    Returns:
        The providers of :data:`PROVIDER_PREFERENCE` that are available (and requested).

    Raises:
        RuntimeUnavailableError: A requested provider is unknown or not available, or
            none of the preferred ones is available.
    """
    have = set(available)
    usable: list[str] = [p for p in PROVIDER_PREFERENCE if p in have]
    if requested:
        wrong = [p for p in requested if p not in usable]
        if wrong:
            raise RuntimeUnavailableError(
                f"{PROVIDERS_ENV} names execution providers that are not available here: "
                f"{', '.join(wrong)} (available: {', '.join(usable) or 'none'})",
                hint=f"available: {', '.join(usable) or 'none'}; unset {PROVIDERS_ENV} "
                "to use them in edgefl's order",
            )
        usable = [p for p in PROVIDER_PREFERENCE if p in requested]
    if not usable:
        raise RuntimeUnavailableError(
            "onnxruntime offers none of the execution providers edgefl uses "
            f"({', '.join(PROVIDER_PREFERENCE)}); it lists {', '.join(available) or 'none'}",
            hint="pip install 'edgefl[jetson]' (onnxruntime with its CPU provider)",
        )
    return usable


def usable_providers() -> list[str]:
    """The providers a session would ask for here, in order; empty when none is usable."""
    try:
        return choose_providers(ort.get_available_providers(), _requested_providers())
    except RuntimeUnavailableError:
        return []


def _requested_providers() -> list[str] | None:
    text = os.environ.get(PROVIDERS_ENV, "")
    names = [p.strip() for p in text.split(",") if p.strip()]
    return names or None


class _SessionInterpreter:
    """An ONNX Runtime session behind the TFLite interpreter interface the base class uses.

    Tensor "indices" are positions: 0 is the single input, and outputs are numbered
    after the inputs.
    """

    def __init__(self, model: str, threads: int, providers: Sequence[str]) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only; they are raised anyway
        # A device answers a sample at a time: no busy-waiting threads in between.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                model, sess_options=options, providers=list(providers)
            )
        except _ORT_ERRORS as exc:
            raise RuntimeError(str(exc).strip()) from exc
        self._inputs = self.session.get_inputs()
        self._outputs = self.session.get_outputs()
        self._feed: dict[str, npt.NDArray[Any]] = {}
        self._results: list[npt.NDArray[Any]] = []

    def allocate_tensors(self) -> None:
        """Nothing to allocate: the session did that."""

    @staticmethod
    def _details(args: Sequence[Any], first_index: int) -> list[dict[str, Any]]:
        details = []
        for offset, arg in enumerate(args):
            dtype = _DTYPES.get(str(arg.type))
            if dtype is None:
                raise ValueError(
                    f"tensor {arg.name!r} has type {arg.type}, which edgefl cannot feed"
                )
            shape = list(arg.shape)
            for axis, dim in enumerate(shape):
                if isinstance(dim, int) and dim > 0:
                    continue
                if axis != 0:
                    raise ValueError(
                        f"tensor {arg.name!r} has a dynamic axis {axis} ({dim!r}); only the "
                        "batch axis may be dynamic"
                    )
                shape[0] = 1  # the dynamic batch axis: edgefl runs one sample at a time
            details.append(
                {
                    "name": arg.name,
                    "index": first_index + offset,
                    "shape": shape,
                    "dtype": dtype,
                    "quantization": (0.0, 0),
                }
            )
        return details

    def get_input_details(self) -> list[dict[str, Any]]:
        """Describe the inputs, TFLite style."""
        return self._details(self._inputs, 0)

    def get_output_details(self) -> list[dict[str, Any]]:
        """Describe the outputs, TFLite style."""
        return self._details(self._outputs, len(self._inputs))

    def set_tensor(self, tensor_index: int, value: npt.NDArray[Any]) -> None:
        """Hold ``value`` as the input at ``tensor_index`` for the next :meth:`invoke`."""
        self._feed[self._inputs[tensor_index].name] = value

    def invoke(self) -> None:
        """Run the session on the inputs set."""
        try:
            self._results = self.session.run(None, self._feed)
        except _ORT_ERRORS as exc:
            raise RuntimeError(f"onnxruntime failed to run the model: {exc}") from exc

    def get_tensor(self, tensor_index: int) -> npt.NDArray[Any]:
        """The output at ``tensor_index`` from the last :meth:`invoke`."""
        return np.asarray(self._results[tensor_index - len(self._inputs)])


@register_runtime
class OnnxRuntime(Runtime):
    """Runs ``.onnx`` models with ``onnxruntime.InferenceSession`` (see the module docstring).

    ``delegates`` are a TFLite notion: ONNX Runtime's accelerators are execution
    providers, chosen by probing, so passing any is an error.
    """

    key = "onnxruntime"
    install_hint = "pip install 'edgefl[jetson]'"

    @classmethod
    def version(cls) -> str:
        """Return the installed ONNX Runtime version (``onnxruntime`` or a GPU build)."""
        for distribution in ("onnxruntime", "onnxruntime-gpu"):
            try:
                return metadata.version(distribution)
            except metadata.PackageNotFoundError:
                continue
        return str(ort.__version__)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Say why no model can run here, or ``None`` when a usable provider exists."""
        try:
            choose_providers(ort.get_available_providers(), _requested_providers())
        except RuntimeUnavailableError as exc:
            return exc.message
        return None

    @classmethod
    def _check_file(cls, path: Path) -> None:
        try:
            with path.open("rb") as fh:
                head = fh.read(8)
        except OSError as exc:
            raise ArtifactError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
        if not head:
            raise ArtifactError(f"{path} is empty, not an ONNX model")
        if head[4:8] == _TFLITE_IDENTIFIER:
            raise ArtifactError(
                f"{path} is a TFLite model; onnxruntime runs ONNX models",
                hint="install the release's onnx variant, or run this file on ai-edge-litert",
            )

    def _delegate_libraries(self, requested: Sequence[str]) -> list[str]:
        if requested:
            raise BadInputError(
                "onnxruntime takes no delegate libraries; its execution providers are "
                f"chosen by probing ({', '.join(PROVIDER_PREFERENCE)})",
                hint=f"narrow them with {PROVIDERS_ENV}",
            )
        return []

    def _load_delegate(self, library: str) -> object:
        raise BadInputError(f"onnxruntime cannot load delegate {library!r}")

    def _new_interpreter(
        self, model_path: str, threads: int, delegates: Sequence[object]
    ) -> InterpreterLike:
        providers = choose_providers(ort.get_available_providers(), _requested_providers())
        # Alone in an empty private folder: external data has nothing to point at.
        with tempfile.TemporaryDirectory(prefix="edgefl-onnx-") as folder:
            private = Path(folder) / "model.onnx"
            try:
                shutil.copyfile(model_path, private)
            except OSError as exc:
                raise ValueError(f"cannot copy the model: {exc.strerror or exc}") from exc
            self._session = _SessionInterpreter(str(private), threads, providers)
        self._requested = providers
        return self._session

    @property
    def execution_provider(self) -> str:
        """The provider the session runs on (the first it registered)."""
        return str(self._session.session.get_providers()[0])

    def details(self) -> dict[str, Any]:
        """The execution provider in use, the session's order and what was available."""
        return {
            "execution_provider": self.execution_provider,
            "execution_providers": list(self._session.session.get_providers()),
            "requested_providers": list(self._requested),
            "available_providers": list(ort.get_available_providers()),
        }
