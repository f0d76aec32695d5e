"""The ``edgetpu`` runtime: a TFLite interpreter with the Coral Edge TPU delegate.

Requirements, none of which this module can check before a device is attached:

* An Edge TPU-compiled model: run ``edgetpu_compiler`` on an integer-only model with
  int8 inputs and outputs (edgefl's ``int8`` recipe). Ops the compiler could not map
  stay on the CPU; an uncompiled model runs entirely on the CPU.
* The libedgetpu runtime library (``libedgetpu.so.1`` on Linux,
  ``libedgetpu.1.dylib`` on macOS, ``edgetpu.dll`` on Windows), see
  https://coral.ai/software/.
* A host interpreter package: ``ai-edge-litert`` is preferred, ``tflite-runtime`` is
  used when it is the only one installed.

There is no Edge TPU on the machines edgefl is developed and tested on, so this backend
is exercised only as far as reporting itself unavailable: :meth:`EdgeTpuRuntime.is_available`
returns ``False`` when the delegate library cannot be loaded, and creating the runtime
then raises :class:`edgefl.errors.RuntimeUnavailableError` with an installation hint.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Sequence
from importlib import metadata

from ._registry import register_runtime
from .base import InterpreterLike, Runtime

try:
    from ai_edge_litert import interpreter as _host

    _HOST_DISTRIBUTION = "ai-edge-litert"
except ImportError:
    # When neither package imports, this import error makes the module unavailable.
    from tflite_runtime import interpreter as _host

    _HOST_DISTRIBUTION = "tflite-runtime"

__all__ = ["EDGETPU_LIBRARY", "EdgeTpuRuntime"]

EDGETPU_LIBRARY: str = {
    "Linux": "libedgetpu.so.1",
    "Darwin": "libedgetpu.1.dylib",
    "Windows": "edgetpu.dll",
}.get(platform.system(), "libedgetpu.so.1")

_HINT = (
    f"install the Edge TPU runtime ({EDGETPU_LIBRARY}) from https://coral.ai/software/ "
    "and attach the device"
)


@register_runtime
class EdgeTpuRuntime(Runtime):
    """Runs Edge TPU-compiled ``.tflite`` models through the Edge TPU delegate.

    The Edge TPU delegate is loaded first; extra ``delegates`` follow it.
    """

    key = "edgetpu"
    install_hint = _HINT

    @classmethod
    def version(cls) -> str:
        """Return the version of the host interpreter package.

        libedgetpu is a system library without Python metadata.
        """
        return metadata.version(_HOST_DISTRIBUTION)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Say why the Edge TPU cannot be used, or ``None`` if its library loads."""
        # A plain dlopen: it does not claim the device, so probing is side-effect free.
        try:
            ctypes.CDLL(EDGETPU_LIBRARY)
        except OSError as exc:
            return f"{EDGETPU_LIBRARY} cannot be loaded: {exc}"
        return None

    def _delegate_libraries(self, requested: Sequence[str]) -> list[str]:
        return [EDGETPU_LIBRARY, *requested]

    def _load_delegate(self, library: str) -> object:
        return _host.load_delegate(library)

    def _new_interpreter(
        self, model_path: str, threads: int, delegates: Sequence[object]
    ) -> InterpreterLike:
        interpreter: InterpreterLike = _host.Interpreter(
            model_path=model_path, num_threads=threads, experimental_delegates=list(delegates)
        )
        return interpreter
